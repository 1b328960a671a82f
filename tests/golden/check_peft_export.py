"""shardlm's adapters in PEFT: export, resume from PEFT, merge.

    .venv/bin/python tests/golden/check_peft_export.py --fixtures DIR --train shardlm_train --logits shardlm_logits \\
        --merge shardlm_merge --launch shardlm_launch --workdir DIR

DIR holds make_peft_fixtures.py's variants (base/, adapter/, input.safetensors). For each of lora_all and
dora_rslora_qvdown, shardlm_train starts from the PEFT adapter (--load-adapter) on the base (--model-dir), trains 3
steps on 2 ranks (FullShard) on random tokens and exports the adapter (--export-adapter). Checked:
  - adapter_config.json has PEFT's fields (peft_type LORA, task_type CAUSAL_LM, r, lora_alpha, target_modules, use_dora,
    use_rslora, base_model_name_or_path) and adapter_model.safetensors PEFT's keys (those of the fixture);
  - the adapter trained (it differs from the one it started from);
  - PeftModel.from_pretrained(base, exported) gives the logits of shardlm_logits --adapter (rel err < 1e-4);
  - shardlm_merge's checkpoint, loaded by transformers, gives PEFT's merge_and_unload logits (rel err < 1e-4).
"""
import argparse
import json
import os
import pathlib
import subprocess
import sys

import torch
from peft import PeftModel
from safetensors.torch import load_file, save_file
from transformers import LlamaForCausalLM

TOL = 1e-4


def rel_err(a, b):
    return ((a.double() - b.double()).abs().max() / b.double().abs().max()).item()


def sh(cmd):
    p = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    if p.returncode != 0:
        sys.exit(f"FAIL: exit {p.returncode}\n$ {' '.join(map(str, cmd))}\n{p.stdout}\n{p.stderr}")
    return p.stdout + p.stderr


def base_model(path):
    return LlamaForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation="sdpa").eval()


def check(args, variant, workdir):
    fixture = pathlib.Path(args.fixtures) / variant
    start = json.loads((fixture / "adapter" / "adapter_config.json").read_text())
    kind = "dora" if start["use_dora"] else "lora"
    targets = ",".join(t[: -len("_proj")] for t in start["target_modules"])
    out = workdir / variant / "adapter"
    flags = ["--adapter", kind, "--lora-rank", start["r"], "--lora-alpha", start["lora_alpha"], "--lora-targets", targets]
    if start["use_rslora"]:
        flags.append("--use-rslora")
    sh([args.launch, "--nproc-per-node", "2", "--", args.train, "--model-dir", fixture / "base", *flags,
        "--load-adapter", fixture / "adapter", "--data", workdir / "tokens.bin", "--seq-len", "16", "--micro-batch", "1", "--steps", "3",
        "--lr", "1e-2", "--warmup-steps", "0", "--sharding", "full", "--export-adapter", out, "--dist-timeout", "60"])

    config = json.loads((out / "adapter_config.json").read_text())
    expected = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": start["r"], "lora_alpha": start["lora_alpha"],
                "use_dora": start["use_dora"], "use_rslora": start["use_rslora"],
                "base_model_name_or_path": str((fixture / "base").resolve())}
    for key, value in expected.items():
        if config.get(key) != value:
            sys.exit(f"FAIL {variant}: adapter_config.json {key} = {config.get(key)!r}, expected {value!r}")
    if sorted(config["target_modules"]) != sorted(start["target_modules"]):
        sys.exit(f"FAIL {variant}: target_modules {config['target_modules']} != {start['target_modules']}")
    trained, initial = load_file(out / "adapter_model.safetensors"), load_file(fixture / "adapter" / "adapter_model.safetensors")
    if set(trained) != set(initial):
        sys.exit(f"FAIL {variant}: keys differ from PEFT's: {sorted(set(trained) ^ set(initial))}")
    moved = max(rel_err(trained[k], initial[k]) for k in trained)
    if moved < 1e-4:
        sys.exit(f"FAIL {variant}: the exported adapter equals the one it started from (max rel change {moved:.2e})")

    ids = load_file(fixture / "input.safetensors")["input_ids"]
    peft = PeftModel.from_pretrained(base_model(fixture / "base"), out).eval()
    with torch.no_grad():
        peft_logits = peft(input_ids=ids).logits
    sh([args.logits, "--model", fixture / "base", "--adapter", out, "--input", fixture / "input.safetensors",
        "--output", workdir / variant / "logits.safetensors"])
    ours = load_file(workdir / variant / "logits.safetensors")["logits"]
    e_logits = rel_err(ours, peft_logits)

    merged_dir = workdir / variant / "merged"
    sh([args.merge, "--base", fixture / "base", "--adapter", out, "--out", merged_dir])
    with torch.no_grad():
        merged = base_model(merged_dir)(input_ids=ids).logits
        peft_merged = peft.merge_and_unload()(input_ids=ids).logits
    e_merge = rel_err(merged, peft_merged)
    ok = e_logits < TOL and e_merge < TOL
    print(f"{'ok  ' if ok else 'FAIL'} {variant}: {len(trained)} PEFT keys, adapter moved {moved:.2e}; logits vs PEFT "
          f"rel err {e_logits:.2e}; merged checkpoint vs PEFT merge_and_unload rel err {e_merge:.2e}")
    return ok


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    for flag in ("fixtures", "train", "logits", "merge", "launch", "workdir"):
        ap.add_argument("--" + flag, required=True)
    args = ap.parse_args()
    workdir = pathlib.Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    # random tokens of the fixtures' vocabulary (97), as --data reads them: uint32
    torch.randint(97, (4096,), generator=torch.Generator().manual_seed(5)).to(torch.int32).numpy().tofile(workdir / "tokens.bin")
    results = [check(args, v, workdir) for v in ("lora_all", "dora_rslora_qvdown")]
    if not all(results):
        sys.exit("FAIL: see above")
    print("PASS: exported adapters load in PEFT with shardlm's logits; merged checkpoints match PEFT's merge")


if __name__ == "__main__":
    main()
