#!/usr/bin/env python3
"""--reduce-dtype bf16 against fp32 reduction, measured on CPU ranks (Gloo).

The main measure: 2 ranks, --sharding full, --precision mixed-bf16, two micro-batches per step, --steps (100) with
the gradient collectives in fp32 (the policy's) and in bf16. The bf16 run must train (its loss falls), stay within
--loss-tol of the fp32 run at every step and within --weight-tol in its final parameters (relative:
max|a-b| / max|b| per tensor, the worst tensor), and differ from it at all (else the option took no effect).
Then the other ways gradients reach their shards, a few steps each against the same run reducing in fp32 (close, and
different): the offloaded host shards without and with accumulation, the replicas' all-reduce of --sharding none,
and pure-bf16 summed in fp32 (--reduce-dtype fp32).

  check_reduce_dtype.py --launch build/bin/shardlm_launch --train build/bin/shardlm_train --workdir /tmp/rd
"""
import argparse
import json
import os
import pathlib
import subprocess
import sys
import time

import numpy as np
from safetensors.torch import load_file

CORPUS = "".join(f"the quick brown fox jumps over the lazy dog {i % 7}. shardlm {i % 5}!\n" for i in range(400))


def run(args, workdir, tag, flags, steps, rows=None):
    """One 2-rank run of `steps` steps (`rows` of them logged: all unless resumed) under shardlm_launch; returns
    (losses, final weights, seconds)."""
    metrics, weights = workdir / f"{tag}.jsonl", workdir / f"{tag}.safetensors"
    cmd = [args.launch, "--nproc-per-node", "2", "--", args.train, "--data", str(workdir / "corpus.txt"),
           "--preset", "llama3-debug", "--layers", "2", "--seq-len", "32", "--micro-batch", "2", "--steps", str(steps),
           "--lr", "1e-3", "--warmup-steps", "5", "--seed", "7", "--dist-timeout", "60", "--log-every", "1000",
           "--metrics", str(metrics), "--save-final", str(weights), *flags]
    start = time.time()
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    if p.returncode != 0:
        sys.exit(f"FAIL {tag}: exit {p.returncode}\n$ {' '.join(cmd)}\n{p.stdout}\n{p.stderr}")
    losses = [json.loads(line)["loss"] for line in metrics.read_text().splitlines()]
    if len(losses) != (steps if rows is None else rows):
        sys.exit(f"FAIL {tag}: {len(losses)} metric rows, expected {steps if rows is None else rows}")
    tensors = {name: t.float().numpy().astype(np.float64) for name, t in load_file(str(weights)).items()}
    return losses, tensors, time.time() - start


