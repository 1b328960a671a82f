#!/usr/bin/env bash
# The GPU entry point (run on a machine with a CUDA PyTorch 2.11; see ../shared/device/README.md). Phases, in the
# order given (default: all of them):
#   build   the tools and the step benchmark against the installed PyTorch's LibTorch (+ .deps/prefix), in $BUILD
#   parity  bf16 on CUDA: shardlm_logits on the golden fixtures and random tiny checkpoints vs transformers fp32
#   nccl    test_dist (its NCCL case: collectives, errors, init deadline on 2 GPUs), then the engine over NCCL:
#           tests/dist/check_equivalence.py with --device cuda (1x4, 2x2, 4x1 ranks x grad-accum against one
#           GPU without sharding; needs 4 GPUs)
#   ops     loss masks and evaluation over NCCL: tests/dist/check_equivalence.py --masked --device cuda (1x2, 2x1
#           ranks x grad-accum; needs 2 GPUs), then one GPU run with --eval-every and --tensorboard, plotted
#   bench   the step benchmark and the peer (HF transformers + FSDP2, eager), same machine, same call: Llama3-8B
#           dims with 8 layers at 1 and N GPUs (FullShard, MixedBF16, seq 4096, micro-batch 2), then a table
#   full8b  full Llama3-8B (32 layers) on N GPUs
#   offload CPU offload on one GPU: Llama3-8B dims with 4 layers without offload and offloaded with each host step
#           (--offload-step sync, overlapped, speculative), the peer without and with CPUOffloadPolicy beside them, and
#           full Llama3-8B with offload + every-block checkpointing
#   offload_ours  the 4-layer runs of shardlm only; offload_full8b the full 8B run only
#   regress the step benchmark of another tree (BASE_BUILD, default build-base: carry its bin/step_benchmark) and of
#           this one, alternating twice, Llama3-8B dims with 4 layers on one GPU
#   memory  the memory planner against measured peaks: 8B dims (8 layers) on 1 and N GPUs, full 8B with
#           checkpointing, 4 layers offloaded on one GPU; one run traced unit by unit (--memory-trace)
#   l405    Llama3-405B dims with 1 and 2 layers on N GPUs with the seed recipe (FullShard, EveryBlock, CPU
#           offload, PureBF16, seq 4096, batch 1): per-layer time and memory from the difference
#   ckpt    checkpoint save and load times: Llama3-8B dims with 4 layers on N GPUs (FullShard, MixedBF16),
#           saves every 3 steps, synchronous then --async-save (the training thread's stall per save), then a
#           resume (load time)
#   lora    LoRA and DoRA on GPUs: tests/dist/check_equivalence.py --adapter lora|dora over NCCL (1x2, 2x1 against one
#           GPU without sharding) on bf16, int4 and fp8 bases, then lora_bench
#   lora_bench  that step benchmark alone: none, lora/dora on bf16, int4 and fp8 bases, the peft + FSDP2 peer
#           (scripts/peer_lora.py) with lora and dora
#   qlora70 70B dims QLoRA on one GPU: int4 base, LoRA rank 64 on every projection, seq 2048, micro-batch
#           QLORA_BATCH (4), every-block checkpointing (the fsdp_qlora figure: ~786 tokens/s per H100 on 4 GPUs)
#   q405    405B dims on N GPUs: QDoRA (int4, rank 64, all 126 layers) and LoRA on fp8 (Q405_FP8_LAYERS layers,
#           100), seq Q405_SEQ (4096), FullShard + every-block + mixed-bf16; setup_s is the initialize + quantize time;
#           q405_int4 and q405_fp8 run one of the two; Q405_STEPS (3) measured steps after as many warm-up steps
#   dense1  one GPU, Llama3-8B dims with 4 layers, seq 4096, micro-batch 2, mixed-bf16: ours, the step benchmark of
#           BASE_BUILD (another tree) and the peer eager, with torch.compile on each layer, and compiled with
#           Liger-Kernel (.deps/whl/liger_kernel-*.whl installed into $OUT/site when carried), then 8 layers with and
#           without block recompute and with selective recompute
#   dense_table  the dense table of docs/benchmarks.md in one call: ours with the block kernels (twice), BASE_BUILD, ours
#           with --block-kernels aten, the peer eager, compiled and compiled with Liger-Kernel, ours with --precision fp8
#           (twice) and with selective recompute (4 layers)
#   cuda_tests  every CUDA test case of test_model (block kernels, MoE kernels, NVRTC) and test_train (float8 linear,
#           AdamW kernel), failures shown
#   recompute8  those 8-layer runs alone: none, selective, every-block (and 4 layers selective)
#   fp8     precision::FP8 on one GPU: (1) test_train's CUDA case (the float8 linear through at::_scaled_mm against its
#           emulation, forward and backward), (2) the step benchmark with --precision fp8 and mixed-bf16 on dense1's
#           shape (Llama3-8B dims, 4 layers, seq 4096, micro-batch 2), alternating twice, (3) fp8_curves
#   fp8_curves  FP8_STEPS (300) steps of the bundled corpus tokenized with the Llama 3 tokenizer (TOKENIZER, default
#           ../shared/data/llama3-tokenizer/tokenizer.json) on Llama3-8B dims with 2 layers, seq 512, micro-batch 4,
#           with mixed-bf16 and with fp8 (same seed and data order): both smoothed curves and the relative difference
#           of the last 50 steps' mean losses (PASS within 3%; docs/benchmarks.md says why)
#   smoke   the merged tree's training state on one GPU over NCCL: llama3-debug (byte text) with CPU offload and each host
#           step, checkpoints saved synchronously and asynchronously, resumed, one shard flipped and refused
#   h100    full Llama3-8B on one GPU (FullShard + EveryBlock + CPU offload + MixedBF16), the 80 GB H100 run
#   load    HF checkpoint loading: full Llama3-8B dims (32 layers, bf16, ~16 GB in 4 GB files) written by transformers,
#           read with a cold page cache (posix_fadvise DONTNEED before each read) by `cat > /dev/null`, then loaded by
#           shardlm_train --steps 0 on 1 and N ranks (FullShard); then shardlm_logits (bf16 and fp32) on one GPU vs
#           transformers (bf16 and fp32) on the same GPU, same input
#   quant   the int4/fp8 dequantization kernels (NVRTC) against the CPU reference bit for bit, their GB/s on a 405B
#           weight [16384, 53248] next to the ATen-op path, and the time to quantize one 405B layer on the GPU
#   moe     Mixtral: bf16 on CUDA, shardlm_logits on the tiny Mixtral fixtures vs transformers fp32 with each expert
#           kernel (grouped = at::_grouped_mm, padded = batched bmm, loop) and the kernels against each other, random
#           tiny Mixtral checkpoints (with transformers' own bf16 error beside ours), then the step benchmark beside the peer: Mixtral-8x7B dims with 4 layers
#           (vocab 128256 as the peer's) on N GPUs, FullShard, MixedBF16, seq 4096, micro-batch 1, grouped and padded
#   moe_bench  that step benchmark (grouped) and the peer alone
#   ep      expert parallelism over NCCL (the all-to-all as grouped ncclSend/ncclRecv): test_dist's NCCL case (which
#           exchanges rows with zero counts), then tests/dist/check_equivalence.py on mixtral-debug with --device cuda:
#           --expert-parallel 2 at 2x1 ranks x grad-accum (2 GPUs), and --expert-parallel 2 and 4 at 4x1 (4 GPUs)
#           MOE_LAYERS: the layers of these Mixtral runs (default 4; 1 fits one 80 GB GPU); SKIP_PEER=1: ours only;
#           with several GPUs also ours with --reduce-dtype bf16 (the gradient collectives in bf16)
#   fused   the block kernels (model/block_kernels.hpp): test_model's CUDA cases (each kernel against the ATen path,
#           forward and gradients, odd sizes; whole bf16 models), then Llama3-8B dims with 4 layers on one GPU (seq 4096,
#           micro-batch 2, mixed-bf16, as dense1) with --block-kernels fused and aten, each with no recompute and with
#           selective, alternating, then one profiled run of each (SHARDLM_PROFILE: the kernels' GPU times)
#   profile the step benchmark with SHARDLM_PROFILE (two profiled steps after the measured ones) on PROFILE_ARGS
#           (default: the moe phase's Mixtral-8x7B run): a Chrome trace in $OUT/profile and rank 0's summary of the
#           GPU time (kernels by time, NCCL, how busy the compute kernels kept the GPU)
#   moe1    the MoE dispatch/combine kernels on one GPU: test_model's CUDA cases of them against the ATen ops (built
#           into $BUILD when missing; they print the kernels' and the ATen ops' times at Mixtral-8x7B size), then
#           Mixtral-8x7B dims with 1 layer (vocab 128256), seq 4096, micro-batch 1, mixed-bf16, 10 steps: ours and
#           BASE_BUILD's (another tree, default build-base: carry its bin/step_benchmark and bin/shardlm_launch)
#           alternating twice, the peer 3 times, SHARDLM_PROFILE profiles of ours and of the base (the MoE nodes'
#           and kernels' GPU time per step from the traces), and a table: tokens/s, MFU, ratio to the best peer run
# TARGETS: what the build phase builds (default: every program the phases run). NCCL_POLICIES: the sharding
# policies of the nccl phase's equivalence check (default: full hybrid none).
# PEER: path of peer_fsdp2.py (default .deps/peer_fsdp2.py, copied there from ../shared/device).
# BUILD: the build folder (default build-gpu). Programs built on a machine without a GPU against the same CUDA wheel
# of PyTorch 2.11 (-DCMAKE_CUDA_ARCHITECTURES=90) run here too: carry them and name their folder, e.g.
# `BUILD=$PWD/build bash scripts/gpu.sh q405` with build/bin/step_benchmark and shardlm_launch carried along.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/shardlm-gpu}; mkdir -p "$OUT"
BUILD=${BUILD:-$PWD/build-gpu}
PEER=${PEER:-.deps/peer_fsdp2.py}
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
export LD_LIBRARY_PATH=$PWD/.deps/prefix/lib/x86_64-linux-gnu:${LD_LIBRARY_PATH:-}
# Programs built elsewhere against the same PyTorch wheel (BUILD pointing at a carried build folder, no build phase)
# have that machine's wheel paths as their run path: they find LibTorch, CUDA and NCCL in this machine's wheel.
TORCH_DIR=$(python3 -c 'import os, torch; print(os.path.dirname(torch.__file__))' 2>/dev/null) \
  && for d in "$TORCH_DIR/lib" "$TORCH_DIR"/../nvidia/*/lib; do LD_LIBRARY_PATH=$LD_LIBRARY_PATH:$d; done
NGPU=$(nvidia-smi -L | wc -l)
phases=${*:-build parity nccl bench full8b}
RESULTS=$OUT/results.jsonl
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | sort | uniq -c

build() {
  local torch_prefix; torch_prefix=$(python3 -c 'import torch;print(torch.utils.cmake_prefix_path)')
  cmake -S . -B "$BUILD" -G Ninja -DCMAKE_BUILD_TYPE=Release -DSHARDLM_BUILD_TESTS=ON -DCMAKE_CUDA_ARCHITECTURES=90 \
    -DCMAKE_PREFIX_PATH="$PWD/.deps/prefix;$torch_prefix" -DSHARDLM_PYTHON="$(command -v python3)" >"$OUT/cmake.log" 2>&1 \
    || { tail -30 "$OUT/cmake.log"; return 1; }
  grep "shardlm:" "$OUT/cmake.log"
  cmake --build "$BUILD" -j 16 --target ${TARGETS:-shardlm_logits shardlm_train shardlm_launch step_benchmark test_dist test_model quant_benchmark} >"$OUT/build.log" 2>&1 \
    || { grep -B2 -A12 "error" "$OUT/build.log" | head -60; return 1; }
}

parity() {
  python3 tests/golden/make_llama_fixtures.py --out "$OUT/golden" >/dev/null
  local ok=PASS
  for d in "$OUT"/golden/*/; do
    "$BUILD/bin/shardlm_logits" --model "$d" --input "$d/input.safetensors" --output "$d/cuda_bf16.safetensors" --device cuda --dtype bf16 || ok=FAIL
    python3 - "$d" <<'PY' || ok=FAIL
