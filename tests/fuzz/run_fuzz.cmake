# Builds the safetensors fuzzer with clang and runs it over the seed corpus for a fixed time.
# -DSOURCE_DIR=<repo> -DWORK=<scratch dir> -DCXX=<clang++> -DPYTHON=<python> -DSECONDS=<budget> -DGENERATOR=<gen>
if(NOT CXX)
  message(FATAL_ERROR "clang++ was not found when the project was configured: the fuzzer needs clang with libFuzzer "
                      "(scripts/setup.sh installs clang and libclang-rt-14-dev)")
endif()
include(${CMAKE_CURRENT_LIST_DIR}/../cmake/run.cmake)
run(${CMAKE_COMMAND} -S ${SOURCE_DIR}/tests/fuzz -B ${WORK}/build -G ${GENERATOR} -DCMAKE_CXX_COMPILER=${CXX}
    -DCMAKE_BUILD_TYPE=RelWithDebInfo)
run(${CMAKE_COMMAND} --build ${WORK}/build)
file(REMOVE_RECURSE ${WORK}/corpus ${WORK}/seeds)
file(MAKE_DIRECTORY ${WORK}/corpus)
run(${PYTHON} ${SOURCE_DIR}/tests/fuzz/make_seeds.py ${WORK}/seeds)
# The seeds once each (a crash here is a regression on a known input), then mutations for SECONDS.
file(GLOB seeds ${WORK}/seeds/*)
run(${WORK}/build/fuzz_safetensors ${seeds})
run(${WORK}/build/fuzz_safetensors -seed=20261121 -max_total_time=${SECONDS} -max_len=4096 -timeout=10 -rss_limit_mb=2048
    -dict=${SOURCE_DIR}/tests/fuzz/safetensors.dict -print_final_stats=1 ${WORK}/corpus ${WORK}/seeds)
if(NOT out MATCHES "stat::number_of_executed_units: ([0-9]+)")
  message(FATAL_ERROR "no libFuzzer statistics in the output:\n${out}")
endif()
set(runs ${CMAKE_MATCH_1})
if(runs LESS 1000)
  message(FATAL_ERROR "the fuzzer ran only ${runs} inputs in ${SECONDS} s:\n${out}")
endif()
message("fuzz_safetensors: ${runs} inputs in ${SECONDS} s, no finding")
