// The training-step benchmark: the trainer on random tokens for a preset (with --layers, --vocab-size), on one
// process or as every rank of a job (shardlm_launch / torchrun), printing from rank 0 one JSON line with the median
// step time, tokens/s per GPU, MFU (6N + attention FLOPs over 989 TFLOP/s, the peer's count; N the active
// parameters for Mixtral: the router and top-k experts), the
// forward/backward/optimizer split and peak memory. scripts/gpu.sh runs it next to the peer (HF transformers +
// FSDP2) in the same call. SHARDLM_PROFILE=DIR profiles two more steps (profile.hpp: a Chrome trace and where the
// GPU time went). The recipes are compiled in a unit per precision (step_benchmark_recipes.hpp).
#include <algorithm>
#include <iostream>

#include "step_benchmark_recipes.hpp"

using namespace shardlm;

int main(int argc, char** argv) {
  return guarded_main("step_benchmark", [&] {
    TrainOptions defaults;
    defaults.preset = "llama3-8b";
    defaults.layers = 4;
    defaults.seq_len = 4096;
    defaults.micro_batch = 2;
    defaults.steps = 10;
    defaults.lr = 1e-5;
    defaults.device = "cuda";
    defaults.precision = "mixed-bf16";
    defaults.builtin_text = "unused: the benchmark draws random tokens";
    const int64_t warmup = 3;  // steps not measured (fewer when --steps is smaller)
    const auto o = cli::parse(argc, argv, defaults, /*policy_flags=*/true);
    const auto r = dispatch_precision(o.precision, [&]<class P>(P) {
      return benchmarks::measure_recipes_of<P>(o, std::min(warmup, o.steps));
    });
    if (r["rank"] == 0) std::cout << r.dump() << std::endl;
    return 0;
  });
}
