# `cmake --install` of the build into a fresh prefix: the eight tools are in PREFIX/bin beside the headers and the CMake
# package, each runs from there (its run path finds LibTorch), and the installed launcher starts two ranks of the
# installed trainer, which train.
file(REMOVE_RECURSE ${WORK})
include(${CMAKE_CURRENT_LIST_DIR}/../cmake/run.cmake)
run(${CMAKE_COMMAND} --install ${BUILD} --prefix ${WORK}/prefix)
foreach(path include/shardlm/shardlm.hpp lib/cmake/shardlm/shardlmConfig.cmake)
  if(NOT EXISTS ${WORK}/prefix/${path})
    message(FATAL_ERROR "not installed: ${path}")
  endif()
endforeach()
set(bin ${WORK}/prefix/bin)
foreach(tool shardlm_launch shardlm_tokenize shardlm_inspect shardlm_plan shardlm_plot shardlm_merge shardlm_logits
        shardlm_train)
  run(${bin}/${tool} --help)
endforeach()
run(${bin}/shardlm_launch --nproc-per-node 2 -- ${bin}/shardlm_train --data ${DATA} --layers 1 --seq-len 32
    --micro-batch 2 --steps 2 --log-every 1 --dist-timeout 60)
if(NOT out MATCHES "\\[rank 0\\] .*2 rank\\(s\\) on cpu.*trained 2 steps")
  message(FATAL_ERROR "the installed launcher and trainer did not train 2 steps on 2 ranks:\n${out}")
endif()
message("installed into ${WORK}/prefix: the tools run from there, and trained 2 steps on 2 ranks")
