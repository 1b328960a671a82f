# Finds the Python that holds torch (the project's .venv first, then python3 on PATH): its LibTorch is the
# one the project builds against, and the golden-fixture tests run it. The LibTorch prefix is added unless
# Torch_DIR was given.
find_program(SHARDLM_PYTHON NAMES python3 HINTS ${CMAKE_CURRENT_LIST_DIR}/../.venv/bin NO_DEFAULT_PATH)
if(NOT SHARDLM_PYTHON)
  find_program(SHARDLM_PYTHON NAMES python3)
endif()
if(NOT Torch_DIR AND SHARDLM_PYTHON)
  execute_process(COMMAND ${SHARDLM_PYTHON} -c "import torch;print(torch.utils.cmake_prefix_path)"
                  OUTPUT_VARIABLE _shardlm_torch_prefix OUTPUT_STRIP_TRAILING_WHITESPACE
                  RESULT_VARIABLE _shardlm_rc ERROR_QUIET)
  if(_shardlm_rc EQUAL 0 AND _shardlm_torch_prefix)
    list(APPEND CMAKE_PREFIX_PATH ${_shardlm_torch_prefix})
  endif()
endif()

# LibTorch's configuration prints two warnings that say nothing about this project (top level only: a parent project
# keeps its own settings).
if(SHARDLM_TOP_LEVEL)
  # 1. Its CUDA part (a CUDA wheel enables the CUDA language) warns whenever CMAKE_CUDA_ARCHITECTURES is defined and
  # asks for TORCH_CUDA_ARCH_LIST instead. The project compiles no CUDA source (its kernels are compiled at run time by
  # NVRTC for the GPU they run on), so the list only feeds LibTorch's own nvcc flags: a given CMAKE_CUDA_ARCHITECTURES
  # (90, 90a, 100-real, native, all) becomes TORCH_CUDA_ARCH_LIST (9.0, 9.0a, 10.0, Auto, All), and CMake is kept from
  # defining its default (policy CMP0104 OLD in CMakeLists.txt: it matters only to targets with CUDA sources, and
  # there are none). CMake's environment default, CUDAARCHS, is translated the same way.
  if(NOT DEFINED CMAKE_CUDA_ARCHITECTURES AND NOT "$ENV{CUDAARCHS}" STREQUAL "")
    set(CMAKE_CUDA_ARCHITECTURES "$ENV{CUDAARCHS}")
  endif()
  if(DEFINED CMAKE_CUDA_ARCHITECTURES)
    set(_shardlm_arch_list "")
    foreach(_arch IN LISTS CMAKE_CUDA_ARCHITECTURES)
      string(REGEX REPLACE "-(real|virtual)$" "" _arch "${_arch}")
      if(_arch STREQUAL "native")
        set(_arch Auto)
      elseif(_arch MATCHES "^all")
        set(_arch All)
      elseif(_arch MATCHES "^([0-9]+)([0-9])([af]?)$")
        set(_arch "${CMAKE_MATCH_1}.${CMAKE_MATCH_2}${CMAKE_MATCH_3}")
      else()
        message(FATAL_ERROR "CMAKE_CUDA_ARCHITECTURES: '${_arch}' is not an architecture (like 90 or 90a); "
                            "or pass TORCH_CUDA_ARCH_LIST (like 9.0) instead")
      endif()
      list(APPEND _shardlm_arch_list ${_arch})
    endforeach()
    set(TORCH_CUDA_ARCH_LIST "${_shardlm_arch_list}" CACHE STRING "CUDA architectures of LibTorch's nvcc flags" FORCE)
  endif()
  unset(CMAKE_CUDA_ARCHITECTURES CACHE)
  unset(CMAKE_CUDA_ARCHITECTURES)
  set(ENV{CUDAARCHS} "")  # (this configure's environment only)
  # 2. It looks for a separate kineto library and warns when there is none: the wheel links kineto (the profiler) into
  # libtorch_cpu, so that library is the answer (linking it twice changes nothing).
  if(NOT kineto_LIBRARY)
    set(_shardlm_torch_libs "")
    foreach(_prefix IN LISTS CMAKE_PREFIX_PATH _shardlm_torch_prefix)
      list(APPEND _shardlm_torch_libs ${_prefix}/../../lib)
    endforeach()
    find_library(kineto_LIBRARY NAMES kineto torch_cpu NAMES_PER_DIR
                 HINTS ${Torch_DIR}/../../../lib ${_shardlm_torch_libs} NO_DEFAULT_PATH)
  endif()
endif()
