# The communication libraries: Gloo's headers (c10d's ProcessGroupGloo needs them; the implementation is the
# one inside libtorch_cpu; Debian: libgloo-dev) and NCCL for multi-GPU jobs (the headers and library of the
# PyTorch wheel's nvidia-nccl package, which LibTorch itself loads, else the CUDA toolkit's). NCCL is optional:
# without it a build runs CPU jobs and single-GPU jobs. Sets SHARDLM_GLOO_INCLUDE_DIR, SHARDLM_NCCL_INCLUDE_DIR,
# SHARDLM_NCCL_LIBRARY and SHARDLM_WITH_NCCL.
find_path(SHARDLM_GLOO_INCLUDE_DIR gloo/algorithm.h)
if(NOT SHARDLM_GLOO_INCLUDE_DIR)
  message(FATAL_ERROR "shardlm needs Gloo's headers for its CPU process groups: apt-get install libgloo-dev")
endif()
set(_shardlm_nccl_root "")
if(SHARDLM_PYTHON)
  execute_process(COMMAND ${SHARDLM_PYTHON} -c "import nvidia.nccl,os;print(os.path.dirname(nvidia.nccl.__file__))"
                  OUTPUT_VARIABLE _shardlm_nccl_root OUTPUT_STRIP_TRAILING_WHITESPACE ERROR_QUIET)
endif()
find_path(SHARDLM_NCCL_INCLUDE_DIR nccl.h HINTS ${_shardlm_nccl_root}/include /usr/local/cuda/include)
find_library(SHARDLM_NCCL_LIBRARY NAMES libnccl.so.2 nccl NAMES_PER_DIR HINTS ${_shardlm_nccl_root}/lib /usr/local/cuda/lib64)
if(SHARDLM_NCCL_INCLUDE_DIR AND SHARDLM_NCCL_LIBRARY AND TARGET torch_cuda)
  set(SHARDLM_WITH_NCCL ON)
else()
  set(SHARDLM_WITH_NCCL OFF)
endif()
