#!/usr/bin/env python3
"""examples/05_llama405b_full (the seed recipe: FullShard, every-block recompute, CPU offload, pure bf16) on a tiny
config, on 2 CPU ranks: it loads a Hugging Face checkpoint directory by byte ranges, trains 3 steps on a token file
with the recipe's offloaded host step, and exports a Hugging Face checkpoint, which transformers loads.

    check_example_405b_full.py --launch shardlm_launch --example 05_llama405b_full --workdir DIR

Checked: the log names the recipe, the loaded checkpoint and the host step; 3 finite losses; the export has every
tensor of the source with its shape and dtype (bf16), trained (not the source's values); transformers loads it and
its logits are finite.
"""
import argparse
import os
import re
import shutil
import subprocess
import sys

import numpy as np
import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "golden"))
from make_llama_fixtures import VARIANTS, build_model, load_checkpoint, quiet_transformers, save_checkpoint  # noqa: E402


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--launch", required=True)
    ap.add_argument("--example", required=True)
    ap.add_argument("--workdir", required=True)
    args = ap.parse_args()
    quiet_transformers()
    shutil.rmtree(args.workdir, ignore_errors=True)
    os.makedirs(args.workdir)
    seed, kwargs, _, _ = VARIANTS["gqa_llama3_untied_v5"]
    source = build_model(kwargs, seed).to(torch.bfloat16)
    source.config.dtype = torch.bfloat16
    src = os.path.join(args.workdir, "source")
    save_checkpoint(source, src, "v5", "60KB")  # several files and an index: read by byte ranges
    tokens = os.path.join(args.workdir, "tokens.bin")
    np.random.default_rng(0).integers(0, kwargs["vocab_size"], size=4096, dtype=np.uint32).tofile(tokens)
    out = os.path.join(args.workdir, "export")
    cmd = [args.launch, "--nproc-per-node", "2", "--", args.example, "--model-dir", src, "--data", tokens, "--device", "cpu",
           "--seq-len", "16", "--steps", "3", "--warmup-steps", "1", "--lr", "1e-3", "--export-dir", out, "--dist-timeout", "60"]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    log = p.stdout + p.stderr
    if p.returncode != 0:
        sys.exit(f"FAIL: exit {p.returncode}\n$ {' '.join(cmd)}\n{log[-3000:]}")
    losses = [float(x) for x in re.findall(r"step \d/3 \| loss ([0-9.naif]+)", log)]
    checks = {
        "the recipe in the log": "full / every-block / cpu / pure-bf16 | 2 rank(s) on cpu" in log,
        "the checkpoint loaded by ranges": f"loading {src}" in log,
        "the offloaded host step": "shardlm: offload: the host steps" in log,
        "3 finite losses": len(losses) == 3 and all(np.isfinite(losses)),
        "the export written": "exported" in log and os.path.exists(os.path.join(out, "config.json")),
    }
    exported = load_checkpoint(out).to(torch.bfloat16)
    theirs, ours = dict(source.named_parameters()), dict(exported.named_parameters())
    checks["every tensor, same shapes"] = theirs.keys() == ours.keys() and all(theirs[k].shape == ours[k].shape for k in theirs)
    changed = sum(not torch.equal(theirs[k].detach(), ours[k].detach()) for k in theirs)
    checks[f"trained ({changed} of {len(theirs)} tensors changed)"] = changed > len(theirs) // 2
    with torch.no_grad():
        logits = exported.float()(input_ids=torch.randint(kwargs["vocab_size"], (1, 8))).logits
    checks["transformers runs the export"] = bool(torch.isfinite(logits).all())
    print(f"losses {losses}")
    for name, ok in checks.items():
        print(f"{'ok  ' if ok else 'FAIL'} {name}")
    sys.exit(0 if all(checks.values()) else 1)


if __name__ == "__main__":
    main()
