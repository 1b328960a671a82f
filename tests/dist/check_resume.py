#!/usr/bin/env python3
"""Sharded checkpoints resume a run exactly.

  A: 2 ranks, FullShard, 8 steps on a uint32 token file, a checkpoint every 4 steps.
  B: a fresh directory holding only A's step-4 checkpoint; 2 ranks resume from it (--resume auto) and run
     steps 5..8: the losses and the final weights must equal A's bit for bit.
  C: the same step-4 checkpoint resumed by 3 ranks (the same global batch of 6: 2 x grad-accum 3 = 3 x 2):
     the shards are re-sliced; losses of steps 5..8 and the final weights within 1e-5 of A's.
  Aa, Ba: A and B with --async-save: the same losses and final weights as A bit for bit, and checkpoints whose
     tensors equal A's. Af: a background write that fails on rank 1 stops every rank, nothing committed.
  An uncommitted checkpoint directory (a save that never finished) is ignored by --resume auto and refused
  by --resume PATH.
  --keep-last 2 with a save every step (sync and async): only the newest two of this run remain; an uncommitted
  directory, a newer committed one and the leftover of a removal cut short are handled as checkpoints.md says.
  kill -9 mid-save (sync and async; SHARDLM_INJECT_SAVE_DELAY_MS holds each save open): the whole job is killed
  while step 4 is being saved; --resume auto takes step 2 and the run continues exactly as A.
  Preemption: rank 1 gets SIGTERM 4 s into a long run with asynchronous saves every 20 steps and --keep-last 1;
  both ranks stop after the same step, finish the save in flight, save a committed checkpoint of that step (the
  only one left) and exit 0; a restart resumes from it.
"""
import argparse
import json
import os
import pathlib
import signal
import shutil
import subprocess
import sys
import time

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

    def command(tag, ranks, accum, ckpt_dir, *extra):
        return [args.launch, "--nproc-per-node", str(ranks), "--", args.train, "--sharding", "full",
                "--data", str(work / "tokens.bin"), "--preset", "llama3-debug", "--layers", "2", "--seq-len", "32",
                "--micro-batch", "1", "--grad-accum", str(accum), "--steps", "8", "--lr", "1e-3", "--warmup-steps", "2",
                "--seed", "5", "--checkpoint-dir", str(ckpt_dir), "--metrics", str(work / f"{tag}.jsonl"),
                "--save-final", str(work / f"{tag}.safetensors"), "--dist-timeout", "60", *extra]

    def run(tag, ranks, accum, ckpt_dir, *extra, expect_ok=True):
        cmd = command(tag, ranks, accum, ckpt_dir, *extra)
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
        if expect_ok and p.returncode != 0:
            sys.exit(f"FAIL {tag}: exit {p.returncode}\n$ {' '.join(cmd)}\n{p.stdout}\n{p.stderr}")
        return p

    def losses(tag):
        return {r["step"]: r["loss"] for r in map(json.loads, (work / f"{tag}.jsonl").read_text().splitlines())}

    def same_as_a(tag):
        """Whether run `tag`'s losses and final weights equal A's bit for bit."""
        a, t = losses("A"), losses(tag)
        wa, wt = load_file(str(work / "A.safetensors")), load_file(str(work / f"{tag}.safetensors"))
        return (all(a[s] == t[s] for s in t) and set(wa) == set(wt) and all(np.array_equal(wa[n], wt[n]) for n in wa))

    def committed(ckpt_dir):
        return sorted(d.name for d in ckpt_dir.glob("step-*") if (d / "COMMITTED").exists())

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

    # Asynchronous saves: the same training, and checkpoints holding the same tensors and meta.json.
    run("Aa", 2, 3, work / "ckAa", "--save-every", "4", "--async-save")
    same_files = committed(work / "ckAa") == committed(work / "ckA") == ["step-00000004", "step-00000008"]
    for name in committed(work / "ckA"):
        for f in (work / "ckA" / name).glob("shard-*.safetensors"):
            sa, saa = load_file(str(f)), load_file(str(work / "ckAa" / name / f.name))
            same_files &= set(sa) == set(saa) and all(np.array_equal(sa[n], saa[n]) for n in sa)
        same_files &= (json.loads((work / "ckA" / name / "meta.json").read_text()) ==
                       json.loads((work / "ckAa" / name / "meta.json").read_text()))
    shutil.copytree(work / "ckAa" / step4.name, work / "ckBa" / step4.name)
    run("Ba", 2, 3, work / "ckBa", "--async-save")
    async_ok = same_files and same_as_a("Aa") and same_as_a("Ba") and sorted(losses("Ba")) == [5, 6, 7, 8]
    print(f"async save: run {'identical to A' if same_as_a('Aa') else 'DIFFERS from A'}; checkpoints "
          f"{'hold the same tensors and meta.json' if same_files else 'DIFFER'}; resumed at 4 "
          f"{'identical to A' if same_as_a('Ba') else 'DIFFERS from A'}")

    # A background write that fails (rank 1's temporary file name is taken by a directory): every rank stops with
    # the error at a step boundary, and the checkpoint stays uncommitted.
    ckf_ = work / "ckAf"
    (ckf_ / "step-00000002" / "shard-1-of-2.safetensors.tmp").mkdir(parents=True)
    p = run("Af", 2, 3, ckf_, "--save-every", "2", "--async-save", expect_ok=False)
    failed_ok = (p.returncode != 0 and "step-00000002: the asynchronous save failed on 1 rank(s)" in p.stderr and
                 "the checkpoint stays uncommitted" in p.stderr and committed(ckf_) == [])
    print(f"async save failing on rank 1: exit {p.returncode}, committed {committed(ckf_)} -> "
          f"{'every rank stopped, nothing committed' if failed_ok else 'WRONG: ' + p.stderr[-1500:]}")
    async_ok &= failed_ok

    shutil.copytree(step4, work / "ckC" / step4.name)
    run("C", 3, 2, work / "ckC")
    c = losses("C")
    worst = max(abs(c[s] - a[s]) / abs(a[s]) for s in c)
    wc = load_file(str(work / "C.safetensors"))
    wworst = max(float(np.abs(wc[n].astype(np.float64) - wa[n]).max() / np.abs(wa[n]).max()) for n in wa)
    print(f"C (3 ranks, resumed at 4 from 2): loss rel err {worst:.2e} (bound 1e-5), final weights rel err {wworst:.2e} (bound 1e-5)")

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

    # --keep-last 2, saving every step of a fresh run (--resume none) into a directory that already holds: an
    # uncommitted older directory (a save in progress elsewhere: never touched), a committed later checkpoint
    # (another run's: never touched) and the leftover of a removal cut short (removed).
    keep_ok = True
    for tag, extra in (("K", ()), ("Ka", ("--async-save",))):
        ck = work / f"ck{tag}"
        (ck / "step-00000000").mkdir(parents=True)
        (ck / "step-00000000" / "shard-0-of-2.safetensors.tmp").write_bytes(b"partial")
        shutil.copytree(work / "ckA" / "step-00000008", ck / "step-00000099")
        shutil.copytree(work / "ckA" / "step-00000004", ck / ".removing-step-00000001")
        run(tag, 2, 3, ck, "--save-every", "1", "--keep-last", "2", "--resume", "none", *extra)
        left = sorted(d.name for d in ck.iterdir())
        ok = left == ["step-00000000", "step-00000007", "step-00000008", "step-00000099"] and \
            (ck / "step-00000000" / "shard-0-of-2.safetensors.tmp").read_bytes() == b"partial" and \
            committed(ck) == ["step-00000007", "step-00000008", "step-00000099"] and same_as_a(tag)
        print(f"--keep-last 2 {' '.join(extra) or '(sync)'}: left {left} -> {'as expected' if ok else 'WRONG'}")
        keep_ok &= ok

    # kill -9 of the whole job while step 4 is being saved (each save held open 4 s after its files are written).
    def proc_stat(pid):
        """(state, parent pid) of a process, or None when it is gone."""
        try:
            fields = pathlib.Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[-1].split()
            return fields[0], int(fields[1])
        except (OSError, IndexError, ValueError):
            return None

    def kill_mid_save(tag, *extra):
        ck = work / f"ck{tag}"
        env = dict(os.environ, SHARDLM_INJECT_SAVE_DELAY_MS="4000")
        with open(work / f"{tag}.log", "w") as log:
            p = subprocess.Popen(command(tag, 2, 3, ck, "--save-every", "2", *extra), env=env, stdout=log, stderr=log)
            deadline, seen = time.time() + 120, False
            while time.time() < deadline and p.poll() is None:
                seen = (ck / "step-00000002" / "COMMITTED").exists() and any((ck / "step-00000004").glob("shard-*"))
                if seen:
                    break
                time.sleep(0.02)
            ranks = [int(d) for d in os.listdir("/proc") if d.isdigit() and (proc_stat(d) or ("", 0))[1] == p.pid]
            for pid in [p.pid] + ranks:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            p.wait()
        for pid in ranks:  # orphans are reaped by init; wait until they are gone
            while (proc_stat(pid) or ("Z", 0))[0] != "Z":
                time.sleep(0.05)
        state = committed(ck)
        if not seen or state != ["step-00000002"]:
            sys.exit(f"FAIL {tag}: the job was not caught mid-save of step 4 (committed: {state})\n" +
                     (work / f"{tag}.log").read_text()[-2000:])
        p = run(tag + "r", 2, 3, ck, *extra)
        resumed = "resumed from" in p.stderr and "step-00000002" in p.stderr
        ok = resumed and sorted(losses(tag + "r")) == list(range(3, 9)) and same_as_a(tag + "r")
        print(f"kill -9 mid-save {' '.join(extra) or '(sync)'}: killed with {state} committed and step-00000004 "
              f"half-written; --resume auto {'took step 2 and trained 3..8 identically to A' if ok else 'FAILED'}")
        return ok

    kill_ok = kill_mid_save("M") and kill_mid_save("Ma", "--async-save")

    # Preemption: SIGTERM to rank 1 only; the stop request reaches rank 0 with the step's loss all-reduce.
    ckf = work / "ckF"
    launch2 = [args.launch, "--nproc-per-node", "2", "--"]
    train_args = ["--data", str(work / "tokens.bin"), "--preset", "llama3-debug", "--layers", "2", "--seq-len", "32",
                  "--micro-batch", "1", "--async-save", "--save-every", "20", "--keep-last", "1",
                  "--checkpoint-dir", str(ckf), "--dist-timeout", "60"]
    cmd = launch2 + ["sh", "-c", '[ $RANK = 1 ] && (sleep 4 && kill -TERM $$) & exec "$0" "$@"', args.train,
                     *train_args, "--steps", "100000"]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    saved = committed(ckf)
    everything = sorted(d.name for d in ckf.iterdir()) if ckf.exists() else []
    stopped = p.returncode == 0 and "stopping after step" in p.stderr and len(saved) == 1 and everything == saved
    step = int(saved[0][5:]) if saved else -1
    p2 = subprocess.run(launch2 + [args.train, *train_args, "--steps", str(step + 2)], capture_output=True, text=True,
                        timeout=300)
    continued = p2.returncode == 0 and f"step-{step:08d}" in p2.stderr and "trained 2 steps" in p2.stderr
    print(f"preemption: SIGTERM to rank 1 -> exit {p.returncode}, committed {saved} (directory: {everything}); restart "
          f"{'resumed and trained 2 more steps' if continued else 'FAILED: ' + p2.stderr[-500:]}")
    if not stopped:
        print(p.stderr[-2000:])

    if not (exact and same_weights and worst <= 1e-5 and wworst <= 1e-5 and auto_ok and refused and stopped and continued and async_ok
            and keep_ok and kill_ok):
        sys.exit("FAIL")
    print("PASS")


if __name__ == "__main__":
    main()
