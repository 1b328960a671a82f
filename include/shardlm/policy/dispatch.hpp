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

}  // namespace shardlm
