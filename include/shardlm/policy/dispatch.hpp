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

/// none or every-block (the step benchmark; shardlm_train gains --checkpointing with the memory planner).
template <class F>
decltype(auto) dispatch_checkpointing(std::string_view name, F&& f) {
  if (name == checkpointing::None::name) return f(checkpointing::None{});
  if (name == checkpointing::EveryBlock::name) return f(checkpointing::EveryBlock{});
  fail<ConfigError>("--checkpointing '", name, "' is not available here: use none or every-block");
}

}  // namespace shardlm
