#pragma once
// The LM head and the next-token cross-entropy fused, a chunk of tokens at a time: the [N, V] logits are never
// materialized whole, nor their fp32 log-softmax (which the plain loss keeps for backward, 4 V bytes a token) and its
// gradients (8 V more in backward). With gradients wanted, each chunk's gradients are computed in the forward, while
// its logits exist (the loss is the end of the graph: the gradient of the sum is known up to the scalar that
// backward brings, of which the caller gives the expected value, `grad_scale`). The hidden states' gradient [N, C] is
// written chunk by chunk and the head weight's [V, C] accumulates over the chunks, both in the compute dtype;
// backward multiplies them in place by the scalar it gets over grad_scale (exactly 1 when the hint was right).
// Numerically this is the plain path (model/ops.hpp next_token_loss_sum): logits in the compute dtype, softmax in
// fp32, the scaled gradient of the logits rounded to the compute dtype, GEMMs accumulating in fp32; the head weight's
// gradient is rounded once per chunk instead of once (a micro-batch of one chunk rounds as the plain path does).
#include <ATen/ATen.h>
#include <torch/csrc/autograd/custom_function.h>

#include <algorithm>
#include <cstdint>
#include <optional>
#include <tuple>
#include <utility>

#include "shardlm/core/errors.hpp"
#include "shardlm/core/nvrtc.hpp"

#if SHARDLM_HAVE_CUDA
#include <c10/cuda/CUDAGuard.h>
#endif