import sys
from safetensors.torch import load_file
d = sys.argv[1]; ours = load_file(d + "/cuda_bf16.safetensors"); ref = load_file(d + "/reference.safetensors")
err = ((ours["logits"] - ref["logits"]).abs().max() / ref["logits"].abs().max()).item()
print(f"{d.rstrip('/').split('/')[-1]}: cuda bf16 logits rel err {err:.2e}, loss err {abs(ours['loss'].item() - ref['loss'].item()):.2e}")
sys.exit(0 if err < 2e-2 else 1)
PY
  done
  python3 tests/golden/check_logits.py --tool "$BUILD/bin/shardlm_logits" --tool-args "--device cuda --dtype bf16" \
    --logits-tol 2e-2 --loss-tol 5e-2 --seed 7 --count 4 --workdir "$OUT/random" | tail -2 || ok=FAIL
  echo "{\"check\": \"bf16 parity\", \"result\": \"$ok\"}" >>"$RESULTS"
}

nccl() {
  "$BUILD/bin/test_dist" >"$OUT/test_dist.log" 2>&1  # NCCL collectives, CPU-tensor error and init deadline on 2 GPUs
  tail -4 "$OUT/test_dist.log"
  echo "{\"check\": \"test_dist (NCCL case)\", \"result\": \"$(grep -q 'Status: SUCCESS' "$OUT/test_dist.log" && echo PASS || echo FAIL)\"}" >>"$RESULTS"
  [ "$NGPU" -ge 4 ] || { echo "nccl: needs 4 GPUs, have $NGPU"; return 0; }
  for policy in ${NCCL_POLICIES:-full hybrid none}; do
    local extra=""; [ $policy = hybrid ] && extra="--shard-group-size 2"
    python3 tests/dist/check_equivalence.py --launch "$BUILD/bin/shardlm_launch" --train "$BUILD/bin/shardlm_train" \
      --sharding $policy $extra --splits 1x4,2x2,4x1 --train-args "--device cuda" --workdir "$OUT/eq_$policy" 2>&1 | tail -4
    echo "{\"check\": \"nccl equivalence $policy\", \"result\": \"${PIPESTATUS[0]}\"}" >>"$RESULTS"
  done
}

