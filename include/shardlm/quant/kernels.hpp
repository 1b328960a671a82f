#pragma once
// The CUDA dequantization kernels, compiled at run time with NVRTC (core/nvrtc.hpp) and launched on the current
// stream. Everything CUDA is compiled only where c10's CUDA headers are present (SHARDLM_HAVE_CUDA, core/compat.hpp).
#include <ATen/ATen.h>

#include <cstdint>

#include "shardlm/core/compat.hpp"
#include "shardlm/core/nvrtc.hpp"

#if SHARDLM_HAVE_CUDA
#include <c10/cuda/CUDAGuard.h>
#endif

namespace shardlm::quant::kernels {

enum class Kind { Int4, FP8 };

/// The kernels' source. Both write bf16 as raw uint16 with round-to-nearest-even (c10::BFloat16's rounding) and
/// compute in fp32 with explicitly rounded operations, so that they match the ATen path bit for bit.
inline constexpr const char* source = R"CUDA(
#include "shardlm_bf16.cuh"
__device__ __forceinline__ float from_e4m3(unsigned b) {
  const unsigned sign = (b & 0x80u) << 24, e = (b >> 3) & 15u, m = b & 7u;
  if (e == 15u && m == 7u) return __uint_as_float(sign | 0x7fc00000u);
  if (e == 0u) return __uint_as_float(sign | __float_as_uint((float)m * 0.001953125f));  // m x 2^-9
  return __uint_as_float(sign | ((e + 120u) << 23) | (m << 20));
}
__device__ __forceinline__ void store16(unsigned short* dst, const unsigned short* v, int vec) {
  if (vec) {
    uint4 a, b;
    a.x = v[0] | ((unsigned)v[1] << 16); a.y = v[2] | ((unsigned)v[3] << 16);
    a.z = v[4] | ((unsigned)v[5] << 16); a.w = v[6] | ((unsigned)v[7] << 16);
    b.x = v[8] | ((unsigned)v[9] << 16); b.y = v[10] | ((unsigned)v[11] << 16);
    b.z = v[12] | ((unsigned)v[13] << 16); b.w = v[14] | ((unsigned)v[15] << 16);
    reinterpret_cast<uint4*>(dst)[0] = a;
    reinterpret_cast<uint4*>(dst)[1] = b;
  } else {
    for (int k = 0; k < 16; ++k) dst[k] = v[k];
  }
}

// Int4: 4 threads per group of 64 values, 16 values (8 code bytes) each; 64 groups per block of 256 threads. The
// group's 16 bf16 levels (lo (15 - q) + hi q) / 15 are computed once into shared memory, then looked up.
extern "C" __global__ void __launch_bounds__(256) shardlm_dequantize_int4(
    const unsigned char* __restrict__ in, unsigned short* __restrict__ out, long long rows, long long cols,
    long long row_bytes, int vec) {
  __shared__ unsigned short lut[64][16];
  const long long groups = cols / 64;
  const long long gi = (long long)blockIdx.x * 64 + threadIdx.x / 4;
  const int slot = threadIdx.x / 4, sub = threadIdx.x & 3;
  const bool active = gi < rows * groups;
  const long long row = active ? gi / groups : 0, g = active ? gi - row * groups : 0;
  const unsigned char* r = in + row * row_bytes;
  if (active) {
    const unsigned char* lp = r + cols / 2 + 2 * g;
    const unsigned char* hp = r + cols / 2 + 2 * groups + 2 * g;
    const float lo = __uint_as_float(((unsigned)lp[0] | ((unsigned)lp[1] << 8)) << 16);
    const float hi = __uint_as_float(((unsigned)hp[0] | ((unsigned)hp[1] << 8)) << 16);
    for (int k = 0; k < 4; ++k) {
      const int q = sub * 4 + k;
      const float sum = __fadd_rn(__fmul_rn(lo, (float)(15 - q)), __fmul_rn(hi, (float)q));
      lut[slot][q] = to_bf16(__fdiv_rn(sum, 15.0f));
    }
  }
  __syncthreads();
  if (!active) return;
  const unsigned char* codes = r + g * 32 + sub * 8;
  unsigned c[8];
  if (vec) {
    const uint2 u = *reinterpret_cast<const uint2*>(codes);
    for (int k = 0; k < 4; ++k) { c[k] = (u.x >> (8 * k)) & 0xffu; c[4 + k] = (u.y >> (8 * k)) & 0xffu; }
  } else {
    for (int k = 0; k < 8; ++k) c[k] = codes[k];
  }
  unsigned short v[16];
  for (int k = 0; k < 8; ++k) { v[2 * k] = lut[slot][c[k] & 15u]; v[2 * k + 1] = lut[slot][c[k] >> 4]; }
  store16(out + row * cols + g * 64 + sub * 16, v, vec);
}

// FP8: one thread per 16 values of a row; value = e4m3(code) x the row's fp32 scale, rounded to bf16.
extern "C" __global__ void __launch_bounds__(256) shardlm_dequantize_fp8(
    const unsigned char* __restrict__ in, unsigned short* __restrict__ out, long long rows, long long cols,
    long long row_bytes, int vec) {
  const long long chunks = (cols + 15) / 16;
  const long long t = (long long)blockIdx.x * blockDim.x + threadIdx.x;
  if (t >= rows * chunks) return;
  const long long row = t / chunks, c0 = (t - row * chunks) * 16;
  const unsigned char* r = in + row * row_bytes;
  const float scale = __uint_as_float((unsigned)r[cols] | ((unsigned)r[cols + 1] << 8) |
                                      ((unsigned)r[cols + 2] << 16) | ((unsigned)r[cols + 3] << 24));
  const int n = cols - c0 < 16 ? (int)(cols - c0) : 16;
  unsigned short v[16];
  if (vec) {
    const uint4 u = *reinterpret_cast<const uint4*>(r + c0);
    const unsigned w[4] = {u.x, u.y, u.z, u.w};
    for (int k = 0; k < 16; ++k) v[k] = to_bf16(__fmul_rn(from_e4m3((w[k / 4] >> (8 * (k % 4))) & 0xffu), scale));
    store16(out + row * cols + c0, v, 1);
  } else {
    for (int k = 0; k < n; ++k) out[row * cols + c0 + k] = to_bf16(__fmul_rn(from_e4m3(r[c0 + k]), scale));
  }
}
)CUDA";

