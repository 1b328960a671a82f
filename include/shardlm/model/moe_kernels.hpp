#pragma once
// The MoE token dispatch and combine (model/moe.hpp): sorting the picks by expert, the backward of the gather of the
// sorted rows, and the weighted combine with its backward. Each has two forms: ATen ops (the CPU path and the test
// oracle) and, for fp32 and bf16 tensors on a GPU, CUDA kernels (NVRTC, core/nvrtc.hpp) that make one pass where the
// ATen ops make several and keep no [N k, C] fp32 temporaries. The dispatchers at the end pick the kernels where
// they serve the tensors and the ATen ops elsewhere.
//
// N = tokens, k = picks per token, P = N k picks (pick p = n k + j is token n's j-th expert), E = experts, C = hidden.
// `back[p]` is the sorted row of pick p, `order[row]` the pick of a sorted row, `token[row]` = order[row] / k.
//
// Numerics: the kernels do what the ATen ops do in the same order (products rounded to fp32, sums over a token's
// picks in pick order starting from 0, one cast at the end; no fused multiply-adds), so they agree bit for bit for
// k <= 2 (one addition: any order is the same) and the sort is the same stable order. The one exception is the
// weights' gradient, a dot product over C: the kernel sums its fp32 products per thread and then over the block,
// ATen in its own reduction order; the two differ by the rounding of an fp32 sum of C terms (test_model bounds it).
#include <ATen/ATen.h>

#include <algorithm>
#include <cstdint>
#include <initializer_list>
#include <optional>
#include <string>
#include <utility>

#include "shardlm/core/compat.hpp"
#include "shardlm/core/nvrtc.hpp"

#if SHARDLM_HAVE_CUDA
#include <c10/cuda/CUDAGuard.h>
#endif

