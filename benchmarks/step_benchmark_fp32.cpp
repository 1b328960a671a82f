// The step benchmark's recipes of --precision fp32 (see step_benchmark_recipes.hpp).
#include "step_benchmark_recipes.hpp"

template nlohmann::json shardlm::benchmarks::measure_recipes_of<shardlm::precision::FP32>(const shardlm::TrainOptions&, int64_t);
