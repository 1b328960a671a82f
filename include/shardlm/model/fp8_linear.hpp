#pragma once
// Float8 training linears (precision::FP8): y = x W^T with x and W in float8 e4m3 and dynamic scales, computed
// afresh from each tensor's values at every call (no amax history to keep or checkpoint). Shapes: M = tokens (the
// leading dimensions of x flattened), K = in features, N = out features.
//
// The recipe is torchao's "rowwise with high-precision grad_weight" (Float8LinearRecipeName.ROWWISE_WITH_GW_HP: its
// row-wise recipe with the weight gradient kept in bf16 for accuracy), with power-of-two scales as its row-wise
// recipes take:
//   forward      y [M, N] = x W^T: x scaled per row (per token), W per row (per output): at::_scaled_mm row-wise
//   grad_input   dx [M, K] = dy W: dy per row (per token), W per column (per input: the other axis, so W is quantized
//                a second time, from its bf16 values): at::_scaled_mm row-wise. dy in e4m3, not e5m2: row-wise scales
//                give each token's gradient its own range (the range that tensor-wise recipes take e5m2 for), and
//                _scaled_mm's row-wise path takes e4m3 operands only
//   grad_weight  dW [N, K] = dy^T x in bf16 from the forward's bf16 x, as the plain path computes it: it sums over every
//                token of the batch, where float8's 4 significant bits would cost most
// Kept for backward: x and W as at::linear keeps them (W is the gathered parameter): the activations are the plain
// path's; the float8 copies live only inside each product (train/memory_plan.hpp counts them as transients).
//
// Scales: the smallest power of two s with amax / s <= 448 (quant::fp8::scales_of_amax), never below 2^-126 so that
// 1/s is finite. Multiplying a bf16 value by a power of two is exact, so the codes are the correctly rounded e4m3 of
// the exact x / s (tests/model/test_model.cpp checks them bit for bit against a reference that rounds each value
// itself). An all-zero row takes s = 1 and codes 0; a huge value sets only its own row's (or column's) scale.
//
// Where it runs: on an sm90+ GPU, at::_scaled_mm (fp32 accumulation; the forward with the tensor cores' fast
// accumulation, as torchao's default, the input gradient without). On the CPU an emulation: the same codes and scales,
// dequantized to fp32 (exact: 4 significant bits times a power of two), multiplied with fp32 accumulation, rounded to
// the output dtype: it checks the scaling math and runs the whole engine path, and is no faster than bf16. A GPU
// without row-wise float8 matmuls is refused (an emulation there would be slower than bf16 and look like fp8).
#include <ATen/ATen.h>
#include <torch/csrc/autograd/custom_function.h>

#include <cmath>
#include <cstdint>

#include "shardlm/core/compat.hpp"
#include "shardlm/core/errors.hpp"
#include "shardlm/quant/fp8.hpp"

