#pragma once
// The dense block's elementwise ops as single CUDA kernels (NVRTC, core/nvrtc.hpp) for bf16 tensors on a GPU: RMSNorm
// forward and backward, SwiGLU's silu(gate) * up forward and backward, RoPE on q and k forward and backward; and the
// autograd nodes of the plain path over them (model/selective.hpp's nodes call the kernels themselves). Over the ATen
// ops (model/ops.hpp, the reference: the CPU path and the GPU path of --block-kernels aten) each saves the launches
// and the intermediate tensors of a composite: RMSNorm's fp32 copy of x, its normalized output and the weight's
// product; silu(gate) kept beside the product; RoPE's rotate_half copy, its negation and two products.
//
// Numerics are the ATen ops' roundings, step for step, computed in fp32 and rounded to bf16 where ATen rounds:
//   RMSNorm  n = bf16(x * rstd), rstd = rsqrt(mean(x^2) + eps) in fp32 (transformers' LlamaRMSNorm: normalize in
//            fp32, cast to the input dtype, THEN times the weight), y = bf16(w * n). Backward: g = bf16(dy * w),
//            dx = bf16(rstd * (g - x rstd * mean(g * x rstd))), dw = bf16(sum over rows of bf16(dy * n)) summed
//            in fp32 in two fixed stages (each block its rows in order, then the blocks' partial sums in order): no
//            atomics, the same bits on every run. The row sums are ordered otherwise than ATen's reductions, so rstd,
//            x's gradient and the weight's may differ from the ATen path by a rounding (the CUDA tests state by how much).
//   SwiGLU   bf16(bf16(silu(gate)) * up), silu in fp32 as ATen's CUDA kernel (x / (1 + exp(-x))); backward:
//            d up = bf16(dy * bf16(silu(gate))), d gate = silu_backward(bf16(dy * up), gate) as ATen's kernel; this
//            program is compiled with fused multiply-adds contracted as nvcc contracts ATen's: bit for bit.
//   RoPE     bf16(bf16(x cos) + bf16(rotate_half(x) sin)) (transformers' rotate_half: (-x2, x1)); backward
//            bf16(bf16(g cos) + rotate_half^T(bf16(g sin))): bit for bit.
// Shapes: N rows of C (the hidden size), B = batch, T = time, H / Hk = query / key heads, D = head dim.
#include <ATen/ATen.h>
#include <torch/csrc/autograd/custom_function.h>

#include <algorithm>
#include <cstdint>
#include <string>
#include <utility>

#include "shardlm/core/compat.hpp"
#include "shardlm/core/errors.hpp"
#include "shardlm/core/nvrtc.hpp"
#include "shardlm/model/config.hpp"

#if SHARDLM_HAVE_CUDA
#include <c10/cuda/CUDAGuard.h>
#endif

