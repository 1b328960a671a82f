"""Mixtral checkpoints in the per-expert layout through shardlm's sharded load, exported in the fused layout.

    check_mixtral_roundtrip.py --launch shardlm_launch --train shardlm_train --data CORPUS --workdir DIR

Saves a tiny random Mixtral with transformers' save_pretrained (the per-expert names
block_sparse_moe.experts.E.w1/w2/w3, index-sharded into several files), then at 1 and 3 ranks of FullShard (3:
shard boundaries fall inside expert matrices) runs
    shardlm_launch --nproc-per-node N -- shardlm_train --model-dir SRC --steps 0 --export-dir OUT
(each rank reads only its shards' byte ranges of the per-expert tensors) and checks that OUT holds the fused layout
(mlp.experts.gate_up_proj, mlp.experts.down_proj, mlp.gate.weight) equal to transformers' own state, and that
transformers loads OUT and gives SRC's logits exactly.
"""
import argparse
import os
import subprocess
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "golden"))
from make_llama_fixtures import quiet_transformers, random_input  # noqa: E402
from make_mixtral_fixtures import TINY, build_model, load_checkpoint, save_checkpoint  # noqa: E402


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    for flag in ("--launch", "--train", "--data", "--workdir"):
        p.add_argument(flag, required=True)
    args = p.parse_args()
    quiet_transformers()
    src = os.path.join(args.workdir, "src")
    model = build_model(dict(TINY, vocab_size=97, num_local_experts=4, num_experts_per_tok=2), seed=31)
    save_checkpoint(model, src, "per_expert", "v5", max_shard_size="60KB")
    assert any("block_sparse_moe.experts.0.w1" in line for line in open(os.path.join(src, "model.safetensors.index.json")))
    ids = random_input(97, 2, 10, seed=31)
    with torch.no_grad():
        reference = model(input_ids=ids).logits
    state = model.state_dict()
    failures = 0
    for ranks in (1, 3):
        out = os.path.join(args.workdir, f"export_{ranks}")
        cmd = [args.launch, "--nproc-per-node", str(ranks), "--", args.train, "--model-dir", src, "--steps", "0",
               "--sharding", "full", "--data", args.data, "--seq-len", "16", "--micro-batch", "1", "--export-dir", out]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
        if proc.returncode != 0:
            print(f"{ranks} rank(s): FAIL exit {proc.returncode}\n{proc.stdout}\n{proc.stderr}")
            failures += 1
            continue
        from safetensors.torch import load_file
        exported = {}
        for f in os.listdir(out):
            if f.endswith(".safetensors"):
                exported.update(load_file(os.path.join(out, f)))
        missing = [k for k in state if k not in exported]
        differ = [k for k in state if k in exported and not torch.equal(exported[k].float(), state[k].float())]
        with torch.no_grad():
            logits = load_checkpoint(out)(input_ids=ids).logits
        ok = not missing and not differ and torch.equal(logits, reference) and "unused" not in proc.stderr
        print(f"{ranks} rank(s): {len(exported)} tensors exported (fused layout), missing {missing[:3]}, "
              f"differ {differ[:3]}, logits max diff {(logits - reference).abs().max().item():.1e} "
              f"{'OK' if ok else 'FAIL'}")
        if not ok:
            print(proc.stderr[-2000:])
        failures += not ok
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
