// A one-recipe trainer against an installed shardlm: a few CPU steps of the tiny Llama on a sentence. Conan's test
// package; also the trainer of tests/consumer (the CMake package) and of the vcpkg port's test (tests/packaging).
#include <shardlm/shardlm.hpp>

using namespace shardlm;
using Recipe = Policies<sharding::FullShard, checkpointing::EveryBlock, precision::MixedBF16>;

int main(int argc, char** argv) {
  return guarded_main("consumer_trainer", [&] {
    const auto defaults = TrainOptions().data(DataOptions().builtin_text(
        "a consumer project trains shardlm's tiny Llama on this sentence, over and over; "
        "a consumer project trains shardlm's tiny Llama on this sentence, over and over."));
    return run_trainer<model::Llama3, Recipe>(cli::parse(argc, argv, defaults));
  });
}
