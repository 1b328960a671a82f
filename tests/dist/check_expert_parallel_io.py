#!/usr/bin/env python3
"""Expert parallelism reads Hugging Face checkpoints in both Mixtral layouts and writes the whole model.

Export: the checkpoint loaded with --expert-parallel 2 (2 ranks, FullShard; 4 ranks without sharding, where the ranks
holding the same experts hold them whole and one of them writes) and exported with --export-dir, cut into several
files, gives byte for byte the files of the same export without expert parallelism.

Makes a tiny random Mixtral checkpoint with shardlm_train (--steps 0 --export-dir: the fused layout) and a copy in the
per-expert layout of Mixtral's releases (block_sparse_moe.experts.E.w1/w2/w3), then fine-tunes from each: one rank
without expert parallelism (the reference) and 2 ranks with --expert-parallel 2, where each rank reads only its
experts' byte ranges. The losses of every step and the final weights written by --save-final (every expert, the same
names and shapes as without expert parallelism) must agree.

The gradients themselves are compared too, through one step that AdamW makes linear: with --grad-clip 1e-10 the
clipped gradient c g is far below AdamW's eps (1e-8), so the first update is lr c g / eps, and the change of every
matrix is its gradient up to one factor, the same in both runs (--lr 1 makes it large against fp32's spacing). Over
several steps AdamW's near sign(g) updates magnify the rounding of gradients that nearly cancel (an expert's gradient
sums every rank's rows in one product where the reference sums per micro-batch): hence the looser --weight-tol.

  check_expert_parallel_io.py --launch build/bin/shardlm_launch --train build/bin/shardlm_train --workdir /tmp/epio
"""
import argparse
import json
import os
import pathlib
import shutil
import subprocess
import sys

import numpy as np
from safetensors.torch import load_file, save_file

CORPUS = "".join(f"the quick brown fox jumps over the lazy dog {i % 7}. shardlm {i % 5}!\n" for i in range(400))


def run(cmd):
    p = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, timeout=600,
                       env={**os.environ, "OMP_NUM_THREADS": "1"})
    if p.returncode != 0:
        sys.exit(f"FAIL: exit {p.returncode}\n$ {' '.join(map(str, cmd))}\n{p.stdout}\n{p.stderr}")
    return p


def per_expert_copy(fused, out):
    """The fused checkpoint's experts as Mixtral's releases store them."""
    out.mkdir(parents=True, exist_ok=True)
    shutil.copy(fused / "config.json", out / "config.json")
    tensors = {}
    for f in sorted(fused.glob("*.safetensors")):
        tensors.update(load_file(str(f)))
    split = {}
    for name, t in tensors.items():
        if name.endswith("mlp.experts.gate_up_proj"):  # [E, 2I, C]: w1 (gate) then w3 (up)
            base = name[: -len("mlp.experts.gate_up_proj")] + "block_sparse_moe.experts."
            half = t.shape[1] // 2
            for e in range(t.shape[0]):
                split[f"{base}{e}.w1.weight"], split[f"{base}{e}.w3.weight"] = t[e, :half].clone(), t[e, half:].clone()
        elif name.endswith("mlp.experts.down_proj"):  # [E, C, I]: w2
            base = name[: -len("mlp.experts.down_proj")] + "block_sparse_moe.experts."
            for e in range(t.shape[0]):
                split[f"{base}{e}.w2.weight"] = t[e].clone()
        elif name.endswith("mlp.gate.weight"):
            split[name.replace("mlp.gate.weight", "block_sparse_moe.gate.weight")] = t
        else:
            split[name] = t
    save_file(split, str(out / "model.safetensors"), metadata={"format": "pt"})


