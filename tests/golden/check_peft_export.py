"""shardlm's adapters in PEFT: export, resume from PEFT, merge.

    .venv/bin/python tests/golden/check_peft_export.py --fixtures DIR --train shardlm_train --logits shardlm_logits \\
        --merge shardlm_merge --launch shardlm_launch --workdir DIR

DIR holds make_peft_fixtures.py's variants (base/, adapter/, input.safetensors) and make_peft_mixtral_fixtures.py's in
DIR/mixtral. For each of lora_all, dora_rslora_qvdown (Llama) and the Mixtral variants (LoRA on the experts and router,
on the experts' down_proj alone, DoRA on the attention), shardlm_train starts from the PEFT adapter (--load-adapter) on
the base (--model-dir), trains 3 steps on 2 ranks (FullShard) on random tokens, checkpointing at step 2, and exports
the adapter (--export-adapter). Checked:
  - adapter_config.json has PEFT's fields (peft_type LORA, task_type CAUSAL_LM, r, lora_alpha, target_modules,
    target_parameters, use_dora, use_rslora, base_model_name_or_path) and adapter_model.safetensors PEFT's keys and
    shapes (those of the fixture);
  - the adapter trained (it differs from the one it started from);
  - Mixtral: a run resumed from the step-2 checkpoint exports the same adapter, bit for bit;
  - PeftModel.from_pretrained(base, exported) gives the logits of shardlm_logits --adapter (rel err < 1e-4);
  - shardlm_merge's checkpoint, loaded by transformers, gives PEFT's merge_and_unload logits (rel err < 1e-4; the
    Mixtral bases are in the per-expert layout of save_pretrained and in the fused one).
"""
import argparse
import json
import os
import pathlib
import shutil
import subprocess
import sys

import torch
from peft import PeftModel
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

TOL = 1e-4


def rel_err(a, b):
    return ((a.double() - b.double()).abs().max() / b.double().abs().max()).item()


def sh(cmd):
    p = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    if p.returncode != 0:
        sys.exit(f"FAIL: exit {p.returncode}\n$ {' '.join(map(str, cmd))}\n{p.stdout}\n{p.stderr}")
    return p.stdout + p.stderr


def base_model(path):
    moe = json.loads((pathlib.Path(path) / "config.json").read_text())["model_type"] == "mixtral"
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation="sdpa",
                                                **({"experts_implementation": "eager"} if moe else {})).eval()


def targets_of(config):
    """--lora-targets for a PEFT adapter_config.json: its target modules and (Mixtral) target parameters."""
    names = {"gate": "router", "experts.gate_up_proj": "gate_up", "experts.down_proj": "down", "gate.weight": "router"}
    modules = [names.get(t, t[: -len("_proj")]) for t in config["target_modules"]]
    return ",".join(modules + [names[t] for t in config.get("target_parameters") or []])


def check(args, variant, workdir):
    fixture = pathlib.Path(args.fixtures) / variant
    shutil.rmtree(workdir / variant, ignore_errors=True)  # a rerun starts clean (no earlier checkpoint to resume)
    start = json.loads((fixture / "adapter" / "adapter_config.json").read_text())
    kind = "dora" if start["use_dora"] else "lora"
    out = workdir / variant / "adapter"
    flags = ["--adapter", kind, "--lora-rank", start["r"], "--lora-alpha", start["lora_alpha"], "--lora-targets", targets_of(start)]
    if start["use_rslora"]:
        flags.append("--use-rslora")
    train = [args.launch, "--nproc-per-node", "2", "--", args.train, "--model-dir", fixture / "base", *flags,
             "--load-adapter", fixture / "adapter", "--data", workdir / "tokens.bin", "--seq-len", "16", "--micro-batch", "1",
             "--steps", "3", "--lr", "1e-2", "--warmup-steps", "0", "--sharding", "full", "--dist-timeout", "60"]
    moe = variant.startswith("mixtral/")
    checkpoints = workdir / variant / "checkpoints"
    sh(train + ["--export-adapter", out] + (["--checkpoint-dir", checkpoints, "--save-every", "2"] if moe else []))
    if moe:  # resumed from step 2: the same adapter at step 3
        resumed = workdir / variant / "resumed"
        sh(train + ["--export-adapter", resumed, "--checkpoint-dir", workdir / variant / "checkpoints_resumed",
                    "--resume", checkpoints / "step-00000002"])
        a, b = load_file(out / "adapter_model.safetensors"), load_file(resumed / "adapter_model.safetensors")
        if set(a) != set(b) or any(not torch.equal(a[k], b[k]) for k in a):
            sys.exit(f"FAIL {variant}: the run resumed at step 2 exported another adapter than the uninterrupted one")

    config = json.loads((out / "adapter_config.json").read_text())
    expected = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": start["r"], "lora_alpha": start["lora_alpha"],
                "use_dora": start["use_dora"], "use_rslora": start["use_rslora"],
                "base_model_name_or_path": str((fixture / "base").resolve())}
    for key, value in expected.items():
        if config.get(key) != value:
            sys.exit(f"FAIL {variant}: adapter_config.json {key} = {config.get(key)!r}, expected {value!r}")
    for field in ("target_modules", "target_parameters"):
        if sorted(config.get(field) or []) != sorted(start.get(field) or []):
            sys.exit(f"FAIL {variant}: {field} {config.get(field)} != {start.get(field)}")
    trained, initial = load_file(out / "adapter_model.safetensors"), load_file(fixture / "adapter" / "adapter_model.safetensors")
    if {(k, t.shape) for k, t in trained.items()} != {(k, t.shape) for k, t in initial.items()}:
        sys.exit(f"FAIL {variant}: keys or shapes differ from PEFT's: {sorted(set(trained) ^ set(initial))}")
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
    variants = ["lora_all", "dora_rslora_qvdown", "mixtral/lora_experts_router", "mixtral/rslora_qv_down_fused",
                "mixtral/dora_attention"]
    results = [check(args, v, workdir) for v in variants]
    if not all(results):
        sys.exit("FAIL: see above")
    print("PASS: exported adapters load in PEFT with shardlm's logits; merged checkpoints match PEFT's merge")


if __name__ == "__main__":
    main()
