#pragma once
// The host optimizer of offloaded runs: AdamW (torch.optim.AdamW's update, decoupled weight decay) in one pass
// over contiguous CPU tensors, multi-threaded. Parameters and moments are fp32 or bf16, gradients fp32 or bf16,
// in any mix; the arithmetic is fp32 and bf16 results are rounded to nearest even. LibTorch's fused CPU kernel
// wants one dtype for all four tensors, so bf16 gradients beside fp32 master weights (what an offloaded
// mixed-bf16 run keeps where that is exact) would need an upcast pass of their own; reading them directly
// saves that pass and half the gradient bytes. The loop is plain code over raw pointers, split among the
// rank's host threads; the step is bound by host memory bandwidth more than by arithmetic.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <bit>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <vector>
#if defined(__SSE2__)
#include <emmintrin.h>
#endif

#include "shardlm/core/errors.hpp"
#include "shardlm/core/parallel.hpp"

namespace shardlm::optim {

/// One AdamW update's scalars. `step` counts from 1 (bias correction); gradients are multiplied by
/// `grad_coef` first (clipping).
struct AdamWStep {
  double lr = 0, beta1 = 0.9, beta2 = 0.95, weight_decay = 0, eps = 1e-8;
  int64_t step = 1;
  double grad_coef = 1.0;
};

/// One shard's AdamW state: master weights and the two moments (contiguous CPU tensors of one size and dtype).
struct AdamWState {
  at::Tensor param, exp_avg, exp_avg_sq;
};

namespace detail {
inline float bf16_to_float(uint16_t b) { return std::bit_cast<float>(static_cast<uint32_t>(b) << 16); }
inline uint16_t float_to_bf16(float f) {  // round to nearest even; NaN stays NaN
  const uint32_t u = std::bit_cast<uint32_t>(f);
  if (std::isnan(f)) return 0x7FC0;
  return static_cast<uint16_t>((u + 0x7FFFu + ((u >> 16) & 1u)) >> 16);
}
template <class T>
inline float load(const T* p, int64_t i) {
  if constexpr (std::is_same_v<T, float>) return p[i];
  else return bf16_to_float(p[i]);
}
template <class T>
inline void store(T* p, int64_t i, float v) {
  if constexpr (std::is_same_v<T, float>) p[i] = v;
  else p[i] = float_to_bf16(v);
}

struct AdamWCoef {
  float keep, b1, one_minus_b1, b2, one_minus_b2, step_size, inv_bc2_sqrt, eps, grad_coef;
};

#if defined(__SSE2__)
// Four lanes at a time with SSE2 (every x86-64 CPU has it; no compiler flag needed). bf16 lanes are the high
// halves of fp32 lanes; the rounding to bf16 is float_to_bf16's, lane by lane.
template <class T>
inline __m128 load4(const T* p, int64_t i) {
  if constexpr (std::is_same_v<T, float>) {
    return _mm_loadu_ps(p + i);
  } else {
    const __m128i h = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(p + i));
    return _mm_castsi128_ps(_mm_unpacklo_epi16(_mm_setzero_si128(), h));
  }
}
template <class T>
inline void store4(T* p, int64_t i, __m128 v) {
  if constexpr (std::is_same_v<T, float>) {
    _mm_storeu_ps(p + i, v);
  } else {
    const __m128i u = _mm_castps_si128(v);
    const __m128i lsb = _mm_and_si128(_mm_srli_epi32(u, 16), _mm_set1_epi32(1));
    __m128i r = _mm_srli_epi32(_mm_add_epi32(u, _mm_add_epi32(_mm_set1_epi32(0x7FFF), lsb)), 16);
    const __m128i nan = _mm_castps_si128(_mm_cmpunord_ps(v, v));
    r = _mm_or_si128(_mm_andnot_si128(nan, r), _mm_and_si128(nan, _mm_set1_epi32(0x7FC0)));
    // 32 -> 16 bits: values lie in [0, 65535]; shift into the signed range for the saturating pack, then back
    const __m128i bias = _mm_set1_epi32(0x8000);
    const __m128i packed = _mm_packs_epi32(_mm_sub_epi32(r, bias), _mm_sub_epi32(r, bias));
    _mm_storel_epi64(reinterpret_cast<__m128i*>(p + i), _mm_xor_si128(packed, _mm_set1_epi16(static_cast<short>(0x8000))));
  }
}
#endif

template <class P, class G>
void adamw_range(const P* param, const G* grad, const P* exp_avg, const P* exp_avg_sq, P* param_out, P* exp_avg_out,
                 P* exp_avg_sq_out, int64_t begin, int64_t end, const AdamWCoef& c) {
#if defined(__SSE2__)
  const __m128 keep = _mm_set1_ps(c.keep), b2 = _mm_set1_ps(c.b2), omb1 = _mm_set1_ps(c.one_minus_b1),
               omb2 = _mm_set1_ps(c.one_minus_b2), step = _mm_set1_ps(c.step_size), ibc2 = _mm_set1_ps(c.inv_bc2_sqrt),
               eps = _mm_set1_ps(c.eps), gc = _mm_set1_ps(c.grad_coef);
  for (; begin + 4 <= end; begin += 4) {
    const __m128 g = _mm_mul_ps(load4(grad, begin), gc);
    const __m128 p = _mm_mul_ps(load4(param, begin), keep);
    const __m128 m = load4(exp_avg, begin);
    const __m128 m1 = _mm_add_ps(m, _mm_mul_ps(omb1, _mm_sub_ps(g, m)));
    const __m128 v1 = _mm_add_ps(_mm_mul_ps(b2, load4(exp_avg_sq, begin)), _mm_mul_ps(_mm_mul_ps(omb2, g), g));
    const __m128 denom = _mm_add_ps(_mm_mul_ps(_mm_sqrt_ps(v1), ibc2), eps);
    store4(param_out, begin, _mm_sub_ps(p, _mm_div_ps(_mm_mul_ps(step, m1), denom)));
    store4(exp_avg_out, begin, m1);
    store4(exp_avg_sq_out, begin, v1);
  }
#endif
  for (int64_t i = begin; i < end; ++i) {
    const float g = load(grad, i) * c.grad_coef;
    const float p = load(param, i) * c.keep;  // decoupled weight decay: p (1 - lr wd)
    const float m = load(exp_avg, i);
    const float m1 = m + c.one_minus_b1 * (g - m);  // lerp(m, g, 1 - beta1)
    const float v1 = c.b2 * load(exp_avg_sq, i) + (c.one_minus_b2 * g) * g;
    const float denom = std::sqrt(v1) * c.inv_bc2_sqrt + c.eps;
    store(param_out, i, p - (c.step_size * m1) / denom);
    store(exp_avg_out, i, m1);
    store(exp_avg_sq_out, i, v1);
  }
}

template <class P, class G>
void adamw_tensor(const AdamWState& in, const at::Tensor& grad, const AdamWState& out, const AdamWCoef& c) {
  const auto* p = static_cast<const P*>(in.param.data_ptr());
  const auto* g = static_cast<const G*>(grad.data_ptr());
  const auto* m = static_cast<const P*>(in.exp_avg.data_ptr());
  const auto* v = static_cast<const P*>(in.exp_avg_sq.data_ptr());
  auto* po = static_cast<P*>(out.param.data_ptr());
  auto* mo = static_cast<P*>(out.exp_avg.data_ptr());
  auto* vo = static_cast<P*>(out.exp_avg_sq.data_ptr());
  parallel_ranges(in.param.numel(), int64_t{1} << 18,
                  [&](int64_t begin, int64_t end) { adamw_range(p, g, m, v, po, mo, vo, begin, end, c); });
}
}  // namespace detail

