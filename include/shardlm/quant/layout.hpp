#pragma once
// The quantization policies' rules (quant::Rules: bytes per row of the row-interleaved layouts, docs/quantization.md),
// torch-free: the tags (quant/policies.hpp), the frozen base's storage (train/frozen_base.hpp) and the memory planner
// (train/memory_plan.hpp) all count with them.
#include <cstdint>
#include <string_view>

#include "shardlm/core/errors.hpp"

namespace shardlm::quant {

namespace int4 {
inline constexpr int64_t group = 64;
/// Bytes of one row: C/2 packed codes, then G bf16 low ends, then G bf16 high ends, padded to 16 bytes so that
/// every row of a buffer starts 16-byte aligned (vector loads in the CUDA kernel).
constexpr int64_t row_bytes(int64_t cols) { return (cols / 2 + 4 * (cols / group) + 15) / 16 * 16; }
}  // namespace int4

namespace fp8 {
/// Bytes of one row: C e4m3 codes, the row's fp32 scale, padded to 16 bytes (rows start 16-byte aligned).
constexpr int64_t row_bytes(int64_t cols) { return (cols + 4 + 15) / 16 * 16; }
}  // namespace fp8

namespace plain {
/// The weight kept in bf16: 2 bytes per value.
constexpr int64_t row_bytes(int64_t cols) { return 2 * cols; }
}  // namespace plain

/// What a quantization policy of the frozen base decides: whether the blocks' projections are stored quantized, and in
/// how many bytes per row (the unquantized base keeps the compute dtype: row_bytes is then its bf16 size).
struct Rules {
  std::string_view name;
  bool quantized;
  int64_t (*row_bytes)(int64_t cols);
  int64_t group = 1;  ///< a row's length must be a multiple of this (int4's groups)
};
inline constexpr Rules no_quant_rules{"none", false, &plain::row_bytes};
inline constexpr Rules int4_rules{"int4", true, &int4::row_bytes, int4::group};
inline constexpr Rules fp8_rules{"fp8", true, &fp8::row_bytes};

/// The rules of the policy --quant names (none, int4, fp8); an error naming the flag for any other value.
inline const Rules& rules_named(std::string_view name) {
  for (const Rules* r : {&no_quant_rules, &int4_rules, &fp8_rules})
    if (r->name == name) return *r;
  fail<ConfigError>("--quant '", name, "' is not a quantization policy: use none, int4 or fp8");
}

}  // namespace shardlm::quant