namespace shardlm::model::ops {

/// The picks of N tokens sorted by expert (pick p = n k + j is token n's j-th expert): `order` [N k] lists the
/// picks in sorted order, `token` [N k] the token of each sorted row, `back` [N k] the sorted row of each pick,
/// `counts` [E] the rows of each expert. All int64.
struct SortedPicks {
  at::Tensor order, token, back, counts;
  int64_t k;
};

/// The ATen forms: the CPU path, and the oracle the kernels are tested against.
namespace moe_aten {

inline SortedPicks sort_picks(const at::Tensor& experts, int64_t E) {  // experts [N, k] int64
  const int64_t k = experts.size(1);
  const auto flat = experts.reshape({-1});                                                    // [N k]
  auto order = std::get<1>(at::sort(flat, /*stable=*/true, /*dim=*/0, /*descending=*/false));  // [N k]
  auto token = at::floor_divide(order, k);
  auto back = at::empty_like(order).scatter_(0, order, at::arange(order.size(0), order.options()));
  return {std::move(order), std::move(token), std::move(back), at::bincount(flat, {}, E), k};
}

/// gx [N, C]: each token's k rows of g [N k, C] summed in pick order in fp32, cast once.
inline at::Tensor gather_backward(const at::Tensor& g, const at::Tensor& back, int64_t k) {
  const int64_t C = g.size(1);
  const auto picks = g.index_select(0, back).view({-1, k, C});                                // [N, k, C]
  return k == 1 ? picks.squeeze(1) : picks.sum(1, /*keepdim=*/false, at::kFloat).to(g.scalar_type());
}

/// y [N, C] = sum_j weights[n, j] x ys[back[n k + j]] in fp32 in pick order, cast once to ys' dtype.
inline at::Tensor combine_forward(const at::Tensor& ys, const at::Tensor& weights, const at::Tensor& back) {
  const auto picks = ys.index_select(0, back).view({weights.size(0), weights.size(1), ys.size(1)});  // [N, k, C]
  return (picks.to(at::kFloat) * weights.unsqueeze(-1)).sum(1).to(ys.scalar_type());
}

/// The combine's gradients from gy [N, C]: g_ys [N k, C] (row r: gy[token[r]] x the weight of its pick, in fp32,
/// cast) and g_w [N, k] fp32 (the dot product of each pick's row of ys with its token's gy).
inline std::pair<at::Tensor, at::Tensor> combine_backward(const at::Tensor& gy, const at::Tensor& ys,
                                                          const at::Tensor& weights, const at::Tensor& order,
                                                          const at::Tensor& token, const at::Tensor& back) {
  const int64_t N = weights.size(0), k = weights.size(1), C = ys.size(1);
  const auto w_sorted = weights.reshape({-1}).index_select(0, order).unsqueeze(-1);         // [N k, 1] fp32
  auto g_ys = (gy.index_select(0, token) * w_sorted).to(ys.scalar_type());                  // [N k, C]
  const auto picks = ys.index_select(0, back).view({N, k, C});
  auto g_w = (picks.to(at::kFloat) * gy.to(at::kFloat).unsqueeze(1)).sum(-1);              // [N, k] fp32
  return {std::move(g_ys), std::move(g_w)};
}

}  // namespace moe_aten

namespace detail {

/// The kernels. Row kernels run one block per token over its C columns, 16 bytes a thread where C and the
/// pointers allow (the `_vec` variants) and one element a thread elsewhere; T is float or bf16 (raw uint16).
/// The sort is a stable counting sort over the E experts in two launches: each block of `chunk` picks counts its
/// experts (`count`), then each block places its picks after those of all experts before and of the blocks before
/// (`scatter`), ranking equal experts within a warp by __match_any_sync, so equal experts keep their pick order:
/// the order of a stable sort, with no general sort and no host sync (bincount waits for the GPU twice).
inline constexpr const char* moe_source = R"CUDA(
#include "shardlm_bf16.cuh"

__device__ __forceinline__ float to_f(float v) { return v; }
__device__ __forceinline__ float to_f(unsigned short v) { return from_bf16(v); }
__device__ __forceinline__ void from_f(float& d, float v) { d = v; }
__device__ __forceinline__ void from_f(unsigned short& d, float v) { d = to_bf16(v); }

// W consecutive elements at p as floats: one 16-byte access when W > 1 (p 16-byte aligned).
template <class T, int W>
__device__ __forceinline__ void load(const T* p, float* v) {
  if constexpr (W == 1) {
    v[0] = to_f(p[0]);
  } else {
    const uint4 u = *reinterpret_cast<const uint4*>(p);
    const unsigned w[4] = {u.x, u.y, u.z, u.w};
    if constexpr (sizeof(T) == 4) {
      for (int i = 0; i < 4; ++i) v[i] = __uint_as_float(w[i]);
    } else {
      for (int i = 0; i < 4; ++i) v[2 * i] = __uint_as_float(w[i] << 16), v[2 * i + 1] = __uint_as_float(w[i] & 0xffff0000u);
    }
  }
}
template <class T, int W>
__device__ __forceinline__ void store(T* p, const float* v) {
  if constexpr (W == 1) {
    from_f(p[0], v[0]);
  } else {
    uint4 u;
    unsigned* w = reinterpret_cast<unsigned*>(&u);
    if constexpr (sizeof(T) == 4) {
      for (int i = 0; i < 4; ++i) w[i] = __float_as_uint(v[i]);
    } else {
      for (int i = 0; i < 4; ++i) w[i] = (unsigned)to_bf16(v[2 * i]) | ((unsigned)to_bf16(v[2 * i + 1]) << 16);
    }
    *reinterpret_cast<uint4*>(p) = u;
  }
}

// The sum of v over the block (blockDim.x a multiple of 32, at most 1024), valid in thread 0; `scratch` holds 32.
__device__ __forceinline__ float block_sum(float v, float* scratch) {
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  if ((threadIdx.x & 31) == 0) scratch[threadIdx.x >> 5] = v;
  __syncthreads();
  float total = 0.f;
  if (threadIdx.x == 0)
    for (int w = 0; w < (int)(blockDim.x >> 5); ++w) total += scratch[w];
  __syncthreads();  // scratch is reused by the next call
  return total;
}

// gx[n] = sum_j g[back[n k + j]]: fp32 from 0 in pick order, one cast.
template <class T, int W>
__device__ void gather_backward(const T* __restrict__ g, const long long* __restrict__ back, T* __restrict__ gx,
                                long long C, int k) {
  const long long n = blockIdx.x;
  for (long long c = (long long)threadIdx.x * W; c < C; c += (long long)blockDim.x * W) {
    float acc[W], v[W];
    for (int i = 0; i < W; ++i) acc[i] = 0.f;
    for (int j = 0; j < k; ++j) {
      load<T, W>(g + back[n * k + j] * C + c, v);
      for (int i = 0; i < W; ++i) acc[i] += v[i];
    }
    store<T, W>(gx + n * C + c, acc);
  }
}

// y[n] = sum_j w[n k + j] x ys[back[n k + j]]: each product rounded to fp32, summed from 0 in pick order, one cast.
template <class T, int W>
__device__ void combine_forward(const T* __restrict__ ys, const float* __restrict__ w, const long long* __restrict__ back,
                                T* __restrict__ y, long long C, int k) {
  const long long n = blockIdx.x;
  for (long long c = (long long)threadIdx.x * W; c < C; c += (long long)blockDim.x * W) {
    float acc[W], v[W];
    for (int i = 0; i < W; ++i) acc[i] = 0.f;
    for (int j = 0; j < k; ++j) {
      const float wj = w[n * k + j];
      load<T, W>(ys + back[n * k + j] * C + c, v);
      for (int i = 0; i < W; ++i) acc[i] += v[i] * wj;
    }
    store<T, W>(y + n * C + c, acc);
  }
}

// For each pick p = n k + j with row r = back[p]: g_ys[r] = gy[n] x w[p] (fp32, cast) and g_w[p] = dot(ys[r], gy[n])
// (fp32 products, summed per thread, then over the block).
template <class T, int W>
__device__ void combine_backward(const T* __restrict__ gy, const T* __restrict__ ys, const float* __restrict__ w,
                                 const long long* __restrict__ back, T* __restrict__ g_ys, float* __restrict__ g_w,
                                 long long C, int k) {
  __shared__ float scratch[32];
  const long long n = blockIdx.x;
  for (int j = 0; j < k; ++j) {
    const long long p = n * k + j, r = back[p];
    const float wj = w[p];
    float dot = 0.f;
    for (long long c = (long long)threadIdx.x * W; c < C; c += (long long)blockDim.x * W) {
      float g[W], v[W], out[W];
      load<T, W>(gy + n * C + c, g);
      load<T, W>(ys + r * C + c, v);
      for (int i = 0; i < W; ++i) {
        out[i] = g[i] * wj;
        dot += v[i] * g[i];
      }
      store<T, W>(g_ys + r * C + c, out);
    }
    dot = block_sum(dot, scratch);
    if (threadIdx.x == 0) g_w[p] = dot;
  }
}

#define SHARDLM_MOE_ROW_KERNELS(SUFFIX, T, W)                                                                        \
  extern "C" __global__ void __launch_bounds__(256) shardlm_moe_gather_backward_##SUFFIX(                            \
      const T* g, const long long* back, T* gx, long long C, int k) {                                                 \
    gather_backward<T, W>(g, back, gx, C, k);                                                                         \
  }                                                                                                                   \
  extern "C" __global__ void __launch_bounds__(256) shardlm_moe_combine_forward_##SUFFIX(                            \
      const T* ys, const float* w, const long long* back, T* y, long long C, int k) {                                 \
    combine_forward<T, W>(ys, w, back, y, C, k);                                                                      \
  }                                                                                                                   \
  extern "C" __global__ void __launch_bounds__(256) shardlm_moe_combine_backward_##SUFFIX(                           \
      const T* gy, const T* ys, const float* w, const long long* back, T* g_ys, float* g_w, long long C, int k) {      \
    combine_backward<T, W>(gy, ys, w, back, g_ys, g_w, C, k);                                                         \
  }
