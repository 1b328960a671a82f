#!/usr/bin/env bash
# Configures (Release, Ninja) and builds into build/, binaries in build/bin: the targets named (scripts/build.sh
# shardlm_train shardlm_launch), or everything (tests, tools, examples, benchmarks). Ninja runs a job per core, but no
# more LibTorch compile jobs at once than the available memory holds (~3 GiB each: the job pool of CMakeLists.txt),
# so a machine with many cores and little memory does not run out. SHARDLM_CMAKE_ARGS: extra configure arguments.
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck disable=SC2086  # SHARDLM_CMAKE_ARGS is a list of arguments
cmake -S . -B build -G Ninja -DCMAKE_BUILD_TYPE=Release ${SHARDLM_CMAKE_ARGS:-} | { grep '^-- shardlm:' || true; }
start=$SECONDS
if (($#)); then
  echo "build: $* ($(nproc) cores)"
  cmake --build build -j "$(nproc)" --target "$@"
else
  echo "build: everything ($(nproc) cores; ~4.5 min on 2 idle cores, much longer beside other builds)"
  cmake --build build -j "$(nproc)"
fi
echo "build: done in $((SECONDS - start)) s"
