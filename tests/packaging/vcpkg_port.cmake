# The vcpkg overlay port (ports/shardlm) without vcpkg, which is in neither Debian nor PyPI: ports/shardlm/portfile.cmake
# itself runs here, with stand-ins for the vcpkg functions it calls that do what vcpkg documents them to do
# (configure and install with the port's options into the package directory, move the CMake files to share/shardlm
# and make their paths relative, install the copyright). Then what vcpkg checks of a package is checked, and the
# vcpkg snippet of docs/packaging.md is built against the package and trains the tiny Llama a few steps.
# Not covered: vcpkg's own toolchain, its ports of the dependencies (here: Debian's packages and the venv's LibTorch,
# given as a triplet gives a user's LibTorch: VCPKG_CMAKE_CONFIGURE_OPTIONS), the debug configuration.
# Arguments: SOURCE_DIR, WORK, FEATURES (the port's features asked), TORCH_PREFIX, GENERATOR.
cmake_minimum_required(VERSION 3.22)
include(${CMAKE_CURRENT_LIST_DIR}/common.cmake)
file(REMOVE_RECURSE ${WORK})

# What vcpkg defines for a portfile (triplet x64-linux-release: a release-only triplet).
set(PORT shardlm)
set(TARGET_TRIPLET x64-linux-release)
set(VCPKG_BUILD_TYPE release)
set(CURRENT_PORT_DIR ${SOURCE_DIR}/ports/shardlm)
set(CURRENT_BUILDTREES_DIR ${WORK}/buildtrees/${PORT})
set(CURRENT_PACKAGES_DIR ${WORK}/packages/${PORT}_${TARGET_TRIPLET})
set(CURRENT_INSTALLED_DIR ${WORK}/installed/${TARGET_TRIPLET})
list(PREPEND FEATURES core)
set(VCPKG_CMAKE_CONFIGURE_OPTIONS "-DCMAKE_PREFIX_PATH=${TORCH_PREFIX}")
file(MAKE_DIRECTORY ${CURRENT_INSTALLED_DIR})

# vcpkg.json as far as this test can read it (vcpkg's schema is not checked): the port's name, the project's version
# (CMakeLists.txt), and the features asked.
file(READ ${CURRENT_PORT_DIR}/vcpkg.json manifest)
string(JSON port_name GET "${manifest}" name)
string(JSON port_version GET "${manifest}" version)
file(STRINGS ${SOURCE_DIR}/CMakeLists.txt project_line REGEX "^project\\(shardlm VERSION ")
string(REGEX MATCH "VERSION ([0-9.]+)" project_line "${project_line}")
if(NOT port_name STREQUAL PORT OR NOT port_version STREQUAL CMAKE_MATCH_1)
  message(FATAL_ERROR "vcpkg.json names ${port_name} ${port_version}, the project is ${PORT} ${CMAKE_MATCH_1}")
endif()
foreach(feature IN LISTS FEATURES)
  string(JSON description ERROR_VARIABLE missing GET "${manifest}" features ${feature} description)
  if(NOT feature STREQUAL "core" AND missing)
    message(FATAL_ERROR "vcpkg.json has no feature '${feature}'")
  endif()
endforeach()

function(vcpkg_check_features)
  cmake_parse_arguments(PARSE_ARGV 0 arg "" "OUT_FEATURE_OPTIONS" "FEATURES")
  set(options "")
  while(arg_FEATURES)
    list(POP_FRONT arg_FEATURES feature option)
    if(feature IN_LIST FEATURES)
      list(APPEND options "-D${option}=ON")
    else()
      list(APPEND options "-D${option}=OFF")
    endif()
  endwhile()
  set(${arg_OUT_FEATURE_OPTIONS} "${options}" PARENT_SCOPE)
endfunction()

function(vcpkg_cmake_configure)
  cmake_parse_arguments(PARSE_ARGV 0 arg "" "SOURCE_PATH" "OPTIONS")
  if(NOT VCPKG_BUILD_TYPE STREQUAL "release")
    message(FATAL_ERROR "this stand-in builds the release configuration only")
  endif()
  run(${CMAKE_COMMAND} -S ${arg_SOURCE_PATH} -B ${CURRENT_BUILDTREES_DIR}/${TARGET_TRIPLET}-rel -G ${GENERATOR}
      -DCMAKE_BUILD_TYPE=Release -DCMAKE_INSTALL_PREFIX=${CURRENT_PACKAGES_DIR} -DCMAKE_PREFIX_PATH=${CURRENT_INSTALLED_DIR}
      ${arg_OPTIONS} ${VCPKG_CMAKE_CONFIGURE_OPTIONS})
endfunction()

function(vcpkg_cmake_install)
  run(${CMAKE_COMMAND} --build ${CURRENT_BUILDTREES_DIR}/${TARGET_TRIPLET}-rel --target install)
endfunction()

