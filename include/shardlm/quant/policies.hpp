#pragma once
// The quantization policies of frozen base weights: NoQuant, Int4, FP8 (docs/quantization.md). Each tag gives a
// ROW-INTERLEAVED, self-contained byte layout of a weight [rows, cols]: row i occupies bytes
// [i x row_bytes(cols), (i + 1) x row_bytes(cols)) and holds everything needed to dequantize it. So the engine can
// keep quantized weights as flat byte buffers: a rank quantizes only the rows of its byte range while reading them
// from safetensors, shards and all-gathers plain bytes, and dequantizes a gathered buffer weight by weight.
//
//   quantize_rows(w [r, cols] fp32/bf16/fp16, any device, out uint8 [r x row_bytes(cols)], same device)
//   dequantize_rows(in uint8 [r x row_bytes(cols)], cols, out bf16 [r, cols], same device)   CUDA: a kernel
//
// Rows are independent: quantizing rows a..b of w gives bytes a..b x row_bytes of quantizing all of w.
#include <ATen/ATen.h>

#include <cstdint>
#include <string_view>

#include "shardlm/core/dtype.hpp"
#include "shardlm/core/errors.hpp"
#include "shardlm/quant/fp8.hpp"
#include "shardlm/quant/int4.hpp"
#include "shardlm/quant/kernels.hpp"