ops() {
  [ "$NGPU" -ge 2 ] || { echo "ops: needs 2 GPUs, have $NGPU"; return 0; }
  cmake --build "$BUILD" --target shardlm_plot >>"$OUT/build.log" 2>&1 || return 1
  python3 tests/dist/check_equivalence.py --launch "$BUILD/bin/shardlm_launch" --train "$BUILD/bin/shardlm_train" \
    --sharding full --masked --splits 1x2,2x1 --train-args "--device cuda" --workdir "$OUT/eq_masked" 2>&1 | tail -4
  echo "{\"check\": \"nccl equivalence masked + eval\", \"result\": \"${PIPESTATUS[0]}\"}" >>"$RESULTS"
  "$BUILD/bin/shardlm_train" --device cuda --data examples/data/corpus.txt --seq-len 128 --steps 60 --lr 3e-3 \
    --eval-fraction 0.05 --eval-every 20 --log-every 20 --metrics "$OUT/ops.jsonl" --tensorboard "$OUT/ops_tb" 2>&1 | tail -6
  "$BUILD/bin/shardlm_plot" --metrics "$OUT/ops.jsonl" --output "$OUT/ops.png" && ls -l "$OUT"/ops_tb
}

ours() {  # ours LABEL NPROC ARGS...
  local label=$1 n=$2; shift 2
  local line; line=$("$BUILD/bin/shardlm_launch" --nproc-per-node "$n" -- "$BUILD/bin/step_benchmark" "$@" 2>"$OUT/$label.log" | grep '"impl"' | sed 's/^\[rank 0\] //')
  [ -n "$line" ] || { echo "$label: no result"; tail -5 "$OUT/$label.log"; return 0; }
  echo "{\"label\": \"$label\", ${line#\{}" | tee -a "$RESULTS"
}

peer() {  # peer LABEL NPROC ARGS...
  local label=$1 n=$2; shift 2
  [ -f "$PEER" ] || { echo "peer script not found at $PEER"; return 0; }
  local line; line=$(torchrun --standalone --nproc-per-node "$n" "$PEER" "$@" 2>"$OUT/$label.log" | grep '"peer"' | tail -1)
  [ -n "$line" ] || { echo "$label: no result"; tail -5 "$OUT/$label.log"; return 0; }
  echo "{\"label\": \"$label\", ${line#\{}" | tee -a "$RESULTS"
}

bench() {
  bench4
  ours "ours_8L_1gpu" 1 --preset llama3-8b --layers 8 --seq-len 4096 --micro-batch 2 --steps 10 --precision mixed-bf16 \
    --sharding full
  peer "peer_8L_${NGPU}gpu" "$NGPU" --preset llama3-8b --layers 8 --seq 4096 --batch 2
  peer "peer_8L_1gpu" 1 --preset llama3-8b --layers 8 --seq 4096 --batch 2
}

full8b() {
  ours "ours_32L_${NGPU}gpu" "$NGPU" --preset llama3-8b --layers 32 --seq-len 4096 --micro-batch 2 --steps 6 --precision mixed-bf16 --sharding full
  ours "ours_32L_${NGPU}gpu_ac" "$NGPU" --preset llama3-8b --layers 32 --seq-len 4096 --micro-batch 2 --steps 6 --precision mixed-bf16 --sharding full --checkpointing every-block
  peer "peer_32L_${NGPU}gpu" "$NGPU" --preset llama3-8b --layers 32 --seq 4096 --batch 2 --steps 6
}

lora() {
  if [ "$NGPU" -ge 2 ]; then
    for case in "lora none" "dora none" "dora int4" "lora fp8"; do
      set -- $case
      python3 tests/dist/check_equivalence.py --launch "$BUILD/bin/shardlm_launch" --train "$BUILD/bin/shardlm_train" \
        --sharding full --adapter $1 --splits 1x2,2x1 --train-args "--device cuda --quant $2" --workdir "$OUT/eq_$1_$2" 2>&1 | tail -4
      echo "{\"check\": \"nccl equivalence $1 on a $2 base\", \"result\": \"${PIPESTATUS[0]}\"}" >>"$RESULTS"
    done
  fi
  lora_bench
}

lora_bench() {  # 8B dims, 8 layers: full fine-tuning, LoRA and DoRA on bf16/int4/fp8 bases, the peft peer beside them
  local common="--preset llama3-8b --layers 8 --seq-len 4096 --micro-batch 2 --steps 10 --precision mixed-bf16 --sharding full"
  ours "ours_8L_${NGPU}gpu_none" "$NGPU" $common
  for case in "lora none" "dora none" "lora int4" "dora int4" "lora fp8"; do
    set -- $case
    ours "ours_8L_${NGPU}gpu_$1_$2" "$NGPU" $common --adapter $1 --quant $2 --lora-rank 16 --lora-alpha 32
  done
  [ "${SKIP_PEER:-0}" = 1 ] && return 0  # SKIP_PEER=1: ours only
  PEER=scripts/peer_lora.py peer "peer_8L_${NGPU}gpu_lora" "$NGPU" --preset llama3-8b --layers 8 --seq 4096 --batch 2
  PEER=scripts/peer_lora.py peer "peer_8L_${NGPU}gpu_dora" "$NGPU" --preset llama3-8b --layers 8 --seq 4096 --batch 2 --dora
}

qlora70() {  # 70B dims QLoRA (int4 base, rank-64 LoRA on every projection) on one GPU, 2048 tokens a sequence
  ours "qlora_70b_1gpu_b${QLORA_BATCH:-4}" 1 --preset llama3-70b --layers 80 --seq-len 2048 --micro-batch "${QLORA_BATCH:-4}" --steps 3 \
    --precision mixed-bf16 --sharding full --checkpointing every-block --adapter lora --quant int4 --lora-rank 64 --lora-alpha 16
}

q405() {  # Llama 3.1 405B dims on N GPUs: QDoRA (int4) on all 126 layers, then LoRA on fp8 with Q405_FP8_LAYERS layers
  q405_int4
  q405_fp8
}

q405_int4() {  # the QDoRA run of q405 alone
  ours "qdora_405b_${NGPU}gpu" "$NGPU" --preset llama3-405b --layers 126 --seq-len "${Q405_SEQ:-4096}" --micro-batch 1 --steps "${Q405_STEPS:-3}" \
    --precision mixed-bf16 --sharding full --checkpointing every-block --adapter dora --quant int4 --lora-rank 64 --lora-alpha 16
}

q405_fp8() {  # the LoRA-on-fp8 run of q405 alone
  ours "lora_fp8_405b_${Q405_FP8_LAYERS:-100}L_${NGPU}gpu" "$NGPU" --preset llama3-405b --layers "${Q405_FP8_LAYERS:-100}" \
    --seq-len "${Q405_SEQ:-4096}" --micro-batch 1 --steps "${Q405_STEPS:-3}" --precision mixed-bf16 --sharding full --checkpointing every-block \
    --adapter lora --quant fp8 --lora-rank 64 --lora-alpha 16
}

offload() {  # CPU offload on one GPU: the 4-layer runs below, the peer's CPUOffloadPolicy beside them, full Llama3-8B
  offload_ours
  peer "peer_4L_1gpu" 1 --preset llama3-8b --layers 4 --seq 4096 --batch 2 --steps 5
  peer "peer_4L_1gpu_offload" 1 --preset llama3-8b --layers 4 --seq 4096 --batch 2 --offload --steps 2 --warmup 1
  offload_full8b
}

offload_full8b() {  # full Llama3-8B offloaded with every-block recompute on one GPU (the host step as --offload-step auto picks)
  ours "ours_32L_1gpu_offload_ac" 1 --preset llama3-8b --seq-len 4096 --micro-batch 2 --precision mixed-bf16 \
    --sharding full --layers 32 --steps 3 --offload cpu --checkpointing every-block
}

