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
