"""Token files that change under a running job: shardlm_train stops with an error naming the file and exit code 1,
never a signal (a memory mapping of a file that shrinks ends the process with SIGBUS).

For the token file and for its loss mask: a run on a fresh copy of both is started, and once its first step is
logged the file is truncated to a few bytes; the run must end within 60 s with exit code 1 and an error naming it.

Usage: check_token_files.py --train BIN --workdir DIR"""
import argparse
import random
import shutil
import subprocess
import sys
import time
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--train", required=True)
    ap.add_argument("--workdir", required=True)
    args = ap.parse_args()
    work = Path(args.workdir)
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    rng = random.Random(20261125)
    n = 1 << 18
    tokens = b"".join(rng.randrange(512).to_bytes(4, "little") for _ in range(n))
    mask = bytes(rng.randrange(2) for _ in range(n))
    failures = []
    for case, victim in (("tokens", "data.bin"), ("mask", "data.mask")):
        d = work / case
        d.mkdir()
        (d / "data.bin").write_bytes(tokens)
        (d / "data.mask").write_bytes(mask)
        cmd = [args.train, "--data", str(d / "data.bin"), "--layers", "1", "--seq-len", "64", "--micro-batch", "4",
               "--steps", "100000", "--log-every", "1"]
        p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        out = []
        for line in p.stdout:  # the first step is logged: the job is reading the files
            out.append(line)
            if line.startswith("step 1/"):
                break
        with open(d / victim, "r+b") as f:
            f.truncate(12)
        deadline = time.monotonic() + 60
        try:
            rest, _ = p.communicate(timeout=max(1.0, deadline - time.monotonic()))
            out.append(rest)
        except subprocess.TimeoutExpired:
            p.kill()
            out.append(p.communicate()[0])
        text = "".join(out)
        expected = f"{d / victim}: changed size while the job was reading it"
        ok = p.returncode == 1 and expected in text and "terminate called" not in text
        print(f"{'ok  ' if ok else 'FAIL'} {case}: exit {p.returncode}")
        if not ok:
            failures.append(f"{case}: exit {p.returncode} (a negative code is a signal), expected 1 and {expected!r}:\n{text[-1500:]}")
    if failures:
        sys.exit("\n\n".join(failures))
    print("check_token_files: 2 cases passed")


if __name__ == "__main__":
    main()
