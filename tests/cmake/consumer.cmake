# Installs shardlm into WORK/prefix, then configures, builds and runs tests/consumer against it.
include(${CMAKE_CURRENT_LIST_DIR}/run.cmake)
file(REMOVE_RECURSE ${WORK})
run(${CMAKE_COMMAND} -S ${SOURCE_DIR} -B ${WORK}/shardlm -G ${GENERATOR} -DSHARDLM_BUILD_TESTS=OFF
    -DSHARDLM_BUILD_TOOLS=OFF -DSHARDLM_BUILD_BENCHMARKS=OFF -DTorch_DIR=${Torch_DIR})
run(${CMAKE_COMMAND} --build ${WORK}/shardlm)  # the compiled part (shardlm::compiled)
run(${CMAKE_COMMAND} --install ${WORK}/shardlm --prefix ${WORK}/prefix)
run(${CMAKE_COMMAND} -S ${SOURCE_DIR}/tests/consumer -B ${WORK}/build -G ${GENERATOR}
    -DCMAKE_PREFIX_PATH=${WORK}/prefix -DTorch_DIR=${Torch_DIR} -DCMAKE_BUILD_TYPE=Release)
run(${CMAKE_COMMAND} --build ${WORK}/build)
run(${WORK}/build/consumer)
run(${WORK}/build/consumer_trainer --steps 2 --layers 1 --seq-len 16 --micro-batch 2)
message("consumer and consumer_trainer built and ran against ${WORK}/prefix")
