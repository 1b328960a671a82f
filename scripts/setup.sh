#!/usr/bin/env bash
# Prepares a Debian bookworm machine to build and test shardlm: the C++ libraries from Debian, and a venv
# (.venv) holding the PyTorch 2.11.0 wheel (whose LibTorch the project builds against) and the Python
# reference stack. Safe to run again: it only installs what is missing.
set -euo pipefail
cd "$(dirname "$0")/.."
start=$SECONDS
pkgs=(build-essential cmake ninja-build python3-venv doctest-dev librange-v3-dev libcxxopts-dev nlohmann-json3-dev
      libbenchmark-dev libgtest-dev libpcre2-dev libgloo-dev zlib1g-dev
      clang libclang-rt-14-dev)  # clang + libFuzzer: the safetensors fuzz test (tests/fuzz)
missing=()
for p in "${pkgs[@]}"; do dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p"); done
if ((${#missing[@]})); then
  sudo=""; [ "$(id -u)" = 0 ] || sudo=sudo
  echo "setup: apt-get install ${missing[*]}"
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "${missing[@]}" >/dev/null
fi
# The venv is filled when it is missing or broken, and again when scripts/requirements.txt changed since it was last
# installed (a copy is kept in .venv), so that a pull that adds a package brings it.
if ! .venv/bin/python -c 'import torch, transformers, safetensors' >/dev/null 2>&1 ||
   ! .venv/bin/pip freeze 2>/dev/null | grep -qx 'torch==2.11.0' ||
   ! cmp -s scripts/requirements.txt .venv/shardlm-requirements.txt; then
  if [ ! -x .venv/bin/python ]; then
    echo "setup: creating .venv with the pinned torch wheel and reference stack (2.8 GB of wheels, 5 GB installed: minutes)"
    python3 -m venv .venv
    .venv/bin/pip install -q --upgrade pip
  else
    echo "setup: installing scripts/requirements.txt into .venv"
  fi
  .venv/bin/pip install -q -r scripts/requirements.txt
  cp scripts/requirements.txt .venv/shardlm-requirements.txt
fi
echo "setup: ready in $((SECONDS - start)) s (torch $(.venv/bin/python -c 'import torch;print(torch.__version__)' 2>/dev/null))"