SHARDLM_MOE_ROW_KERNELS(f32, float, 1)
SHARDLM_MOE_ROW_KERNELS(f32_vec, float, 4)
SHARDLM_MOE_ROW_KERNELS(bf16, unsigned short, 1)
SHARDLM_MOE_ROW_KERNELS(bf16_vec, unsigned short, 8)

// An expert index kept inside [0, E): the router's top-k never leaves it, and a stray value must not write outside
// the shared counters.
__device__ __forceinline__ int expert_at(const long long* experts, long long p, int E) {
  const long long e = experts[p];
  return e < 0 ? 0 : e >= E ? E - 1 : (int)e;
}

// hist[b, e]: the picks of expert e among picks [b chunk, (b + 1) chunk). Dynamic shared memory: E ints.
extern "C" __global__ void __launch_bounds__(256) shardlm_moe_sort_count(const long long* __restrict__ experts,
                                                                         int* __restrict__ hist, long long P, int E,
                                                                         long long chunk) {
  extern __shared__ int counts[];
  for (int e = threadIdx.x; e < E; e += blockDim.x) counts[e] = 0;
  __syncthreads();
  const long long first = (long long)blockIdx.x * chunk, last = min(first + chunk, P);
  for (long long p = first + threadIdx.x; p < last; p += blockDim.x) atomicAdd(&counts[expert_at(experts, p, E)], 1);
  __syncthreads();
  for (int e = threadIdx.x; e < E; e += blockDim.x) hist[(long long)blockIdx.x * E + e] = counts[e];
}

