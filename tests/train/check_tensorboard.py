"""TensorBoard reads the event files of `shardlm_train --tensorboard DIR`: its EventAccumulator (which checks the
record CRCs) finds the scalars of every step, equal (as float32) to the metrics JSONL of the same run.
tensorboard is in scripts/requirements.txt: a Python without it fails, naming the fix."""
import argparse
import json
import os
import shutil
import subprocess
import sys

import numpy as np

try:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
except ImportError:
    sys.exit(f"tensorboard is not installed for {sys.executable}: pip install -r scripts/requirements.txt (or set "
             "SHARDLM_TENSORBOARD_PYTHON to a Python that has it)")

p = argparse.ArgumentParser()
p.add_argument("--train", required=True)
p.add_argument("--data", required=True)
p.add_argument("--workdir", required=True)
a = p.parse_args()
shutil.rmtree(a.workdir, ignore_errors=True)
os.makedirs(a.workdir)
metrics, board = os.path.join(a.workdir, "m.jsonl"), os.path.join(a.workdir, "tb")
subprocess.run([a.train, "--data", a.data, "--layers", "2", "--seq-len", "32", "--micro-batch", "2", "--steps", "6",
                "--eval-fraction", "0.1", "--eval-every", "3", "--eval-samples", "8", "--metrics", metrics,
                "--tensorboard", board], check=True)
rows = [json.loads(line) for line in open(metrics)]
ea = EventAccumulator(board)
ea.Reload()
tags = set(ea.Tags()["scalars"])
expected = {"train/loss": "loss", "train/grad_norm": "grad_norm", "train/lr": "lr", "train/tokens_per_s": "tokens_per_s",
            "eval/loss": "eval_loss"}
assert set(expected) <= tags, f"missing tags: {set(expected) - tags}"
for tag, key in expected.items():
    got = {e.step: e.value for e in ea.Scalars(tag)}
    want = {r["step"]: np.float32(r[key]) for r in rows if key in r}
    assert got.keys() == want.keys(), (tag, sorted(got), sorted(want))
    for step, v in want.items():
        assert np.float32(got[step]) == v, (tag, step, got[step], v)
print(f"tensorboard: {len(tags)} tags, {len(rows)} steps, eval at steps {sorted(r['step'] for r in rows if 'eval_loss' in r)}: match the JSONL")
