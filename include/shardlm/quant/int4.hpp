#pragma once
// Int4: group-wise asymmetric 4-bit quantization of a weight's rows (groups of 64 along a row), with the group's
// grid fitted by half-quadratic proximal iterations in the manner of HQQ (Badri & Shaji, 2023). Batched ATen
// ops, so the same code quantizes on the CPU and on a GPU. The byte layout and the reasons for it are in
// docs/quantization.md; the tags that use these functions are in quant/policies.hpp.
//
// R = rows, C = cols, G = C / 64 groups per row, N = R x G groups.
#include <ATen/ATen.h>

#include <algorithm>
#include <cstdint>

#include "shardlm/quant/layout.hpp"  // group, row_bytes

namespace shardlm::quant::int4 {

inline constexpr int levels = 16;

/// The half-quadratic iterations (HQQ's defaults: an l_p error with p = 0.7, beta 10 growing by kappa 1.01).
struct FitOptions {
  int iters = 20;
  double lp_norm = 0.7, beta = 10.0, kappa = 1.01;
};

namespace detail {

/// The 16 dequantized values of each group's grid, in bf16: level q = (lo (15 - q) + hi q) / 15, computed in fp32
/// with one rounding per operation (no fused multiply-add) so that the CUDA kernel gives the same bits. Levels 0
/// and 15 are exactly lo and hi.
inline at::Tensor grid(const at::Tensor& lo, const at::Tensor& hi) {  // [N] fp32 (bf16 values) each -> [N, 16] bf16
  const auto q = at::arange(levels, lo.options());                    // [16]
  const auto sum = lo.unsqueeze(1) * (15 - q) + hi.unsqueeze(1) * q;  // [N, 16]
  // A full divisor tensor: ATen divides by a broadcast scalar through its reciprocal on CUDA, which rounds twice.
  return (sum / at::full_like(sum, 15.0f)).to(at::kBFloat16);
}

/// Codes of `w` on the grid [lo, hi]: round((w - lo) / step) clamped to [0, 15]; a zero step gives code 0.
inline at::Tensor codes(const at::Tensor& w, const at::Tensor& lo, const at::Tensor& hi) {  // w [N, 64] fp32 -> uint8
  const auto step = ((hi - lo) / 15.0f).unsqueeze(1);  // [N, 1]
  auto q = ((w - lo.unsqueeze(1)) / step).round().clamp(0, 15);
  return at::where(step > 0, q, at::zeros_like(q)).to(at::kByte);
}

/// The groups' values on their grids, bf16 [N, 64].
inline at::Tensor dequantize(const at::Tensor& q, const at::Tensor& lo, const at::Tensor& hi) {
  return at::gather(grid(lo, hi), 1, q.to(at::kLong));
}

/// HQQ's l_p shrinkage (the proximal operator of |x|^p): sign(x) max(|x| - |x|^(p-1) / beta, 0).
inline at::Tensor shrink(const at::Tensor& x, double beta, double p) {
  const auto a = x.abs();
  return x.sign() * at::relu(a - a.pow(p - 1) / beta);
}

/// The grid (lo, hi) of each group, fitted to w [N, 64] fp32. Starts from the min-max grid; each iteration
/// quantizes, splits the error into a sparse part W_e (the l_p proximal step) and fits the grid to W - W_e by least
/// squares over the codes (scale and offset: HQQ fits the zero point alone, fitting both lowers the l2 error
/// further). The grid only ever shrinks inside [min, max] of the group, so codes 0 and 15 stay in use. The grid
/// of lowest l2 error seen is returned.
inline std::pair<at::Tensor, at::Tensor> fit(const at::Tensor& w, const FitOptions& o) {
  const auto [mn, mx] = at::aminmax(w, 1);  // [N]
  auto lo = mn.clone(), hi = mx.clone();
  auto best_lo = lo, best_hi = hi;
  auto best_err = at::full_like(mn, INFINITY);
  double beta = o.beta;
  for (int it = 0; it <= o.iters; ++it) {
    const auto step = (hi - lo) / 15.0f;
    const auto q = ((w - lo.unsqueeze(1)) / step.unsqueeze(1)).round().clamp(0, 15).nan_to_num(0);  // [N, 64]
    const auto e = w - (q * step.unsqueeze(1) + lo.unsqueeze(1));
    const auto err = (e * e).sum(1);
    const auto better = err < best_err;
    best_err = at::where(better, err, best_err);
    best_lo = at::where(better, lo, best_lo);
    best_hi = at::where(better, hi, best_hi);
    if (it == o.iters) break;
    const auto t = w - shrink(e, beta, o.lp_norm);  // [N, 64] the target with the sparse error removed
    const auto qc = q - q.mean(1, true), tc = t - t.mean(1, true);
    const auto var = (qc * qc).sum(1);
    const auto slope = (qc * tc).sum(1) / var;
    const auto fit_ok = (var > 0) & (slope > 0);
    auto new_lo = t.mean(1) - slope * q.mean(1);
    auto new_hi = new_lo + 15 * slope;
    new_lo = at::maximum(new_lo, mn);
    new_hi = at::maximum(at::minimum(new_hi, mx), new_lo);
    lo = at::where(fit_ok, new_lo, lo);
    hi = at::where(fit_ok, new_hi, hi);
    beta *= o.kappa;
  }
  return {best_lo, best_hi};
}

}  // namespace detail

/// Quantizes w [R, C] (any floating dtype and device, C a multiple of 64, finite) into out (uint8 [R x
/// row_bytes(C)], same device). Rows are processed in chunks of about 2^24 values to bound the temporaries.
/// A group whose values lie exactly on their min-max grid (a dequantized group) keeps that grid, which makes
/// dequantize(quantize(.)) idempotent.
inline void quantize_rows(const at::Tensor& w, const at::Tensor& out, const FitOptions& o = {}) {
  const int64_t rows = w.size(0), cols = w.size(1), g = cols / group, rb = row_bytes(cols);
  const auto out2 = out.view({rows, rb});
  const int64_t chunk = std::max<int64_t>(1, (int64_t{1} << 24) / std::max<int64_t>(cols, 1));
  for (int64_t r0 = 0; r0 < rows; r0 += chunk) {
    const int64_t n = std::min(chunk, rows - r0);
    const auto x = w.narrow(0, r0, n).to(at::kFloat).reshape({n * g, group});  // [N, 64]
    auto [lo, hi] = detail::fit(x, o);
    lo = lo.to(at::kBFloat16).to(at::kFloat);  // lo >= min, and rounding to nearest keeps it so for bf16 inputs
    hi = hi.to(at::kBFloat16).to(at::kFloat);
    auto q = detail::codes(x, lo, hi);
    // Already quantized groups: the min-max grid reproduces them exactly, so keep it.
    const auto [mn, mx] = at::aminmax(x, 1);
    const auto lo_m = mn.to(at::kBFloat16).to(at::kFloat), hi_m = mx.to(at::kBFloat16).to(at::kFloat);
    const auto q_m = detail::codes(x, lo_m, hi_m);
    const auto exact = (detail::dequantize(q_m, lo_m, hi_m).to(at::kFloat) == x).all(1);  // [N]
    lo = at::where(exact, lo_m, lo);
    hi = at::where(exact, hi_m, hi);
    q = at::where(exact.unsqueeze(1), q_m, q).view({n, cols / 2, 2});
    auto dst = out2.narrow(0, r0, n);  // [n, rb]
    dst.narrow(1, 0, cols / 2).copy_(q.select(2, 0) | at::bitwise_left_shift(q.select(2, 1), 4));
    dst.narrow(1, cols / 2, 2 * g).copy_(lo.to(at::kBFloat16).view({n, g}).view(at::kByte));
    dst.narrow(1, cols / 2 + 2 * g, 2 * g).copy_(hi.to(at::kBFloat16).view({n, g}).view(at::kByte));
    dst.narrow(1, cols / 2 + 4 * g, rb - cols / 2 - 4 * g).zero_();
  }
}

/// Dequantizes in (uint8 [R x row_bytes(C)]) into out (bf16 [R, C], same device) with ATen ops: the CPU path and
/// the reference of the CUDA kernel.
inline void dequantize_rows(const at::Tensor& in, int64_t cols, const at::Tensor& out) {
  const int64_t rows = out.size(0), g = cols / group, rb = row_bytes(cols);
  const auto in2 = in.view({rows, rb});
  const auto packed = in2.narrow(1, 0, cols / 2);                                       // [R, C/2]
  const auto q = at::stack({packed & 15, at::bitwise_right_shift(packed, 4)}, 2).reshape({rows * g, group});  // [N, 64]
  const auto lo = in2.narrow(1, cols / 2, 2 * g).contiguous().view(at::kBFloat16).reshape({rows * g}).to(at::kFloat);
  const auto hi = in2.narrow(1, cols / 2 + 2 * g, 2 * g).contiguous().view(at::kBFloat16).reshape({rows * g}).to(at::kFloat);
  out.copy_(detail::dequantize(q, lo, hi).view({rows, cols}));
}

}  // namespace shardlm::quant::int4
