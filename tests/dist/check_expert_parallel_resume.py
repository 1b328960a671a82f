#!/usr/bin/env python3
"""Training checkpoints with expert parallelism resume at another expert parallelism, and without it, exactly.

A tiny Mixtral (mixtral-debug, 2 layers of 4 experts), the same global batch of 4 samples in every run, 4 steps:

  A   2 ranks, --expert-parallel 2, checkpoints at steps 2 and 4: the uninterrupted run every other run is held to.
  Aa  A with --async-save: checkpoints whose files are byte for byte A's.
  a   2 ranks, --expert-parallel 2, resumed from A's step 2: steps 3..4 and the final weights equal A's bit for bit.
  b   4 ranks, --expert-parallel 4, resumed from A's step 2 (each rank now holds one expert of a layer).
  c   1 rank without expert parallelism, resumed from A's step 2 (the experts back inside each block's flat buffer).
  D   2 ranks without expert parallelism, a checkpoint at step 2 (format 2: no expert files).
  d   2 ranks, --expert-parallel 2, resumed from D's step 2.
  E   4 ranks, --expert-parallel 2 (each expert file set sharded over the 2 ranks holding those experts), a
      checkpoint at step 2; e: resumed from it on 2 ranks at --expert-parallel 2.
b, c, d and e: the losses and gradient norms of steps 3..4 and the final weights within the tolerances of
dist_equivalence_expert_parallel (an expert's gradient sums the rows of every rank in one product at one expert
parallelism and per rank at another: the rounding differs), against A (d also against D).
Then one bit flipped in an expert file of A's step 2 is refused, naming the file and the unit, at expert parallelism
2 and 4 and without it.

  check_expert_parallel_resume.py --launch build/bin/shardlm_launch --train build/bin/shardlm_train --workdir /tmp/epr
"""
import argparse
import json
import os
import pathlib
import shutil
import struct
import subprocess
import sys

import numpy as np
from safetensors.torch import load_file

