# vcpkg overlay port of shardlm (docs/packaging.md): vcpkg install shardlm --overlay-ports=<checkout>/ports
#
# The port builds the checkout that holds it (ports/shardlm/ of a shardlm source tree): an overlay port for users of
# a checkout, with no download. A port for a registry would take the sources with vcpkg_from_github (REPO, REF,
# SHA512) instead. vcpkg's binary cache keys on the port's files, not on the checkout's: after changing the sources,
# install with --no-binarycaching (or bump port-version) so that vcpkg rebuilds.
#
# Not run by vcpkg here (the vcpkg tool is in neither Debian nor PyPI): tests/packaging/vcpkg_port.cmake runs this
# file with stand-ins for the vcpkg functions it calls and builds a consumer against the result.
get_filename_component(SOURCE_PATH "${CURRENT_PORT_DIR}/../.." ABSOLUTE)
if(NOT EXISTS "${SOURCE_PATH}/include/shardlm/shardlm.hpp")
  message(FATAL_ERROR "${SOURCE_PATH} is not a shardlm checkout: this overlay port builds the checkout it lives in (ports/shardlm)")
endif()

vcpkg_check_features(OUT_FEATURE_OPTIONS FEATURE_OPTIONS
  FEATURES
    compiled SHARDLM_BUILD_COMPILED
)
# NCCL: required with the nccl feature, otherwise used when the consumer's LibTorch has CUDA and NCCL is found.
set(nccl AUTO)
if("nccl" IN_LIST FEATURES)
  set(nccl ON)
endif()
if(NOT "compiled" IN_LIST FEATURES)
  set(VCPKG_BUILD_TYPE release)  # headers and CMake files only: one configuration holds them all
endif()

vcpkg_cmake_configure(
  SOURCE_PATH "${SOURCE_PATH}"
  OPTIONS
    ${FEATURE_OPTIONS}
    -DSHARDLM_BUILD_TESTS=OFF
    -DSHARDLM_BUILD_TOOLS=OFF
    -DSHARDLM_BUILD_BENCHMARKS=OFF
    -DSHARDLM_INSTALL=ON
    -DSHARDLM_NCCL=${nccl}
    -DSHARDLM_INSTALL_CMAKEDIR=share/shardlm
)
vcpkg_cmake_install()
vcpkg_cmake_config_fixup(PACKAGE_NAME shardlm)

file(REMOVE_RECURSE "${CURRENT_PACKAGES_DIR}/debug/include")

file(INSTALL "${CMAKE_CURRENT_LIST_DIR}/usage" DESTINATION "${CURRENT_PACKAGES_DIR}/share/${PORT}")
# The project has no LICENSE file yet: the copyright file says so until it has one.
if(EXISTS "${SOURCE_PATH}/LICENSE")
  vcpkg_install_copyright(FILE_LIST "${SOURCE_PATH}/LICENSE")
else()
  file(WRITE "${CURRENT_PACKAGES_DIR}/share/${PORT}/copyright"
       "shardlm declares no license yet (its source tree has no LICENSE file).\n")
endif()
