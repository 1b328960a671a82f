"""Compare shardlm_logits with transformers on random tiny Llama checkpoints.

    .venv/bin/python tests/golden/check_logits.py --tool build/bin/shardlm_logits --seed S [--count N] [--workdir DIR]
    .venv/bin/python tests/golden/check_logits.py --dry-run --seed S   # no tool: checks the checkpoints reload in HF

Seed S decides N random configs (hidden size a multiple of the head count, head_dim 8/16/32 set explicitly, 2/4/8
heads with a divisor as kv heads, 1-3 layers, vocab 50-300, rope default/linear/llama3 with random factors, tied or
not, config.json in the v5 or v4 form, sometimes sharded with model.safetensors.index.json, B 1-3, T 1-20). For each
it saves a random HF Llama (weights as in make_llama_fixtures.py) to DIR/config_I/ with input.safetensors
(input_ids int64 [B, T]) and runs
    TOOL --model DIR/config_I --input DIR/config_I/input.safetensors --output DIR/config_I/output.safetensors
which must write logits (fp32 [B, T, V]) and loss (fp32 []). Passes when max|ours - ref| / max|ref| < 1e-4 on the
logits and |ours - ref| < 1e-5 on the loss (T = 1 leaves no next token: both losses must then be NaN, as in HF).
With --dry-run "ours" is transformers itself reloading DIR/config_I, and the logits must be bit-identical.
Prints one line per config; exits 1 if any config fails.
"""
import argparse
import math
import os
import random
import shutil
import subprocess
import sys
import tempfile

import torch
from safetensors.torch import load_file, save_file

from make_llama_fixtures import build_model, forward, load_checkpoint, quiet_transformers, random_input, save_checkpoint

LOGITS_TOLERANCE, LOSS_TOLERANCE = 1e-4, 1e-5


def random_rope(rng):
    rope_type = rng.choice(["default", "linear", "llama3"])
    rope = {"rope_type": rope_type, "rope_theta": rng.choice([10000.0, 500000.0])}
    if rope_type == "linear":
        rope["factor"] = round(rng.uniform(1.0, 8.0), 2)
    if rope_type == "llama3":
        low = rng.choice([1.0, 2.0])
        # small original_max_position_embeddings so that the scaling changes frequencies at these head dims
        rope.update(factor=rng.choice([2.0, 4.0, 8.0, 16.0]), low_freq_factor=low,
                    high_freq_factor=low * rng.choice([2.0, 4.0]), original_max_position_embeddings=rng.choice([4, 8, 16, 32]))
    return rope


def random_case(rng):
    """(LlamaConfig kwargs, config.json form, whether sharded, B, T, torch seed) drawn from rng."""
    heads = rng.choice([2, 4, 8])
    config = dict(vocab_size=rng.randint(50, 300), hidden_size=heads * rng.randint(4, 16),
                  intermediate_size=rng.randint(16, 192), num_hidden_layers=rng.randint(1, 3),
                  num_attention_heads=heads, num_key_value_heads=rng.choice([d for d in (1, 2, 4, 8) if heads % d == 0]),
                  head_dim=rng.choice([8, 16, 32]), rms_norm_eps=rng.choice([1e-5, 1e-6]), max_position_embeddings=128,
                  rope_parameters=random_rope(rng), tie_word_embeddings=rng.random() < 0.5)
    return config, rng.choice(["v4", "v5"]), rng.random() < 0.4, rng.randint(1, 3), rng.randint(1, 20), rng.randrange(2**31)


def summary(config, form, sharded, batch, time):
    rope = config["rope_parameters"]
    rope_text = rope["rope_type"] + "".join(f",{k}={v}" for k, v in rope.items() if k != "rope_type")
    return (f"V={config['vocab_size']} C={config['hidden_size']} I={config['intermediate_size']} "
            f"L={config['num_hidden_layers']} heads={config['num_attention_heads']}/{config['num_key_value_heads']} "
            f"head_dim={config['head_dim']} rope={rope_text} tied={config['tie_word_embeddings']} form={form} "
            f"sharded={sharded} B={batch} T={time}")


