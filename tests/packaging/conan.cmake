# The Conan recipe (conanfile.py) offline, as docs/packaging.md tells a user: the profile is the doc's (with this
# machine's compiler, its Debian packages' versions and the venv's LibTorch put in), CONAN_HOME lies in WORK with no
# remote and a proxy that refuses every connection, so nothing can come from the network: every dependency is a
# platform requirement. `conan create` builds the package and its test_package, which must train; then the doc's
# consumer project (conanfile.txt + the find_package CMakeLists.txt) is installed, built and run.
# Arguments: SOURCE_DIR, WORK, CONAN, GENERATOR, CXX, COMPILER, COMPILER_VERSION, ARCH, TORCH_DIR, and the platform
# versions TORCH_VERSION, NLOHMANN_JSON_VERSION, CXXOPTS_VERSION, RANGE_V3_VERSION, PCRE2_VERSION.
cmake_minimum_required(VERSION 3.22)
include(${CMAKE_CURRENT_LIST_DIR}/common.cmake)
file(REMOVE_RECURSE ${WORK})
file(WRITE ${WORK}/home/remotes.json "{\"remotes\": []}\n")

# The doc's profile with this machine's values in place of its own (every key must still be there).
read_snippet(conan_profile profile)
# (Each key sits after a newline: the snippet opens with [settings].)
foreach(pair "\ncompiler=[^\n]*;\ncompiler=${COMPILER}" "\ncompiler.version=[^\n]*;\ncompiler.version=${COMPILER_VERSION}"
             "\narch=[^\n]*;\narch=${ARCH}" "\nlibtorch/[^\n]*;\nlibtorch/${TORCH_VERSION}"
             "\nnlohmann_json/[^\n]*;\nnlohmann_json/${NLOHMANN_JSON_VERSION}" "\ncxxopts/[^\n]*;\ncxxopts/${CXXOPTS_VERSION}"
             "\nrange-v3/[^\n]*;\nrange-v3/${RANGE_V3_VERSION}" "\npcre2/[^\n]*;\npcre2/${PCRE2_VERSION}"
             "'Torch_DIR': '[^']*';'Torch_DIR': '${TORCH_DIR}'")
  list(GET pair 0 pattern)
  list(GET pair 1 value)
  if(NOT profile MATCHES "${pattern}")
    message(FATAL_ERROR "the conan_profile snippet of docs/packaging.md has no line matching '${pattern}'")
  endif()
  string(REGEX REPLACE "${pattern}" "${value}" profile "${profile}")
endforeach()
if(NOT profile MATCHES "\\[conf\\][^[]*$")
  message(FATAL_ERROR "the conan_profile snippet of docs/packaging.md must end with its [conf] section")
endif()
# This compiler (the one of the build running the test); the generator; the test package's build out of the tree.
string(APPEND profile "tools.build:compiler_executables={'cpp': '${CXX}'}\n"
                      "tools.cmake.cmaketoolchain:generator=${GENERATOR}\n"
                      "tools.cmake.cmake_layout:test_folder=${WORK}/test_package\n")
file(WRITE ${WORK}/profile "${profile}")

set(conan ${CMAKE_COMMAND} -E env CONAN_HOME=${WORK}/home http_proxy=http://127.0.0.1:9 https_proxy=http://127.0.0.1:9
    ${CONAN})
# The recipe's test package writes CMakeUserPresets.json beside its CMakeLists.txt unless told not to: keep the
# source tree clean.
run(${conan} create ${SOURCE_DIR} --profile:all=${WORK}/profile --no-remote -c tools.cmake.cmaketoolchain:user_presets=)
if(NOT run_output MATCHES "shardlm: trained 3 steps")
  message(FATAL_ERROR "conan create passed but its test package did not train 3 steps:\n${run_output}")
endif()
string(REGEX MATCH "step 3/3[^\n]*" last_step "${run_output}")
message("conan create: the test package trained: ${last_step}")

# The consumer of the doc: conanfile.txt, the find_package CMakeLists.txt, cmake --preset conan-release.
set(app ${WORK}/app)
read_snippet(conan_consumer conanfile)
file(WRITE ${app}/conanfile.txt "${conanfile}")
write_app(${app} find_package ${CMAKE_CURRENT_LIST_DIR}/app/forward.cpp)
run(${CMAKE_COMMAND} -E chdir ${app} ${conan} install . --profile:all=${WORK}/profile --no-remote)
run(${CMAKE_COMMAND} -E chdir ${app} ${CMAKE_COMMAND} --preset conan-release)
run(${CMAKE_COMMAND} -E chdir ${app} ${CMAKE_COMMAND} --build --preset conan-release)
run(${app}/build/Release/app)
if(NOT run_output MATCHES "logits \\[1, 4, 512\\]")
  message(FATAL_ERROR "the Conan consumer printed no logits:\n${run_output}")
endif()
message("the Conan consumer ran: ${run_output}")
