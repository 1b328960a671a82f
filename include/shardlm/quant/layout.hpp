#pragma once
// The byte sizes of the quantized row layouts (docs/quantization.md), torch-free: the quantization code
// (quant/int4.hpp, quant/fp8.hpp) and the memory planner (train/memory_plan.hpp) both count with them.
#include <cstdint>
#include <string_view>

#include "shardlm/core/errors.hpp"

namespace shardlm::quant {

namespace int4 {
inline constexpr int64_t group = 64;
/// Bytes of one row: C/2 packed codes, then G bf16 low ends, then G bf16 high ends, padded to 16 bytes so that
/// every row of a buffer starts 16-byte aligned (vector loads in the CUDA kernel).
inline int64_t row_bytes(int64_t cols) { return (cols / 2 + 4 * (cols / group) + 15) / 16 * 16; }
}  // namespace int4

namespace fp8 {
/// Bytes of one row: C e4m3 codes, the row's fp32 scale, padded to 16 bytes (rows start 16-byte aligned).
inline int64_t row_bytes(int64_t cols) { return (cols + 4 + 15) / 16 * 16; }
}  // namespace fp8

/// Fails with an error naming --quant unless `policy` names a quantization policy (none, int4, fp8).
inline void check_policy(std::string_view policy) {
  if (policy != "none" && policy != "int4" && policy != "fp8")
    fail<ConfigError>("--quant '", policy, "' is not a quantization policy: use none, int4 or fp8");
}

/// The bytes of a row of `cols` values stored by the policy named `policy` (none: bf16 values).
inline int64_t row_bytes(std::string_view policy, int64_t cols) {
  check_policy(policy);
  return policy == "int4" ? int4::row_bytes(cols) : policy == "fp8" ? fp8::row_bytes(cols) : 2 * cols;
}

}  // namespace shardlm::quant
