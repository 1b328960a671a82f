#!/usr/bin/env python3
"""Every policy combination shardlm_train compiles trains, and trains the same model.

For each precision, one reference run (1 rank, grad-accum 2, --sharding none, no checkpointing, no offload) and
then every combination of --sharding (none, grad-op, full, hybrid with shard groups of 1: replicated),
--checkpointing (none, every-block, every-2) and --offload (none, cpu; not with --sharding none, which is
refused) on 2 ranks with the same global batch. --checkpointing selective (which changes the model's autograd nodes,
not what the engine does) runs with every sharding and offload in fp32 and with --sharding full in the bf16
precisions: 9 runs, about 10 s, rather than 21. Its bf16 gradients are the plain path's bit for bit; in fp32 the
nodes add an RMSNorm's input gradients in another order (model/selective.hpp): gradients 5e-7 apart, which AdamW's
early sign-like steps carry into near-zero weights: 1.6e-5 after 3 steps, so its fp32 weights are held to
SELECTIVE_FP32_WEIGHT_TOL. The losses of every step and the final weights must agree with
the reference of that precision within its tolerance: sharding, recompute and offload move tensors around but
do not change the math; what differs is the order of the cross-rank sums, in fp32 for fp32 and mixed-bf16
(reduced in fp32) and in bf16 for pure-bf16.

mixed-bf16 runs without gradient clipping (--grad-clip 0): its gradients are summed in fp32 in an order that
gives the same values (two micro-batches or two ranks), so its runs agree bit for bit, but the clipping norm is
an fp32 sum of squares whose order follows the shards (each shard's norm, then across ranks): on an AMD EPYC CI
machine the first step's norms were 5.1538467 (1 rank) and 5.1538572 (FullShard), 2e-6 apart. The clipped
gradients then move a few fp32 master weights across a bf16 rounding boundary of the compute weights, and
AdamW's early, sign-like updates turn the changed gradients of near-zero entries into whole learning-rate steps:
weights 1e-7 apart after two steps, 7.3e-3 (one embedding entry) after three, where without clipping every
mixed-bf16 combination matched the reference exactly (other machines had measured 1.7e-4 with clipping).
The fp32 runs keep clipping on (the default 1.0), so the clipping of every policy is checked there.

  check_matrix.py --launch build/bin/shardlm_launch --train build/bin/shardlm_train --workdir /tmp/matrix
"""
import argparse
import importlib.util
import itertools
import pathlib
import sys

HERE = pathlib.Path(__file__).resolve().parent
spec = importlib.util.spec_from_file_location("check_equivalence", HERE / "check_equivalence.py")
eq = importlib.util.module_from_spec(spec)
spec.loader.exec_module(eq)

# (loss, weights) relative tolerances per precision: fp32 as the equivalence tests; for bf16 about 3-10x the
# largest differences measured (mixed-bf16 with clipping: losses 0, weights 1.7e-4, without: 0; pure-bf16, whose gradients are summed in
# bf16: losses 2.1e-5, weights 6.7e-3, about two bf16 steps of the largest weight).
TOLERANCES = {"fp32": (1e-5, 1e-5), "mixed-bf16": (1e-4, 1e-3), "pure-bf16": (2e-4, 2e-2)}
SELECTIVE_FP32_WEIGHT_TOL = 1e-4  # about 6x the 1.6e-5 measured (module docstring)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--launch", required=True)
    ap.add_argument("--train", required=True)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--precisions", default="fp32,mixed-bf16,pure-bf16")
    ap.add_argument("--train-args", default="")
    ap.add_argument("--workdir", required=True)
    args = ap.parse_args()
    workdir = pathlib.Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / "corpus.txt").write_text(eq.CORPUS)
    # check_equivalence.run's arguments: its parser's defaults with this run's programs, steps and flags.
    run_args = eq.parser().parse_args(["--launch", args.launch, "--train", args.train, "--sharding", "none",
                                       "--steps", str(args.steps), "--train-args", args.train_args,
                                       "--workdir", args.workdir])

    failed, count = [], 0
    for precision in args.precisions.split(","):
        loss_tol, weight_tol = TOLERANCES[precision]
        base = ["--precision", precision] + (["--grad-clip", "0"] if precision == "mixed-bf16" else [])
        ref_losses, _, ref_weights, _ = eq.run(run_args, workdir, f"{precision}_reference", 1, 2, "none", base)
        worst_loss = worst_weight = 0.0
        for sharding, ckpt, offload in itertools.product(["none", "grad-op", "full", "hybrid"],
                                                         ["none", "every-block", "every-2", "selective"], ["none", "cpu"]):
            if sharding == "none" and offload == "cpu":
                continue
            if ckpt == "selective" and precision != "fp32" and (sharding, offload) != ("full", "none"):
                continue
            extra = base + ["--checkpointing", ckpt, "--offload", offload]
            if sharding == "hybrid":
                extra += ["--shard-group-size", "1"]
            tag = f"{precision}_{sharding}_{ckpt}_{offload}"
            losses, _, weights, secs = eq.run(run_args, workdir, tag, 2, 1, sharding, extra)
            loss_err = max(abs(x - y) / abs(y) for x, y in zip(losses, ref_losses))
            if set(weights) != set(ref_weights):
                sys.exit(f"FAIL {tag}: saved tensors differ from the reference")
            name, w_err = max(((n, eq.rel_err(weights[n], ref_weights[n])) for n in ref_weights), key=lambda t: t[1])
            w_tol = SELECTIVE_FP32_WEIGHT_TOL if ckpt == "selective" and precision == "fp32" else weight_tol
            ok = loss_err <= loss_tol and w_err <= w_tol and losses[-1] < losses[0]
            count += 1
            worst_loss, worst_weight = max(worst_loss, loss_err), max(worst_weight, w_err)
            if not ok:
                failed.append(tag)
            print(f"{'ok  ' if ok else 'FAIL'} {tag:>36}: losses {losses[0]:.4f} -> {losses[-1]:.4f}, loss rel err "
                  f"{loss_err:.2e}, worst weight rel err {w_err:.2e} ({name}), {secs:.1f} s", flush=True)
        print(f"{precision}: worst loss rel err {worst_loss:.2e} (tolerance {loss_tol}), worst weight rel err "
              f"{worst_weight:.2e} (tolerance {weight_tol})", flush=True)
    if failed:
        sys.exit(f"FAIL: {len(failed)} of {count} combinations: {', '.join(failed)}")
    print(f"PASS: {count} policy combinations on 2 ranks match the 1-rank reference of their precision")


if __name__ == "__main__":
    main()
