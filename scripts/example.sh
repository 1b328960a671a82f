#!/usr/bin/env bash
# The README's main job: set up, build what it runs (the precompiled header and shardlm::compiled, the example, the
# launcher: not the whole project), and train the tiny Llama of examples/01 on its embedded corpus with FullShard over
# 2 CPU ranks (shardlm_launch). Extra arguments go to the example (try --help).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
scripts/build.sh 01_tiny_llama_cpu shardlm_launch
exec build/bin/shardlm_launch --nproc-per-node 2 -- build/bin/01_tiny_llama_cpu "$@"
