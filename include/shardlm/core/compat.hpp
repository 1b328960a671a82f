#pragma once
// Everything that depends on the LibTorch version lives here, each with its reason. The project pins
// LibTorch 2.11.0 (the PyTorch wheel) and must also build with newer 2.x releases.
#include <ATen/ATen.h>
#include <torch/version.h>

#include <ftw.h>
#include <unistd.h>

#include <algorithm>
#include <filesystem>
#include <initializer_list>
#include <optional>

#if TORCH_VERSION_MAJOR < 2 || (TORCH_VERSION_MAJOR == 2 && TORCH_VERSION_MINOR < 11)
#error "shardlm needs LibTorch >= 2.11 (pip install torch==2.11.0); Debian's libtorch-dev 1.13 is too old"
#endif

// The PyTorch wheels ship the CUDA headers of c10 and link c10_cuda through the `torch` target; the CUDA
// runtime's headers come from the toolkit that LibTorch's CMake config found.
#if __has_include(<c10/cuda/CUDACachingAllocator.h>) && __has_include(<cuda_runtime_api.h>)
#define SHARDLM_HAVE_CUDA 1
#include <c10/cuda/CUDACachingAllocator.h>
#include <c10/cuda/CUDAFunctions.h>
#include <cuda_runtime_api.h>
#else
#define SHARDLM_HAVE_CUDA 0
#endif

namespace shardlm::compat {

/// Causal scaled-dot-product attention with grouped KV heads. `enable_gqa` (2.5+) lets flash attention read
/// the shared KV heads in place instead of materializing repeated copies.
inline at::Tensor causal_attention(const at::Tensor& q,   // [B, H, T, D]
                                   const at::Tensor& k,   // [B, Hkv, T, D]
                                   const at::Tensor& v) { // [B, Hkv, T, D]
  return at::scaled_dot_product_attention(q, k, v, /*attn_mask=*/std::nullopt, /*dropout_p=*/0.0,
                                          /*is_causal=*/true, /*scale=*/std::nullopt,
                                          /*enable_gqa=*/k.size(1) != q.size(1));
}

/// The fused AdamW kernel (CPU and CUDA, 2.4+): one launch for a list of tensors, the same update as
/// torch.optim.AdamW(fused=True). The kernel reads the step counts but does not advance them: like
/// torch.optim, advance them first (bias correction of step 1 divides by 1 - beta^0 = 0 otherwise).
/// `grad_scale` (a scalar fp32 tensor on the params' device) divides the gradients, which the kernel writes
/// back divided.
inline void fused_adamw(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs,
                        at::TensorList exp_avg_sqs, at::TensorList steps, double lr, double beta1,
                        double beta2, double weight_decay, double eps,
                        const std::optional<at::Tensor>& grad_scale = std::nullopt) {
  at::_foreach_add_(steps, 1);
  at::_fused_adamw_(params, grads, exp_avgs, exp_avg_sqs, /*max_exp_avg_sqs=*/{}, steps, lr, beta1, beta2,
                    weight_decay, eps, /*amsgrad=*/false, /*maximize=*/false, grad_scale, /*found_inf=*/std::nullopt);
}

/// A 1-D tensor of `numel` elements in page-locked host memory of exactly that size, freed with the tensor. The
/// caching host allocator behind at::empty(..., pinned_memory(true)) rounds every block up to a power of two
/// (ATen/core/CachingHostAllocator.h, PowerOf2Ceil), up to twice the bytes asked: for offloaded training state
/// (the largest use of host memory) that is the difference between fitting a model and the OOM killer. Without
/// CUDA the tensor is ordinary host memory.
inline at::Tensor pinned_empty(int64_t numel, at::ScalarType dtype) {
#if SHARDLM_HAVE_CUDA
  const size_t bytes = static_cast<size_t>(numel) * c10::elementSize(dtype);
  void* ptr = nullptr;
  if (const auto err = cudaHostAlloc(&ptr, std::max<size_t>(bytes, 1), cudaHostAllocDefault); err != cudaSuccess) {
    (void)cudaGetLastError();
    TORCH_CHECK(false, "cannot page-lock ", static_cast<double>(bytes) / (1 << 30), " GiB of host memory (",
                cudaGetErrorString(err), "): the host has too little memory for this run's offloaded state");
  }
  return at::from_blob(ptr, {numel}, [](void* p) { (void)cudaFreeHost(p); }, at::TensorOptions().dtype(dtype));
#else
  return at::empty({numel}, dtype);
#endif
}

/// Whether at::_grouped_mm (2.8+) serves a [M, K] x [G, K, N] product of `dtype` on `device` with these inner
/// sizes: bf16 on an sm90/sm100 GPU, every row stride a multiple of 16 bytes.
inline bool has_grouped_mm(const at::Device& device, at::ScalarType dtype, std::initializer_list<int64_t> sizes) {
#if SHARDLM_HAVE_CUDA && (TORCH_VERSION_MAJOR > 2 || TORCH_VERSION_MINOR >= 8)
  if (!device.is_cuda() || dtype != at::kBFloat16) return false;
  for (auto n : sizes)
    if (n * 2 % 16 != 0) return false;
  int major = 0;
  if (cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device.has_index() ? device.index() : 0) !=
      cudaSuccess)
    return false;
  return major == 9 || major == 10;
#else
  (void)device, (void)dtype, (void)sizes;
  return false;
#endif
}