namespace shardlm::model::fp8 {

/// The smallest scale: values are multiplied by 1/s, which must be finite in bf16 and fp32.
inline constexpr float min_scale = 0x1p-126f;

/// A matrix in float8 e4m3 with one fp32 power-of-two scale per row: value = code x scale.
struct Scaled {
  at::Tensor codes;  // [R, C] e4m3, row-major
  at::Tensor scale;  // [R, 1] fp32
};

/// x [R, C] (any floating dtype) quantized with one scale per row. Three passes over x: the row maxima (one reduction,
/// no |x| copy), the scaling, the cast. No clamp: |x / s| <= 448 exactly by the choice of s (a non-finite x gives a
/// NaN code, as the bf16 product would give a non-finite output).
inline Scaled quantize_rows(const at::Tensor& x) {
  const auto amax = at::linalg_vector_norm(x, INFINITY, {1}, /*keepdim=*/true).to(at::kFloat);  // [R, 1]
  auto scale = quant::fp8::scales_of_amax(amax).clamp_min(min_scale);                             // [R, 1]
  const auto inverse = scale.reciprocal().to(x.scalar_type());  // exact: powers of two
  auto codes = (x * inverse).to(at::kFloat8_e4m3fn).contiguous();                                 // [R, C]
  return {std::move(codes), std::move(scale)};
}

/// How a float8 product is computed.
enum class Matmul {
  scaled_mm,  ///< at::_scaled_mm with row-wise scales (sm90+)
  emulated,   ///< the same codes and scales dequantized, an fp32 product (the CPU; the GPU test's reference)
};

/// The float8 product on `device`: the emulation on the CPU, _scaled_mm on an sm90+ GPU; refused elsewhere.
inline Matmul matmul_on(const at::Device& device) {
  if (!device.is_cuda()) return Matmul::emulated;
  if (compat::has_scaled_mm_rowwise(device)) return Matmul::scaled_mm;
  fail<ConfigError>("--precision fp8 needs row-wise float8 matmuls (at::_scaled_mm on compute capability 9.x or 10.x: "
                    "H100, H200, B200); ", device.str(), " has compute capability ", compat::cuda_major(device),
                    ".x: use --precision mixed-bf16");
}

/// a [M, K] times b [N, K] transposed, both in float8 with row-wise scales: [M, N] in `out` dtype.
inline at::Tensor scaled_product(const Scaled& a, const Scaled& b, at::ScalarType out, Matmul how, bool fast_accum) {
  if (how == Matmul::scaled_mm)
    return compat::scaled_mm_rowwise(a.codes, b.codes.t(), a.scale, b.scale.view({1, -1}), out, fast_accum);
  return at::mm(a.codes.to(at::kFloat) * a.scale, (b.codes.to(at::kFloat) * b.scale).t()).to(out);
}

/// a [M, K] (bf16) times b [N, K] transposed through float8: [M, N] in a's dtype. With _scaled_mm, M is padded with
/// zero rows to a multiple of 16 (its constraint; K and N are the model's sizes, checked when the model is set up).
inline at::Tensor product(const at::Tensor& a, const at::Tensor& b, Matmul how, bool fast_accum) {
  const int64_t M = a.size(0), pad = how == Matmul::scaled_mm ? (16 - M % 16) % 16 : 0;
  if (how == Matmul::scaled_mm)
    SHARDLM_ASSERT(a.scalar_type() == at::kBFloat16 && a.size(1) % 16 == 0 && b.size(0) % 16 == 0,
                   "float8 _scaled_mm needs bf16 operands with K and N multiples of 16, got ", a.sizes(), " x ", b.sizes());
  const auto y = scaled_product(quantize_rows(pad ? at::constant_pad_nd(a, {0, 0, 0, pad}) : a), quantize_rows(b),
                                a.scalar_type(), how, fast_accum);
  return pad ? y.narrow(0, 0, M) : y;
}

/// y [..., N] = x [..., K] W^T through float8 (the recipe above). `how`: a Matmul.
struct LinearFunction : torch::autograd::Function<LinearFunction> {
  static at::Tensor forward(torch::autograd::AutogradContext* ctx, const at::Tensor& x, const at::Tensor& w,
                            int64_t how) {
    ctx->save_for_backward({x, w});
    ctx->saved_data["how"] = how;
    auto sizes = x.sizes().vec();
    sizes.back() = w.size(0);
    return product(x.reshape({-1, x.size(-1)}), w, static_cast<Matmul>(how), /*fast_accum=*/true).view(sizes);
  }
  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list dys) {
    const auto saved = ctx->get_saved_variables();
    const auto &x = saved[0], &w = saved[1];
    const auto how = static_cast<Matmul>(ctx->saved_data["how"].toInt());
    const auto dy = dys[0].reshape({-1, w.size(0)});  // [M, N]
    torch::autograd::variable_list grads(3);
    if (ctx->needs_input_grad(0)) grads[0] = product(dy, w.t(), how, /*fast_accum=*/false).view(x.sizes());  // [..., K]
    if (ctx->needs_input_grad(1)) grads[1] = dy.t().mm(x.reshape({-1, x.size(-1)}));                    // [N, K], bf16
    return grads;
  }
};

/// x [..., K] W^T through float8 on x's device (matmul_on).
inline at::Tensor linear(const at::Tensor& x, const at::Tensor& w) {
  return LinearFunction::apply(x, w, static_cast<int64_t>(matmul_on(x.device())));
}

}  // namespace shardlm::model::fp8