offload_ours() {  # Llama3-8B dims, 4 layers, one GPU: no offload, then offloaded with each host step (engine/offload.hpp);
  # speculative twice: with the default --grad-clip 1 (random weights clip every step: after the first redone step it
  # steps as overlapped does) and with clipping off (every speculative update stands)
  local common="--preset llama3-8b --seq-len 4096 --micro-batch 2 --precision mixed-bf16 --sharding full --layers 4"
  ours "ours_4L_1gpu" 1 $common --steps 8
  for step in sync overlapped speculative; do
    ours "ours_4L_1gpu_offload_$step" 1 $common --steps 8 --offload cpu --offload-step $step
  done
  ours "ours_4L_1gpu_offload_speculative_noclip" 1 $common --steps 8 --offload cpu --offload-step speculative --grad-clip 0
}

offload_pair() {  # Llama3-8B dims with 4 layers on one GPU: no offload, and offloaded with the speculative host step with
  # clipping off (every speculative update stands), the runs the peer's are set against in the same call
  local common="--preset llama3-8b --seq-len 4096 --micro-batch 2 --precision mixed-bf16 --sharding full --layers 4"
  ours "ours_4L_1gpu" 1 $common --steps 8
  ours "ours_4L_1gpu_offload_speculative_noclip" 1 $common --steps 8 --offload cpu --offload-step speculative --grad-clip 0
}

peer_offload() {  # the peer without and with CPUOffloadPolicy, Llama3-8B dims with 4 layers on one GPU
  peer "peer_4L_1gpu" 1 --preset llama3-8b --layers 4 --seq 4096 --batch 2 --steps 5
  peer "peer_4L_1gpu_offload" 1 --preset llama3-8b --layers 4 --seq 4096 --batch 2 --offload --steps 2 --warmup 1
}

regress() {  # the same step benchmark built from BASE_BUILD (another tree) and from this one, alternating, same call
  local common="--preset llama3-8b --layers 4 --seq-len 4096 --micro-batch 2 --steps 10 --precision mixed-bf16 --sharding full"
  for i in 1 2; do
    BUILD=${BASE_BUILD:-$PWD/build-base} ours "base_4L_1gpu_$i" 1 $common
    ours "new_4L_1gpu_$i" 1 $common
  done
}

bench4() {  # the 8-layer run at N GPUs alone
  ours "ours_8L_${NGPU}gpu" "$NGPU" --preset llama3-8b --layers 8 --seq-len 4096 --micro-batch 2 --steps 10 \
    --precision mixed-bf16 --sharding full
}

memory() {
  local common="--preset llama3-8b --seq-len 4096 --micro-batch 2 --precision mixed-bf16 --sharding full"
  ours "mem_8L_${NGPU}gpu_trace" "$NGPU" $common --layers 8 --steps 1 --memory-trace
  grep "shardlm: memory" "$OUT/mem_8L_${NGPU}gpu_trace.log" | sed 's/^\[rank 0\] shardlm: memory //' | tail -20
  ours "mem_8L_${NGPU}gpu" "$NGPU" $common --layers 8 --steps 3
  ours "mem_8L_1gpu" 1 $common --layers 8 --steps 3
  ours "mem_32L_${NGPU}gpu_ac" "$NGPU" $common --layers 32 --steps 3 --checkpointing every-block
  ours "mem_4L_1gpu_offload" 1 $common --layers 4 --steps 3 --offload cpu
  ours "mem_8L_${NGPU}gpu_grad-op_every2" "$NGPU" --preset llama3-8b --seq-len 4096 --micro-batch 1 --precision mixed-bf16 \
    --sharding grad-op --layers 8 --steps 3 --checkpointing every-2
}

l405() {  # Llama3-405B dims, the seed recipe (FullShard, every-block, CPU offload, pure bf16, seq 4096, batch 1) with 1 and
  # 2 layers: per-layer forward/backward/host-step times from the difference; L405_STEP: --offload-step (overlapped: the
  # second copy of the state of 2 layers does not fit a 128 GB host)
  local common="--preset llama3-405b --seq-len 4096 --micro-batch 1 --precision pure-bf16 --sharding full --checkpointing every-block --offload cpu --offload-step ${L405_STEP:-overlapped}"
  ours "l405_1L_${NGPU}gpu" "$NGPU" $common --layers 1 --steps 3
  ours "l405_2L_${NGPU}gpu" "$NGPU" $common --layers 2 --steps 3
}

l405_hidden() {  # one 405B layer with clipping off: the host step speculative (during the backward) and overlapped
  local common="--preset llama3-405b --seq-len 4096 --micro-batch 1 --precision pure-bf16 --sharding full --checkpointing every-block --offload cpu --layers 1 --steps 3 --grad-clip 0"
  ours "l405_1L_${NGPU}gpu_speculative_noclip" "$NGPU" $common --offload-step speculative
  ours "l405_1L_${NGPU}gpu_overlapped_noclip" "$NGPU" $common --offload-step overlapped
}

ckpt() {
  local dir=${CKPT_DIR:-/tmp/shardlm-ckpt}
  python3 -c "import numpy as np; np.random.default_rng(0).integers(0, 128256, size=1 << 24, dtype=np.uint32).tofile('$OUT/tokens.bin')"
  local common="--preset llama3-8b --layers 4 --seq-len 4096 --micro-batch 2 --precision mixed-bf16 --sharding full --device cuda
    --data $OUT/tokens.bin --lr 1e-5 --log-every 1 --save-every 3 --keep-last 1"
  for mode in sync async; do
    rm -rf "$dir"
    local extra=""; [ $mode = async ] && extra="--async-save"
    echo "-- $mode saves"
    "$BUILD/bin/shardlm_launch" --nproc-per-node "$NGPU" -- "$BUILD/bin/shardlm_train" $common --steps 6 \
      --checkpoint-dir "$dir" $extra 2>&1 | grep "rank 0" | grep -E "checkpoint|save stall|trained" | sed 's/^\[rank 0\] //'
  done
  echo "-- load"
  "$BUILD/bin/shardlm_launch" --nproc-per-node "$NGPU" -- "$BUILD/bin/shardlm_train" $common --steps 7 \
    --checkpoint-dir "$dir" 2>&1 | grep "rank 0" | grep -E "resumed|trained" | sed 's/^\[rank 0\] //'
  du -sh "$dir"/step-* 2>/dev/null
  rm -rf "$dir"
}

