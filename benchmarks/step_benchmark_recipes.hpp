#pragma once
// The step benchmark's recipes of one precision: each precision's 21 recipes x 2 models are instantiated in a
// translation unit of their own (step_benchmark_<precision>.cpp), as shardlm_train's are; the extern declarations
// keep them out of main's unit.
#include <shardlm/shardlm.hpp>

#include <algorithm>
#include <chrono>
#include <cstdlib>
#include <random>

#include "profile.hpp"

namespace shardlm::benchmarks {

/// The trainer of `Model` and `Recipe` on random tokens: `warmup` steps, then --steps measured; the JSON line.
template <class Model, class Recipe>
nlohmann::json measure(const TrainOptions& o, int64_t warmup) {
  const auto config = train::resolve_config(o);
  const auto env = dist::LaunchEnv::from_environment();
  // Random tokens: enough distinct windows for every step of the run at this world size.
  // SHARDLM_PROFILE=DIR: two more steps after the measured ones, profiled (benchmarks/profile.hpp)
  const char* profile_dir = std::getenv("SHARDLM_PROFILE");
  const int64_t profiled = profile_dir && *profile_dir ? 2 : 0;
  const int64_t n = (o.steps + warmup + profiled + 1) * o.micro_batch * o.grad_accum * env.world_size * o.seq_len + 1;
  auto tokens = std::make_shared<std::vector<uint32_t>>(n);
  std::mt19937 rng(o.seed);
  for (auto& t : *tokens) t = rng() % static_cast<uint32_t>(config.vocab_size);
  const auto start = std::chrono::steady_clock::now();  // construction: initialize or load, quantize, shard
  train::Trainer<Model, Recipe> trainer(o, data::TokenDataset::from_tokens(tokens, "random tokens"));
  const double setup_s = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  std::vector<train::StepMetrics> steps;
  std::vector<double> losses;  // every step's, warm-up included: the run trains
  for (int64_t s = 0; s < warmup + o.steps; ++s) {
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
  const double tps = static_cast<double>(o.micro_batch * o.grad_accum * o.seq_len) / step_s;  // per rank
  const double peak = o.peak_tflops > 0 ? o.peak_tflops * 1e12 : 989e12;
  const auto plan = trainer.memory_plan();
  double alloc = 0, reserved = 0;
  for (const auto& m : steps) alloc = std::max(alloc, m.mem_alloc_gb), reserved = std::max(reserved, m.mem_reserved_gb);
  return {{"impl", "shardlm"}, {"preset", o.preset}, {"layers", config.num_layers}, {"seq", o.seq_len},
          {"batch", o.micro_batch}, {"world", trainer.groups().size()}, {"sharding", Recipe::Sharding::name},
          {"checkpointing", Recipe::Checkpointing::name}, {"precision", Recipe::Precision::name}, {"device", o.device},
          {"params", config.num_params()}, {"vocab", config.vocab_size}, {"step_s", step_s},
          {"fwd_bwd_opt_s", {median(&M::forward_s), median(&M::backward_s), median(&M::optimizer_s)}},
          {"tokens_per_s_per_gpu", tps}, {"mfu", tps * config.flops_per_token(o.seq_len) / peak},
          {"peak_alloc_gb", alloc}, {"peak_reserved_gb", reserved}, {"plan_gb", plan.gpu_peak() / plan.gib},
          {"plan_peak_at", plan.peak_at}, {"plan_host_gb", plan.host_total() / plan.gib}, {"loss", steps.back().loss},
          {"losses", losses},
          {"aux_loss", steps.back().aux_loss < 0 ? nlohmann::json() : nlohmann::json(steps.back().aux_loss)},
          {"expert_kernel", std::getenv("SHARDLM_MOE_KERNEL") ? std::getenv("SHARDLM_MOE_KERNEL") : "auto"},
          {"adapter", trainer.adapter().kind}, {"lora_rank", trainer.adapter().active() ? trainer.adapter().rank : 0},
          {"quant", trainer.quant()}, {"setup_s", setup_s}, {"rank", trainer.rank()}};
}

/// measure() with the model of the options and the recipe of precision P that the other policy flags name.
template <class P>
nlohmann::json measure_recipes_of(const TrainOptions& o, int64_t warmup) {
  return dispatch_recipe_of<P>(o.sharding, o.checkpointing, o.offload, [&]<class Recipe>(Recipe) {
    return with_model(train::resolve_config(o), [&]<class Model>(Model) { return measure<Model, Recipe>(o, warmup); });
  });
}

extern template nlohmann::json measure_recipes_of<precision::FP32>(const TrainOptions&, int64_t);
extern template nlohmann::json measure_recipes_of<precision::MixedBF16>(const TrainOptions&, int64_t);
extern template nlohmann::json measure_recipes_of<precision::PureBF16>(const TrainOptions&, int64_t);

}  // namespace shardlm::benchmarks
