# The dependencies of shardlm::shardlm, found the same way by the project's own build (CMakeLists.txt) and by the
# installed package's config (shardlmConfig.cmake): LibTorch >= 2.11 with its distributed (c10d) headers,
# nlohmann_json >= 3.10, cxxopts >= 3, range-v3, PCRE2's 8-bit library (ShardlmFindPcre2.cmake), Gloo's headers
# and, as SHARDLM_NCCL asks, NCCL (ShardlmFindComm.cmake).
#
# A failure stops the search and leaves SHARDLM_DEPENDENCY_ERROR saying what is missing and how to provide it: the
# build stops with it, the config reports the package not found with it (a config file must not abort a
# find_package(shardlm QUIET)). Each package is searched QUIET so that this message, not a generic one, is what the
# user reads.
set(SHARDLM_DEPENDENCY_ERROR "")
set(SHARDLM_MIN_TORCH_VERSION 2.11)

# A project that found Torch already (before add_subdirectory(shardlm), or before find_package(shardlm)) keeps its
# targets: Torch's config defines some of them without a guard and cannot run twice where they are visible.
if(NOT TARGET torch)
  # A CUDA LibTorch's config enables the CUDA language. When a toolchain file sets CMAKE_CXX_STANDARD (Conan's sets
  # 20), CMake 3.25 probes nvcc with that dialect, which it has no flags for, and the configuration fails; LibTorch
  # itself is C++17 for CUDA, and shardlm compiles no CUDA source (its kernels go through NVRTC at run time).
  if(CMAKE_CXX_STANDARD GREATER 17 AND NOT DEFINED CMAKE_CUDA_STANDARD)
    set(CMAKE_CUDA_STANDARD 17)
  endif()
  find_package(Torch QUIET)
  if(NOT Torch_FOUND)
    set(SHARDLM_DEPENDENCY_ERROR "LibTorch not found (no TorchConfig.cmake): pass -DCMAKE_PREFIX_PATH=\"$(python3 -c 'import torch;print(torch.utils.cmake_prefix_path)')\" or -DTorch_DIR=<the directory holding TorchConfig.cmake>")
    return()
  endif()
endif()
if(Torch_VERSION AND Torch_VERSION VERSION_LESS SHARDLM_MIN_TORCH_VERSION)
  set(_shardlm_fix "point CMake at a newer one (for the PyTorch wheel: torch.utils.cmake_prefix_path)")
  if(SHARDLM_TORCH_VERSION)  # the project's own build: the version it pins (CMakeLists.txt)
    set(_shardlm_fix "pip install torch==${SHARDLM_TORCH_VERSION}")
  endif()
  set(SHARDLM_DEPENDENCY_ERROR "shardlm needs LibTorch >= ${SHARDLM_MIN_TORCH_VERSION}, found ${Torch_VERSION} (${Torch_DIR}): ${_shardlm_fix}")
  return()
endif()
# The CPU process groups are c10d's: a LibTorch built without distributed support (ConanCenter's libtorch recipe)
# cannot serve. Checked where Torch's config says where its headers are (TorchConfig.cmake sets TORCH_INCLUDE_DIRS).
if(TORCH_INCLUDE_DIRS)
  set(_shardlm_c10d FALSE)
  foreach(_shardlm_dir IN LISTS TORCH_INCLUDE_DIRS)
    if(EXISTS "${_shardlm_dir}/torch/csrc/distributed/c10d/ProcessGroupGloo.hpp")
      set(_shardlm_c10d TRUE)
    endif()
  endforeach()
  if(NOT _shardlm_c10d)
    set(SHARDLM_DEPENDENCY_ERROR "the LibTorch found (${Torch_DIR}) has no distributed (c10d) headers (torch/csrc/distributed/c10d/ProcessGroupGloo.hpp): shardlm needs a LibTorch built with distributed support, such as the PyTorch wheel's")
    return()
  endif()
endif()

find_package(nlohmann_json 3.10 QUIET)
if(NOT nlohmann_json_FOUND)
  set(SHARDLM_DEPENDENCY_ERROR "nlohmann_json >= 3.10 not found (Debian: apt-get install nlohmann-json3-dev; Conan: nlohmann_json; vcpkg: nlohmann-json)")
  return()
endif()
find_package(cxxopts 3 QUIET)
if(NOT cxxopts_FOUND)
  set(SHARDLM_DEPENDENCY_ERROR "cxxopts >= 3 not found (Debian: apt-get install libcxxopts-dev; Conan: cxxopts; vcpkg: cxxopts)")
  return()
endif()
# No version asked: Debian's range-v3 config accepts only an exact version.
find_package(range-v3 QUIET)
if(NOT range-v3_FOUND OR NOT TARGET range-v3::range-v3)
  set(SHARDLM_DEPENDENCY_ERROR "range-v3 not found (Debian: apt-get install librange-v3-dev; Conan: range-v3; vcpkg: range-v3)")
  return()
endif()
include(${CMAKE_CURRENT_LIST_DIR}/ShardlmFindPcre2.cmake)
if(SHARDLM_DEPENDENCY_ERROR)
  return()
endif()
include(${CMAKE_CURRENT_LIST_DIR}/ShardlmFindComm.cmake)