namespace shardlm::quant {

namespace detail {

inline void check_quantize(std::string_view policy, const at::Tensor& w, const at::Tensor& out, int64_t row_bytes,
                           std::string_view what) {
  if (w.dim() != 2) fail<Error>(policy, " quantization of ", what, ": expected a matrix [rows, cols], got ", w.dim(), " dimensions");
  if (!at::isFloatingType(w.scalar_type()) || w.element_size() < 2)
    fail<Error>(policy, " quantization of ", what, ": expected fp32, bf16 or fp16 values, got ", dtype_name(w.scalar_type()));
  if (out.scalar_type() != at::kByte || !out.is_contiguous())
    fail<Error>(policy, " quantization of ", what, ": the output must be a contiguous uint8 buffer, got ",
                dtype_name(out.scalar_type()), out.is_contiguous() ? "" : " (not contiguous)");
  if (out.device() != w.device())
    fail<Error>(policy, " quantization of ", what, ": the output is on ", out.device().str(), ", the weight on ", w.device().str());
  if (out.numel() != w.size(0) * row_bytes)
    fail<Error>(policy, " quantization of ", what, ": the output holds ", out.numel(), " bytes, ", w.size(0), " rows of ",
                w.size(1), " columns need ", w.size(0) * row_bytes, " (", row_bytes, " per row)");
  if (w.numel() > 0 && policy != "none" && !at::isfinite(w).all().item<bool>())
    fail<Error>(policy, " quantization of ", what, ": the weight holds non-finite values (inf or NaN)");
}

inline void check_dequantize(std::string_view policy, const at::Tensor& in, int64_t cols, const at::Tensor& out,
                             int64_t row_bytes, std::string_view what) {
  if (out.dim() != 2 || out.size(1) != cols)
    fail<Error>(policy, " dequantization of ", what, ": the output must be a matrix [rows, ", cols, "], got ", out.sizes());
  if (out.scalar_type() != at::kBFloat16 || !out.is_contiguous())
    fail<Error>(policy, " dequantization of ", what, ": the output must be contiguous bf16, got ", dtype_name(out.scalar_type()),
                out.is_contiguous() ? "" : " (not contiguous)");
  if (in.scalar_type() != at::kByte || !in.is_contiguous())
    fail<Error>(policy, " dequantization of ", what, ": the input must be a contiguous uint8 buffer, got ",
                dtype_name(in.scalar_type()), in.is_contiguous() ? "" : " (not contiguous)");
  if (in.device() != out.device())
    fail<Error>(policy, " dequantization of ", what, ": the input is on ", in.device().str(), ", the output on ", out.device().str());
  if (in.numel() != out.size(0) * row_bytes)
    fail<Error>(policy, " dequantization of ", what, ": the input holds ", in.numel(), " bytes, ", out.size(0), " rows of ",
                cols, " columns need ", out.size(0) * row_bytes, " (", row_bytes, " per row)");
}

inline void check_group(std::string_view policy, int64_t cols, int64_t group, std::string_view what) {
  if (cols % group != 0)
    fail<ConfigError>(policy, " quantizes groups of ", group, " values along a row: ", what, " has ", cols,
                      " columns, not a multiple of ", group, " (keep this weight unquantized with NoQuant)");
}

}  // namespace detail

/// The weight kept in bf16: 2 bytes per value, no scale (a bf16 copy, not a transformation).
struct NoQuant {
  static constexpr const Rules& rules = no_quant_rules;
  static constexpr std::string_view name = rules.name;
  static constexpr bool quantized = rules.quantized;
  static int64_t row_bytes(int64_t cols) { return rules.row_bytes(cols); }
  static void quantize_rows(const at::Tensor& w, const at::Tensor& out, std::string_view what = "weight") {
    detail::check_quantize(name, w, out, w.dim() == 2 ? row_bytes(w.size(1)) : 0, what);
    out.view(at::kBFloat16).view(w.sizes()).copy_(w);
  }
  static void dequantize_rows(const at::Tensor& in, int64_t cols, const at::Tensor& out, std::string_view what = "weight") {
    detail::check_dequantize(name, in, cols, out, row_bytes(cols), what);
    out.copy_(in.view(at::kBFloat16).view(out.sizes()));
  }
};

/// Group-wise asymmetric 4-bit (groups of 64 along a row, a fitted grid per group: HQQ-style half-quadratic
/// iterations). Row: cols/2 bytes of packed codes (value 2j in the low nibble of byte j), cols/64 bf16 low ends,
/// cols/64 bf16 high ends of the grids, padded to 16 bytes: 4.5 bits per value.
struct Int4 {
  static constexpr const Rules& rules = int4_rules;
  static constexpr std::string_view name = rules.name;
  static constexpr bool quantized = rules.quantized;
  static constexpr int64_t group = rules.group;
  static int64_t row_bytes(int64_t cols) { return rules.row_bytes(cols); }
  static void quantize_rows(const at::Tensor& w, const at::Tensor& out, std::string_view what = "weight",
                            const int4::FitOptions& options = {}) {
    if (w.dim() == 2) detail::check_group(name, w.size(1), group, what);
    detail::check_quantize(name, w, out, w.dim() == 2 ? row_bytes(w.size(1)) : 0, what);
    int4::quantize_rows(w, out, options);
  }
  static void dequantize_rows(const at::Tensor& in, int64_t cols, const at::Tensor& out, std::string_view what = "weight") {
    detail::check_group(name, cols, group, what);
    detail::check_dequantize(name, in, cols, out, row_bytes(cols), what);
    if (in.is_cuda() && kernels::dequantize(kernels::Kind::Int4, in, out.size(0), cols, row_bytes(cols), out)) return;
    int4::dequantize_rows(in, cols, out);
  }
  /// The ATen-op path alone: what dequantize_rows falls back to without NVRTC (the benchmark's reference).
  static void dequantize_rows_aten(const at::Tensor& in, int64_t cols, const at::Tensor& out) { int4::dequantize_rows(in, cols, out); }
};

/// e4m3 with a power-of-two fp32 scale per row. Row: cols bytes of codes, the fp32 scale, padded to 16 bytes.
struct FP8 {
  static constexpr const Rules& rules = fp8_rules;
  static constexpr std::string_view name = rules.name;
  static constexpr bool quantized = rules.quantized;
  static int64_t row_bytes(int64_t cols) { return rules.row_bytes(cols); }
  static void quantize_rows(const at::Tensor& w, const at::Tensor& out, std::string_view what = "weight") {
    detail::check_quantize(name, w, out, w.dim() == 2 ? row_bytes(w.size(1)) : 0, what);
    fp8::quantize_rows(w, out);
  }
  static void dequantize_rows(const at::Tensor& in, int64_t cols, const at::Tensor& out, std::string_view what = "weight") {
    detail::check_dequantize(name, in, cols, out, row_bytes(cols), what);
    if (in.is_cuda() && kernels::dequantize(kernels::Kind::FP8, in, out.size(0), cols, row_bytes(cols), out)) return;
    fp8::dequantize_rows(in, cols, out);
  }
  /// The ATen-op path alone: what dequantize_rows falls back to without NVRTC (the benchmark's reference).
  static void dequantize_rows_aten(const at::Tensor& in, int64_t cols, const at::Tensor& out) { fp8::dequantize_rows(in, cols, out); }
};

/// Calls f(Tag{}) for the policy named `name` ("none" | "int4" | "fp8", the --quant flag's values).
template <class F>
decltype(auto) dispatch(std::string_view name, F&& f) {
  if (name == NoQuant::name) return f(NoQuant{});
  if (name == Int4::name) return f(Int4{});
  rules_named(name);  // the error naming --quant for any other name
  return f(FP8{});
}

}  // namespace shardlm::quant