namespace shardlm::model::ops {

namespace detail {

/// The CUDA kernel of the chunk's softmax for bf16 logits: one block per row reads the row twice (an online max and
/// sum of exponentials, then the gradient scale x (softmax - onehot) written over it), where the ATen ops make an
/// fp32 copy and pass over it five times. Rows whose target is ignore_index get loss 0 and a zero gradient; a target
/// outside [0, V) a NaN loss.
inline constexpr const char* xent_source = R"CUDA(
#include "shardlm_bf16.cuh"
#define SHARDLM_INF __int_as_float(0x7f800000)
// (m, s): the running max and the sum of exp(x - m); combining two keeps exp of -inf out (0 x inf).
__device__ __forceinline__ void merge(float& m, float& s, float m2, float s2) {
  const float M = fmaxf(m, m2);
  if (M == -SHARDLM_INF) return;
  s = (m == -SHARDLM_INF ? 0.f : s * expf(m - M)) + (m2 == -SHARDLM_INF ? 0.f : s2 * expf(m2 - M));
  m = M;
}
__device__ __forceinline__ void add(float& m, float& s, float x) {
  if (x == -SHARDLM_INF) return;
  if (x > m) { s = (m == -SHARDLM_INF ? 0.f : s * expf(m - x)) + 1.f; m = x; }
  else s += expf(x - m);
}
extern "C" __global__ void __launch_bounds__(512) shardlm_softmax_xent_bf16(
    unsigned short* __restrict__ logits, const long long* __restrict__ targets, float* __restrict__ loss,
    long long V, long long ignore_index, int grad, float scale, int vec) {
  __shared__ float wm[16], ws[16];
  __shared__ float xt, lse;
  unsigned short* row = logits + (long long)blockIdx.x * V;
  const long long t = targets[blockIdx.x];
  if (t == ignore_index) {
    if (threadIdx.x == 0) loss[blockIdx.x] = 0.f;
    if (grad) for (long long i = threadIdx.x; i < V; i += blockDim.x) row[i] = 0;
    return;
  }
  const bool in_range = t >= 0 && t < V;
  if (threadIdx.x == 0) xt = in_range ? from_bf16(row[t]) : __int_as_float(0x7fc00000);
  float m = -SHARDLM_INF, s = 0.f;
  if (vec) {
    for (long long i = threadIdx.x * 8ll; i < V; i += blockDim.x * 8ll) {
      const uint4 u = *reinterpret_cast<const uint4*>(row + i);
      const unsigned w[4] = {u.x, u.y, u.z, u.w};
      for (int k = 0; k < 4; ++k) { add(m, s, __uint_as_float(w[k] << 16)); add(m, s, __uint_as_float(w[k] & 0xffff0000u)); }
    }
  } else {
    for (long long i = threadIdx.x; i < V; i += blockDim.x) add(m, s, from_bf16(row[i]));
  }
  for (int o = 16; o > 0; o >>= 1) merge(m, s, __shfl_xor_sync(0xffffffffu, m, o), __shfl_xor_sync(0xffffffffu, s, o));
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, warps = blockDim.x / 32;
  if (lane == 0) wm[warp] = m, ws[warp] = s;
  __syncthreads();
  if (warp == 0) {
    m = lane < warps ? wm[lane] : -SHARDLM_INF, s = lane < warps ? ws[lane] : 0.f;
    for (int o = 16; o > 0; o >>= 1) merge(m, s, __shfl_xor_sync(0xffffffffu, m, o), __shfl_xor_sync(0xffffffffu, s, o));
    if (lane == 0) { lse = m + logf(s); loss[blockIdx.x] = lse - xt; }
  }
  __syncthreads();
  if (!grad) return;
  const float l = lse;
  if (vec) {
    for (long long i = threadIdx.x * 8ll; i < V; i += blockDim.x * 8ll) {
      uint4 u = *reinterpret_cast<const uint4*>(row + i);
      unsigned* w = reinterpret_cast<unsigned*>(&u);
      for (int k = 0; k < 4; ++k) {
        const float a = scale * (expf(__uint_as_float(w[k] << 16) - l) - (i + 2 * k == t ? 1.f : 0.f));
        const float b = scale * (expf(__uint_as_float(w[k] & 0xffff0000u) - l) - (i + 2 * k + 1 == t ? 1.f : 0.f));
        w[k] = (unsigned)to_bf16(a) | ((unsigned)to_bf16(b) << 16);
      }
      *reinterpret_cast<uint4*>(row + i) = u;
    }
  } else {
    for (long long i = threadIdx.x; i < V; i += blockDim.x)
      row[i] = to_bf16(scale * (expf(from_bf16(row[i]) - l) - (i == t ? 1.f : 0.f)));
  }
}
)CUDA";

inline constexpr nvrtc::Program xent_program{"shardlm_loss.cu", xent_source};

/// The kernel's rows' losses for contiguous bf16 logits [c, V] on a GPU (the gradient written over the logits with
/// `grad`), or nothing where the kernel is not available.
inline std::optional<at::Tensor> softmax_xent_kernel(const at::Tensor& logits, const at::Tensor& targets,
                                                     int64_t ignore_index, bool grad, double grad_scale = 1.0) {
#if SHARDLM_HAVE_CUDA
  if (!logits.is_cuda() || logits.scalar_type() != at::kBFloat16 || !logits.is_contiguous()) return std::nullopt;
  const int device = logits.get_device();
  const c10::cuda::CUDAGuard guard(static_cast<c10::DeviceIndex>(device));
  void* f = nvrtc::function_or_warn(device, xent_program, "shardlm_softmax_xent_bf16",
                                    "the fused loss takes its softmax with ATen ops instead (slower)");
  if (!f) return std::nullopt;
  const auto t = targets.to(logits.device(), at::kLong).contiguous();
  auto rows = at::empty({logits.size(0)}, logits.options().dtype(at::kFloat));
  if (logits.size(0) == 0) return rows;
  void* ptr = logits.data_ptr();
  const void* t_ptr = t.data_ptr();
  void* l_ptr = rows.data_ptr();
  int64_t V = logits.size(1);
  int g = grad ? 1 : 0, vec = V % 8 == 0 && reinterpret_cast<uintptr_t>(ptr) % 16 == 0 ? 1 : 0;
  float scale = static_cast<float>(grad_scale);
  void* args[] = {&ptr, &t_ptr, &l_ptr, &V, &ignore_index, &g, &scale, &vec};
  nvrtc::launch(f, device, static_cast<unsigned>(logits.size(0)), 512, 0, args, "the fused loss's softmax kernel");
  return rows;
#else
  (void)logits, (void)targets, (void)ignore_index, (void)grad, (void)grad_scale;
  return std::nullopt;
#endif
}

/// For logits [c, V] and targets [c] (ignore_index: no loss, no gradient): each row's loss logsumexp - logit at the
/// target, in fp32 [c], and with `grad` grad_scale x the gradient of their sum, softmax - onehot (zero rows where
/// ignored), in the logits' dtype [c, V]; it may overwrite `logits`.
inline std::pair<at::Tensor, at::Tensor> softmax_xent_aten(at::Tensor logits, const at::Tensor& targets,
                                                           int64_t ignore_index, bool grad, double grad_scale = 1.0) {
  auto x = logits.to(at::kFloat);  // [c, V]: this chunk's own, a cast copy or (fp32) the logits themselves
  const auto valid = targets.ne(ignore_index);                                                // [c]
  const auto safe = at::where(valid, targets, at::zeros_like(targets)).unsqueeze(1);         // [c, 1]
  const auto vf = valid.to(at::kFloat).unsqueeze(1);                                          // [c, 1]
  const auto xt = x.gather(1, safe);                                                          // [c, 1]
  const auto m = at::amax(x, {1}, /*keepdim=*/true);                                          // [c, 1]
  const auto s = x.sub_(m).exp_().sum(1, /*keepdim=*/true);                                   // [c, 1]
  auto rows = ((m + s.log() - xt) * vf).squeeze(1);                                           // [c]: lse - x_t
  if (!grad) return {std::move(rows), at::Tensor()};
  x.div_(s).scatter_add_(1, safe, -vf).mul_(vf * grad_scale);
  return {std::move(rows), x.scalar_type() == logits.scalar_type() ? x : logits.copy_(x)};
}

/// softmax_xent_aten's result, by the CUDA kernel for bf16 logits on a GPU.
inline std::pair<at::Tensor, at::Tensor> softmax_xent(at::Tensor logits, const at::Tensor& targets, int64_t ignore_index,
                                                      bool grad, double grad_scale) {
  if (auto rows = softmax_xent_kernel(logits, targets, ignore_index, grad, grad_scale))
    return {std::move(*rows), grad ? logits : at::Tensor()};
  return softmax_xent_aten(std::move(logits), targets, ignore_index, grad, grad_scale);
}

}  // namespace detail