// Block b places its chunk's picks: row = (picks of experts < e) + (picks of e in blocks < b) + (picks of e earlier
// in the chunk). Block 0 also writes counts [E] (int64). Dynamic shared memory: (1 + warps) E ints.
extern "C" __global__ void __launch_bounds__(256) shardlm_moe_sort_scatter(
    const long long* __restrict__ experts, const int* __restrict__ hist, long long* __restrict__ order,
    long long* __restrict__ token, long long* __restrict__ back, long long* __restrict__ counts, long long P, int E,
    int k, int blocks, long long chunk) {
  extern __shared__ int shared[];
  int* next = shared;          // [E]: the next free row of each expert in this block
  int* in_warp = shared + E;   // [warps][E]: the picks of each expert in each warp of the tile
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
  for (int e = threadIdx.x; e < E; e += blockDim.x) {
    int total = 0, before = 0;
    for (int b = 0; b < blocks; ++b) {
      const int h = hist[(long long)b * E + e];
      total += h;
      if (b < (int)blockIdx.x) before += h;
    }
    next[e] = before;
    in_warp[e] = total;
    if (blockIdx.x == 0) counts[e] = total;
  }
  __syncthreads();
  if (threadIdx.x == 0)
    for (int e = 0, start = 0; e < E; ++e) next[e] += start, start += in_warp[e];
  __syncthreads();
  const long long first = (long long)blockIdx.x * chunk, last = min(first + chunk, P);
  for (long long tile = first; tile < last; tile += blockDim.x) {
    for (int i = threadIdx.x; i < warps * E; i += blockDim.x) in_warp[i] = 0;
    __syncthreads();
    const long long p = tile + threadIdx.x;
    const bool valid = p < last;
    const int e = valid ? expert_at(experts, p, E) : -1;
    const unsigned same = __match_any_sync(0xffffffffu, e);
    const int rank = __popc(same & ((1u << lane) - 1u));
    if (valid && rank == 0) in_warp[warp * E + e] = __popc(same);
    __syncthreads();
    if (valid) {
      long long row = next[e] + rank;
      for (int w = 0; w < warp; ++w) row += in_warp[w * E + e];
      order[row] = p;
      token[row] = p / k;
      back[p] = row;
    }
    __syncthreads();
    for (int i = threadIdx.x; i < E; i += blockDim.x)
      for (int w = 0; w < warps; ++w) next[i] += in_warp[w * E + i];
    __syncthreads();
  }
}
)CUDA";

inline constexpr nvrtc::Program moe_program{"shardlm_moe.cu", moe_source};

/// The sort's picks per block and the largest E it takes (its shared counters: (1 + 8 warps) E ints, 36 KiB).
inline constexpr int64_t sort_chunk = 2048;
inline constexpr int64_t sort_max_experts = 1024;

}  // namespace detail

