#pragma once
// Run-time choice of a compiled policy: calls f(Tag{}) with the tag whose name matches a flag's value.
#include <string_view>

#include "shardlm/core/errors.hpp"
#include "shardlm/policy/policies.hpp"

namespace shardlm {

template <class F>
decltype(auto) dispatch_precision(std::string_view name, F&& f) {
  if (name == precision::FP32::name) return f(precision::FP32{});
  if (name == precision::MixedBF16::name) return f(precision::MixedBF16{});
  if (name == precision::PureBF16::name) return f(precision::PureBF16{});
  fail<ConfigError>("--precision '", name, "' is not a precision policy: use fp32, mixed-bf16 or pure-bf16");
}

template <class F>
decltype(auto) dispatch_sharding(std::string_view name, F&& f) {
  if (name == sharding::NoShard::name) return f(sharding::NoShard{});
  if (name == sharding::ShardGradOp::name) return f(sharding::ShardGradOp{});
  if (name == sharding::FullShard::name) return f(sharding::FullShard{});
  if (name == sharding::HybridShard::name) return f(sharding::HybridShard{});
  fail<ConfigError>("--sharding '", name, "' is not a sharding policy: use none, grad-op, full or hybrid");
}

/// The compiled checkpointing policies: none, every-block, every-2 (EveryNth<2>).
template <class F>
decltype(auto) dispatch_checkpointing(std::string_view name, F&& f) {
  if (name == checkpointing::None::name) return f(checkpointing::None{});
  if (name == checkpointing::EveryBlock::name) return f(checkpointing::EveryBlock{});
  if (name == checkpointing::EveryNth<2>::name) return f(checkpointing::EveryNth<2>{});
  fail<ConfigError>("--checkpointing '", name, "' is not a compiled checkpointing policy: use none, every-block or every-2");
}

template <class F>
decltype(auto) dispatch_offload(std::string_view name, F&& f) {
  if (name == offload::None::name) return f(offload::None{});
  if (name == offload::Cpu::name) return f(offload::Cpu{});
  fail<ConfigError>("--offload '", name, "' is not an offload policy: use none or cpu");
}

/// Calls f(Policies<...>{}) for the recipe of precision P that the other policy flags name; a combination the engine
/// refuses is a ConfigError with the engine's static_assert message. A program that compiles each precision in a
/// translation unit of its own calls this there (tools/shardlm_train_recipes.hpp).
template <class P, class F>
decltype(auto) dispatch_recipe_of(std::string_view sharding, std::string_view checkpointing, std::string_view offload,
                                  F&& f) {
  return dispatch_sharding(sharding, [&]<class S>(S) {
    return dispatch_checkpointing(checkpointing, [&]<class C>(C) {
      return dispatch_offload(offload, [&]<class O>(O) {
        using Recipe = Policies<S, P, C, O>;
        if constexpr (engine_supports<Recipe>) {
          return f(Recipe{});
        } else {
          fail<ConfigError>("--offload ", offload, " with --sharding ", sharding, ": ", SHARDLM_OFFLOAD_NEEDS_SHARDING);
          return f(Policies<S, P, C>{});  // not reached; gives every branch the same return type
        }
      });
    });
  });
}

/// Calls f(Policies<...>{}) for the recipe the policy flags name (see dispatch_recipe_of).
template <class F>
decltype(auto) dispatch_recipe(std::string_view sharding, std::string_view precision, std::string_view checkpointing,
                               std::string_view offload, F&& f) {
  return dispatch_precision(precision, [&]<class P>(P) { return dispatch_recipe_of<P>(sharding, checkpointing, offload, f); });
}

}  // namespace shardlm
