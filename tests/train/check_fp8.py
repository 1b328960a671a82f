#!/usr/bin/env python3
"""precision::FP8 through the whole engine on 2 CPU ranks (FullShard): shardlm_train with --precision fp8 and with
mixed-bf16 on the same data, seed and global batch. On the CPU the float8 linears are an emulation with the GPU path's
codes and scales (model/fp8_linear.hpp), so this checks the scaling math inside real training: the log and the metrics
say fp8, the loss falls, and each step's loss stays within --tolerance (relative) of mixed-bf16's.

The GPU loss-curve comparison on real text is scripts/gpu.sh's fp8 phase."""
import argparse
import json
import os
import subprocess
import sys


def run(args, precision):
    metrics = os.path.join(args.workdir, f"{precision}.jsonl")
    if os.path.exists(metrics):
        os.remove(metrics)
    cmd = [args.launch, "--nproc-per-node", "2", "--", args.train, "--data", args.data, "--preset", "llama3-debug",
           "--layers", "2", "--seq-len", "64", "--micro-batch", "2", "--steps", str(args.steps), "--lr", "3e-3",
           "--warmup-steps", "3", "--log-every", "5", "--sharding", "full", "--precision", precision, "--seed", "5",
           "--metrics", metrics, "--dist-timeout", "120"]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    if p.returncode != 0:
        sys.exit(f"{precision}: shardlm_train failed ({p.returncode}):\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}")
    log = p.stdout + p.stderr
    with open(metrics) as f:
        losses = [json.loads(line)["loss"] for line in f if line.strip()]
    return log, losses


def main():
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--launch", required=True)
    ap.add_argument("--train", required=True)
    ap.add_argument("--data", required=True)
    ap.add_argument("--workdir", required=True)
    ap.add_argument("--steps", type=int, default=24)
    ap.add_argument("--tolerance", type=float, default=0.01)
    args = ap.parse_args()
    os.makedirs(args.workdir, exist_ok=True)
    log8, fp8 = run(args, "fp8")
    _, bf16 = run(args, "mixed-bf16")
    ok = True
    if "full / none / none / fp8 | 2 rank(s) on cpu" not in log8:
        print("the fp8 run's log does not name its recipe 'full / none / none / fp8 | 2 rank(s) on cpu'")
        ok = False
    if len(fp8) != args.steps or len(bf16) != args.steps:
        sys.exit(f"expected {args.steps} metrics lines, got {len(fp8)} (fp8) and {len(bf16)} (mixed-bf16)")
    rel = [abs(a - b) / b for a, b in zip(fp8, bf16)]
    head, tail = sum(fp8[:3]) / 3, sum(fp8[-3:]) / 3
    print("step  fp8       mixed-bf16  rel diff")
    for i in range(0, args.steps, max(1, args.steps // 8)):
        print(f"{i + 1:4d}  {fp8[i]:.5f}   {bf16[i]:.5f}     {rel[i]:.2e}")
    print(f"fp8 loss {head:.4f} (first 3 steps) -> {tail:.4f} (last 3); max relative difference to mixed-bf16 "
          f"{max(rel):.2e} (tolerance {args.tolerance})")
    if not tail < 0.85 * head:
        print("the fp8 loss did not fall by 15%")
        ok = False
    if max(rel) > args.tolerance:
        print("fp8 strays from mixed-bf16 beyond the tolerance")
        ok = False
    if fp8 == bf16:
        print("fp8 and mixed-bf16 give the same losses bit for bit: the float8 linears did not run")
        ok = False
    print("PASS" if ok else "FAIL")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