namespace shardlm::model::fused {

namespace detail {
/// Helpers both programs include: 8 bf16 at a time (one 16-byte access where `vec`, else one by one up to `n`).
inline constexpr const char* common = R"CUDA(
#include "shardlm_bf16.cuh"
__device__ __forceinline__ float round_bf16(float f) { return from_bf16(to_bf16(f)); }
// p[e, e + 8) as floats; without `vec`, elements at n and past read as 0.
__device__ __forceinline__ void load8(const unsigned short* __restrict__ p, long long e, long long n, int vec, float* v) {
  if (vec) {
    const uint4 u = *reinterpret_cast<const uint4*>(p + e);
    const unsigned w[4] = {u.x, u.y, u.z, u.w};
#pragma unroll
    for (int k = 0; k < 4; ++k) { v[2 * k] = __uint_as_float(w[k] << 16); v[2 * k + 1] = __uint_as_float(w[k] & 0xffff0000u); }
  } else {
#pragma unroll
    for (int k = 0; k < 8; ++k) v[k] = e + k < n ? from_bf16(p[e + k]) : 0.f;
  }
}
__device__ __forceinline__ void store8(unsigned short* __restrict__ p, long long e, long long n, int vec, const unsigned short* b) {
  if (vec) {
    uint4 u;
    u.x = b[0] | ((unsigned)b[1] << 16); u.y = b[2] | ((unsigned)b[3] << 16);
    u.z = b[4] | ((unsigned)b[5] << 16); u.w = b[6] | ((unsigned)b[7] << 16);
    *reinterpret_cast<uint4*>(p + e) = u;
  } else {
#pragma unroll
    for (int k = 0; k < 8; ++k) if (e + k < n) p[e + k] = b[k];
  }
}
)CUDA";

/// RMSNorm and RoPE (no fused multiply-adds: every product and sum rounded as written, as ATen's separate ops round).
inline constexpr const char* norm_rope_source = R"CUDA(
#include "shardlm_block_common.cuh"
// The block's sum of v (blockDim.x a multiple of 32, at most 1024) in one fixed order; every thread gets it.
__device__ float block_sum(float v) {
  __shared__ float warp_sums[32];
  __shared__ float total;
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  __syncthreads();  // every thread has read the previous call's total
  if (lane == 0) warp_sums[warp] = v;
  __syncthreads();
  if (warp == 0) {
    v = lane < (int)(blockDim.x >> 5) ? warp_sums[lane] : 0.f;
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    if (lane == 0) total = v;
  }
  __syncthreads();
  return total;
}

// One block per row of x [N, C]; thread t holds chunks k of 8 elements at (k blockDim + t) 8, k < K, in registers:
// x is read once.
template <int K>
__device__ void rms_norm_forward(const unsigned short* __restrict__ x, const unsigned short* __restrict__ w,
                                 unsigned short* __restrict__ y, float* __restrict__ rstd, long long C, float eps, int vec,
                                 int vec_w) {
  const long long row = blockIdx.x;
  float v[K][8];
  float ss = 0.f;
#pragma unroll
  for (int k = 0; k < K; ++k) {
    const long long e = ((long long)k * blockDim.x + threadIdx.x) * 8;
    if (e < C) {
      load8(x + row * C, e, C, vec, v[k]);
#pragma unroll
      for (int i = 0; i < 8; ++i) ss += v[k][i] * v[k][i];
    }
  }
  const float r = rsqrtf(block_sum(ss) / (float)C + eps);  // rsqrt as ATen's kernels take it
  if (threadIdx.x == 0) rstd[row] = r;
#pragma unroll
  for (int k = 0; k < K; ++k) {
    const long long e = ((long long)k * blockDim.x + threadIdx.x) * 8;
    if (e < C) {
      float wv[8];
      unsigned short out[8];
      load8(w, e, C, vec_w, wv);
#pragma unroll
      for (int i = 0; i < 8; ++i) out[i] = to_bf16(wv[i] * round_bf16(v[k][i] * r));
      store8(y + row * C, e, C, vec, out);
    }
  }
}

// Rows blockIdx.x, + gridDim.x, ... of x [N, C]: dx, and this block's fp32 partial sums of the weight's gradient in
// partial[blockIdx.x] [C] (each column's products added in row order).
template <int K>
__device__ void rms_norm_backward(const unsigned short* __restrict__ x, const unsigned short* __restrict__ w,
                                  const unsigned short* __restrict__ dy, const float* __restrict__ rstd,
                                  unsigned short* __restrict__ dx, float* __restrict__ partial, long long N, long long C,
                                  int vec, int vec_w) {
  float acc[K][8];
#pragma unroll
  for (int k = 0; k < K; ++k)
#pragma unroll
    for (int i = 0; i < 8; ++i) acc[k][i] = 0.f;
  for (long long row = blockIdx.x; row < N; row += gridDim.x) {
    const float r = rstd[row];
    float n[K][8], g[K][8];
    float s = 0.f;
#pragma unroll
    for (int k = 0; k < K; ++k) {
      const long long e = ((long long)k * blockDim.x + threadIdx.x) * 8;
      if (e < C) {
        float xv[8], dv[8], wv[8];
        load8(x + row * C, e, C, vec, xv);
        load8(dy + row * C, e, C, vec, dv);
        load8(w, e, C, vec_w, wv);
#pragma unroll
        for (int i = 0; i < 8; ++i) {
          n[k][i] = xv[i] * r;                                    // the fp32 normalized x
          acc[k][i] += round_bf16(dv[i] * round_bf16(n[k][i]));   // dy * n, n as the forward rounded it
          g[k][i] = round_bf16(dv[i] * wv[i]);                    // the normalized output's gradient
          s += g[k][i] * n[k][i];
        }
      }
    }
    const float c = block_sum(s) / (float)C;
#pragma unroll
    for (int k = 0; k < K; ++k) {
      const long long e = ((long long)k * blockDim.x + threadIdx.x) * 8;
      if (e < C) {
        unsigned short out[8];
#pragma unroll
        for (int i = 0; i < 8; ++i) out[i] = to_bf16(r * (g[k][i] - n[k][i] * c));
        store8(dx + row * C, e, C, vec, out);
      }
    }
  }
#pragma unroll
  for (int k = 0; k < K; ++k) {
    const long long e = ((long long)k * blockDim.x + threadIdx.x) * 8;
#pragma unroll
    for (int i = 0; i < 8; ++i)
      if (e + i < C) partial[blockIdx.x * C + e + i] = acc[k][i];
  }
}

#define SHARDLM_RMS_NORM_KERNELS(K)                                                                                    \
  extern "C" __global__ void __launch_bounds__(256) shardlm_rms_norm_forward_##K(                                     \
      const unsigned short* x, const unsigned short* w, unsigned short* y, float* rstd, long long C, float eps, int vec, \
      int vec_w) {                                                                                                   \
    rms_norm_forward<K>(x, w, y, rstd, C, eps, vec, vec_w);                                                          \
  }                                                                                                                  \
  extern "C" __global__ void __launch_bounds__(256) shardlm_rms_norm_backward_##K(                                    \
      const unsigned short* x, const unsigned short* w, const unsigned short* dy, const float* rstd, unsigned short* dx, \
      float* partial, long long N, long long C, int vec, int vec_w) {                                                \
    rms_norm_backward<K>(x, w, dy, rstd, dx, partial, N, C, vec, vec_w);                                             \
  }