/// sum over the N rows of h [N, C] of the cross-entropy of h W^T (W [V, C]) at targets [N] (ignore_index skipped),
/// in fp32, `chunk` rows at a time. Gradients for h and W as far as they require them, computed in the forward for
/// an incoming gradient of `grad_scale`.
struct LinearCrossEntropy : torch::autograd::Function<LinearCrossEntropy> {
  static at::Tensor forward(torch::autograd::AutogradContext* ctx, const at::Tensor& h, const at::Tensor& w,
                            const at::Tensor& targets, int64_t ignore_index, int64_t chunk, double grad_scale) {
    SHARDLM_ASSERT(h.dim() == 2 && w.dim() == 2 && h.size(1) == w.size(1) && targets.dim() == 1 &&
                       targets.size(0) == h.size(0) && chunk > 0 && h.scalar_type() == w.scalar_type(),
                   "LinearCrossEntropy: h [N, C], w [V, C] of one dtype, targets [N], chunk > 0");
    SHARDLM_ASSERT(grad_scale != 0, "LinearCrossEntropy: grad_scale must not be 0");
    const int64_t N = h.size(0), C = h.size(1);
    const bool want_h = h.requires_grad(), want_w = w.requires_grad(), grad = want_h || want_w;
    auto total = at::zeros({}, h.options().dtype(at::kFloat));
    at::Tensor dh = want_h ? at::empty({N, C}, h.options()) : at::Tensor();
    at::Tensor dw = want_w ? at::empty_like(w, at::MemoryFormat::Contiguous) : at::Tensor();
    const auto wt = w.t();
    for (int64_t r = 0; r < N; r += chunk) {
      const int64_t c = std::min(chunk, N - r);
      const auto hc = h.narrow(0, r, c);
      auto [rows, g] = detail::softmax_xent(at::mm(hc, wt), targets.narrow(0, r, c), ignore_index, grad, grad_scale);
      total.add_(rows.sum());
      if (want_h) {
        auto out = dh.narrow(0, r, c);
        at::mm_out(out, g, w);
      }
      if (want_w) r == 0 ? void(at::mm_out(dw, g.t(), hc)) : void(dw.addmm_(g.t(), hc));
    }
    if (want_w && N == 0) dw.zero_();
    ctx->save_for_backward({dh, dw});
    ctx->saved_data["grad_scale"] = grad_scale;
    return total;
  }

  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list g) {
    const auto saved = ctx->get_saved_variables();
    // In place (the gradients are this graph's own; backward runs once): exactly 1 when the hint was right.
    const auto factor = g[0] / ctx->saved_data["grad_scale"].toDouble();
    const auto scaled = [&](at::Tensor t) { return t.defined() ? t.mul_(factor) : at::Tensor(); };
    return {scaled(saved[0]), scaled(saved[1]), at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor()};
  }
};

/// Sum of next-token cross-entropy of the head's logits h W^T against already shifted targets (model/ops.hpp
/// next_token_loss_sum), for h [..., C] and targets [...], computed `chunk` tokens at a time; `grad_scale`: the
/// gradient backward is expected to bring (the loss's scale), which the gradients computed in the forward carry.
inline at::Tensor linear_cross_entropy_sum(const at::Tensor& h, const at::Tensor& w, const at::Tensor& targets,
                                           int64_t chunk, double grad_scale = 1.0, int64_t ignore_index = -100) {
  return LinearCrossEntropy::apply(h.reshape({-1, h.size(-1)}), w, targets.reshape({-1}).to(at::kLong), ignore_index,
                                   chunk, grad_scale);
}

}  // namespace shardlm::model::ops
