# The communication libraries: Gloo's headers (c10d's ProcessGroupGloo needs them; the implementation is the
# one inside libtorch_cpu; Debian: libgloo-dev) and NCCL for multi-GPU jobs (the headers and library of the
# PyTorch wheel's nvidia-nccl package, which LibTorch itself loads, else the CUDA toolkit's). Without NCCL a build
# runs CPU jobs and single-GPU jobs. SHARDLM_NCCL says whether NCCL is used: AUTO (the default: when found and
# LibTorch has CUDA), ON (required: an error says what is missing) or OFF. Sets SHARDLM_GLOO_INCLUDE_DIR,
# SHARDLM_NCCL_INCLUDE_DIR, SHARDLM_NCCL_LIBRARY and SHARDLM_WITH_NCCL; a failure is left in
# SHARDLM_DEPENDENCY_ERROR (ShardlmDependencies.cmake).
find_path(SHARDLM_GLOO_INCLUDE_DIR gloo/algorithm.h)
if(NOT SHARDLM_GLOO_INCLUDE_DIR)
  set(SHARDLM_DEPENDENCY_ERROR "Gloo's headers not found (gloo/algorithm.h), which c10d's ProcessGroupGloo includes: apt-get install libgloo-dev (vcpkg: gloo), or give -DSHARDLM_GLOO_INCLUDE_DIR=<dir>")
  return()
endif()

if(NOT DEFINED SHARDLM_NCCL OR SHARDLM_NCCL STREQUAL "")
  set(SHARDLM_NCCL AUTO)
endif()
string(TOUPPER "${SHARDLM_NCCL}" _shardlm_nccl)
if(_shardlm_nccl MATCHES "^(ON|TRUE|YES|1)$")
  set(_shardlm_nccl ON)
elseif(_shardlm_nccl MATCHES "^(OFF|FALSE|NO|0)$")
  set(_shardlm_nccl OFF)
elseif(NOT _shardlm_nccl STREQUAL "AUTO")
  set(SHARDLM_DEPENDENCY_ERROR "SHARDLM_NCCL is '${SHARDLM_NCCL}': use AUTO, ON or OFF")
  return()
endif()

set(SHARDLM_WITH_NCCL OFF)
if(NOT _shardlm_nccl STREQUAL "OFF")
  set(_shardlm_nccl_root "")
  if(SHARDLM_PYTHON)
    execute_process(COMMAND ${SHARDLM_PYTHON} -c "import nvidia.nccl,os;print(os.path.dirname(nvidia.nccl.__file__))"
                    OUTPUT_VARIABLE _shardlm_nccl_root OUTPUT_STRIP_TRAILING_WHITESPACE ERROR_QUIET)
  endif()
  # The wheel's nvidia-nccl sits beside torch in site-packages (Torch_DIR is site-packages/torch/share/cmake/Torch):
  # a consumer of the wheel's LibTorch finds it without asking Python.
  set(_shardlm_wheel_nccl "${Torch_DIR}/../../../../nvidia/nccl")
  find_path(SHARDLM_NCCL_INCLUDE_DIR nccl.h
            HINTS ${_shardlm_nccl_root}/include ${_shardlm_wheel_nccl}/include /usr/local/cuda/include)
  find_library(SHARDLM_NCCL_LIBRARY NAMES libnccl.so.2 nccl NAMES_PER_DIR
               HINTS ${_shardlm_nccl_root}/lib ${_shardlm_wheel_nccl}/lib /usr/local/cuda/lib64)
  if(SHARDLM_NCCL_INCLUDE_DIR AND SHARDLM_NCCL_LIBRARY AND TARGET torch_cuda)
    set(SHARDLM_WITH_NCCL ON)
  elseif(_shardlm_nccl STREQUAL "ON")
    set(_shardlm_cuda "no")
    if(TARGET torch_cuda)
      set(_shardlm_cuda "yes")
    endif()
    set(SHARDLM_DEPENDENCY_ERROR "SHARDLM_NCCL=ON but NCCL cannot be used (nccl.h: ${SHARDLM_NCCL_INCLUDE_DIR}; libnccl: ${SHARDLM_NCCL_LIBRARY}; LibTorch with CUDA: ${_shardlm_cuda}): use a CUDA LibTorch with the wheel's nvidia-nccl or NCCL in /usr/local/cuda, give -DSHARDLM_NCCL_INCLUDE_DIR and -DSHARDLM_NCCL_LIBRARY, or -DSHARDLM_NCCL=OFF")
    return()
  endif()
endif()