dense1() {  # the one-GPU dense comparison of issue 28 (see the phase list above)
  local common="--preset llama3-8b --seq-len 4096 --micro-batch 2 --precision mixed-bf16 --sharding full --layers 4 --steps 10"
  ours "ours_4L_1gpu" 1 $common
  local base=${BASE_BUILD:-$PWD/build-base}
  [ -x "$base/bin/step_benchmark" ] && BUILD=$base ours "base_4L_1gpu" 1 $common
  peer "peer_4L_1gpu" 1 --preset llama3-8b --layers 4 --seq 4096 --batch 2 --steps 8
  peer "peer_4L_1gpu_compile" 1 --preset llama3-8b --layers 4 --seq 4096 --batch 2 --steps 8 --compile
  if ls .deps/whl/liger_kernel-*.whl >/dev/null 2>&1; then
    pip install -q --no-index --no-deps --target "$OUT/site" .deps/whl/liger_kernel-*.whl >/dev/null 2>&1
    PYTHONPATH=$OUT/site peer "peer_4L_1gpu_compile_liger" 1 --preset llama3-8b --layers 4 --seq 4096 --batch 2 --steps 8 --compile --liger
  fi
  ours "ours_4L_1gpu_again" 1 $common
  ours "ours_4L_1gpu_selective" 1 $common --checkpointing selective
  ours "ours_8L_1gpu" 1 ${common/--layers 4/--layers 8}
  ours "ours_8L_1gpu_every_block" 1 ${common/--layers 4/--layers 8} --checkpointing every-block
  ours "ours_8L_1gpu_selective" 1 ${common/--layers 4/--layers 8} --checkpointing selective
}
recompute8() {  # Llama3-8B dims with 8 layers on one GPU: no recompute, selective, every block (dense1's last runs)
  local common="--preset llama3-8b --seq-len 4096 --micro-batch 2 --precision mixed-bf16 --sharding full --layers 8 --steps 10"
  ours "ours_8L_1gpu" 1 $common
  ours "ours_8L_1gpu_selective" 1 $common --checkpointing selective
  ours "ours_8L_1gpu_every_block" 1 $common --checkpointing every-block
  ours "ours_4L_1gpu_selective" 1 ${common/--layers 8/--layers 4} --checkpointing selective
}

fp8() {  # precision::FP8 on one GPU (see the phase list above)
  if [ ! -x "$BUILD/bin/test_train" ]; then
    cmake --build "$BUILD" -j 16 --target test_train >>"$OUT/build.log" 2>&1 || { echo "fp8: test_train does not build"; return 1; }
  fi
  "$BUILD/bin/test_train" '-tc=CUDA: precision::FP8*' >"$OUT/fp8_test.log" 2>&1
  local rc=$?
  grep -E "_scaled_mm vs emulation|skipped|refused|test cases" "$OUT/fp8_test.log" | sed 's/^ *//' | tail -8
  echo "{\"check\": \"fp8 linear: _scaled_mm vs emulation\", \"result\": \"$([ "$rc" = 0 ] && echo PASS || echo FAIL)\"}" >>"$RESULTS"
  local common="--preset llama3-8b --seq-len 4096 --micro-batch 2 --sharding full --layers 4 --steps 10"
  for i in 1 2; do
    ours "ours_4L_1gpu_bf16_$i" 1 $common --precision mixed-bf16
    ours "ours_4L_1gpu_fp8_$i" 1 $common --precision fp8
  done
  fp8_curves
}

fp8_curves() {  # fp8 against mixed-bf16 on real text (see the phase list above)
  local tok=${TOKENIZER:-../shared/data/llama3-tokenizer/tokenizer.json}
  [ -f "$tok" ] || tok=shared/data/llama3-tokenizer/tokenizer.json
  [ -f "$tok" ] || { echo "fp8_curves: no Llama 3 tokenizer.json (set TOKENIZER=PATH)"; return 1; }
  if [ ! -x "$BUILD/bin/shardlm_tokenize" ]; then
    cmake --build "$BUILD" -j 16 --target shardlm_tokenize >>"$OUT/build.log" 2>&1 || { echo "fp8_curves: shardlm_tokenize does not build"; return 1; }
  fi
  "$BUILD/bin/shardlm_tokenize" --tokenizer "$tok" --output "$OUT/corpus-llama3" examples/data/corpus.txt 2>&1 | tail -1 \
    || return 1
  local steps=${FP8_STEPS:-300}
  local common="--preset llama3-8b --layers 2 --seq-len 512 --micro-batch 4 --steps $steps --lr 1e-4 --warmup-steps 20
    --sharding full --seed 1 --device cuda --data $OUT/corpus-llama3.bin --log-every 50"
  local p
  for p in mixed-bf16 fp8; do
    rm -f "$OUT/fp8_curve_$p.jsonl"
    "$BUILD/bin/shardlm_train" $common --precision $p --metrics "$OUT/fp8_curve_$p.jsonl" >"$OUT/fp8_curve_$p.log" 2>&1 \
      || { echo "fp8_curves: the $p run failed"; tail -5 "$OUT/fp8_curve_$p.log"; return 1; }
    grep -E "shardlm: .*\| |trained" "$OUT/fp8_curve_$p.log" | head -1
    grep -E "trained" "$OUT/fp8_curve_$p.log" | tail -1
  done
  python3 - "$OUT/fp8_curve_mixed-bf16.jsonl" "$OUT/fp8_curve_fp8.jsonl" "$RESULTS" <<'PY'
import json, sys
def losses(path):
    with open(path) as f:
        return [json.loads(line)["loss"] for line in f if line.strip()]
bf16, fp8 = losses(sys.argv[1]), losses(sys.argv[2])
n = min(len(bf16), len(fp8))
def smooth(v, alpha=0.1):  # an exponential moving average, as TensorBoard's smoothing
    out, s = [], v[0]
    for x in v:
        s = alpha * x + (1 - alpha) * s
        out.append(s)
    return out
sb, s8 = smooth(bf16[:n]), smooth(fp8[:n])
print("step   mixed-bf16  fp8      rel diff (smoothed, EMA 0.1)")
for i in list(range(0, n, 25)) + [n - 1]:
    print(f"{i + 1:5d}  {sb[i]:.4f}     {s8[i]:.4f}   {abs(s8[i] - sb[i]) / sb[i]:+.2e}")
# The bundled corpus is small (22k tokens): after ~50 steps both runs memorize it and the loss falls toward 0, where a
# relative difference means nothing. Compared: the learning phase (smoothed mixed-bf16 loss >= 1 nat) relatively,
# the memorized phase absolutely.
learn = [i for i in range(n) if sb[i] >= 1.0]
rel = max(abs(s8[i] - sb[i]) / sb[i] for i in learn)
late = [i for i in range(n) if sb[i] < 1.0]
absd = max((abs(s8[i] - sb[i]) for i in late), default=0.0)
rel_tol, abs_tol = 0.03, 0.05
ok = rel <= rel_tol and absd <= abs_tol
print(f"learning phase ({len(learn)} steps, smoothed loss >= 1): largest relative difference {rel:.2e} (tolerance {rel_tol}); "
      f"after ({len(late)} steps): largest absolute difference {absd:.4f} nats (tolerance {abs_tol})")
with open(sys.argv[3], "a") as f:
    f.write(json.dumps({"check": "fp8 loss curve vs mixed-bf16", "steps": n, "learning_steps": len(learn),
                        "max_rel_diff_learning": rel, "max_abs_diff_after": absd, "result": "PASS" if ok else "FAIL"}) + "\n")
PY
}

smoke() {  # small runs on one GPU that touch the checkpoint's checksums over NCCL, the host steps and a resume
  local dir=/tmp/shardlm-smoke
  local common="--preset llama3-debug --seq-len 128 --micro-batch 2 --device cuda --data examples/data/corpus.txt --log-every 1"
  for step in sync overlapped speculative; do
    rm -rf "$dir"
    "$BUILD/bin/shardlm_train" $common --precision mixed-bf16 --offload cpu --offload-step $step --grad-clip 0 --steps 4 \
      --save-every 2 --checkpoint-dir "$dir" --async-save 2>&1 | grep -E "trained|error|Error" | sed "s/^/$step: /"
    "$BUILD/bin/shardlm_train" $common --precision mixed-bf16 --offload cpu --offload-step $step --grad-clip 0 --steps 6 \
      --checkpoint-dir "$dir" 2>&1 | grep -E "resumed|trained|error" | sed "s/^/$step resume: /"
  done
  python3 - "$dir/step-00000006" <<'PY'
import sys, glob
f = sorted(glob.glob(sys.argv[1] + "/shard-*.safetensors"))[0]
b = bytearray(open(f, "rb").read()); b[-100] ^= 1; open(f, "wb").write(b)
PY
  "$BUILD/bin/shardlm_train" $common --precision mixed-bf16 --offload cpu --steps 7 --checkpoint-dir "$dir" 2>&1 | tail -2 | sed "s/^/flipped: /"
  echo "flipped exit: ${PIPESTATUS[0]}"
  rm -rf "$dir"
}

