#pragma once
// CUDA kernels of the project compiled at run time with NVRTC: the project compiles no .cu files. The wheel's
// headers do not ship ATen's NVRTC stub (ATen/cuda/nvrtc_stub/ATenNVRTC.h) and libtorch_cuda does not export
// the jiterator's compile function, so this file opens NVRTC and the driver API itself with dlopen, declaring the
// few entry points it uses (no CUDA toolkit headers needed). A program (a source) is compiled once per process per
// GPU architecture, its module loaded once per device, and kernels are launched on the current stream.
// Everything CUDA is compiled only where c10's CUDA headers are present (SHARDLM_HAVE_CUDA, core/compat.hpp).
#include <ATen/ATen.h>

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
#include <stdexcept>
#include <utility>
#endif

namespace shardlm::nvrtc {

/// A header a program includes by name (beside "shardlm_bf16.cuh", which every program may include).
struct Header {
  const char* name = nullptr;
  const char* source = nullptr;
};

/// A kernel source and the name NVRTC gives it in its messages.
struct Program {
  const char* name;
  const char* source;
  /// Contract a * b + c into fused multiply-adds (nvcc's default, which ATen's kernels are built with): for a kernel
  /// that must round as an ATen kernel does. Off by default: the project's kernels round as their CPU references.
  bool fmad = false;
  /// A header of its own (code that two programs compiled with different options share), if any.
  Header header = {};
};

/// A header every program may include as "shardlm_bf16.cuh": bf16 as raw uint16, read exactly and written with
/// round-to-nearest-even (c10::BFloat16's rounding; NaN stays NaN).
inline constexpr const char* bf16_header = R"CUDA(
#pragma once
__device__ __forceinline__ float from_bf16(unsigned short b) { return __uint_as_float((unsigned)b << 16); }
__device__ __forceinline__ unsigned short to_bf16(float f) {
  unsigned u = __float_as_uint(f);
  if ((u & 0x7fffffffu) > 0x7f800000u) return 0x7fc0;
  return (unsigned short)((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
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

/// `program` compiled for sm_<arch> (a cubin); throws with NVRTC's log.
inline std::string compile(const Program& program, int arch) {
  const auto& a = api();
  Api::nvrtcProgram prog = nullptr;
  const char* headers[] = {bf16_header, program.header.source};
  const char* header_names[] = {"shardlm_bf16.cuh", program.header.name};
  const int header_count = program.header.source ? 2 : 1;
  if (int r = a.nvrtcCreateProgram(&prog, program.source, program.name, header_count, headers, header_names); r != 0)
    throw std::runtime_error(std::string("nvrtcCreateProgram: ") + a.nvrtcGetErrorString(r));
  const std::string arch_flag = "--gpu-architecture=sm_" + std::to_string(arch);
  const char* opts[] = {arch_flag.c_str(), "--std=c++17", program.fmad ? "--fmad=true" : "--fmad=false"};
  const int r = a.nvrtcCompileProgram(prog, 3, opts);
  std::string result;
  if (r != 0) {
    size_t n = 0;
    a.nvrtcGetProgramLogSize(prog, &n);
    std::string log(n, '\0');
    a.nvrtcGetProgramLog(prog, log.data());
    a.nvrtcDestroyProgram(&prog);
    throw std::runtime_error(std::string("NVRTC (") + program.name + ", " + arch_flag + "): " +
                             a.nvrtcGetErrorString(r) + "\n" + log);
  }
  size_t n = 0;
  a.nvrtcGetCUBINSize(prog, &n);
  result.resize(n);
  a.nvrtcGetCUBIN(prog, result.data());
  a.nvrtcDestroyProgram(&prog);
  return result;
}

}  // namespace detail

/// Kernel `kernel` of `program` on `device`: the program compiled for the device's architecture on first use (once
/// per process), its module loaded once per device. Throws on failure.
inline void* function(int device, const Program& program, const char* kernel) {
  static std::mutex mutex;
  static std::map<std::pair<std::string, int>, std::string> cubins;  // by (program, architecture)
  static std::map<std::pair<std::string, int>, void*> modules;       // by (program, device)
  static std::map<std::pair<void*, std::string>, void*> functions;   // by (module, kernel)
  std::lock_guard<std::mutex> lock(mutex);
  const auto& a = detail::api();
  if (!a.error.empty()) throw std::runtime_error(a.error);
  auto check = [](int r, const char* what) {
    if (r != 0) throw std::runtime_error(std::string(what) + ": " + detail::cu_error(r));
  };
  void*& module = modules[{program.name, device}];
  if (!module) {
    int dev = 0, major = 0, minor = 0;
    check(a.cuDeviceGet(&dev, device), "cuDeviceGet");
    check(a.cuDeviceGetAttribute(&major, 75, dev), "cuDeviceGetAttribute");  // CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR
    check(a.cuDeviceGetAttribute(&minor, 76, dev), "cuDeviceGetAttribute");  // ..._MINOR
    const int arch = major * 10 + minor;
    auto& cubin = cubins[{program.name, arch}];
    if (cubin.empty()) cubin = detail::compile(program, arch);
    void* ctx = nullptr;
    check(a.cuCtxGetCurrent(&ctx), "cuCtxGetCurrent");
    if (!ctx) {  // the runtime's primary context, as PyTorch uses it
      check(a.cuDevicePrimaryCtxRetain(&ctx, dev), "cuDevicePrimaryCtxRetain");
      check(a.cuCtxSetCurrent(ctx), "cuCtxSetCurrent");
    }
    check(a.cuModuleLoadData(&module, cubin.data()), "cuModuleLoadData");
  }
  void*& f = functions[{module, kernel}];
  if (!f) check(a.cuModuleGetFunction(&f, module, kernel), "cuModuleGetFunction");
  return f;
}

/// `program` compiled for sm_<arch> with NVRTC alone (no GPU, no driver): how a test on a machine without a GPU
/// catches a kernel that does not compile. The cubin; throws with NVRTC's log, or when NVRTC cannot be opened.
inline std::string compile_for_arch(const Program& program, int arch) {
  if (!detail::api().nvrtcCompileProgram) throw std::runtime_error("libnvrtc.so could not be opened");
  return detail::compile(program, arch);
}

/// function(), or nullptr having warned once per program with `fallback` (what the caller does instead).
inline void* function_or_warn(int device, const Program& program, const char* kernel, const char* fallback) {
  try {
    return function(device, program, kernel);
  } catch (const std::exception& e) {
    static std::mutex mutex;
    static std::map<std::string, bool> warned;
    std::lock_guard<std::mutex> lock(mutex);
    if (!std::exchange(warned[program.name], true))
      log::warn("the CUDA kernels of ", program.name, " are not available (", e.what(), "); ", fallback);
    return nullptr;
  }
}

/// Launches `f` on `device`'s current stream with `blocks` x `threads` and `shared` bytes of dynamic shared memory;
/// throws, naming `what`, when the launch fails.
inline void launch(void* f, int device, unsigned blocks, unsigned threads, unsigned shared, void** args, const char* what) {
  // The driver API launches into the thread's current context. A thread that has made no CUDA runtime call yet has
  // none (autograd's device thread may run a node's backward whose first launch is ours): make the device's primary
  // context, the runtime's and PyTorch's, current there.
  const auto& a = detail::api();
  void* ctx = nullptr;
  if (a.cuCtxGetCurrent(&ctx) != 0 || !ctx) {
    int dev = 0;
    int r = a.cuDeviceGet(&dev, device);
    if (r == 0) r = a.cuDevicePrimaryCtxRetain(&ctx, dev);
    if (r == 0) r = a.cuCtxSetCurrent(ctx);
    if (r != 0) throw std::runtime_error(std::string("launching ") + what + ": no CUDA context: " + detail::cu_error(r));
  }
  void* stream = c10::cuda::getCurrentCUDAStream(static_cast<c10::DeviceIndex>(device)).stream();
  const int r = a.cuLaunchKernel(f, blocks, 1, 1, threads, 1, 1, shared, stream, args, nullptr);
  if (r != 0) throw std::runtime_error(std::string("launching ") + what + " failed: " + detail::cu_error(r));
}
#endif

}  // namespace shardlm::nvrtc