SHARDLM_RMS_NORM_KERNELS(1)
SHARDLM_RMS_NORM_KERNELS(2)
SHARDLM_RMS_NORM_KERNELS(4)
SHARDLM_RMS_NORM_KERNELS(8)

// out[j] = bf16(sum over b < G of partial[b][j]), 32 columns per block of 256 threads: 8 row groups summed in order,
// then the 8 group sums in order.
extern "C" __global__ void __launch_bounds__(256) shardlm_column_sum(const float* __restrict__ partial,
                                                                     unsigned short* __restrict__ out, long long G,
                                                                     long long C) {
  __shared__ float sums[8][33];
  const int lx = threadIdx.x & 31, ly = threadIdx.x >> 5;
  const long long j = (long long)blockIdx.x * 32 + lx;
  float s = 0.f;
  if (j < C)
    for (long long b = ly; b < G; b += 8) s += partial[b * C + j];
  sums[ly][lx] = s;
  __syncthreads();
  if (ly == 0 && j < C) {
    float t = 0.f;
#pragma unroll
    for (int k = 0; k < 8; ++k) t += sums[k][lx];
    out[j] = to_bf16(t);
  }
}

// RoPE on q [B, H, T, D] and k [B, Hk, T, D] (element strides of B, heads and T; D contiguous) with the tables
// cos, sin [T, D]; outputs laid out [B, T, heads, D]. One block per (b, t), a thread per pair (i, i + D/2) of a head's
// row (32-bit index arithmetic within the block). backward = 0: x cos + rotate_half(x) sin; 1: the gradient through
// it, g cos + rotate_half^T(g sin).
extern "C" __global__ void __launch_bounds__(256) shardlm_rope(
    const unsigned short* __restrict__ q, long long qb, long long qh, long long qt, const unsigned short* __restrict__ k,
    long long kb, long long kh, long long kt, const unsigned short* __restrict__ cos, const unsigned short* __restrict__ sin,
    unsigned short* __restrict__ q_out, unsigned short* __restrict__ k_out, long long T, int H, int Hk, int D,
    int backward) {
  const long long bt = blockIdx.x, b = bt / T, t = bt - b * T;
  const int half = D / 2, pairs = (H + Hk) * half;
  const unsigned short* c = cos + t * D;
  const unsigned short* s = sin + t * D;
  for (int p = threadIdx.x; p < pairs; p += blockDim.x) {
    const int head = p / half, i = p - head * half;
    const bool is_q = head < H;
    const int hh = is_q ? head : head - H;
    const unsigned short* src = is_q ? q + b * qb + hh * qh + t * qt : k + b * kb + hh * kh + t * kt;
    unsigned short* dst = is_q ? q_out + (bt * H + hh) * D : k_out + (bt * Hk + hh) * D;
    const float x1 = from_bf16(src[i]), x2 = from_bf16(src[i + half]);
    const float c1 = from_bf16(c[i]), c2 = from_bf16(c[i + half]), s1 = from_bf16(s[i]), s2 = from_bf16(s[i + half]);
    float o1, o2;
    if (!backward) {  // rotate_half(x) = (-x2, x1)
      o1 = round_bf16(x1 * c1) + round_bf16(-x2 * s1);
      o2 = round_bf16(x2 * c2) + round_bf16(x1 * s2);
    } else {          // gs = g sin; x1 gets gs2, x2 gets -gs1
      o1 = round_bf16(x1 * c1) + round_bf16(x2 * s2);
      o2 = round_bf16(x2 * c2) - round_bf16(x1 * s1);
    }
    dst[i] = to_bf16(o1);
    dst[i + half] = to_bf16(o2);
  }
}
)CUDA";