/// AdamW from the state `in` and the gradient `grad` into the state `out` (which may be `in` itself: in place):
/// contiguous CPU tensors of one size; parameters and moments of one dtype (fp32 or bf16), the gradient fp32 or bf16.
/// Reading one state and writing another costs the same memory traffic as an update in place, which is what lets an
/// offloaded run step speculatively and keep the state it may have to return to (engine/offload.hpp).
inline void host_adamw(const AdamWState& in, const at::Tensor& grad, const AdamWState& out,
                       const AdamWStep& s) {
  const auto pt = in.param.scalar_type(), gt = grad.scalar_type();
  auto supported = [](at::ScalarType t) { return t == at::kFloat || t == at::kBFloat16; };
  for (const auto* t : {&in.exp_avg, &in.exp_avg_sq, &out.param, &out.exp_avg, &out.exp_avg_sq})
    if (t->scalar_type() != pt || !supported(pt) || !supported(gt))
      fail<ConfigError>("host AdamW: parameters and moments must share fp32 or bf16, gradients fp32 or bf16 (got ", pt,
                        ", ", t->scalar_type(), " and ", gt, ")");
  for (const auto* t : {&in.param, &grad, &in.exp_avg, &in.exp_avg_sq, &out.param, &out.exp_avg, &out.exp_avg_sq})
    SHARDLM_ASSERT(t->device().is_cpu() && t->is_contiguous() && t->numel() == in.param.numel(),
                   "host AdamW takes contiguous CPU tensors of one size");
  SHARDLM_ASSERT(s.step >= 1, "AdamW steps count from 1");
  const double bc1 = 1 - std::pow(s.beta1, static_cast<double>(s.step));
  const double bc2 = 1 - std::pow(s.beta2, static_cast<double>(s.step));
  const detail::AdamWCoef c{static_cast<float>(1 - s.lr * s.weight_decay), static_cast<float>(s.beta1),
                            static_cast<float>(1 - s.beta1),         static_cast<float>(s.beta2),
                            static_cast<float>(1 - s.beta2),         static_cast<float>(s.lr / bc1),
                            static_cast<float>(1 / std::sqrt(bc2)),  static_cast<float>(s.eps),
                            static_cast<float>(s.grad_coef)};
  if (pt == at::kFloat && gt == at::kFloat) detail::adamw_tensor<float, float>(in, grad, out, c);
  else if (pt == at::kFloat) detail::adamw_tensor<float, uint16_t>(in, grad, out, c);
  else if (gt == at::kFloat) detail::adamw_tensor<uint16_t, float>(in, grad, out, c);
  else detail::adamw_tensor<uint16_t, uint16_t>(in, grad, out, c);
}

