#!/usr/bin/env bash
# The GPU entry point (run on a machine with a CUDA PyTorch 2.11; see ../shared/device/README.md):
#   1. builds the tools and the step benchmark against the installed PyTorch's LibTorch (+ .deps/prefix);
#   2. bf16 parity on CUDA: shardlm_logits --device cuda --dtype bf16 on the golden fixtures and on random
#      tiny checkpoints, against transformers in fp32 (logits rel err < 2e-2);
#   3. the single-GPU step benchmark (Llama3-8B dims, 4 layers, seq 4096, micro-batch 2, MixedBF16) and the
#      peer (HF transformers + FSDP2, eager) on the same GPU, then a table.
# PEER: path of peer_fsdp2.py (default .deps/peer_fsdp2.py, copied there from ../shared/device).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/shardlm-gpu}; mkdir -p "$OUT"
BUILD=${BUILD:-/tmp/shardlm-build}
PEER=${PEER:-.deps/peer_fsdp2.py}
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
export LD_LIBRARY_PATH=$PWD/.deps/prefix/lib/x86_64-linux-gnu:${LD_LIBRARY_PATH:-}
TORCH_PREFIX=$(python3 -c 'import torch;print(torch.utils.cmake_prefix_path)')
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader

echo "== build"
cmake -S . -B "$BUILD" -G Ninja -DCMAKE_BUILD_TYPE=Release -DSHARDLM_BUILD_TESTS=OFF \
  -DCMAKE_PREFIX_PATH="$PWD/.deps/prefix;$TORCH_PREFIX" -DSHARDLM_PYTHON=$(command -v python3) >"$OUT/cmake.log" 2>&1 \
  || { tail -30 "$OUT/cmake.log"; exit 1; }
cmake --build "$BUILD" -j 16 --target shardlm_logits step_benchmark >"$OUT/build.log" 2>&1 || { grep -A5 error "$OUT/build.log" | head -40; exit 1; }

echo "== bf16 parity on CUDA"
python3 tests/golden/make_llama_fixtures.py --out "$OUT/golden" >/dev/null
parity=PASS
for d in "$OUT"/golden/*/; do
  "$BUILD/bin/shardlm_logits" --model "$d" --input "$d/input.safetensors" --output "$d/cuda_bf16.safetensors" --device cuda --dtype bf16 || parity=FAIL
  python3 - "$d" <<'PY' || parity=FAIL
import sys, torch
from safetensors.torch import load_file
d = sys.argv[1]; ours = load_file(d + "/cuda_bf16.safetensors"); ref = load_file(d + "/reference.safetensors")
err = ((ours["logits"] - ref["logits"]).abs().max() / ref["logits"].abs().max()).item()
loss = abs(ours["loss"].item() - ref["loss"].item())
print(f"{d.rstrip('/').split('/')[-1]}: cuda bf16 logits rel err {err:.2e}, loss err {loss:.2e}")
sys.exit(0 if err < 2e-2 else 1)
PY
done
python3 tests/golden/check_logits.py --tool "$BUILD/bin/shardlm_logits" --tool-args "--device cuda --dtype bf16" \
  --logits-tol 2e-2 --loss-tol 5e-2 --seed 7 --count 4 --workdir "$OUT/random" || parity=FAIL

echo "== step benchmark: Llama3-8B dims, 4 layers, seq 4096, micro-batch 2"
ours=$("$BUILD/bin/step_benchmark" --preset llama3-8b --layers 4 --seq-len 4096 --micro-batch 2 --steps 10 --precision mixed-bf16 2>"$OUT/bench.log" | tail -1)
echo "$ours"
peer=""
if [ -f "$PEER" ]; then
  peer=$(torchrun --standalone --nproc-per-node 1 "$PEER" --preset llama3-8b --layers 4 --seq 4096 --batch 2 2>"$OUT/peer.log" | tail -1)
  echo "$peer"
else
  echo "peer script not found at $PEER"
fi
python3 - "$ours" "$peer" "$parity" <<'PY'
import json, sys
ours = json.loads(sys.argv[1]) if sys.argv[1] else {}
peer = json.loads(sys.argv[2]) if sys.argv[2] else {}
print("\n| what | shardlm | peer (HF + FSDP2, eager) | ratio |\n|---|---|---|---|")
def row(name, key, fmt, idx=None):
    a, b = ours.get(key), peer.get(key)
    if idx is not None: a, b = a and a[idx], b and b[idx]
    ratio = f"{a / b:.2f}" if a and b else "-"
    print(f"| {name} | {fmt.format(a) if a is not None else '-'} | {fmt.format(b) if b is not None else '-'} | {ratio} |")
row("tokens/s per GPU", "tokens_per_s_per_gpu", "{:.0f}")
row("MFU", "mfu", "{:.3f}")
row("step s", "step_s", "{:.4f}")
for i, n in enumerate(["forward s", "backward s", "optimizer s"]): row(n, "fwd_bwd_opt_s", "{:.4f}", i)
row("peak allocated GB", "peak_alloc_gb", "{:.1f}")
row("peak reserved GB", "peak_reserved_gb", "{:.1f}")
print(f"\nbf16 CUDA parity: {sys.argv[3]}")
PY