h100() {
  ours "h100_32L_1gpu_offload_ac" 1 --preset llama3-8b --seq-len 4096 --micro-batch 2 --precision mixed-bf16 \
    --sharding full --layers 32 --steps 2 --offload cpu --checkpointing every-block
  free -g | head -2
}

load() {
  local dir=${LOAD_DIR:-/tmp/shardlm-8b-hf}
  python3 - "$dir" <<'PY' || return 1
import os, sys, time, torch
from transformers import LlamaConfig, LlamaForCausalLM
d = sys.argv[1]
if not os.path.exists(os.path.join(d, "model.safetensors.index.json")):
    cfg = LlamaConfig(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                      num_key_value_heads=8, vocab_size=128256, max_position_embeddings=8192, rope_theta=500000.0,
                      rms_norm_eps=1e-5, tie_word_embeddings=False, torch_dtype="bfloat16")
    torch.manual_seed(0)
    with torch.device("cuda"):
        m = LlamaForCausalLM(cfg).to(torch.bfloat16)
    t = time.time(); m.save_pretrained(d, max_shard_size="4GB"); print(f"written by transformers in {time.time() - t:.1f} s")
    os.sync()
PY
  local files; files=$(ls "$dir"/*.safetensors)
  local bytes; bytes=$(du -cb $files | tail -1 | cut -f1)
  echo "checkpoint: $(echo $files | wc -w) files, $bytes bytes"
  cold() { python3 -c "import os,sys
for f in sys.argv[1:]:
    fd = os.open(f, os.O_RDONLY); os.fsync(fd); os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED); os.close(fd)" $files; }
  cold; local t0; t0=$(date +%s.%N); cat $files > /dev/null; local t1; t1=$(date +%s.%N)
  python3 -c "print(f'cat (cold): {$bytes / 1e9 / ($t1 - $t0):.2f} GB/s, {$t1 - $t0:.2f} s')"
  cat $files > /dev/null; t0=$(date +%s.%N); cat $files > /dev/null; t1=$(date +%s.%N)
  python3 -c "print(f'cat (page cache): {$bytes / 1e9 / ($t1 - $t0):.2f} GB/s')"
  [ -f "$OUT/tokens.bin" ] || python3 -c "import numpy as np; np.random.default_rng(0).integers(0, 128256, size=1 << 24, dtype=np.uint32).tofile('$OUT/tokens.bin')"
  for n in 1 "$NGPU"; do
    cold
    t0=$(date +%s.%N)
    "$BUILD/bin/shardlm_launch" --nproc-per-node "$n" -- "$BUILD/bin/shardlm_train" --model-dir "$dir" --steps 0 \
      --data "$OUT/tokens.bin" --device cuda --sharding full --precision mixed-bf16 2>&1 | grep "rank 0" | grep -E "loading|loaded" | tail -2 | sed 's/^\[rank 0\] //'
    t1=$(date +%s.%N)
    python3 -c "print(f'shardlm_train --steps 0 on $n rank(s), cold: {$bytes / 1e9 / ($t1 - $t0):.2f} GB/s over the whole process ({$t1 - $t0:.2f} s, start-up included)')"
  done
  python3 - "$dir" "$BUILD/bin/shardlm_logits" "$OUT" <<'PY'
import subprocess, sys, torch
from safetensors.torch import save_file, load_file
from transformers import LlamaForCausalLM
d, exe, out = sys.argv[1:]
torch.manual_seed(1)
ids = torch.randint(0, 128256, (1, 512))
save_file({"input_ids": ids}, f"{out}/ids.safetensors")
ref = {}
for name, dt in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
    m = LlamaForCausalLM.from_pretrained(d, dtype=dt, attn_implementation="sdpa").cuda()
    with torch.no_grad():
        o = m(ids.cuda(), labels=ids.cuda())
    ref[name] = (o.logits.float().cpu(), o.loss.item()); del m, o; torch.cuda.empty_cache()
for name in ("fp32", "bf16"):
    subprocess.run([exe, "--model", d, "--input", f"{out}/ids.safetensors", "--output", f"{out}/ours_{name}.safetensors",
                    "--device", "cuda", "--dtype", name], check=True)
    ours = load_file(f"{out}/ours_{name}.safetensors")
    for rname in ("fp32", "bf16"):
        rl, rloss = ref[rname]
        err = ((ours["logits"] - rl).abs().max() / rl.abs().max()).item()
        print(f"logits 8B dims: shardlm {name} vs transformers {rname}: max rel err {err:.2e}, loss {ours['loss'].item():.5f} vs {rloss:.5f}")
rl, _ = ref["fp32"]; bl, _ = ref["bf16"]
print(f"logits 8B dims: transformers bf16 vs transformers fp32: max rel err {((bl - rl).abs().max() / rl.abs().max()).item():.2e}")
PY
}

quant() {
  "$BUILD/bin/quant_benchmark" 2>&1 | tee "$OUT/quant.log"
  local rc=${PIPESTATUS[0]}
  echo "{\"check\": \"quant kernels == cpu reference\", \"result\": \"$([ "$rc" = 0 ] && echo PASS || echo FAIL)\"}" >>"$RESULTS"
}

moe() {
  python3 tests/golden/make_mixtral_fixtures.py --out "$OUT/golden_moe" >/dev/null
  local ok=PASS
  for d in "$OUT"/golden_moe/*/; do
    for kernel in grouped padded loop; do
      "$BUILD/bin/shardlm_logits" --model "$d" --input "$d/input.safetensors" --moe-kernel "$kernel" \
        --output "$d/cuda_bf16_$kernel.safetensors" --device cuda --dtype bf16 || ok=FAIL
    done
    python3 - "$d" <<'PY' || ok=FAIL
import sys
from safetensors.torch import load_file
d = sys.argv[1]; ref = load_file(d + "/reference.safetensors"); bad = False
rel = lambda a, b: ((a - b).abs().max() / b.abs().max()).item()
out = {k: load_file(f"{d}/cuda_bf16_{k}.safetensors") for k in ("grouped", "padded", "loop")}
for k, o in out.items():
    err, loss, aux = rel(o["logits"], ref["logits"]), abs(o["loss"] - ref["loss"]).item(), abs(o["aux_loss"] - ref["aux_loss"]).item()
    print(f"{d.rstrip('/').split('/')[-1]} {k}: cuda bf16 logits rel err {err:.2e}, loss err {loss:.2e}, aux err {aux:.2e}")
    bad |= err > 2e-2 or loss > 5e-2 or aux > 5e-2
print(f"  grouped vs padded logits rel err {rel(out['grouped']['logits'], out['padded']['logits']):.2e}, "
      f"padded vs loop {rel(out['padded']['logits'], out['loop']['logits']):.2e}")
bad |= rel(out["grouped"]["logits"], out["padded"]["logits"]) > 2e-2
sys.exit(1 if bad else 0)
PY
  done
  python3 tests/golden/check_mixtral_logits.py --tool "$BUILD/bin/shardlm_logits" --tool-args "--device cuda --dtype bf16" \
    --logits-tol 2e-2 --loss-tol 5e-2 --seed 7 --count 4 --bf16-peer cuda --workdir "$OUT/random_moe" | tail -5 || ok=FAIL
  echo "{\"check\": \"mixtral bf16 parity and expert kernels\", \"result\": \"$ok\"}" >>"$RESULTS"
  moe_bench
  ours "moe_ours_${MOE_LAYERS}L_${NGPU}gpu_padded" "$NGPU" $MOE_COMMON --moe-kernel padded
}
MOE_LAYERS=${MOE_LAYERS:-4}
MOE_COMMON="--preset mixtral-8x7b --layers $MOE_LAYERS --vocab-size 128256 --seq-len 4096 --micro-batch 1 --steps 10 --precision mixed-bf16 --sharding full"
ep() {
  [ "$NGPU" -ge 2 ] || { echo "ep: needs 2 GPUs, have $NGPU"; return 0; }
  "$BUILD/bin/test_dist" -tc='NCCL*' >"$OUT/test_dist_ep.log" 2>&1
  echo "{\"check\": \"test_dist NCCL all-to-all\", \"result\": \"$(grep -q 'Status: SUCCESS' "$OUT/test_dist_ep.log" && echo PASS || echo FAIL)\"}" >>"$RESULTS"
  local runs="2:2x1"; [ "$NGPU" -ge 4 ] && runs="2:2x1 2:4x1 4:4x1"
  for run in $runs; do
    python3 tests/dist/check_equivalence.py --launch "$BUILD/bin/shardlm_launch" --train "$BUILD/bin/shardlm_train" \
      --preset mixtral-debug --sharding full --test-args "--expert-parallel ${run%%:*}" --splits "${run#*:}" \
      --grad-norm-tol 1e-4 --weight-tol 1e-4 --train-args "--device cuda" --workdir "$OUT/ep_$run" 2>&1 | tail -3
    echo "{\"check\": \"nccl expert parallel ${run%%:*} at ${run#*:}\", \"result\": \"${PIPESTATUS[0]}\"}" >>"$RESULTS"
  done
}

moe_bench() {  # the moe phase's step benchmark beside the peer alone (grouped expert GEMM where it applies)
  ours "moe_ours_${MOE_LAYERS}L_${NGPU}gpu" "$NGPU" $MOE_COMMON
  # one GPU reduces nothing: the bf16 reduction is measured where there is a collective
  if [ "$NGPU" -gt 1 ]; then ours "moe_ours_${MOE_LAYERS}L_${NGPU}gpu_reduce_bf16" "$NGPU" $MOE_COMMON --reduce-dtype bf16; fi
  [ "${SKIP_PEER:-0}" = 1 ] && return 0  # SKIP_PEER=1: ours only
  peer "moe_peer_${MOE_LAYERS}L_${NGPU}gpu" "$NGPU" --preset mixtral-8x7b --layers "$MOE_LAYERS" --seq 4096 --batch 1
}
fused() {  # the block kernels: their CUDA tests, then the dense step with them and without (see the phase list above)
  "$BUILD/bin/test_model" -tc="*NVRTC*,*block kernels*,CUDA:*" -s >"$OUT/fused_tests.log" 2>&1
  local rc=$?
  grep -E "MESSAGE|test cases|assertions" "$OUT/fused_tests.log" | tail -40
  [ "$rc" = 0 ] || grep -E "ERROR|logged|CAPTURE|values|  [A-Za-z_.]+ := " "$OUT/fused_tests.log" | head -80  # what failed, where
  echo "{\"check\": \"block kernels == ATen path (test_model CUDA cases)\", \"result\": \"$([ "$rc" = 0 ] && echo PASS || echo FAIL)\"}" >>"$RESULTS"
  local common="--preset llama3-8b --seq-len 4096 --micro-batch 2 --precision mixed-bf16 --sharding full --layers 4 --steps 10"
  for i in 1 2; do
    for k in fused aten; do
      ours "${k}_4L_1gpu_$i" 1 $common --block-kernels $k
      ours "${k}_4L_1gpu_selective_$i" 1 $common --block-kernels $k --checkpointing selective
    done
  done
  for k in fused aten; do
    SHARDLM_PROFILE=$OUT/profile_$k ours "profile_${k}_4L_1gpu" 1 $common --block-kernels $k
    grep "shardlm: profile" "$OUT/profile_${k}_4L_1gpu.log" | sed 's/^\[rank 0\] //'
  done
}

profile() {  # PROFILE_ARGS (default: the moe phase's Mixtral run) with SHARDLM_PROFILE: two profiled steps, rank 0's summary
  local args=${PROFILE_ARGS:-$MOE_COMMON}
  SHARDLM_PROFILE=$OUT/profile ours "profile_${NGPU}gpu" "$NGPU" $args
  grep "shardlm: profile" "$OUT/profile_${NGPU}gpu.log" | sed 's/^\[rank 0\] //'
}

moe1() {  # the MoE dispatch/combine kernels on one GPU (see the phase list above)
  if [ ! -x "$BUILD/bin/test_model" ]; then
    cmake --build "$BUILD" --target test_model >>"$OUT/build.log" 2>&1 || { echo "moe1: test_model did not build"; return 1; }
  fi
  "$BUILD/bin/test_model" -tc="every NVRTC program*,CUDA: the MoE*" >"$OUT/moe1_tests.log" 2>&1
  local rc=$?
  grep -E "MESSAGE|ERROR|FAILED|test cases:|assertions:|Status:" "$OUT/moe1_tests.log" | head -40
  echo "{\"check\": \"MoE kernels against the ATen ops (test_model CUDA cases)\", \"result\": \"$([ $rc = 0 ] && echo PASS || echo FAIL)\"}" >>"$RESULTS"
  local common="--preset mixtral-8x7b --layers 1 --vocab-size 128256 --seq-len 4096 --micro-batch 1 --steps 10 --precision mixed-bf16 --sharding full"
  local base=${BASE_BUILD:-$PWD/build-base} have_base=0
  [ -x "$base/bin/step_benchmark" ] && [ -x "$base/bin/shardlm_launch" ] && have_base=1 \
    || echo "moe1: no $base/bin/step_benchmark and shardlm_launch: ours only"
  for i in 1 2; do
    [ $have_base = 1 ] && BUILD=$base ours "moe1_base_$i" 1 $common
    ours "moe1_ours_$i" 1 $common
  done
  for i in 1 2 3; do peer "moe1_peer_$i" 1 --preset mixtral-8x7b --layers 1 --seq 4096 --batch 1; done
  SHARDLM_PROFILE=$OUT/profile_moe1_ours ours "moe1_profile_ours" 1 $common
  [ $have_base = 1 ] && SHARDLM_PROFILE=$OUT/profile_moe1_base BUILD=$base ours "moe1_profile_base" 1 $common
  for who in ours base; do
    [ -f "$OUT/profile_moe1_$who/trace_rank0.json" ] || continue
    echo "-- profile of $who (2 steps; ms per step)"
    grep "shardlm: profile:.*GPU span" "$OUT/moe1_profile_$who.log" | sed 's/^.*shardlm: profile: //'
    python3 - "$OUT/profile_moe1_$who/trace_rank0.json" <<'PY'
# GPU kernel time per step of the MoE autograd nodes' backward (the host op autograd names after the node encloses
# the launch), and the MoE kernels by name (forward and backward; a node's forward has no host op of its own).
import bisect, collections, json, sys
ev = json.load(open(sys.argv[1]))["traceEvents"]
steps = 2
ops = collections.defaultdict(list)  # tid -> [(ts, end, name)] of host ops
launch = {}                          # correlation -> (tid, ts) of the runtime / driver launch
for e in ev:
    c = e.get("cat", "")
    if c == "cpu_op" and "dur" in e: ops[e["tid"]].append((e["ts"], e["ts"] + e["dur"], e["name"]))
    elif c in ("cuda_runtime", "cuda_driver") and "correlation" in e.get("args", {}): launch[e["args"]["correlation"]] = (e["tid"], e["ts"])
for v in ops.values(): v.sort()
starts = {t: [o[0] for o in v] for t, v in ops.items()}
nodes = ("GatherPicks", "CombinePicks", "SwiGLU")
by_node, by_kernel, total = collections.Counter(), collections.Counter(), 0.0
for e in ev:
    if e.get("cat") != "kernel": continue
    ms = e.get("dur", 0) / 1e3 / steps
    total += ms
    if e["name"].startswith("shardlm_moe"): by_kernel[e["name"]] += ms
    where = launch.get(e.get("args", {}).get("correlation"))
    if not where or where[0] not in ops: continue
    tid, ts = where
    i = bisect.bisect_right(starts[tid], ts)
    for s, end, name in reversed(ops[tid][max(0, i - 400):i]):
        hit = next((n for n in nodes if n in name), None)
        if hit and s <= ts < end:
            by_node[hit + " backward"] += ms
            break
print(f"all kernels {total:.2f} ms/step")
for k, v in sorted(by_node.items()): print(f"  {k}: {v:.3f} ms/step")
for k, v in sorted(by_kernel.items(), key=lambda x: -x[1]): print(f"  kernel {k}: {v:.3f} ms/step")
PY
  done
  python3 - "$RESULTS" <<'PY'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1]) if l.strip()]