/// SwiGLU, compiled with fused multiply-adds as nvcc compiles ATen's silu kernels (ActivationSiluKernel.cu: silu
/// and silu_backward in fp32 opmath; the same expressions here).
inline constexpr const char* swiglu_source = R"CUDA(
#include "shardlm_block_common.cuh"
__device__ __forceinline__ float silu(float x) { return x / (1.0f + expf(-x)); }
__device__ __forceinline__ float silu_grad(float dy, float x) {
  const float s = 1.0f / (1.0f + expf(-x));
  return dy * s * (1.0f + x * (1.0f - s));
}
// out = bf16(bf16(silu(gate)) * up) over n elements, 8 per thread and step.
extern "C" __global__ void __launch_bounds__(256) shardlm_swiglu_forward(const unsigned short* __restrict__ gate,
                                                                         const unsigned short* __restrict__ up,
                                                                         unsigned short* __restrict__ out, long long n,
                                                                         int vec) {
  const long long chunks = (n + 7) / 8;
  for (long long c = (long long)blockIdx.x * blockDim.x + threadIdx.x; c < chunks; c += (long long)gridDim.x * blockDim.x) {
    const long long e = c * 8;
    float g[8], u[8];
    unsigned short o[8];
    load8(gate, e, n, vec, g);
    load8(up, e, n, vec, u);
#pragma unroll
    for (int i = 0; i < 8; ++i) o[i] = to_bf16(round_bf16(silu(g[i])) * u[i]);
    store8(out, e, n, vec, o);
  }
}
// d_gate, d_up from dy (the product's gradient); with `product`, silu(gate) * up recomputed there too.
extern "C" __global__ void __launch_bounds__(256) shardlm_swiglu_backward(
    const unsigned short* __restrict__ dy, const unsigned short* __restrict__ gate, const unsigned short* __restrict__ up,
    unsigned short* __restrict__ d_gate, unsigned short* __restrict__ d_up, unsigned short* __restrict__ product,
    long long n, int vec) {
  const long long chunks = (n + 7) / 8;
  for (long long c = (long long)blockIdx.x * blockDim.x + threadIdx.x; c < chunks; c += (long long)gridDim.x * blockDim.x) {
    const long long e = c * 8;
    float d[8], g[8], u[8];
    unsigned short dg[8], du[8], pr[8];
    load8(dy, e, n, vec, d);
    load8(gate, e, n, vec, g);
    load8(up, e, n, vec, u);
#pragma unroll
    for (int i = 0; i < 8; ++i) {
      const float act = round_bf16(silu(g[i]));
      du[i] = to_bf16(d[i] * act);
      dg[i] = to_bf16(silu_grad(round_bf16(d[i] * u[i]), g[i]));
      pr[i] = to_bf16(act * u[i]);
    }
    store8(d_gate, e, n, vec, dg);
    store8(d_up, e, n, vec, du);
    if (product) store8(product, e, n, vec, pr);
  }
}
)CUDA";

inline constexpr nvrtc::Program norm_rope_program{"shardlm_norm_rope.cu", norm_rope_source, /*fmad=*/false,
                                                  {"shardlm_block_common.cuh", common}};
inline constexpr nvrtc::Program swiglu_program{"shardlm_swiglu.cu", swiglu_source, /*fmad=*/true,
                                               {"shardlm_block_common.cuh", common}};

/// Threads of a block are at most 256; each holds K chunks of 8 elements of a row in registers (K = 1, 2, 4, 8):
/// rows of up to 16384 elements (Llama 3.1 405B's hidden size). 0: a longer row (the ATen path serves it).
inline int chunks_per_thread(int64_t C) {
  for (int k : {1, 2, 4, 8})
    if (C <= int64_t{8} * k * 256) return k;
  return 0;
}
inline unsigned norm_threads(int64_t C, int k) {
  const int64_t threads = (C + 8 * k - 1) / (8 * k);
  return static_cast<unsigned>(std::max<int64_t>(32, (threads + 31) / 32 * 32));
}
/// Blocks of the RMSNorm backward (each sums its rows' weight gradient, then the column sums add the blocks'): fixed,
/// not the device's SM count, so that the sums are ordered alike on every GPU; two per SM of an H100 or H200 (132
/// SMs), which hold two or more of them at once where rows are up to 8192 long: one wave.
inline constexpr int64_t norm_backward_blocks = 264;

