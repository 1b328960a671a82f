#pragma once
// AdamW over one contiguous run of a device shard in one kernel (NVRTC, core/nvrtc.hpp): fp32 master weights and
// moments, gradients in fp32 or bf16. The update is LibTorch's fused AdamW's (ATen/native/cuda/fused_adam_utils.cuh,
// ADAMW mode, fp32 opmath): the same float expressions and fused multiply-adds, so the two agree bit for bit (the
// CUDA test in test_train checks it). What it saves over the fused kernel: the per-tensor step counts (a launch of
// _foreach_add_ and one tensor each), the tensor-list metadata and its chunking, and the gradient written back
// when a clipping scale applies; the engine's runs are contiguous, so one launch streams each of them
// (engine/offload.hpp DeviceShards). bf16 gradients are read as they are, with no fp32 copy.
#include <ATen/ATen.h>

#include <algorithm>
#include <cmath>
#include <cstdint>

#include "shardlm/core/compat.hpp"
#include "shardlm/core/nvrtc.hpp"
#include "shardlm/optim/host_adamw.hpp"

namespace shardlm::optim {

namespace detail {
inline constexpr const char* adamw_source = R"CUDA(
#include "shardlm_bf16.cuh"

struct Hyper {
  float lr, beta1, beta2, weight_decay, eps, grad_scale, step;
  int scaled;
};

__device__ __forceinline__ float grad_at(const float* g, long long i) { return g[i]; }
__device__ __forceinline__ float grad_at(const unsigned short* g, long long i) { return from_bf16(g[i]); }

// One element, as ATen's adam_math in ADAMW mode for fp32 (its opmath): the same float expressions, its explicit
// fused multiply-adds, the rest contracted as nvcc contracts them (fmad on for this program).
__device__ __forceinline__ void update(float& param, float grad, float& exp_avg, float& exp_avg_sq, const Hyper& h,
                                       float step_size, float bias_correction2_sqrt) {
  if (h.scaled) grad /= h.grad_scale;
  if (h.weight_decay != 0) param -= h.lr * h.weight_decay * param;
  exp_avg = fmaf(h.beta1, exp_avg, fmaf(-h.beta1, grad, grad));
  exp_avg_sq = fmaf(h.beta2, exp_avg_sq, fmaf(-h.beta2, grad * grad, grad * grad));
  const float denom = (sqrtf(exp_avg_sq) / bias_correction2_sqrt) + h.eps;
  param -= step_size * exp_avg / denom;
}

// p, m, v: fp32; g: G. `head` elements first one by one until p, m, v (and g) are 16-byte (8 for bf16 g) aligned,
// then 4 at a time where `vec`, then the tail.
template <class G>
__device__ void adamw(float* __restrict__ p, const G* __restrict__ g, float* __restrict__ m, float* __restrict__ v,
                      long long n, long long head, int vec, Hyper h) {
  const long long tid = (long long)blockIdx.x * blockDim.x + threadIdx.x, stride = (long long)gridDim.x * blockDim.x;
  // The bias corrections as ATen's kernel takes them: on the device, in float, from the fp32 step count.
  const float bias_correction1 = 1 - powf(h.beta1, h.step);
  const float bias_correction2 = 1 - powf(h.beta2, h.step);
  const float step_size = h.lr / bias_correction1, bias_correction2_sqrt = sqrtf(bias_correction2);
  long long done = 0;
  if (vec) {
    for (long long i = tid; i < head; i += stride) update(p[i], grad_at(g, i), m[i], v[i], h, step_size, bias_correction2_sqrt);
    const long long quads = (n - head) / 4;
    for (long long q = tid; q < quads; q += stride) {
      const long long i = head + 4 * q;
      float4 pp = *reinterpret_cast<float4*>(p + i), mm = *reinterpret_cast<float4*>(m + i),
             vv = *reinterpret_cast<float4*>(v + i);
      float gg[4];
#pragma unroll
      for (int k = 0; k < 4; ++k) gg[k] = grad_at(g, i + k);
      update(pp.x, gg[0], mm.x, vv.x, h, step_size, bias_correction2_sqrt);
      update(pp.y, gg[1], mm.y, vv.y, h, step_size, bias_correction2_sqrt);
      update(pp.z, gg[2], mm.z, vv.z, h, step_size, bias_correction2_sqrt);
      update(pp.w, gg[3], mm.w, vv.w, h, step_size, bias_correction2_sqrt);
      *reinterpret_cast<float4*>(p + i) = pp, *reinterpret_cast<float4*>(m + i) = mm;
      *reinterpret_cast<float4*>(v + i) = vv;
    }
    done = head + 4 * quads;
  }
  for (long long i = done + tid; i < n; i += stride) update(p[i], grad_at(g, i), m[i], v[i], h, step_size, bias_correction2_sqrt);
}

extern "C" __global__ void __launch_bounds__(256) shardlm_adamw_f32(float* p, const float* g, float* m, float* v,
                                                                    long long n, long long head, int vec, Hyper h) {
  adamw(p, g, m, v, n, head, vec, h);
}
extern "C" __global__ void __launch_bounds__(256) shardlm_adamw_bf16grad(float* p, const unsigned short* g, float* m,
                                                                         float* v, long long n, long long head, int vec,
                                                                         Hyper h) {
  adamw(p, g, m, v, n, head, vec, h);
}
)CUDA";

inline constexpr nvrtc::Program adamw_program{"shardlm_adamw.cu", adamw_source, /*fmad=*/true};

/// The kernel's scalars, laid out as its `Hyper`.
struct AdamWHyper {
  float lr, beta1, beta2, weight_decay, eps, grad_scale, step;
  int scaled;
};
}  // namespace detail