/// The compute capability major of CUDA `device` (0 without CUDA).
inline int cuda_major(const at::Device& device) {
#if SHARDLM_HAVE_CUDA
  int major = 0;
  if (device.is_cuda() && cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor,
                                                 device.has_index() ? device.index() : 0) == cudaSuccess)
    return major;
  (void)cudaGetLastError();
#else
  (void)device;
#endif
  return 0;
}

/// a [M, K] x b [K, N] in float8 e4m3 with fp32 row-wise scales sa [M, 1] (of a's rows) and sb [1, N] (of b's
/// columns), in `out` dtype: at::_scaled_mm (2.11's form; 2.9+ also has _scaled_mm_v2 with explicit scaling kinds, the
/// old form stays). Its constraints on Hopper, checked by the caller: both operands e4m3 (row-wise scaling takes no
/// e5m2), a row-major, b column-major, M, K and N multiples of 16, out bf16, a GPU of compute capability 9.x or 10.x
/// (where its row-wise kernels are built; has_scaled_mm_rowwise). `fast_accum`: the tensor cores' faster accumulation (torchao takes it for the forward only).
inline at::Tensor scaled_mm_rowwise(const at::Tensor& a, const at::Tensor& b, const at::Tensor& sa, const at::Tensor& sb,
                                    at::ScalarType out, bool fast_accum) {
  return at::_scaled_mm(a, b, sa, sb, /*bias=*/std::nullopt, /*scale_result=*/std::nullopt, out, fast_accum);
}

/// Whether scaled_mm_rowwise runs on `device`: CUDA of compute capability 9 (Hopper) or 10 (Blackwell).
inline bool has_scaled_mm_rowwise(const at::Device& device) {
  const int major = cuda_major(device);
  return major == 9 || major == 10;
}

/// Bytes allocated and reserved by the CUDA caching allocator on `device` (current, peak).
struct DeviceMemory {
  double allocated = 0, reserved = 0, peak_allocated = 0, peak_reserved = 0;
};
inline DeviceMemory cuda_memory(int device) {
  DeviceMemory m;
#if SHARDLM_HAVE_CUDA
  namespace alloc = c10::cuda::CUDACachingAllocator;
  const auto stats = alloc::getDeviceStats(static_cast<c10::DeviceIndex>(device));
  const auto agg = static_cast<size_t>(c10::CachingAllocator::StatType::AGGREGATE);
  m.allocated = static_cast<double>(stats.allocated_bytes[agg].current);
  m.peak_allocated = static_cast<double>(stats.allocated_bytes[agg].peak);
  m.reserved = static_cast<double>(stats.reserved_bytes[agg].current);
  m.peak_reserved = static_cast<double>(stats.reserved_bytes[agg].peak);
#else
  (void)device;
#endif
  return m;
}

/// Starts a new peak for cuda_memory()'s peak figures.
inline void reset_cuda_peak(int device) {
#if SHARDLM_HAVE_CUDA
  c10::cuda::CUDACachingAllocator::resetPeakStats(static_cast<c10::DeviceIndex>(device));
#else
  (void)device;
#endif
}

/// Removes a file or a directory tree. The 2.11 wheel's libtorch.so exports its own copies of several
/// std::filesystem functions, which shadow libstdc++'s in programs that link it; its remove_all crashes
/// (null call) with g++ 12's libstdc++. POSIX nftw does the same job without it.
inline void remove_all(const std::filesystem::path& path) {
  ::nftw(path.c_str(), [](const char* p, const struct stat*, int, struct FTW*) { return ::remove(p); }, 16,
         FTW_DEPTH | FTW_PHYS);
}

}  // namespace shardlm::compat