inline bool aligned16(const at::Tensor& t) { return reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 == 0; }
inline unsigned elementwise_blocks(int64_t work) {
  return static_cast<unsigned>(std::clamp<int64_t>((work + 255) / 256, 1, 65536));
}
}  // namespace detail

/// Whether the kernels serve x under `kernels`: BlockKernels::fused, x bf16 on a GPU, and both programs compiled
/// (else, once, a warning that the ATen ops compute instead).
inline bool serve(BlockKernels kernels, const at::Tensor& x) {
#if SHARDLM_HAVE_CUDA
  if (kernels != BlockKernels::fused || !x.defined() || !x.is_cuda() || x.scalar_type() != at::kBFloat16) return false;
  constexpr const char* fallback = "RMSNorm, SwiGLU and RoPE compute with ATen ops instead (--block-kernels aten)";
  const int device = x.get_device();
  return nvrtc::function_or_warn(device, detail::norm_rope_program, "shardlm_rope", fallback) != nullptr &&
         nvrtc::function_or_warn(device, detail::swiglu_program, "shardlm_swiglu_forward", fallback) != nullptr;
#else
  (void)kernels, (void)x;
  return false;
#endif
}

/// serve() for RMSNorm of x [..., C] with weight [C]: also a bf16 weight on x's device and C <= 16384.
inline bool serve_rms_norm(BlockKernels kernels, const at::Tensor& x, const at::Tensor& weight) {
  return serve(kernels, x) && weight.scalar_type() == at::kBFloat16 && weight.device() == x.device() &&
         weight.dim() == 1 && x.dim() >= 1 && weight.size(0) == x.size(-1) && detail::chunks_per_thread(x.size(-1)) > 0;
}

struct RmsNormOut {
  at::Tensor y;     ///< w * bf16(normalized x), x's shape, bf16
  at::Tensor rstd;  ///< [N] fp32: 1 / sqrt(mean(x^2) + eps) of each row, for the backward
};
struct RmsNormGrads {
  at::Tensor dx;  ///< x's shape, bf16
  at::Tensor dw;  ///< [C], bf16
};
struct SwiGLUGrads {
  at::Tensor d_gate, d_up;  ///< views of one [2, ...] buffer
};
/// The RoPE kernel applies the rotation or, to a gradient, its transpose.
enum class RopeDirection { forward, backward };

#if SHARDLM_HAVE_CUDA
/// RMSNorm of x [..., C] (bf16, CUDA) with weight [C]: one kernel, one block per row. Only where serve_rms_norm.
inline RmsNormOut rms_norm_forward(const at::Tensor& x, const at::Tensor& weight, double eps) {
  const auto xc = x.contiguous(), w = weight.contiguous();
  const int64_t C = xc.size(-1), N = C > 0 ? xc.numel() / C : 0;
  auto y = at::empty(xc.sizes(), xc.options());
  auto rstd = at::empty({N}, xc.options().dtype(at::kFloat));
  if (N == 0 || C == 0) return {y, rstd};
  const int k = detail::chunks_per_thread(C);
  SHARDLM_ASSERT(k > 0, "rms_norm_forward: rows of ", C, " elements are beyond the kernel (serve_rms_norm refuses them)");
  const int device = xc.get_device();
  const c10::cuda::CUDAGuard guard(static_cast<c10::DeviceIndex>(device));
  const std::string name = "shardlm_rms_norm_forward_" + std::to_string(k);
  void* f = nvrtc::function(device, detail::norm_rope_program, name.c_str());
  const void* xp = xc.data_ptr();
  const void* wp = w.data_ptr();
  void* yp = y.data_ptr();
  void* rp = rstd.data_ptr();
  long long cols = C;
  float e = static_cast<float>(eps);
  // x and y in 16-byte accesses where rows start on 16-byte boundaries; the weight (a view into the engine's flat
  // buffer, anywhere) decides for itself.
  int vec = C % 8 == 0 && detail::aligned16(xc) && detail::aligned16(y) ? 1 : 0;
  int vec_w = C % 8 == 0 && detail::aligned16(w) ? 1 : 0;
  void* args[] = {&xp, &wp, &yp, &rp, &cols, &e, &vec, &vec_w};
  SHARDLM_ASSERT(N <= 0x7fffffff, "rms_norm_forward: ", N, " rows exceed a grid");
  nvrtc::launch(f, device, static_cast<unsigned>(N), detail::norm_threads(C, k), 0, args, "the RMSNorm forward kernel");
  return {y, rstd};
}