runs = [r for r in rows if r.get("label", "").startswith("moe1_")]
peers = [r for r in runs if "peer" in r]
best = max((r["tokens_per_s_per_gpu"] for r in peers), default=None)
print("\n| moe1 run (Mixtral-8x7B dims, 1 layer, 1 GPU) | tokens/s | MFU | step s | fwd/bwd/opt s | x best peer |\n|---|---|---|---|---|---|")
for r in runs:
    t = r["tokens_per_s_per_gpu"]
    print(f"| {r['label']} | {t:,.0f} | {100 * r['mfu']:.1f}% | {r['step_s']:.4f} | {'/'.join(f'{v:.3f}' for v in r['fwd_bwd_opt_s'])} | "
          + (f"{t / best:.2f}x" if best else "-") + " |")
PY
}

table() {
  python3 - "$RESULTS" <<'PY'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1]) if l.strip()]
print("\n| run | tokens/s/GPU | MFU | step s | fwd/bwd/opt s | peak alloc GiB | peak reserved GiB | plan GiB (error) |\n|---|---|---|---|---|---|---|---|")
for r in rows:
    if "label" not in r: continue
    f = r.get("fwd_bwd_opt_s") or [r.get("fwd_s"), r.get("bwd_s"), r.get("opt_s")]
    fmt = lambda v, p: "-" if v is None else f"{v:.{p}f}"
    tps = r.get("tokens_per_s_per_gpu", r.get("tokens_per_s"))
    print(f"| {r['label']} | {fmt(tps, 0)} | {fmt(r.get('mfu'), 3)} | {fmt(r.get('step_s'), 3)} | "
          f"{'/'.join(fmt(v, 3) for v in f)} | {fmt(r.get('peak_alloc_gb'), 1)} | {fmt(r.get('peak_reserved_gb'), 1)} | "
          + (f"{r['plan_gb']:.1f} ({(r['plan_gb'] / r['peak_alloc_gb'] - 1) * 100:+.1f}%)" if r.get("plan_gb") else "-") + " |")