/// The bytes host_adamw moves per element: parameters and moments read and written, the gradient read.
inline int64_t host_adamw_bytes_per_element(at::ScalarType state, at::ScalarType grad) {
  return 6 * static_cast<int64_t>(c10::elementSize(state)) + static_cast<int64_t>(c10::elementSize(grad));
}

/// The host's memory bandwidth as the host AdamW's threads see it: STREAM's triad a = b + s c over three fp32 arrays
/// of `bytes` in all, split by parallel_ranges over the same threads; the best of `repeats`, in bytes moved (two
/// arrays read, one written) per second.
inline double host_triad_bytes_per_s(int64_t bytes = int64_t{3} << 30, int repeats = 5) {
  const int64_t n = bytes / 12;
  auto a = at::empty({n}, at::kFloat), b = at::ones({n}, at::kFloat), c = at::full({n}, 2.0f, at::kFloat);
  float* pa = a.data_ptr<float>();
  const float* pb = b.data_ptr<float>();
  const float* pc = c.data_ptr<float>();
  double best = 0;
  for (int r = 0; r < repeats; ++r) {
    const auto t0 = std::chrono::steady_clock::now();
    parallel_ranges(n, int64_t{1} << 18, [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) pa[i] = pb[i] + 3.0f * pc[i];
    });
    const double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    best = std::max(best, static_cast<double>(n) * 12 / s);
  }
  SHARDLM_ASSERT(a[n - 1].item<float>() == 7.0f, "triad result");
  return best;
}

/// AdamW on `param` (updated in place) with moments `exp_avg`, `exp_avg_sq`.
inline void host_adamw(const at::Tensor& param, const at::Tensor& grad, const at::Tensor& exp_avg,
                       const at::Tensor& exp_avg_sq, const AdamWStep& s) {
  const AdamWState state{param, exp_avg, exp_avg_sq};
  host_adamw(state, grad, state, s);
}

}  // namespace shardlm::optim