/// Whether adamw_run serves these tensors: CUDA, contiguous fp32 master and moments, fp32 or bf16 gradients, and the
/// kernel compiled (else, once, a warning that the fused kernel steps instead).
inline bool adamw_kernel_serves(const at::Tensor& master, const at::Tensor& grad) {
#if SHARDLM_HAVE_CUDA
  if (!master.is_cuda() || master.scalar_type() != at::kFloat) return false;
  if (grad.scalar_type() != at::kFloat && grad.scalar_type() != at::kBFloat16) return false;
  return nvrtc::function_or_warn(master.get_device(), detail::adamw_program, "shardlm_adamw_f32",
                                 "AdamW steps with LibTorch's fused kernel instead") != nullptr;
#else
  (void)master, (void)grad;
  return false;
#endif
}

/// One AdamW step over contiguous 1-D `master`, `grad`, `exp_avg`, `exp_avg_sq` of one length (views of a shard) on
/// the current stream; `s.grad_coef` (clipping) as the fused kernel's gradient scale 1 / coef. Only where
/// adamw_kernel_serves said so.
inline void adamw_run(const at::Tensor& master, const at::Tensor& grad, const at::Tensor& exp_avg,
                      const at::Tensor& exp_avg_sq, const AdamWStep& s) {
#if SHARDLM_HAVE_CUDA
  SHARDLM_ASSERT(master.is_contiguous() && grad.is_contiguous() && exp_avg.is_contiguous() && exp_avg_sq.is_contiguous() &&
                     grad.numel() == master.numel() && exp_avg.numel() == master.numel() &&
                     exp_avg_sq.numel() == master.numel(),
                 "adamw_run takes contiguous runs of one length");
  const int64_t n = master.numel();
  if (n == 0) return;
  const bool bf16 = grad.scalar_type() == at::kBFloat16;
  const int device = master.get_device();
  void* kernel = nvrtc::function(device, detail::adamw_program, bf16 ? "shardlm_adamw_bf16grad" : "shardlm_adamw_f32");
  // ATen's kernel takes the hyperparameters, the gradient scale and the step count as fp32 (its opmath for fp32).
  const auto f = [](double x) { return static_cast<float>(x); };
  detail::AdamWHyper h{f(s.lr), f(s.beta1), f(s.beta2), f(s.weight_decay), f(s.eps), f(1.0 / s.grad_coef),
                       f(static_cast<double>(s.step)), s.grad_coef != 1.0 ? 1 : 0};
  // Elements before the first 16-byte boundary of the master run; the others must share its alignment.
  const auto addr = [](const at::Tensor& t) { return reinterpret_cast<uintptr_t>(t.data_ptr()); };
  int64_t head = static_cast<int64_t>(((16 - addr(master) % 16) % 16) / 4);
  if (head > n) head = n;
  const auto at16 = [&](const at::Tensor& t, int64_t bytes) { return (addr(t) + head * t.element_size()) % bytes == 0; };
  int vec = addr(master) % 4 == 0 && at16(exp_avg, 16) && at16(exp_avg_sq, 16) && at16(grad, bf16 ? 8 : 16) ? 1 : 0;
  void* p = master.data_ptr();
  void* g = grad.data_ptr();
  void* m = exp_avg.data_ptr();
  void* v = exp_avg_sq.data_ptr();
  long long count = n, first = head;
  void* args[] = {&p, &g, &m, &v, &count, &first, &vec, &h};
  const int64_t threads = 256, per_thread = 16;
  const auto blocks = static_cast<unsigned>(std::clamp<int64_t>((n + threads * per_thread - 1) / (threads * per_thread), 1, 4096));
  nvrtc::launch(kernel, device, blocks, static_cast<unsigned>(threads), 0, args, "the AdamW kernel");
#else
  (void)master, (void)grad, (void)exp_avg, (void)exp_avg_sq, (void)s;
  SHARDLM_ASSERT(false, "adamw_run without CUDA");
#endif
}

}  // namespace shardlm::optim
