// The training-step benchmark: the trainer on random tokens for a preset (with --layers, --vocab-size), on one
// process or as every rank of a job (shardlm_launch / torchrun), printing from rank 0 one JSON line with the median
// step time, tokens/s per GPU, MFU (6N + attention FLOPs over 989 TFLOP/s, the peer's count; N the active
// parameters for Mixtral: the router and top-k experts), the forward/backward/optimizer split and peak memory.
// scripts/gpu.sh runs it next to the peer (HF transformers + FSDP2) in the same call. SHARDLM_PROFILE=DIR profiles
// two more steps (profile.hpp: a Chrome trace and where the GPU time went). Every recipe the policy flags name, and
// both models, are served by this one unit.
#include <shardlm/shardlm.hpp>

#include <execinfo.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <csignal>
#include <cstdlib>
#include <iostream>
#include <random>

#include "profile.hpp"

using namespace shardlm;

namespace {

/// The trainer of the options' model and recipe on random tokens: `warmup` steps, then --steps measured; the JSON
/// line.
nlohmann::json measure(const TrainOptions& o, int64_t warmup) {
  const auto config = train::resolve_config(o.model());
  const auto env = dist::LaunchEnv::from_environment();
  // Random tokens: enough distinct windows for every step of the run at this world size.
  // SHARDLM_PROFILE=DIR: two more steps after the measured ones, profiled (benchmarks/profile.hpp)
  const char* profile_dir = std::getenv("SHARDLM_PROFILE");
  const int64_t profiled = profile_dir && *profile_dir ? 2 : 0;
  const int64_t n = (o.steps() + warmup + profiled + 1) * o.micro_batch() * o.grad_accum() * env.world_size * o.seq_len() + 1;
  auto tokens = std::make_shared<std::vector<uint32_t>>(n);
  std::mt19937 rng(o.seed());
  for (auto& t : *tokens) t = rng() % static_cast<uint32_t>(config.vocab_size);
  const auto start = std::chrono::steady_clock::now();  // construction: initialize or load, quantize, shard
  train::TrainerCore trainer(o, data::TokenDataset::from_tokens(tokens, "random tokens"), nullptr, o.recipe(),
                             train::model_factory_for(config));
  const double setup_s = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  // Offloaded: the host's memory bandwidth as the host optimizer's threads see it (STREAM's triad), to set its
  // AdamW's bytes per second against.
  const double triad = trainer.recipe().offload.host ? optim::host_triad_bytes_per_s() : 0;
  std::vector<train::StepMetrics> steps;
  std::vector<double> losses;  // every step's, warm-up included: the run trains
  for (int64_t s = 0; s < warmup + o.steps(); ++s) {
    auto m = trainer.step();
    losses.push_back(m.loss);
    if (s >= warmup) steps.push_back(m);
  }
  if (profiled > 0) {
    bench::StepProfile profile;
    for (int64_t s = 0; s < profiled; ++s) trainer.step();
    profile.finish(profile_dir, trainer.rank() == 0, profiled);
  }
  auto median = [&](auto field) {
    std::vector<double> v;
    for (const auto& m : steps) v.push_back(m.*field);
    std::sort(v.begin(), v.end());
    return v[v.size() / 2];
  };
  using M = train::StepMetrics;
  const double step_s = median(&M::step_s);
  const double tps = static_cast<double>(o.micro_batch() * o.grad_accum() * o.seq_len()) / step_s;  // per rank
  const double peak = o.log().peak_tflops() > 0 ? o.log().peak_tflops() * 1e12 : 989e12;
  const auto plan = trainer.memory_plan();
  const auto& r = trainer.recipe();
  double alloc = 0, reserved = 0;
  for (const auto& m : steps) alloc = std::max(alloc, m.mem_alloc_gb), reserved = std::max(reserved, m.mem_reserved_gb);
  nlohmann::json out = {{"impl", "shardlm"}, {"preset", o.model().preset()}, {"layers", config.num_layers}, {"seq", o.seq_len()},
          {"batch", o.micro_batch()}, {"world", trainer.groups().size()}, {"sharding", std::string(r.sharding.name)},
          {"checkpointing", r.checkpointing.name()}, {"precision", std::string(r.precision.name)},
          {"reduce_dtype", reduce_dtype_name(r.precision.reduce)}, {"offload", std::string(r.offload.name)}, {"device", o.dist().device()},
          {"params", config.num_params()}, {"vocab", config.vocab_size}, {"step_s", step_s},
          {"fwd_bwd_opt_s", {median(&M::forward_s), median(&M::backward_s), median(&M::optimizer_s)}},
          {"tokens_per_s_per_gpu", tps}, {"mfu", tps * config.flops_per_token(o.seq_len()) / peak},
          {"peak_alloc_gb", alloc}, {"peak_reserved_gb", reserved}, {"plan_gb", plan.gpu_peak() / plan.gib},
          {"plan_peak_at", plan.peak_at}, {"plan_host_gb", plan.host_total() / plan.gib}, {"loss", steps.back().loss},
          {"losses", losses},
          {"aux_loss", steps.back().aux_loss < 0 ? nlohmann::json() : nlohmann::json(steps.back().aux_loss)},
          {"expert_kernel", o.model().moe_kernel()}, {"block_kernels", o.model().block_kernels()},
          {"expert_parallel", o.dist().expert_parallel()},
          {"adapter", std::string(r.adapter.name)}, {"lora_rank", trainer.adapter().active() ? trainer.adapter().rank : 0},
          {"quant", std::string(r.quant.name)}, {"setup_s", setup_s}, {"rank", trainer.rank()}};
  if (r.offload.host) {
    out["offload_step"] = engine::host_step_name(trainer.offload_step());
    out["host_triad_gbs"] = triad / 1e9;
    out["host_step_s"] = median(&M::host_step_s);
    out["host_adamw_gbs"] = median(&M::host_step_gbs);
    out["host_threads"] = at::get_num_threads();
    int64_t redone = 0;
    for (const auto& m : steps) redone += m.host_step_redone ? 1 : 0;
    out["host_steps_redone"] = redone;
  }
  return out;
}

}  // namespace

/// A crash on a machine without a debugger: the frames (binary+offset, for addr2line) on stderr, then the signal.
void print_frames_on_crash() {
  for (int sig : {SIGSEGV, SIGBUS, SIGFPE, SIGILL}) {
    std::signal(sig, [](int s) {
      void* frames[64];
      const int n = backtrace(frames, 64);
      const char head[] = "step_benchmark: crashed; frames:\n";
      (void)!write(STDERR_FILENO, head, sizeof head - 1);
      backtrace_symbols_fd(frames, n, STDERR_FILENO);
      std::signal(s, SIG_DFL);
      std::raise(s);
    });
  }
}

int main(int argc, char** argv) {
  print_frames_on_crash();
  return guarded_main("step_benchmark", [&] {
    auto defaults = TrainOptions()
                        .seq_len(4096)
                        .micro_batch(2)
                        .steps(10)
                        .model(ModelOptions().preset("llama3-8b").layers(4))
                        .optim(optim::AdamWOptions().lr(1e-5))
                        .dist(DistOptions().device("cuda"))
                        .policy(PolicyOptions().precision("mixed-bf16"))
                        .data(DataOptions().builtin_text("unused: the benchmark draws random tokens"));
    const int64_t warmup = 3;  // steps not measured (fewer when --steps is smaller)
    const auto o = cli::parse(argc, argv, defaults, /*policy_flags=*/true);
    const auto r = measure(o, std::min(warmup, o.steps()));
    if (r["rank"] == 0) std::cout << r.dump() << std::endl;
    return 0;
  });
}