inline constexpr nvrtc::Program program{"shardlm_quant.cu", source};

/// Dequantizes `rows` rows of `in` (uint8, CUDA, contiguous) into out (bf16 [rows, cols], contiguous, same device)
/// with the kernel of `kind` on the current stream. Returns false, having warned once, when the kernels cannot be
/// compiled or loaded (the caller then uses the ATen path); launch errors throw.
inline bool dequantize(Kind kind, const at::Tensor& in, int64_t rows, int64_t cols, int64_t row_bytes,
                       const at::Tensor& out) {
#if SHARDLM_HAVE_CUDA
  const int device = in.get_device();
  const c10::cuda::CUDAGuard guard(static_cast<c10::DeviceIndex>(device));
  void* f = nvrtc::function_or_warn(device, program, kind == Kind::Int4 ? "shardlm_dequantize_int4" : "shardlm_dequantize_fp8",
                                    "dequantizing with ATen ops instead (slower, more memory)");
  if (!f) return false;
  if (rows == 0 || cols == 0) return true;
  const auto in_addr = reinterpret_cast<uintptr_t>(in.data_ptr()), out_addr = reinterpret_cast<uintptr_t>(out.data_ptr());
  int vec = in_addr % 16 == 0 && out_addr % 16 == 0 && row_bytes % 16 == 0 && (kind == Kind::Int4 || cols % 16 == 0);
  const void* in_ptr = in.data_ptr();
  void* out_ptr = out.data_ptr();
  void* args[] = {&in_ptr, &out_ptr, &rows, &cols, &row_bytes, &vec};
  const int64_t threads = kind == Kind::Int4 ? rows * (cols / 64) * 4 : rows * ((cols + 15) / 16);
  nvrtc::launch(f, device, static_cast<unsigned>((threads + 255) / 256), 256, 0, args, "the dequantization kernel");
  return true;
#else
  (void)kind, (void)in, (void)rows, (void)cols, (void)row_bytes, (void)out;
  return false;
#endif
}

}  // namespace shardlm::quant::kernels