/// x's and the weight's gradients of rms_norm_forward from dy (x's shape) and its rstd: one kernel over the rows, one
/// over the columns (the weight's gradient summed in a fixed order).
inline RmsNormGrads rms_norm_backward(const at::Tensor& dy, const at::Tensor& x, const at::Tensor& weight,
                                     const at::Tensor& rstd) {
  const auto xc = x.contiguous(), w = weight.contiguous(), g = dy.to(x.scalar_type()).contiguous();
  TORCH_CHECK(g.sizes() == xc.sizes(), "rms_norm_backward: the gradient's shape ", g.sizes(), " is not x's ", xc.sizes());
  const int64_t C = xc.size(-1), N = C > 0 ? xc.numel() / C : 0;
  auto dx = at::empty(xc.sizes(), xc.options());
  auto dw = at::empty({C}, w.options());
  if (N == 0 || C == 0) return {dx, dw.zero_()};
  const int k = detail::chunks_per_thread(C);
  SHARDLM_ASSERT(k > 0, "rms_norm_backward: rows of ", C, " elements are beyond the kernel");
  const int64_t G = std::min(N, detail::norm_backward_blocks);
  auto partial = at::empty({G, C}, xc.options().dtype(at::kFloat));
  const int device = xc.get_device();
  const c10::cuda::CUDAGuard guard(static_cast<c10::DeviceIndex>(device));
  const std::string name = "shardlm_rms_norm_backward_" + std::to_string(k);
  void* f = nvrtc::function(device, detail::norm_rope_program, name.c_str());
  void* sum = nvrtc::function(device, detail::norm_rope_program, "shardlm_column_sum");
  const void* xp = xc.data_ptr();
  const void* wp = w.data_ptr();
  const void* gp = g.data_ptr();
  const void* rp = rstd.data_ptr();
  void* dxp = dx.data_ptr();
  void* pp = partial.data_ptr();
  void* dwp = dw.data_ptr();
  long long rows = N, cols = C, groups = G;
  int vec = C % 8 == 0 && detail::aligned16(xc) && detail::aligned16(g) && detail::aligned16(dx) ? 1 : 0;
  int vec_w = C % 8 == 0 && detail::aligned16(w) ? 1 : 0;
  void* args[] = {&xp, &wp, &gp, &rp, &dxp, &pp, &rows, &cols, &vec, &vec_w};
  nvrtc::launch(f, device, static_cast<unsigned>(G), detail::norm_threads(C, k), 0, args, "the RMSNorm backward kernel");
  void* sum_args[] = {&pp, &dwp, &groups, &cols};
  nvrtc::launch(sum, device, static_cast<unsigned>((C + 31) / 32), 256, 0, sum_args, "the RMSNorm weight-gradient sum");
  return {dx, dw};
}

/// silu(gate) * up (bf16, CUDA, one shape): one kernel. Only where serve().
inline at::Tensor swiglu_forward(const at::Tensor& gate, const at::Tensor& up) {
  TORCH_CHECK(gate.sizes() == up.sizes(), "swiglu_forward: gate ", gate.sizes(), " and up ", up.sizes(), " differ");
  const auto g = gate.contiguous(), u = up.to(gate.scalar_type()).contiguous();
  auto out = at::empty(g.sizes(), g.options());
  const int64_t n = g.numel();
  if (n == 0) return out;
  const int device = g.get_device();
  const c10::cuda::CUDAGuard guard(static_cast<c10::DeviceIndex>(device));
  void* f = nvrtc::function(device, detail::swiglu_program, "shardlm_swiglu_forward");
  const void* gp = g.data_ptr();
  const void* up_ = u.data_ptr();
  void* op = out.data_ptr();
  long long count = n;
  int vec = n % 8 == 0 && detail::aligned16(g) && detail::aligned16(u) && detail::aligned16(out) ? 1 : 0;
  void* args[] = {&gp, &up_, &op, &count, &vec};
  nvrtc::launch(f, device, detail::elementwise_blocks((n + 7) / 8), 256, 0, args, "the SwiGLU forward kernel");
  return out;
}

