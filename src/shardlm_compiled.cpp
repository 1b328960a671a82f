// shardlm::compiled: the entry points that depend on no policy and no program, compiled once (core/compiled.hpp).
// A program linking this library declares them `extern template` (SHARDLM_COMPILED) and compiles only its own code.
#define SHARDLM_COMPILING 1
#include <shardlm/shardlm.hpp>

namespace shardlm {
template TrainOptions cli::parse_once<void>(int, const char* const*, TrainOptions, bool, const cli::ExtraFlags&);
template int train::run_once<void>(const TrainOptions&, const RecipeRules&, const train::ModelFactory&, train::Faults);
template class train::BasicTrainer<void>;
template train::ModelFactory train::model_factory<model::Llama3>();
template train::ModelFactory train::model_factory<model::Mixtral>();
}  // namespace shardlm
