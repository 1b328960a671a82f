# PCRE2 (8-bit code units; Debian's libpcre2-dev) for the tokenizer's pre-tokenizer regex, as the imported target
# shardlm::pcre2. Used by the build and, installed next to shardlmConfig.cmake, by consumers of the package; a failure
# is left in SHARDLM_DEPENDENCY_ERROR (ShardlmDependencies.cmake).
if(NOT TARGET shardlm::pcre2)
  find_package(PkgConfig QUIET)
  if(PKG_CONFIG_FOUND)
    pkg_check_modules(SHARDLM_PC_PCRE2 QUIET libpcre2-8)
  endif()
  find_path(SHARDLM_PCRE2_INCLUDE_DIR pcre2.h HINTS ${SHARDLM_PC_PCRE2_INCLUDE_DIRS})
  find_library(SHARDLM_PCRE2_LIBRARY NAMES pcre2-8 HINTS ${SHARDLM_PC_PCRE2_LIBRARY_DIRS})
  if(NOT SHARDLM_PCRE2_INCLUDE_DIR OR NOT SHARDLM_PCRE2_LIBRARY)
    set(SHARDLM_DEPENDENCY_ERROR "PCRE2 not found (pcre2.h and libpcre2-8; Debian: apt-get install libpcre2-dev; Conan: pcre2; vcpkg: pcre2)")
    return()
  endif()
  add_library(shardlm::pcre2 UNKNOWN IMPORTED)
  set_target_properties(shardlm::pcre2 PROPERTIES IMPORTED_LOCATION "${SHARDLM_PCRE2_LIBRARY}"
                        INTERFACE_INCLUDE_DIRECTORIES "${SHARDLM_PCRE2_INCLUDE_DIR}")
endif()