# Moves CONFIG_PATH (default share/PACKAGE_NAME) to share/PACKAGE_NAME, removes a parent folder named cmake, and
# makes the files' prefix computations climb the two levels of share/PACKAGE_NAME.
function(vcpkg_cmake_config_fixup)
  cmake_parse_arguments(PARSE_ARGV 0 arg "" "PACKAGE_NAME;CONFIG_PATH" "")
  if(NOT arg_PACKAGE_NAME)
    set(arg_PACKAGE_NAME ${PORT})
  endif()
  if(NOT arg_CONFIG_PATH)
    set(arg_CONFIG_PATH share/${arg_PACKAGE_NAME})
  endif()
  set(share ${CURRENT_PACKAGES_DIR}/share/${arg_PACKAGE_NAME})
  if(NOT arg_CONFIG_PATH STREQUAL "share/${arg_PACKAGE_NAME}")
    file(GLOB files ${CURRENT_PACKAGES_DIR}/${arg_CONFIG_PATH}/*)
    file(COPY ${files} DESTINATION ${share})
    file(REMOVE_RECURSE ${CURRENT_PACKAGES_DIR}/${arg_CONFIG_PATH})
    get_filename_component(parent ${CURRENT_PACKAGES_DIR}/${arg_CONFIG_PATH} DIRECTORY)
    get_filename_component(parent_name ${parent} NAME)
    if(parent_name STREQUAL "cmake")
      file(REMOVE_RECURSE ${parent})
    endif()
  endif()
  if(NOT EXISTS ${share})
    message(FATAL_ERROR "'${share}' does not exist")
  endif()
  file(GLOB_RECURSE cmake_files ${share}/*.cmake)
  foreach(f IN LISTS cmake_files)
    file(READ ${f} text)
    string(REGEX REPLACE
      "get_filename_component\\(_IMPORT_PREFIX \"\\\${CMAKE_CURRENT_LIST_FILE}\" PATH\\)(\nget_filename_component\\(_IMPORT_PREFIX \"\\\${_IMPORT_PREFIX}\" PATH\\))*"
      "get_filename_component(_IMPORT_PREFIX \"\${CMAKE_CURRENT_LIST_FILE}\" PATH)\nget_filename_component(_IMPORT_PREFIX \"\${_IMPORT_PREFIX}\" PATH)\nget_filename_component(_IMPORT_PREFIX \"\${_IMPORT_PREFIX}\" PATH)"
      text "${text}")
    string(REGEX REPLACE "get_filename_component\\(PACKAGE_PREFIX_DIR \"\\\${CMAKE_CURRENT_LIST_DIR}/\\.\\./(\\.\\./)*\" ABSOLUTE\\)"
      "get_filename_component(PACKAGE_PREFIX_DIR \"\${CMAKE_CURRENT_LIST_DIR}/../../\" ABSOLUTE)" text "${text}")
    string(REPLACE "${CURRENT_PACKAGES_DIR}" "\${_IMPORT_PREFIX}" text "${text}")
    file(WRITE ${f} "${text}")
  endforeach()
endfunction()

function(vcpkg_install_copyright)
  cmake_parse_arguments(PARSE_ARGV 0 arg "" "" "FILE_LIST")
  file(READ ${arg_FILE_LIST} text)
  file(WRITE ${CURRENT_PACKAGES_DIR}/share/${PORT}/copyright "${text}")
endfunction()

include(${CURRENT_PORT_DIR}/portfile.cmake)

# vcpkg's checks of a package: the CMake files in share/<port> (none left in lib/cmake), a copyright and a usage
# file, no headers under debug/, no absolute path of the build machine in the CMake files.
set(pkg ${CURRENT_PACKAGES_DIR})
foreach(f include/shardlm/shardlm.hpp share/shardlm/shardlmConfig.cmake share/shardlm/shardlmConfigVersion.cmake
          share/shardlm/shardlmTargets.cmake share/shardlm/ShardlmDependencies.cmake share/shardlm/copyright
          share/shardlm/usage)
  if(NOT EXISTS ${pkg}/${f})
    message(FATAL_ERROR "the package lacks ${f}")
  endif()
endforeach()
foreach(d lib/cmake debug/include)
  if(EXISTS ${pkg}/${d})
    message(FATAL_ERROR "the package holds ${d}, which vcpkg refuses")
  endif()
endforeach()
if("compiled" IN_LIST FEATURES AND NOT EXISTS ${pkg}/lib/libshardlm_compiled.a)
  message(FATAL_ERROR "the compiled feature was asked, the package has no lib/libshardlm_compiled.a")
endif()
file(GLOB cmake_files ${pkg}/share/shardlm/*.cmake)
foreach(f IN LISTS cmake_files)
  file(READ ${f} text)
  foreach(dir ${WORK} ${SOURCE_DIR})
    string(FIND "${text}" "${dir}" absolute)
    if(NOT absolute EQUAL -1)
      message(FATAL_ERROR "${f} holds an absolute path of this machine (${dir})")
    endif()
  endforeach()
endforeach()

# vcpkg installs the package's files into installed/<triplet>: the consumer's prefix.
file(COPY ${pkg}/ DESTINATION ${CURRENT_INSTALLED_DIR})
write_app(${WORK}/app vcpkg ${SOURCE_DIR}/test_package/test_package.cpp)
build_and_run(${WORK}/app PREFIX_PATH ${CURRENT_INSTALLED_DIR} ${TORCH_PREFIX}
              RUN --steps 2 --layers 1 --seq-len 16 --micro-batch 2 --log-every 1 EXPECT "trained 2 steps")
