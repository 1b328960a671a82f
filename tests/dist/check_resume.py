#!/usr/bin/env python3
"""Sharded checkpoints resume a run exactly.

  A: 2 ranks, FullShard, 8 steps on a uint32 token file, a checkpoint every 4 steps.
  B: a fresh directory holding only A's step-4 checkpoint; 2 ranks resume from it (--resume auto) and run
     steps 5..8: the losses and the final weights must equal A's bit for bit.
  C: the same step-4 checkpoint resumed by 3 ranks (the same global batch of 6: 2 x grad-accum 3 = 3 x 2):
     the shards are re-sliced; losses of steps 5..8 within 1e-5 of A's.
  An uncommitted checkpoint directory (a save that never finished) is ignored by --resume auto and refused
  by --resume PATH.
  Preemption: rank 1 gets SIGTERM 4 s into a long run; both ranks stop after the same step, save a committed
  checkpoint of it and exit 0; a restart resumes from it.
"""
import argparse
import json
import pathlib
import shutil
import subprocess
import sys

import numpy as np
from safetensors.numpy import load_file


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--launch", required=True)
    ap.add_argument("--train", required=True)
    ap.add_argument("--workdir", required=True)
    args = ap.parse_args()
    work = pathlib.Path(args.workdir)
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    text = "".join(f"resume me exactly {i % 11}: the quick brown fox. " for i in range(600)).encode()
    np.frombuffer(text, dtype=np.uint8).astype("<u4").tofile(work / "tokens.bin")

    def run(tag, ranks, accum, ckpt_dir, *extra, expect_ok=True):
        cmd = [args.launch, "--nproc-per-node", str(ranks), "--", args.train, "--sharding", "full",
               "--data", str(work / "tokens.bin"), "--preset", "llama3-debug", "--layers", "2", "--seq-len", "32",
               "--micro-batch", "1", "--grad-accum", str(accum), "--steps", "8", "--lr", "1e-3", "--warmup-steps", "2",
               "--seed", "5", "--checkpoint-dir", str(ckpt_dir), "--metrics", str(work / f"{tag}.jsonl"),
               "--save-final", str(work / f"{tag}.safetensors"), "--dist-timeout", "60", *extra]
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
        if expect_ok and p.returncode != 0:
            sys.exit(f"FAIL {tag}: exit {p.returncode}\n$ {' '.join(cmd)}\n{p.stdout}\n{p.stderr}")
        return p

    def losses(tag):
        return {r["step"]: r["loss"] for r in map(json.loads, (work / f"{tag}.jsonl").read_text().splitlines())}

    run("A", 2, 3, work / "ckA", "--save-every", "4")
    step4 = work / "ckA" / "step-00000004"
    if not (step4 / "COMMITTED").exists():
        sys.exit(f"FAIL: {step4} was not committed")
    files = sorted(f.name for f in step4.iterdir())
    print(f"A: checkpoint {step4.name}: {', '.join(files)}")

    shutil.copytree(step4, work / "ckB" / step4.name)
    p = run("B", 2, 3, work / "ckB")
    if "resumed from" not in p.stderr + p.stdout:
        sys.exit("FAIL B: the log does not say it resumed")
    a, b = losses("A"), losses("B")
    if sorted(b) != [5, 6, 7, 8]:
        sys.exit(f"FAIL B: metrics steps {sorted(b)}, expected 5..8")
    exact = all(a[s] == b[s] for s in b)
    wa, wb = load_file(str(work / "A.safetensors")), load_file(str(work / "B.safetensors"))
    same_weights = set(wa) == set(wb) and all(np.array_equal(wa[n], wb[n]) for n in wa)
    print(f"B (2 ranks, resumed at 4): losses {'bitwise equal' if exact else 'DIFFER'} "
          f"({', '.join(f'{a[s]:.6f}/{b[s]:.6f}' for s in b)}); final weights {'bitwise equal' if same_weights else 'DIFFER'}")

    shutil.copytree(step4, work / "ckC" / step4.name)
    run("C", 3, 2, work / "ckC")
    c = losses("C")
    worst = max(abs(c[s] - a[s]) / abs(a[s]) for s in c)
    wc = load_file(str(work / "C.safetensors"))
    wworst = max(float(np.abs(wc[n].astype(np.float64) - wa[n]).max() / np.abs(wa[n]).max()) for n in wa)
    print(f"C (3 ranks, resumed at 4 from 2): loss rel err {worst:.2e} (bound 1e-5), final weights rel err {wworst:.2e}")

    # A save that never finished: the newest directory, without COMMITTED. B's run ended with step 8 saved.
    broken = work / "ckB" / "step-00000012"
    shutil.copytree(work / "ckB" / "step-00000008", broken)
    (broken / "COMMITTED").unlink()
    p = run("D", 2, 3, work / "ckB")  # auto: must take step 8 (nothing left to train)
    auto_ok = "resumed from" in p.stderr and "step-00000008" in p.stderr and "nothing to train" in p.stderr
    p = run("E", 2, 3, work / "ckE", "--resume", str(broken), expect_ok=False)
    refused = p.returncode != 0 and "not a committed checkpoint" in p.stderr
    print(f"uncommitted checkpoint: --resume auto {'skips it' if auto_ok else 'DID NOT skip it'}; "
          f"--resume PATH {'refuses it' if refused else 'DID NOT refuse it'}")

    # Preemption: SIGTERM to rank 1 only; the stop request reaches rank 0 with the step's loss all-reduce.
    ckf = work / "ckF"
    cmd = [args.launch, "--nproc-per-node", "2", "--", "sh", "-c",
           '[ $RANK = 1 ] && (sleep 4 && kill -TERM $$) & exec "$0" "$@"', args.train,
           "--data", str(work / "tokens.bin"), "--preset", "llama3-debug", "--layers", "2", "--seq-len", "32",
           "--micro-batch", "1", "--steps", "100000", "--checkpoint-dir", str(ckf), "--dist-timeout", "60"]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    saved = sorted(d.name for d in ckf.glob("step-*") if (d / "COMMITTED").exists()) if ckf.exists() else []
    stopped = p.returncode == 0 and "stopping after step" in p.stderr and len(saved) == 1
    step = int(saved[0][5:]) if saved else -1
    p2 = subprocess.run(cmd[:4] + [args.train] + cmd[8:-6] + ["--steps", str(step + 2), "--checkpoint-dir", str(ckf),
                        "--dist-timeout", "60"], capture_output=True, text=True, timeout=300)
    continued = p2.returncode == 0 and f"step-{step:08d}" in p2.stderr and "trained 2 steps" in p2.stderr
    print(f"preemption: SIGTERM to rank 1 -> exit {p.returncode}, committed {saved}; restart "
          f"{'resumed and trained 2 more steps' if continued else 'FAILED: ' + p2.stderr[-500:]}")
    if not stopped:
        print(p.stderr[-2000:])

    if not (exact and same_weights and worst <= 1e-5 and auto_ok and refused and stopped and continued):
        sys.exit("FAIL")
    print("PASS")


if __name__ == "__main__":
    main()