/// The CUDA forms: nullopt where they do not serve the tensors (not CUDA, a dtype other than fp32 and bf16, the
/// kernels not available: warned once), and the caller takes the ATen form.
namespace moe_cuda {

#if SHARDLM_HAVE_CUDA
namespace detail {

inline void* kernel(int device, const std::string& name) {
  return nvrtc::function_or_warn(device, ops::detail::moe_program, name.c_str(),
                                 "the MoE dispatch and combine use ATen ops instead (more passes over memory)");
}

/// A row kernel for `t`'s dtype on `device`: the 16-byte variant where C and every pointer allow it, and its threads
/// for one row of C columns (a warp per 32 accesses, at most 256). `f` is null where the dtype is not served or the
/// kernels are not available.
struct RowKernel {
  void* f = nullptr;
  unsigned threads = 0;
};
inline RowKernel row_kernel(int device, const char* base, const at::Tensor& t, int64_t C,
                            std::initializer_list<const void*> ptrs) {
  const bool bf16 = t.scalar_type() == at::kBFloat16;
  if (!bf16 && t.scalar_type() != at::kFloat) return {};
  const int64_t width = bf16 ? 8 : 4;
  bool vec = C % width == 0;
  for (const void* p : ptrs) vec = vec && reinterpret_cast<uintptr_t>(p) % 16 == 0;
  const int64_t accesses = vec ? C / width : C;
  return {kernel(device, std::string(base) + (bf16 ? "_bf16" : "_f32") + (vec ? "_vec" : "")),
          static_cast<unsigned>(std::clamp<int64_t>((accesses + 31) / 32 * 32, 32, 256))};
}

/// Launches `rk` with one block per row of N (none when there is nothing to compute).
inline void launch_rows(const RowKernel& rk, int device, int64_t N, int64_t C, void** args, const char* what) {
  if (N > 0 && C > 0) nvrtc::launch(rk.f, device, static_cast<unsigned>(N), rk.threads, 0, args, what);
}

inline bool on_cuda(std::initializer_list<const at::Tensor*> ts) {
  for (const auto* t : ts)
    if (!t->is_cuda()) return false;
  return true;
}

}  // namespace detail

inline std::optional<at::Tensor> gather_backward(const at::Tensor& g_in, const at::Tensor& back_in, int64_t k) {
  if (!detail::on_cuda({&g_in, &back_in}) || g_in.dim() != 2 || k < 1) return std::nullopt;
  const int device = g_in.get_device();
  const c10::cuda::CUDAGuard guard(static_cast<c10::DeviceIndex>(device));
  const auto g = g_in.contiguous(), back = back_in.to(at::kLong).contiguous();
  long long C = g.size(1);
  const int64_t N = g.size(0) / k;
  auto gx = at::empty({N, C}, g.options());                                                  // [N, C]
  const auto rk = detail::row_kernel(device, "shardlm_moe_gather_backward", g, C, {g.data_ptr(), gx.data_ptr()});
  if (!rk.f) return std::nullopt;
  const void* g_ptr = g.data_ptr();
  const void* b_ptr = back.data_ptr();
  void* gx_ptr = gx.data_ptr();
  int kk = static_cast<int>(k);
  void* args[] = {&g_ptr, &b_ptr, &gx_ptr, &C, &kk};
  detail::launch_rows(rk, device, N, C, args, "the MoE gather's backward");
  return gx;
}

inline std::optional<at::Tensor> combine_forward(const at::Tensor& ys_in, const at::Tensor& weights_in,
                                                 const at::Tensor& back_in) {
  if (!detail::on_cuda({&ys_in, &weights_in, &back_in}) || weights_in.scalar_type() != at::kFloat) return std::nullopt;
  const int device = ys_in.get_device();
  const c10::cuda::CUDAGuard guard(static_cast<c10::DeviceIndex>(device));
  const auto ys = ys_in.contiguous(), w = weights_in.contiguous(), back = back_in.to(at::kLong).contiguous();
  const int64_t N = w.size(0);
  long long C = ys.size(1);
  auto y = at::empty({N, C}, ys.options());                                                  // [N, C]
  const auto rk = detail::row_kernel(device, "shardlm_moe_combine_forward", ys, C, {ys.data_ptr(), y.data_ptr()});
  if (!rk.f) return std::nullopt;
  const void* ys_ptr = ys.data_ptr();
  const void* w_ptr = w.data_ptr();
  const void* b_ptr = back.data_ptr();
  void* y_ptr = y.data_ptr();
  int k = static_cast<int>(w.size(1));
  void* args[] = {&ys_ptr, &w_ptr, &b_ptr, &y_ptr, &C, &k};
  detail::launch_rows(rk, device, N, C, args, "the MoE combine");
  return y;
}

inline std::optional<std::pair<at::Tensor, at::Tensor>> combine_backward(const at::Tensor& gy_in, const at::Tensor& ys_in,
                                                                         const at::Tensor& weights_in,
                                                                         const at::Tensor& back_in) {
  if (!detail::on_cuda({&gy_in, &ys_in, &weights_in, &back_in}) || weights_in.scalar_type() != at::kFloat ||
      gy_in.scalar_type() != ys_in.scalar_type())
    return std::nullopt;
  const int device = ys_in.get_device();
  const c10::cuda::CUDAGuard guard(static_cast<c10::DeviceIndex>(device));
  const auto gy = gy_in.contiguous(), ys = ys_in.contiguous(), w = weights_in.contiguous();
  const auto back = back_in.to(at::kLong).contiguous();
  const int64_t N = w.size(0);
  long long C = ys.size(1);
  auto g_ys = at::empty_like(ys, at::MemoryFormat::Contiguous);                               // [N k, C]
  auto g_w = at::empty_like(w);                                                               // [N, k] fp32
  const auto rk = detail::row_kernel(device, "shardlm_moe_combine_backward", ys, C,
                                     {gy.data_ptr(), ys.data_ptr(), g_ys.data_ptr()});
  if (!rk.f) return std::nullopt;
  if (C == 0) g_w.zero_();  // an empty dot product
  const void* gy_ptr = gy.data_ptr();
  const void* ys_ptr = ys.data_ptr();
  const void* w_ptr = w.data_ptr();
  const void* b_ptr = back.data_ptr();
  void* g_ys_ptr = g_ys.data_ptr();
  void* g_w_ptr = g_w.data_ptr();
  int k = static_cast<int>(w.size(1));
  void* args[] = {&gy_ptr, &ys_ptr, &w_ptr, &b_ptr, &g_ys_ptr, &g_w_ptr, &C, &k};
  detail::launch_rows(rk, device, N, C, args, "the MoE combine's backward");
  return std::make_pair(std::move(g_ys), std::move(g_w));
}

namespace detail {

/// Whether the sort's kernels take these picks: CUDA, at most sort_max_experts experts, fewer than 2^31 picks (int
/// rows and counts).
inline bool sort_serves(const at::Tensor& picks, int64_t E) {
  return picks.is_cuda() && E >= 1 && E <= ops::detail::sort_max_experts && picks.numel() < (int64_t{1} << 31);
}

/// hist [blocks, E] int32: the picks of each expert in each block of sort_chunk picks of `picks` (int64, contiguous,
/// not empty), by the count kernel `count` on the current stream.
inline at::Tensor count_per_block(void* count, int device, const at::Tensor& picks, int64_t E) {
  long long P = picks.numel(), chunk = ops::detail::sort_chunk;
  int e = static_cast<int>(E);
  const int64_t blocks = (P + chunk - 1) / chunk;
  auto hist = at::empty({blocks, E}, picks.options().dtype(at::kInt));                      // [blocks, E]
  const void* x = picks.data_ptr();
  void* h = hist.data_ptr();
  void* args[] = {&x, &h, &P, &e, &chunk};
  nvrtc::launch(count, device, static_cast<unsigned>(blocks), 256, static_cast<unsigned>(E * sizeof(int)), args,
                "the MoE sort's count");
  return hist;
}

}  // namespace detail

/// The picks of each expert [E] int64 among `picks` [P] (int64), as bincount(picks, {}, E) gives them, without
/// bincount's two host syncs.
inline std::optional<at::Tensor> expert_counts(const at::Tensor& picks_in, int64_t E) {
  if (!detail::sort_serves(picks_in, E) || picks_in.dim() != 1) return std::nullopt;
  const int device = picks_in.get_device();
  const c10::cuda::CUDAGuard guard(static_cast<c10::DeviceIndex>(device));
  void* count = detail::kernel(device, "shardlm_moe_sort_count");
  if (!count) return std::nullopt;
  const auto picks = picks_in.to(at::kLong).contiguous();
  if (picks.numel() == 0) return at::zeros({E}, picks.options());
  return detail::count_per_block(count, device, picks, E).sum(0, /*keepdim=*/false, at::kLong);
}

inline std::optional<SortedPicks> sort_picks(const at::Tensor& experts_in, int64_t E) {
  if (!detail::sort_serves(experts_in, E) || experts_in.dim() != 2) return std::nullopt;
  const int device = experts_in.get_device();
  const c10::cuda::CUDAGuard guard(static_cast<c10::DeviceIndex>(device));
  void* count = detail::kernel(device, "shardlm_moe_sort_count");
  void* scatter = count ? detail::kernel(device, "shardlm_moe_sort_scatter") : nullptr;
  if (!scatter) return std::nullopt;
  const auto experts = experts_in.to(at::kLong).contiguous();
  long long P = experts.numel(), chunk = ops::detail::sort_chunk;
  int k = static_cast<int>(experts.size(1)), e = static_cast<int>(E);
  const auto opts = experts.options();
  auto order = at::empty({P}, opts), token = at::empty({P}, opts), back = at::empty({P}, opts);
  auto counts = at::empty({E}, opts);  // the scatter writes every expert's count
  if (P == 0) return SortedPicks{std::move(order), std::move(token), std::move(back), counts.zero_(), k};
  const auto hist = detail::count_per_block(count, device, experts, E);                     // [blocks, E]
  int blocks = static_cast<int>(hist.size(0));
  const void* x = experts.data_ptr();
  const void* h = hist.data_ptr();
  void* o = order.data_ptr();
  void* t = token.data_ptr();
  void* b = back.data_ptr();
  void* c = counts.data_ptr();
  void* args[] = {&x, &h, &o, &t, &b, &c, &P, &e, &k, &blocks, &chunk};
  nvrtc::launch(scatter, device, static_cast<unsigned>(blocks), 256, static_cast<unsigned>((1 + 256 / 32) * E * sizeof(int)),
                args, "the MoE sort's scatter");
  return SortedPicks{std::move(order), std::move(token), std::move(back), std::move(counts), k};
}
#else
inline std::optional<at::Tensor> gather_backward(const at::Tensor&, const at::Tensor&, int64_t) { return std::nullopt; }
inline std::optional<at::Tensor> combine_forward(const at::Tensor&, const at::Tensor&, const at::Tensor&) {
  return std::nullopt;
}
inline std::optional<std::pair<at::Tensor, at::Tensor>> combine_backward(const at::Tensor&, const at::Tensor&,
                                                                         const at::Tensor&, const at::Tensor&) {
  return std::nullopt;
}
inline std::optional<at::Tensor> expert_counts(const at::Tensor&, int64_t) { return std::nullopt; }
inline std::optional<SortedPicks> sort_picks(const at::Tensor&, int64_t) { return std::nullopt; }
#endif

}  // namespace moe_cuda

