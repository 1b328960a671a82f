// shardlm_train: the policy-matrix program. Picks the policies from flags (--sharding, --precision, --checkpointing,
// --offload; --adapter lora|dora and --quant int4|fp8: docs/adapters.md) and trains with the common trainer flags
// (--help lists them all), on one process or as one rank of a job started by shardlm_launch, torchrun or srun. The
// model is Llama 3 or Mixtral, by the preset or config.json's model_type. The flags map onto
// the tags' rules (policy/dispatch.hpp); the trainer below the policy boundary is compiled once, so every recipe
// costs this program nothing more (docs/architecture.md).
//
// Injected faults for tests (read here, in the program: the library takes them as train::Faults):
//   SHARDLM_INJECT_NAN_STEPS=3,5      the backward of those (1-based) steps is NaN
//   SHARDLM_INJECT_HANG=S             rank 1 stops before the collectives of step S
//   SHARDLM_INJECT_SAVE_DELAY_MS=N    every rank waits N ms after writing its checkpoint shard, before the commit
#include <shardlm/shardlm.hpp>

#include <cstdlib>
#include <sstream>

using namespace shardlm;

namespace {
train::Faults faults_from_environment() {
  train::Faults f;
  auto number = [](const char* name, const std::string& text) {
    try {
      size_t used = 0;
      const long long v = std::stoll(text, &used);
      if (used == text.size()) return static_cast<int64_t>(v);
    } catch (const std::exception&) {
    }
    fail<ConfigError>(name, "='", text, "' is not an integer");
  };
  if (const char* steps = std::getenv("SHARDLM_INJECT_NAN_STEPS")) {
    std::stringstream in(steps);
    for (std::string item; std::getline(in, item, ',');)
      if (!item.empty()) f.nan_steps.insert(number("SHARDLM_INJECT_NAN_STEPS", item));
  }
  if (const char* step = std::getenv("SHARDLM_INJECT_HANG")) f.hang_step = number("SHARDLM_INJECT_HANG", step);
  if (const char* ms = std::getenv("SHARDLM_INJECT_SAVE_DELAY_MS"))
    f.save_delay = std::chrono::milliseconds(number("SHARDLM_INJECT_SAVE_DELAY_MS", ms));
  return f;
}
}  // namespace

int main(int argc, char** argv) {
  return guarded_main("shardlm_train", [&] {
    const auto o = cli::parse(argc, argv, TrainOptions{}, /*policy_flags=*/true);
    return run_trainer(o, faults_from_environment());
  });
}
