#pragma once
// The CUDA dequantization kernels, compiled at run time with NVRTC: the project compiles no .cu files. The wheel's
// headers do not ship ATen's NVRTC stub (ATen/cuda/nvrtc_stub/ATenNVRTC.h) and libtorch_cuda does not export
// the jiterator's compile function, so this file opens NVRTC and the driver API itself with dlopen, declaring the
// few entry points it uses (no CUDA toolkit headers needed). The source is compiled once per process per GPU
// architecture, the module loaded once per device, and the kernels launched on the current stream.
// Everything CUDA is compiled only where c10's CUDA headers are present (SHARDLM_HAVE_CUDA, core/compat.hpp).
#include <ATen/ATen.h>

#include <cstdint>
#include <string>

#include "shardlm/core/compat.hpp"
#include "shardlm/core/log.hpp"

#if SHARDLM_HAVE_CUDA
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <dlfcn.h>
#include <link.h>

#include <map>
#include <mutex>
#include <vector>
#endif

namespace shardlm::quant::kernels {

enum class Kind { Int4, FP8 };

/// The kernels' source. Both write bf16 as raw uint16 with round-to-nearest-even (c10::BFloat16's rounding) and
/// compute in fp32 with explicitly rounded operations, so that they match the ATen path bit for bit.
inline constexpr const char* source = R"CUDA(
__device__ __forceinline__ unsigned short to_bf16(float f) {
  unsigned u = __float_as_uint(f);
  if ((u & 0x7fffffffu) > 0x7f800000u) return 0x7fc0;
  return (unsigned short)((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
}
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

#if SHARDLM_HAVE_CUDA
namespace detail {

/// NVRTC and driver API entry points, opened once. The types are the C API's (opaque handles, int results).
struct Api {
  using nvrtcProgram = void*;
  int (*nvrtcCreateProgram)(nvrtcProgram*, const char*, const char*, int, const char* const*, const char* const*) = nullptr;
  int (*nvrtcCompileProgram)(nvrtcProgram, int, const char* const*) = nullptr;
  int (*nvrtcGetProgramLogSize)(nvrtcProgram, size_t*) = nullptr;
  int (*nvrtcGetProgramLog)(nvrtcProgram, char*) = nullptr;
  int (*nvrtcGetCUBINSize)(nvrtcProgram, size_t*) = nullptr;
  int (*nvrtcGetCUBIN)(nvrtcProgram, char*) = nullptr;
  int (*nvrtcDestroyProgram)(nvrtcProgram*) = nullptr;
  const char* (*nvrtcGetErrorString)(int) = nullptr;
  int (*cuInit)(unsigned) = nullptr;
  int (*cuDeviceGet)(int*, int) = nullptr;
  int (*cuDeviceGetAttribute)(int*, int, int) = nullptr;
  int (*cuCtxGetCurrent)(void**) = nullptr;
  int (*cuCtxSetCurrent)(void*) = nullptr;
  int (*cuDevicePrimaryCtxRetain)(void**, int) = nullptr;
  int (*cuModuleLoadData)(void**, const void*) = nullptr;
  int (*cuModuleGetFunction)(void**, void*, const char*) = nullptr;
  int (*cuLaunchKernel)(void*, unsigned, unsigned, unsigned, unsigned, unsigned, unsigned, unsigned, void*, void**,
                        void**) = nullptr;
  int (*cuGetErrorString)(int, const char**) = nullptr;
  std::string error;  // why the API is not usable, empty when it is
};

/// The path of an NVRTC library already loaded into the process (PyTorch loads its own through
/// libcaffe2_nvrtc.so), else empty.
inline std::string loaded_nvrtc() {
  std::string found;
  dl_iterate_phdr(
      [](struct dl_phdr_info* info, size_t, void* data) {
        const std::string name = info->dlpi_name ? info->dlpi_name : "";
        const auto slash = name.rfind('/');
        const auto base = name.substr(slash == std::string::npos ? 0 : slash + 1);
        if (base.rfind("libnvrtc.so", 0) == 0) {
          *static_cast<std::string*>(data) = name;
          return 1;
        }
        return 0;
      },
      &found);
  return found;
}

template <class F>
void bind(void* lib, const char* name, F& f, std::string& error) {
  f = lib ? reinterpret_cast<F>(dlsym(lib, name)) : nullptr;
  if (!f && error.empty()) error = std::string("symbol ") + name + " not found";
}

inline const Api& api() {
  static const Api a = [] {
    Api a;
    try {
      (void)at::globalContext().getNVRTC();  // makes PyTorch load its NVRTC (and the driver library)
    } catch (const std::exception&) {
    }
    void* nvrtc = nullptr;
    const auto path = loaded_nvrtc();
    if (!path.empty()) nvrtc = dlopen(path.c_str(), RTLD_NOW | RTLD_LOCAL);
    for (const char* name : {"libnvrtc.so.13", "libnvrtc.so.12", "libnvrtc.so"})
      if (!nvrtc) nvrtc = dlopen(name, RTLD_NOW | RTLD_LOCAL);
    void* cuda = dlopen("libcuda.so.1", RTLD_NOW | RTLD_LOCAL);
    if (!nvrtc) a.error = "libnvrtc.so could not be opened";
    if (!cuda) a.error = "libcuda.so.1 could not be opened";
    bind(nvrtc, "nvrtcCreateProgram", a.nvrtcCreateProgram, a.error);
    bind(nvrtc, "nvrtcCompileProgram", a.nvrtcCompileProgram, a.error);
    bind(nvrtc, "nvrtcGetProgramLogSize", a.nvrtcGetProgramLogSize, a.error);
    bind(nvrtc, "nvrtcGetProgramLog", a.nvrtcGetProgramLog, a.error);
    bind(nvrtc, "nvrtcGetCUBINSize", a.nvrtcGetCUBINSize, a.error);
    bind(nvrtc, "nvrtcGetCUBIN", a.nvrtcGetCUBIN, a.error);
    bind(nvrtc, "nvrtcDestroyProgram", a.nvrtcDestroyProgram, a.error);
    bind(nvrtc, "nvrtcGetErrorString", a.nvrtcGetErrorString, a.error);
    bind(cuda, "cuInit", a.cuInit, a.error);
    bind(cuda, "cuDeviceGet", a.cuDeviceGet, a.error);
    bind(cuda, "cuDeviceGetAttribute", a.cuDeviceGetAttribute, a.error);
    bind(cuda, "cuCtxGetCurrent", a.cuCtxGetCurrent, a.error);
    bind(cuda, "cuCtxSetCurrent", a.cuCtxSetCurrent, a.error);
    bind(cuda, "cuDevicePrimaryCtxRetain", a.cuDevicePrimaryCtxRetain, a.error);
    bind(cuda, "cuModuleLoadData", a.cuModuleLoadData, a.error);
    bind(cuda, "cuModuleGetFunction", a.cuModuleGetFunction, a.error);
    bind(cuda, "cuLaunchKernel", a.cuLaunchKernel, a.error);
    bind(cuda, "cuGetErrorString", a.cuGetErrorString, a.error);
    if (a.error.empty() && a.cuInit(0) != 0) a.error = "cuInit failed";
    return a;
  }();
  return a;
}

inline std::string cu_error(int r) {
  const char* s = nullptr;
  if (api().cuGetErrorString) api().cuGetErrorString(r, &s);
  return s ? s : "CUDA driver error " + std::to_string(r);
}

/// The kernel source compiled for sm_<arch> (a cubin), once per process per architecture; throws with NVRTC's log.
inline std::string compile(int arch) {
  const auto& a = api();
  Api::nvrtcProgram prog = nullptr;
  if (int r = a.nvrtcCreateProgram(&prog, source, "shardlm_quant.cu", 0, nullptr, nullptr); r != 0)
    throw std::runtime_error(std::string("nvrtcCreateProgram: ") + a.nvrtcGetErrorString(r));
  const std::string arch_flag = "--gpu-architecture=sm_" + std::to_string(arch);
  const char* opts[] = {arch_flag.c_str(), "--std=c++17", "--fmad=false"};
  const int r = a.nvrtcCompileProgram(prog, 3, opts);
  std::string result;
  if (r != 0) {
    size_t n = 0;
    a.nvrtcGetProgramLogSize(prog, &n);
    std::string log(n, '\0');
    a.nvrtcGetProgramLog(prog, log.data());
    a.nvrtcDestroyProgram(&prog);
    throw std::runtime_error(std::string("NVRTC (") + arch_flag + "): " + a.nvrtcGetErrorString(r) + "\n" + log);
  }
  size_t n = 0;
  a.nvrtcGetCUBINSize(prog, &n);
  result.resize(n);
  a.nvrtcGetCUBIN(prog, result.data());
  a.nvrtcDestroyProgram(&prog);
  return result;
}

struct Functions {
  void* int4 = nullptr;
  void* fp8 = nullptr;
};

/// The kernels on `device` (compiled and loaded on first use); throws on failure.
inline Functions functions(int device) {
  static std::mutex mutex;
  static std::map<int, std::string> cubins;     // by architecture
  static std::map<int, Functions> by_device;
  std::lock_guard<std::mutex> lock(mutex);
  if (auto it = by_device.find(device); it != by_device.end()) return it->second;
  const auto& a = api();
  if (!a.error.empty()) throw std::runtime_error(a.error);
  auto check = [](int r, const char* what) {
    if (r != 0) throw std::runtime_error(std::string(what) + ": " + cu_error(r));
  };
  int dev = 0, major = 0, minor = 0;
  check(a.cuDeviceGet(&dev, device), "cuDeviceGet");
  check(a.cuDeviceGetAttribute(&major, 75, dev), "cuDeviceGetAttribute");  // CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR
  check(a.cuDeviceGetAttribute(&minor, 76, dev), "cuDeviceGetAttribute");  // ..._MINOR
  const int arch = major * 10 + minor;
  if (!cubins.count(arch)) cubins[arch] = compile(arch);
  void* ctx = nullptr;
  check(a.cuCtxGetCurrent(&ctx), "cuCtxGetCurrent");
  if (!ctx) {  // the runtime's primary context, as PyTorch uses it
    check(a.cuDevicePrimaryCtxRetain(&ctx, dev), "cuDevicePrimaryCtxRetain");
    check(a.cuCtxSetCurrent(ctx), "cuCtxSetCurrent");
  }
  void* module = nullptr;
  check(a.cuModuleLoadData(&module, cubins[arch].data()), "cuModuleLoadData");
  Functions f;
  check(a.cuModuleGetFunction(&f.int4, module, "shardlm_dequantize_int4"), "cuModuleGetFunction");
  check(a.cuModuleGetFunction(&f.fp8, module, "shardlm_dequantize_fp8"), "cuModuleGetFunction");
  return by_device[device] = f;
}

}  // namespace detail
#endif

/// Dequantizes `rows` rows of `in` (uint8, CUDA, contiguous) into out (bf16 [rows, cols], contiguous, same device)
/// with the kernel of `kind` on the current stream. Returns false, having warned once, when the kernels cannot be
/// compiled or loaded (the caller then uses the ATen path); launch errors throw.
inline bool dequantize(Kind kind, const at::Tensor& in, int64_t rows, int64_t cols, int64_t row_bytes,
                       const at::Tensor& out) {
#if SHARDLM_HAVE_CUDA
  const int device = in.get_device();
  const c10::cuda::CUDAGuard guard(static_cast<c10::DeviceIndex>(device));
  detail::Functions f;
  try {
    f = detail::functions(device);
  } catch (const std::exception& e) {
    static std::once_flag warned;
    std::call_once(warned, [&] {
      log::warn("quant: the CUDA dequantization kernels are not available (", e.what(),
                "); dequantizing with ATen ops instead (slower, more memory)");
    });
    return false;
  }
  if (rows == 0 || cols == 0) return true;
  const auto in_addr = reinterpret_cast<uintptr_t>(in.data_ptr()), out_addr = reinterpret_cast<uintptr_t>(out.data_ptr());
  int vec = in_addr % 16 == 0 && out_addr % 16 == 0 && row_bytes % 16 == 0 && (kind == Kind::Int4 || cols % 16 == 0);
  const void* in_ptr = in.data_ptr();
  void* out_ptr = out.data_ptr();
  void* args[] = {&in_ptr, &out_ptr, &rows, &cols, &row_bytes, &vec};
  const int64_t threads = kind == Kind::Int4 ? rows * (cols / 64) * 4 : rows * ((cols + 15) / 16);
  const auto blocks = static_cast<unsigned>((threads + 255) / 256);
  void* stream = c10::cuda::getCurrentCUDAStream(static_cast<c10::DeviceIndex>(device)).stream();
  const int r = detail::api().cuLaunchKernel(kind == Kind::Int4 ? f.int4 : f.fp8, blocks, 1, 1, 256, 1, 1, 0, stream,
                                             args, nullptr);
  if (r != 0) throw std::runtime_error("quant: launching the dequantization kernel failed: " + detail::cu_error(r));
  return true;
#else
  (void)kind, (void)in, (void)rows, (void)cols, (void)row_bytes, (void)out;
  return false;
#endif
}

}  // namespace shardlm::quant::kernels