CORPUS = "".join(f"the quick brown fox jumps over the lazy dog {i % 7}. shardlm {i % 5}!\n" for i in range(400))
LOSS_TOL, GRAD_NORM_TOL, WEIGHT_TOL = 1e-5, 1e-4, 1e-4  # dist_equivalence_expert_parallel's
GLOBAL_BATCH, STEPS = 4, 4


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--launch", required=True)
    ap.add_argument("--train", required=True)
    ap.add_argument("--workdir", required=True)
    args = ap.parse_args()
    work = pathlib.Path(args.workdir)
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    (work / "corpus.txt").write_text(CORPUS)

    def run(tag, ranks, ep, *extra, expect_ok=True):
        cmd = [args.launch, "--nproc-per-node", ranks, "--", args.train, "--sharding", "full", "--preset", "mixtral-debug",
               "--layers", 2, "--data", work / "corpus.txt", "--seq-len", 32, "--micro-batch", 1,
               "--grad-accum", GLOBAL_BATCH // ranks, "--steps", STEPS, "--lr", "1e-3", "--warmup-steps", 1, "--seed", 7,
               "--dist-timeout", 60, "--expert-parallel", ep, "--metrics", work / f"{tag}.jsonl",
               "--save-final", work / f"{tag}.safetensors", *extra]
        p = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, timeout=300,
                           env={**os.environ, "OMP_NUM_THREADS": "1"})
        if (p.returncode == 0) != expect_ok:
            sys.exit(f"FAIL {tag}: exit {p.returncode}\n$ {' '.join(map(str, cmd))}\n{p.stdout}\n{p.stderr}")
        return p

    def rows(tag):
        return {r["step"]: r for r in map(json.loads, (work / f"{tag}.jsonl").read_text().splitlines())}

    def weights(tag):
        return {n: t.double().numpy() for n, t in load_file(str(work / f"{tag}.safetensors")).items()}

    def compare(tag, ref):
        """(loss, grad norm, weight) worst relative errors of run `tag` against `ref` over `tag`'s steps, and whether
        they are all bit for bit equal."""
        r, a = rows(tag), rows(ref)
        if sorted(r) != [3, 4]:
            sys.exit(f"FAIL {tag}: metrics of steps {sorted(r)}, expected 3..4 (resumed at 2)")
        wr, wa = weights(tag), weights(ref)
        if set(wr) != set(wa):
            sys.exit(f"FAIL {tag}: final tensors {sorted(set(wr) ^ set(wa))} in one run only")
        loss = max(abs(r[s]["loss"] - a[s]["loss"]) / abs(a[s]["loss"]) for s in r)
        norm = max(abs(r[s]["grad_norm"] - a[s]["grad_norm"]) / abs(a[s]["grad_norm"]) for s in r)
        weight = max(float(np.abs(wr[n] - wa[n]).max() / max(np.abs(wa[n]).max(), 1e-30)) for n in wa)
        exact = all(r[s]["loss"] == a[s]["loss"] and r[s]["grad_norm"] == a[s]["grad_norm"] for s in r) and \
            all(np.array_equal(wr[n], wa[n]) for n in wa)
        return loss, norm, weight, exact

    failures = []
    ck = work / "ckA"
    run("A", 2, 2, "--save-every", 2, "--checkpoint-dir", ck)
    step2 = ck / "step-00000002"
    files = sorted(p.name for p in step2.iterdir())
    want = ["COMMITTED", "experts-0-of-2.shard-0-of-1.safetensors", "experts-1-of-2.shard-0-of-1.safetensors",
            "meta.json", "shard-0-of-2.safetensors", "shard-1-of-2.safetensors"]
    if files != want:
        failures.append(f"A: step 2 holds {files}, expected {want}")
    run("Aa", 2, 2, "--save-every", 2, "--checkpoint-dir", work / "ckAa", "--async-save")
    for step in ("step-00000002", "step-00000004"):
        for name in want:
            if (ck / step / name).read_bytes() != (work / "ckAa" / step / name).read_bytes():
                failures.append(f"Aa: {step}/{name} differs from the synchronous save's")
    print(f"Aa (--async-save): checkpoint files {'byte for byte A' if not failures else 'DIFFER'}'s")

    run("a", 2, 2, "--resume", step2)
    loss, norm, weight, exact = compare("a", "A")
    print(f"a (2 ranks, --expert-parallel 2, from A's step 2): {'bitwise equal' if exact else 'DIFFERS'} "
          f"(loss {loss:.1e}, grad norm {norm:.1e}, weights {weight:.1e})")
    if not exact:
        failures.append("a: resumed at the same expert parallelism, not bit for bit A")

    run("D", 2, 1, "--save-every", 2, "--checkpoint-dir", work / "ckD")
    if any((work / "ckD" / "step-00000002").glob("experts-*")):
        failures.append("D: expert files in a checkpoint without expert parallelism")
    if json.loads((work / "ckD" / "step-00000002" / "meta.json").read_text())["format"] != 2:
        failures.append("D: a checkpoint without expert parallelism not written in format 2")
    run("E", 4, 2, "--save-every", 2, "--checkpoint-dir", work / "ckE")
    if not (work / "ckE" / "step-00000002" / "experts-1-of-2.shard-1-of-2.safetensors").exists():
        failures.append("E: no expert file sharded over 2 ranks")
    run("b", 4, 4, "--resume", step2)
    run("c", 1, 1, "--resume", step2)
    run("d", 2, 2, "--resume", work / "ckD" / "step-00000002")
    run("e", 2, 2, "--resume", work / "ckE" / "step-00000002")
    for tag, ref, what in [("b", "A", "4 ranks, --expert-parallel 4, from A's step 2"),
                           ("c", "A", "1 rank without expert parallelism, from A's step 2"),
                           ("d", "A", "2 ranks, --expert-parallel 2, from D's step 2 (no expert parallelism)"),
                           ("d", "D", "the same against D"),
                           ("e", "A", "2 ranks, --expert-parallel 2, from E's step 2 (4 ranks)")]:
        loss, norm, weight, _ = compare(tag, ref)
        ok = loss <= LOSS_TOL and norm <= GRAD_NORM_TOL and weight <= WEIGHT_TOL
        print(f"{tag} ({what}): loss {loss:.1e}, grad norm {norm:.1e}, weights {weight:.1e} against {ref} "
              f"(bounds {LOSS_TOL:.0e}, {GRAD_NORM_TOL:.0e}, {WEIGHT_TOL:.0e}){'' if ok else ': FAIL'}")
        if not ok:
            failures.append(f"{tag}: against {ref} past the bounds")

    # One bit flipped in the middle of block 1's experts' exp_avg in the file of experts 2..3.
    bad = work / "bad"
    shutil.copytree(step2, bad)
    path = bad / "experts-1-of-2.shard-0-of-1.safetensors"
    data = bytearray(path.read_bytes())
    n = struct.unpack("<Q", data[:8])[0]
    begin, end = json.loads(data[8:8 + n])["u2.exp_avg"]["data_offsets"]
    data[8 + n + (begin + end) // 2] ^= 0x10
    path.write_bytes(bytes(data))
    expected = f"{path}: unit 2 (block 1) experts: its tensors fail their checksum"
    for tag, ranks, ep in [("bad2", 2, 2), ("bad4", 4, 4), ("bad1", 1, 1)]:
        p = run(tag, ranks, ep, "--resume", bad, expect_ok=False)
        if expected not in p.stdout + p.stderr:
            failures.append(f"{tag}: the damaged expert file not refused with '{expected}'\n{p.stdout}\n{p.stderr}")
    print(f"a flipped bit in {path.name}: refused at --expert-parallel 2, 4 and 1 "
          f"{'naming the file and the unit' if not any(f.startswith('bad') for f in failures) else 'WRONGLY'}")

    if failures:
        sys.exit("FAIL:\n" + "\n".join(failures))
    print("OK")


if __name__ == "__main__":
    main()