/// The gradients of silu(gate) * up from dy, written into one [2, ...] buffer; with `product`, silu(gate) * up
/// recomputed into it (the down projection's weight gradient reads it) in the same pass.
inline SwiGLUGrads swiglu_backward(const at::Tensor& dy, const at::Tensor& gate, const at::Tensor& up,
                                   at::Tensor* product = nullptr) {
  TORCH_CHECK(gate.sizes() == up.sizes() && dy.sizes() == gate.sizes(), "swiglu_backward: dy ", dy.sizes(), ", gate ",
              gate.sizes(), " and up ", up.sizes(), " differ");
  const auto g = gate.contiguous(), u = up.to(gate.scalar_type()).contiguous(), d = dy.to(gate.scalar_type()).contiguous();
  const int64_t n = g.numel();
  auto buffer = at::empty({2, n}, g.options());
  SwiGLUGrads grads{buffer[0].view(g.sizes()), buffer[1].view(g.sizes())};
  if (product) *product = at::empty(g.sizes(), g.options());
  if (n == 0) return grads;
  const int device = g.get_device();
  const c10::cuda::CUDAGuard guard(static_cast<c10::DeviceIndex>(device));
  void* f = nvrtc::function(device, detail::swiglu_program, "shardlm_swiglu_backward");
  const void* dp = d.data_ptr();
  const void* gp = g.data_ptr();
  const void* up_ = u.data_ptr();
  void* dgp = grads.d_gate.data_ptr();
  void* dup = grads.d_up.data_ptr();
  void* pp = product ? product->data_ptr() : nullptr;
  long long count = n;
  int vec = n % 8 == 0 && detail::aligned16(d) && detail::aligned16(g) && detail::aligned16(u) &&
                    detail::aligned16(buffer) && (!product || detail::aligned16(*product))
                ? 1 : 0;
  void* args[] = {&dp, &gp, &up_, &dgp, &dup, &pp, &count, &vec};
  nvrtc::launch(f, device, detail::elementwise_blocks((n + 7) / 8), 256, 0, args, "the SwiGLU backward kernel");
  return grads;
}

/// RoPE on q [B, H, T, D] and k [B, Hk, T, D] (any strides, D contiguous or made so; bf16, CUDA) with the tables cos,
/// sin [T, D] in one kernel: the rotated q and k (or, backward, the gradients of the unrotated ones) as contiguous
/// [B, T, H, D] and [B, T, Hk, D] (the projections' layout; transpose(1, 2) gives the heads' shape).
inline std::pair<at::Tensor, at::Tensor> rope(const at::Tensor& q, const at::Tensor& k, const at::Tensor& cos,
                                              const at::Tensor& sin, RopeDirection direction) {
  TORCH_CHECK(q.dim() == 4 && k.dim() == 4 && q.size(0) == k.size(0) && q.size(2) == k.size(2) && q.size(3) == k.size(3),
              "rope: q ", q.sizes(), " and k ", k.sizes(), " are not [B, heads, T, D] of one B, T and D");
  const int64_t B = q.size(0), H = q.size(1), Hk = k.size(1), T = q.size(2), D = q.size(3);
  TORCH_CHECK(D % 2 == 0 && cos.sizes() == at::IntArrayRef({T, D}) && sin.sizes() == at::IntArrayRef({T, D}),
              "rope: tables cos ", cos.sizes(), " and sin ", sin.sizes(), " are not [T, D] = [", T, ", ", D, "] (D even)");
  const auto last_contiguous = [](const at::Tensor& t) { return t.stride(3) == 1 ? t : t.contiguous(); };
  const auto qc = last_contiguous(q), kc = last_contiguous(k.to(q.scalar_type()));
  const auto c = cos.to(q.scalar_type()).contiguous(), s = sin.to(q.scalar_type()).contiguous();
  auto q_out = at::empty({B, T, H, D}, qc.options()), k_out = at::empty({B, T, Hk, D}, qc.options());
  SHARDLM_ASSERT(B * T <= 0x7fffffff && (H + Hk) * D <= 0x7fffffff, "rope: ", B, " x ", T, " rows of ", H + Hk, " x ",
                 D, " exceed the kernel's grid and 32-bit row index");
  if (B * T * (H + Hk) * D > 0) {
    const int device = qc.get_device();
    const c10::cuda::CUDAGuard guard(static_cast<c10::DeviceIndex>(device));
    void* f = nvrtc::function(device, detail::norm_rope_program, "shardlm_rope");
    const void* qp = qc.data_ptr();
    const void* kp = kc.data_ptr();
    const void* cp = c.data_ptr();
    const void* sp = s.data_ptr();
    void* qo = q_out.data_ptr();
    void* ko = k_out.data_ptr();
    long long qb = qc.stride(0), qh = qc.stride(1), qt = qc.stride(2), kb = kc.stride(0), kh = kc.stride(1),
              kt = kc.stride(2), t = T;
    int h = static_cast<int>(H), hk = static_cast<int>(Hk), d = static_cast<int>(D);
    int backward = direction == RopeDirection::backward ? 1 : 0;
    void* args[] = {&qp, &qb, &qh, &qt, &kp, &kb, &kh, &kt, &cp, &sp, &qo, &ko, &t, &h, &hk, &d, &backward};
    nvrtc::launch(f, device, static_cast<unsigned>(B * T), 256, 0, args, "the RoPE kernel");
  }
  return {q_out, k_out};
}
#else
inline RmsNormOut rms_norm_forward(const at::Tensor&, const at::Tensor&, double) {
  SHARDLM_ASSERT(false, "rms_norm_forward without CUDA");
  return {};
}
inline RmsNormGrads rms_norm_backward(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&) {
  SHARDLM_ASSERT(false, "rms_norm_backward without CUDA");
  return {};
}
inline at::Tensor swiglu_forward(const at::Tensor&, const at::Tensor&) {
  SHARDLM_ASSERT(false, "swiglu_forward without CUDA");
  return {};
}
inline SwiGLUGrads swiglu_backward(const at::Tensor&, const at::Tensor&, const at::Tensor&, at::Tensor* = nullptr) {
  SHARDLM_ASSERT(false, "swiglu_backward without CUDA");
  return {};
}
inline std::pair<at::Tensor, at::Tensor> rope(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                              RopeDirection) {
  SHARDLM_ASSERT(false, "rope without CUDA");
  return {};
}
#endif

