// The step benchmark's recipes of --precision mixed-bf16 (see step_benchmark_recipes.hpp).
#include "step_benchmark_recipes.hpp"

template nlohmann::json shardlm::benchmarks::measure_recipes_of<shardlm::precision::MixedBF16>(const shardlm::TrainOptions&, int64_t);