def run_tool(tool, model_dir, input_path, extra_args=()):
    """(logits, loss) from the shardlm tool, or raises RuntimeError with its stderr."""
    output_path = os.path.join(model_dir, "output.safetensors")
    proc = subprocess.run([tool, "--model", model_dir, "--input", input_path, "--output", output_path, *extra_args],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{tool} exited with {proc.returncode}:\n{proc.stderr.strip()}")
    out = load_file(output_path)
    return out["logits"], out["loss"]


def loss_error(ours, ref):
    if math.isnan(ref) and math.isnan(ours):
        return 0.0
    return abs(ours - ref)  # NaN when only one side is NaN: fails the comparison below


def check_case(index, rng, args):
    config, form, sharded, batch, time, seed = random_case(rng)
    line = f"[{index}] {summary(config, form, sharded, batch, time)}"
    model_dir = os.path.join(args.workdir, f"config_{index}")
    shutil.rmtree(model_dir, ignore_errors=True)  # a stale shard from an earlier run would be loaded too

    model = build_model(config, seed)
    input_ids = random_input(config["vocab_size"], batch, time, seed)  # [B, T]
    with torch.no_grad():
        ref_logits, ref_loss = forward(model, input_ids)  # [B, T, V], []
    size = sum(p.numel() * p.element_size() for p in model.state_dict().values())
    save_checkpoint(model, model_dir, form, max_shard_size=size // 3 if sharded else None)
    input_path = os.path.join(model_dir, "input.safetensors")
    save_file({"input_ids": input_ids}, input_path)

    try:
        if args.dry_run:
            with torch.no_grad():
                logits, loss = forward(load_checkpoint(model_dir), load_file(input_path)["input_ids"])
        else:
            logits, loss = run_tool(args.tool, model_dir, input_path, args.tool_args.split())
    except Exception as error:  # report and go on with the other configs
        print(f"{line}: FAIL {error}")
        return False
    if logits.shape != ref_logits.shape or loss.shape != ():
        print(f"{line}: FAIL logits {list(logits.shape)} (expected {list(ref_logits.shape)}), "
              f"loss {list(loss.shape)} (expected [])")
        return False

    logits_err = ((logits.float() - ref_logits).abs().max() / ref_logits.abs().max()).item()
    loss_err = loss_error(loss.item(), ref_loss.item())
    if args.dry_run:
        ok = torch.equal(logits, ref_logits) and loss_err == 0.0
    else:
        ok = logits_err < args.logits_tol and loss_err < args.loss_tol
    print(f"{line}: logits rel err {logits_err:.2e} loss err {loss_err:.2e} (ref loss {ref_loss.item():.6f}) "
          f"{'OK' if ok else 'FAIL'}")
    return ok


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tool", help="path to the shardlm_logits executable")
    parser.add_argument("--seed", type=int, required=True, help="decides every config, weight and token")
    parser.add_argument("--count", type=int, default=3, help="how many random configs to check")
    parser.add_argument("--workdir", help="where config_I/ directories go (default: a new temporary directory)")
    parser.add_argument("--dry-run", action="store_true", help="skip the tool; check that HF reloads each checkpoint")
    parser.add_argument("--tool-args", default="", help="extra tool arguments, e.g. '--device cuda --dtype bf16'")
    parser.add_argument("--logits-tol", type=float, default=LOGITS_TOLERANCE, help="bound on the logits rel err")
    parser.add_argument("--loss-tol", type=float, default=LOSS_TOLERANCE, help="bound on the absolute loss error")
    args = parser.parse_args()
    if not args.dry_run and not args.tool:
        parser.error("--tool is required unless --dry-run is given")
    return run_random_cases(args, check_case, "check_logits_")


def run_random_cases(args, check_case, prefix):
    """Runs check_case(i, rng, args) for --count random configs drawn from --seed in --workdir (a new temporary
    directory when not given); prints the summary; returns the exit status."""
    args.workdir = args.workdir or tempfile.mkdtemp(prefix=prefix)
    os.makedirs(args.workdir, exist_ok=True)
    quiet_transformers()
    torch.use_deterministic_algorithms(True)
    rng = random.Random(args.seed)
    failures = sum(not check_case(i, rng, args) for i in range(args.count))
    print(f"{args.count - failures}/{args.count} configs passed (seed {args.seed}, checkpoints in {args.workdir})")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
