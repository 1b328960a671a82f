# A consumer project of docs/packaging.md, as a user would make it from this source tree (WAY):
#   find_package      installs the headers-only package (nothing compiled), then builds the snippet against it;
#   add_subdirectory  puts the tree at app/shardlm, the snippet adds only that;
#   fetchcontent      packs the tree into a release-style archive that the snippet fetches from a file:// URL.
# The main is tests/packaging/app/forward.cpp, compiled without optimization: each way costs seconds.
# Arguments: SOURCE_DIR, WORK, WAY, TORCH_PREFIX (torch.utils.cmake_prefix_path), GENERATOR.
cmake_minimum_required(VERSION 3.22)
include(${CMAKE_CURRENT_LIST_DIR}/common.cmake)
file(REMOVE_RECURSE ${WORK})
set(app ${WORK}/app)
set(main ${CMAKE_CURRENT_LIST_DIR}/app/forward.cpp)
set(prefix_path ${TORCH_PREFIX})

if(WAY STREQUAL "find_package")
  run(${CMAKE_COMMAND} -S ${SOURCE_DIR} -B ${WORK}/shardlm -G ${GENERATOR} -DSHARDLM_BUILD_COMPILED=OFF
      -DSHARDLM_BUILD_TESTS=OFF -DSHARDLM_BUILD_TOOLS=OFF -DSHARDLM_BUILD_BENCHMARKS=OFF)
  run(${CMAKE_COMMAND} --install ${WORK}/shardlm --prefix ${WORK}/prefix)
  list(PREPEND prefix_path ${WORK}/prefix)
  write_app(${app} find_package ${main})
elseif(WAY STREQUAL "add_subdirectory")
  write_app(${app} add_subdirectory ${main})
  file(CREATE_LINK ${SOURCE_DIR} ${app}/shardlm SYMBOLIC)
elseif(WAY STREQUAL "fetchcontent")
  # What a release archive holds of the tree: what a build of the library reads.
  set(release ${WORK}/shardlm-0.1.0)
  file(COPY ${SOURCE_DIR}/CMakeLists.txt ${SOURCE_DIR}/cmake ${SOURCE_DIR}/include ${SOURCE_DIR}/src DESTINATION ${release})
  run(${CMAKE_COMMAND} -E chdir ${WORK} ${CMAKE_COMMAND} -E tar czf shardlm-0.1.0.tar.gz shardlm-0.1.0)
  file(REMOVE_RECURSE ${release})
  write_app(${app} fetchcontent ${main} REPLACE "/path/to/shardlm-0.1.0.tar.gz" "file://${WORK}/shardlm-0.1.0.tar.gz")
else()
  message(FATAL_ERROR "WAY '${WAY}': use find_package, add_subdirectory or fetchcontent")
endif()

build_and_run(${app} PREFIX_PATH ${prefix_path} EXPECT "logits \\[1, 4, 512\\]")