/// The picks of each expert [E] (int64) among `picks` [P] (int64, each in [0, E)): bincount(picks, {}, E), with no
/// host sync on a GPU.
inline at::Tensor expert_counts(const at::Tensor& picks, int64_t E) {
  if (auto c = moe_cuda::expert_counts(picks, E)) return std::move(*c);
  return at::bincount(picks, {}, E);
}

/// gx [N, C] from the gradient g [N k, C] of the sorted rows (moe_aten::gather_backward).
inline at::Tensor gather_backward(const at::Tensor& g, const at::Tensor& back, int64_t k) {
  if (auto gx = moe_cuda::gather_backward(g, back, k)) return std::move(*gx);
  return moe_aten::gather_backward(g, back, k);
}

/// y [N, C], the weighted sum of each token's rows of ys (moe_aten::combine_forward).
inline at::Tensor combine_forward(const at::Tensor& ys, const at::Tensor& weights, const at::Tensor& back) {
  if (auto y = moe_cuda::combine_forward(ys, weights, back)) return std::move(*y);
  return moe_aten::combine_forward(ys, weights, back);
}

/// The combine's gradients of ys and of the weights from gy (moe_aten::combine_backward).
inline std::pair<at::Tensor, at::Tensor> combine_backward(const at::Tensor& gy, const at::Tensor& ys,
                                                          const at::Tensor& weights, const at::Tensor& order,
                                                          const at::Tensor& token, const at::Tensor& back) {
  if (auto g = moe_cuda::combine_backward(gy, ys, weights, back)) return std::move(*g);
  return moe_aten::combine_backward(gy, ys, weights, order, token, back);
}

/// The picks of `experts` [N, k] (int64, each in [0, E): the router's top-k) sorted by expert, stably: the kernels
/// on a GPU, ATen's stable sort elsewhere.
inline SortedPicks sort_picks(const at::Tensor& experts, int64_t E) {
  if (auto s = moe_cuda::sort_picks(experts, E)) return std::move(*s);
  return moe_aten::sort_picks(experts, E);
}

}  // namespace shardlm::model::ops