def train(args, workdir, tag, model_dir, ranks, accum, extra, steps=None):
    metrics, weights = workdir / f"{tag}.jsonl", workdir / f"{tag}.safetensors"
    run([args.launch, "--nproc-per-node", ranks, "--", args.train, "--model-dir", model_dir, "--data",
         workdir / "corpus.txt", "--seq-len", 32, "--micro-batch", 1, "--grad-accum", accum, "--steps", steps or args.steps,
         "--lr", "1e-3", "--warmup-steps", 1, "--seed", 7, "--dist-timeout", 60, "--metrics", metrics,
         "--save-final", weights, *extra])
    losses = [json.loads(line)["loss"] for line in metrics.read_text().splitlines()]
    return losses, {n: t.double().numpy() for n, t in load_file(str(weights)).items()}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--launch", required=True)
    ap.add_argument("--train", required=True)
    ap.add_argument("--workdir", required=True)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--tol", type=float, default=1e-5, help="relative: losses, and the linearized step's changes")
    ap.add_argument("--weight-tol", type=float, default=1e-3, help="relative, per tensor, after --steps steps")
    args = ap.parse_args()
    workdir = pathlib.Path(args.workdir)
    if workdir.exists():
        shutil.rmtree(workdir)
    workdir.mkdir(parents=True)
    (workdir / "corpus.txt").write_text(CORPUS)
    fused, split = workdir / "fused", workdir / "per_expert"
    run([args.train, "--preset", "mixtral-debug", "--layers", 2, "--steps", 0, "--seed", 3, "--data", workdir / "corpus.txt",
         "--export-dir", fused])
    per_expert_copy(fused, split)
    failed = False
    start = {n: t.double().numpy() for n, t in load_file(str(fused / "model.safetensors")).items()}
    linear = ["--lr", 1, "--grad-clip", "1e-10"]
    _, ref = train(args, workdir, "linear_reference", fused, 1, 2, linear, steps=1)
    _, got = train(args, workdir, "linear_ep2", fused, 2, 1, linear + ["--expert-parallel", 2], steps=1)
    # matrices only: a norm scale's change (1e-5 of 1.0) is near fp32's spacing there, in both runs alike
    errs = [(float(np.abs((got[n] - start[n]) - (ref[n] - start[n])).max() / np.abs(ref[n] - start[n]).max()), n)
            for n in ref if ref[n].ndim >= 2]
    worst, name = max(errs)
    failed |= worst > args.tol
    print(f"{'ok  ' if worst <= args.tol else 'FAIL'} gradients (one linearized step): worst rel err {worst:.2e} ({name}) "
          f"over {len(errs)} matrices")
    export = ["--steps", 0, "--model-dir", fused, "--data", workdir / "corpus.txt", "--export-max-file-gb", "0.0005"]
    run([args.train, *export, "--export-dir", workdir / "export_reference"])
    reference = sorted(p.name for p in (workdir / "export_reference").iterdir())
    for ranks, flags in ((2, ["--expert-parallel", 2]), (4, ["--expert-parallel", 2, "--sharding", "none"])):
        out = workdir / f"export_{ranks}"
        run([args.launch, "--nproc-per-node", ranks, "--", args.train, *export, "--export-dir", out, "--dist-timeout", 60,
             *flags])
        names = sorted(p.name for p in out.iterdir())
        differ = [n for n in reference if n not in names or (out / n).read_bytes() != (workdir / "export_reference" / n).read_bytes()]
        ok = names == reference and not differ and len(reference) > 3
        failed |= not ok
        print(f"{'ok  ' if ok else 'FAIL'} export with {' '.join(map(str, flags))} on {ranks} ranks: {len(names)} files, "
              f"{'the same bytes as without expert parallelism' if ok else f'differ: {differ or names}'}")
    for layout, model_dir in (("fused", fused), ("per-expert", split)):
        ref_losses, ref = train(args, workdir, f"{layout}_reference", model_dir, 1, 2, [])
        losses, got = train(args, workdir, f"{layout}_ep2", model_dir, 2, 1, ["--expert-parallel", 2])
        if set(got) != set(ref) or any(got[n].shape != ref[n].shape for n in ref):
            sys.exit(f"FAIL {layout}: --save-final's tensors differ from the reference's: "
                     f"{sorted((n, got.get(n, np.empty(0)).shape) for n in set(got) ^ set(ref))}")
        loss_err = max(abs(a - b) / abs(b) for a, b in zip(losses, ref_losses))
        worst, name = max((float(np.abs(got[n] - ref[n]).max() / max(np.abs(ref[n]).max(), 1e-30)), n) for n in ref)
        ok = loss_err <= args.tol and worst <= args.weight_tol and len(losses) == args.steps
        failed |= not ok
        print(f"{'ok  ' if ok else 'FAIL'} {layout:>10}: --expert-parallel 2 on 2 ranks from the checkpoint: loss rel err "
              f"{loss_err:.2e}, worst parameter rel err {worst:.2e} ({name}), {len(got)} tensors")
    if failed:
        sys.exit(f"FAIL: expert parallelism differs from the reference by more than {args.tol}")
    print("PASS: both checkpoint layouts load into expert-parallel shards; --export-dir and --save-final write the whole "
          "model as without expert parallelism")


if __name__ == "__main__":
    main()
