#pragma once
// FP8: e4m3 (the "fn" variant: no infinities, largest finite 448) with one power-of-two fp32 scale per row. Batched
// ATen ops (CPU and GPU). Layout and error figures: docs/quantization.md; the tag is in quant/policies.hpp.
//
// R = rows, C = cols.
#include <ATen/ATen.h>

#include <cstdint>

#include "shardlm/quant/layout.hpp"  // row_bytes

namespace shardlm::quant::fp8 {

/// The largest finite e4m3fn value; ATen's conversion turns anything from 464 up (and infinities) into NaN, so
/// values are clamped to +-448 first.
inline constexpr float max_value = 448.0f;


/// The scales of groups whose largest magnitudes are `amax` (fp32, any shape): the smallest power of two s with
/// amax / s <= 448 (1 where amax is 0). The row scales below; the float8 training linears take their own groups'
/// (model/fp8_linear.hpp).
inline at::Tensor scales_of_amax(const at::Tensor& amax) {
  auto s = at::exp2(at::ceil(at::log2(amax / max_value)));
  // log2 and exp2 round: correct by one binade either way (divisions by powers of two are exact).
  s = at::where(amax / s > max_value, s * 2, s);
  s = at::where(amax / (s * 0.5f) <= max_value, s * 0.5f, s);
  return at::where(amax > 0, s, at::ones_like(s));
}

/// The row scales: the smallest power of two s with max|w| / s <= 448 (1 for an all-zero row). A power of two makes
/// code x scale exact in bf16 (e4m3 has 4 significant bits), so dequantized values re-quantize to themselves: the
/// largest code then lies in [224, 448], and a row whose largest code is exactly 224 re-quantizes with s / 2 and
/// doubled codes, the same values. It costs nothing measurable in error (docs/quantization.md).
inline at::Tensor scales(const at::Tensor& w) {  // [R, C] fp32 -> [R, 1] fp32
  return scales_of_amax(w.abs().amax(1, true));
}

/// Quantizes w [R, C] (any floating dtype and device, finite) into out (uint8 [R x row_bytes(C)], same device).
inline void quantize_rows(const at::Tensor& w, const at::Tensor& out) {
  const int64_t rows = w.size(0), cols = w.size(1), rb = row_bytes(cols);
  const auto out2 = out.view({rows, rb});
  const auto x = w.to(at::kFloat);
  const auto s = scales(x);                                                                  // [R, 1]
  const auto codes = (x / s).clamp(-max_value, max_value).to(at::kFloat8_e4m3fn).contiguous();  // [R, C]
  out2.narrow(1, 0, cols).copy_(codes.view(at::kByte));
  out2.narrow(1, cols, 4).copy_(s.contiguous().view(at::kByte).view({rows, 4}));
  out2.narrow(1, cols + 4, rb - cols - 4).zero_();
}

/// Dequantizes in (uint8 [R x row_bytes(C)]) into out (bf16 [R, C], same device) with ATen ops: value = code x scale
/// in fp32, rounded to bf16. The CPU path and the reference of the CUDA kernel.
inline void dequantize_rows(const at::Tensor& in, int64_t cols, const at::Tensor& out) {
  const int64_t rows = out.size(0), rb = row_bytes(cols);
  const auto in2 = in.view({rows, rb});
  const auto codes = in2.narrow(1, 0, cols).contiguous().view(at::kFloat8_e4m3fn).to(at::kFloat);  // [R, C]
  const auto s = in2.narrow(1, cols, 4).contiguous().view(at::kFloat);                               // [R, 1]
  out.copy_((codes * s).to(at::kBFloat16));
}

}  // namespace shardlm::quant::fp8