// The plain path's autograd nodes over the kernels (ops::rms_norm, ops::swiglu_product, ops::rope_qk choose them).

/// RMSNorm: keeps x, the weight and rstd [N] (the ATen ops keep x's fp32 copy, rstd, the normalized output and the
/// weight).
struct RmsNormFunction : torch::autograd::Function<RmsNormFunction> {
  static at::Tensor forward(torch::autograd::AutogradContext* ctx, const at::Tensor& x, const at::Tensor& weight,
                            double eps) {
    auto out = rms_norm_forward(x, weight, eps);
    ctx->save_for_backward({x, weight, out.rstd});
    return out.y;
  }
  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list dys) {
    const auto saved = ctx->get_saved_variables();
    auto grads = rms_norm_backward(dys[0], saved[0], saved[1], saved[2]);
    return {ctx->needs_input_grad(0) ? grads.dx : at::Tensor(), ctx->needs_input_grad(1) ? grads.dw : at::Tensor(),
            at::Tensor()};
  }
};

/// silu(gate) * up: keeps gate and up (the ATen ops keep silu(gate) too).
struct SwiGLUFunction : torch::autograd::Function<SwiGLUFunction> {
  static at::Tensor forward(torch::autograd::AutogradContext* ctx, const at::Tensor& gate, const at::Tensor& up) {
    ctx->save_for_backward({gate, up});
    return swiglu_forward(gate, up);
  }
  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list dys) {
    const auto saved = ctx->get_saved_variables();
    auto grads = swiglu_backward(dys[0], saved[0], saved[1]);
    return {grads.d_gate, grads.d_up};
  }
};

/// RoPE on q and k in one kernel each way: keeps only the tables (the model's cached cos/sin). Returns q and k rotated
/// as [B, T, heads, D] (fresh tensors, not views: ops::rope_qk transposes them).
struct RopeFunction : torch::autograd::Function<RopeFunction> {
  static torch::autograd::variable_list forward(torch::autograd::AutogradContext* ctx, const at::Tensor& q,
                                                const at::Tensor& k, const at::Tensor& cos, const at::Tensor& sin) {
    ctx->saved_data["cos"] = cos;
    ctx->saved_data["sin"] = sin;
    ctx->saved_data["q_sizes"] = q.sizes().vec();
    ctx->saved_data["k_sizes"] = k.sizes().vec();
    auto [qr, kr] = rope(q, k, cos, sin, RopeDirection::forward);
    return {qr, kr};
  }
  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list dys) {
    const auto cos = ctx->saved_data["cos"].toTensor(), sin = ctx->saved_data["sin"].toTensor();
    // The outputs' gradients as [B, heads, T, D]; a query or key that nothing read back has none: zeros in its place.
    const auto given = [&](size_t i, const char* sizes) {
      return dys[i].defined() ? dys[i].transpose(1, 2) : at::zeros(ctx->saved_data[sizes].toIntVector(), cos.options());
    };
    auto [gq, gk] = rope(given(0, "q_sizes"), given(1, "k_sizes"), cos, sin, RopeDirection::backward);
    return {gq.transpose(1, 2), gk.transpose(1, 2), at::Tensor(), at::Tensor()};
  }
};

}  // namespace shardlm::model::fused