def compare(a, b):
    """(max per-step |loss difference|, worst tensor's relative difference, its name) of runs a and b."""
    (la, wa), (lb, wb) = a, b
    loss_diff = max(abs(x - y) for x, y in zip(la, lb))
    name, worst = max(((n, float(np.abs(wa[n] - wb[n]).max() / max(np.abs(wb[n]).max(), 1e-30))) for n in wb),
                      key=lambda t: t[1])
    return loss_diff, worst, name


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--launch", required=True)
    ap.add_argument("--train", required=True)
    ap.add_argument("--workdir", required=True)
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--variant-steps", type=int, default=5)
    ap.add_argument("--loss-tol", type=float, default=5e-3, help="max per-step |loss difference| of the main measure")
    ap.add_argument("--weight-tol", type=float, default=3e-2, help="max final relative parameter difference")
    args = ap.parse_args()
    workdir = pathlib.Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / "corpus.txt").write_text(CORPUS)
    failed = []

    mixed = ["--sharding", "full", "--precision", "mixed-bf16", "--grad-accum", "2"]
    ref_l, ref_w, s32 = run(args, workdir, "fp32", mixed, args.steps)
    bf_l, bf_w, s16 = run(args, workdir, "bf16", mixed + ["--reduce-dtype", "bf16"], args.steps)
    loss_diff, worst, name = compare((bf_l, bf_w), (ref_l, ref_w))
    per_step = [abs(x - y) for x, y in zip(bf_l, ref_l)]
    print(f"mixed-bf16, full, 2 ranks x grad-accum 2, {args.steps} steps: fp32 reduction loss {ref_l[0]:.4f} -> "
          f"{ref_l[-1]:.4f} ({s32:.1f} s), bf16 reduction {bf_l[0]:.4f} -> {bf_l[-1]:.4f} ({s16:.1f} s)")
    print(f"  per-step |loss difference|: max {loss_diff:.3e} (step {per_step.index(loss_diff) + 1}), mean "
          f"{sum(per_step) / len(per_step):.3e}, final {per_step[-1]:.3e}; final parameters: worst relative difference "
          f"{worst:.3e} ({name}), median over tensors "
          f"{np.median([compare((bf_l, {n: bf_w[n]}), (ref_l, {n: ref_w[n]}))[1] for n in ref_w]):.3e}")
    if not bf_l[-1] < bf_l[0] - 0.5:
        failed.append(f"the bf16-reduced run did not train: loss {bf_l[0]:.4f} -> {bf_l[-1]:.4f}")
    if loss_diff > args.loss_tol or worst > args.weight_tol:
        failed.append(f"bf16 reduction differs from fp32 by {loss_diff:.3e} in loss (tolerance {args.loss_tol}) and "
                      f"{worst:.3e} in parameters (tolerance {args.weight_tol})")
    if worst == 0:
        failed.append("bf16 reduction gave the fp32 run's parameters bit for bit: --reduce-dtype took no effect")

    # The other gradient paths, a few steps each: the same run reducing in fp32 against it in the other dtype.
    variants = [
        ("offload", ["--sharding", "full", "--precision", "mixed-bf16", "--offload", "cpu"], "bf16"),
        ("offload_accum", ["--sharding", "full", "--precision", "mixed-bf16", "--offload", "cpu", "--grad-accum", "2"], "bf16"),
        ("ddp", ["--sharding", "none", "--precision", "mixed-bf16"], "bf16"),
        ("pure_fp32", ["--sharding", "full", "--precision", "pure-bf16", "--grad-accum", "2"], "fp32"),
    ]
    for tag, flags, dtype in variants:
        a_l, a_w, _ = run(args, workdir, f"{tag}_policy", flags, args.variant_steps)
        b_l, b_w, secs = run(args, workdir, f"{tag}_{dtype}", flags + ["--reduce-dtype", dtype], args.variant_steps)
        loss_diff, worst, name = compare((b_l, b_w), (a_l, a_w))
        ok = loss_diff <= args.loss_tol and worst <= args.weight_tol and worst > 0 and b_l[-1] < b_l[0]
        print(f"{'ok  ' if ok else 'FAIL'} {tag:>13} --reduce-dtype {dtype} against the policy's: max |loss difference| "
              f"{loss_diff:.3e}, worst parameter {worst:.3e} ({name}), loss {b_l[0]:.4f} -> {b_l[-1]:.4f}, {secs:.1f} s")
        if not ok:
            failed.append(f"{tag}: --reduce-dtype {dtype} " + ("took no effect" if worst == 0 else "is off or did not train"))
    # A checkpoint holds masters and AdamW moments, never gradients: one saved reducing in fp32 resumes reducing in
    # bf16 (meta.json records each save's reduce dtype, for information).
    ckpt = workdir / "checkpoints"
    resume = ["--sharding", "full", "--precision", "mixed-bf16", "--checkpoint-dir", str(ckpt)]
    run(args, workdir, "saved", resume, 3)
    run(args, workdir, "resumed", resume + ["--reduce-dtype", "bf16"], 5, rows=2)
    metas = {p.parent.name: json.loads(p.read_text()) for p in ckpt.glob("*/meta.json")}
    dtypes = [m.get("reduce_dtype") for _, m in sorted(metas.items())]
    steps = [json.loads(line)["step"] for line in (workdir / "resumed.jsonl").read_text().splitlines()]
    ok = dtypes == ["fp32", "bf16"] and steps[-2:] == [4, 5]
    print(f"{'ok  ' if ok else 'FAIL'} resumed a checkpoint saved reducing in fp32 with --reduce-dtype bf16: steps "
          f"{steps}, saves' reduce_dtype {dtypes}")
    if not ok:
        failed.append("resuming with another --reduce-dtype")
    if failed:
        sys.exit("FAIL: " + "; ".join(failed))
    print(f"PASS: bf16 reduction within {args.loss_tol} (loss) and {args.weight_tol} (parameters) of fp32, and different")


if __name__ == "__main__":
    main()