off = [r for r in rows if "offload_step" in r]
if off:
    print("\n| offloaded run | host step | host AdamW s/step | host AdamW GB/s | host triad GB/s | ratio | threads | redone |\n|---|---|---|---|---|---|---|---|")
    for r in off:
        print(f"| {r['label']} | {r['offload_step']} | {r['host_step_s']:.3f} | {r['host_adamw_gbs']:.1f} | {r['host_triad_gbs']:.1f} | "
              f"{r['host_adamw_gbs'] / max(r['host_triad_gbs'], 1e-9):.2f} | {r['host_threads']} | {r['host_steps_redone']} |")
for r in rows:
    if "check" in r: print(f"{r['check']}: {r['result']}")
PY
}

cuda_tests() {  # every CUDA test case of test_model and test_train (see the phase list above)
  "$BUILD/bin/test_model" -tc="*NVRTC*,*block kernels*,CUDA:*" -s >"$OUT/fused_tests.log" 2>&1; local rc=$?
  grep -E "MESSAGE|test cases|assertions" "$OUT/fused_tests.log" | tail -30
  [ "$rc" = 0 ] || grep -E "ERROR|logged|CAPTURE|values|  [A-Za-z_.]+ := " "$OUT/fused_tests.log" | head -60
  echo "{\"check\": \"test_model CUDA cases (block + MoE kernels)\", \"result\": \"$([ "$rc" = 0 ] && echo PASS || echo FAIL)\"}" >>"$RESULTS"
  "$BUILD/bin/test_train" '-tc=CUDA:*' >"$OUT/train_cuda_tests.log" 2>&1; rc=$?
  grep -E "MESSAGE|_scaled_mm|test cases|assertions|ERROR" "$OUT/train_cuda_tests.log" | tail -12
  echo "{\"check\": \"test_train CUDA cases (fp8 linear, AdamW kernel)\", \"result\": \"$([ "$rc" = 0 ] && echo PASS || echo FAIL)\"}" >>"$RESULTS"
}
dense_table() {  # the one-GPU dense table (see the phase list above)
  local common="--preset llama3-8b --seq-len 4096 --micro-batch 2 --precision mixed-bf16 --sharding full --layers 4 --steps 10"
  ours "ours_4L_fused" 1 $common
  [ -x "${BASE_BUILD:-$PWD/build-base}/bin/step_benchmark" ] && BUILD=${BASE_BUILD:-$PWD/build-base} ours "base_4L" 1 $common
  ours "ours_4L_aten" 1 $common --block-kernels aten
  peer "peer_4L_eager" 1 --preset llama3-8b --layers 4 --seq 4096 --batch 2 --steps 8
  peer "peer_4L_compile" 1 --preset llama3-8b --layers 4 --seq 4096 --batch 2 --steps 8 --compile
  pip install -q --no-index --no-deps --target "$OUT/site" .deps/whl/liger_kernel-*.whl >/dev/null 2>&1
  PYTHONPATH=$OUT/site peer "peer_4L_compile_liger" 1 --preset llama3-8b --layers 4 --seq 4096 --batch 2 --steps 8 --compile --liger
  ours "ours_4L_fused_again" 1 $common
  ours "ours_4L_fp8" 1 ${common/mixed-bf16/fp8}
  ours "ours_4L_fused_selective" 1 $common --checkpointing selective
  ours "ours_4L_fp8_again" 1 ${common/mixed-bf16/fp8}
}

for phase in $phases; do echo "== $phase"; $phase || { echo "phase $phase failed"; table; exit 1; }; done
table
