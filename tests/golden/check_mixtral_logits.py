"""Compare shardlm_logits with transformers on random tiny Mixtral checkpoints.

    .venv/bin/python tests/golden/check_mixtral_logits.py --tool build/bin/shardlm_logits --seed S [--count N]
        [--workdir DIR] [--tool-args '--device cuda --dtype bf16' --logits-tol 5e-2 --loss-tol 5e-2 [--bf16-peer cuda]]

Seed S decides N random configs (4-8 experts, top-1..3, head_dim 8/16, 1-3 layers, vocab 50-300, tied or not,
output_router_logits true or false with a random router_aux_loss_coef, the per-expert layout transformers'
save_pretrained writes or the fused layout of its state_dict, config.json in the v5 or v4 form, B 1-3, T 2-20).
Each is saved to DIR/config_I/ (weights as in make_mixtral_fixtures.py) and
    TOOL --model DIR/config_I --input DIR/config_I/input.safetensors --output DIR/config_I/output.safetensors
must write logits, loss (with the aux term exactly when transformers adds it) and aux_loss. Passes when
max|ours - ref| / max|ref| < 1e-4 on the logits and |ours - ref| < 1e-5 on the loss and on the aux loss.
Prints one line per config; exits 1 if any config fails. With --bf16-peer DEVICE each line also gives transformers'
own bf16 logits on DEVICE against its fp32 reference, and ours against those: how far bf16 alone moves the model
(a router that flips a token's expert in bf16 moves both). The pass/fail bounds stay against the fp32 reference.
"""
import argparse
import os
import shutil
import sys

import torch
from safetensors.torch import load_file, save_file

from check_logits import LOGITS_TOLERANCE, LOSS_TOLERANCE, run_random_cases, run_tool
from make_llama_fixtures import random_input
from make_mixtral_fixtures import build_model, forward, save_checkpoint


def random_case(rng):
    heads = rng.choice([2, 4])
    experts = rng.randint(4, 8)
    config = dict(vocab_size=rng.randint(50, 300), hidden_size=heads * rng.randint(4, 12),
                  intermediate_size=rng.randint(8, 96), num_hidden_layers=rng.randint(1, 3), num_attention_heads=heads,
                  num_key_value_heads=rng.choice([d for d in (1, 2, 4) if heads % d == 0]), head_dim=rng.choice([8, 16]),
                  max_position_embeddings=128, rms_norm_eps=rng.choice([1e-5, 1e-6]),
                  rope_parameters={"rope_type": "default", "rope_theta": rng.choice([10000.0, 1000000.0])},
                  num_local_experts=experts, num_experts_per_tok=rng.randint(1, 3),
                  output_router_logits=rng.random() < 0.5, router_aux_loss_coef=round(rng.uniform(0.001, 0.2), 4),
                  tie_word_embeddings=rng.random() < 0.3)
    return (config, rng.choice(["per_expert", "fused"]), rng.choice(["v4", "v5"]), rng.randint(1, 3), rng.randint(2, 20),
            rng.randrange(2**31))


def relative_max_error(ours, ref):
    return ((ours - ref).abs().max() / ref.abs().max()).item()


def check_case(index, rng, args):
    config, layout, form, batch, time, seed = random_case(rng)
    keys = ["vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_local_experts",
            "num_experts_per_tok", "output_router_logits", "router_aux_loss_coef", "tie_word_embeddings"]
    line = f"[{index}] " + " ".join(f"{k}={config[k]}" for k in keys) + f" layout={layout} form={form} B={batch} T={time}"
    model_dir = os.path.join(args.workdir, f"config_{index}")
    shutil.rmtree(model_dir, ignore_errors=True)
    model = build_model(config, seed)
    input_ids = random_input(config["vocab_size"], batch, time, seed)  # [B, T]
    with torch.no_grad():
        ref_logits, ref_loss, ref_aux = forward(model, input_ids)
    save_checkpoint(model, model_dir, layout, form)
    input_path = os.path.join(model_dir, "input.safetensors")
    save_file({"input_ids": input_ids}, input_path)
    try:
        logits, loss = run_tool(args.tool, model_dir, input_path, args.tool_args.split())
        aux = load_file(os.path.join(model_dir, "output.safetensors"))["aux_loss"]
    except Exception as error:  # report and go on with the other configs
        print(f"{line}: FAIL {error}")
        return False
    logits_err = relative_max_error(logits.float(), ref_logits)
    loss_err, aux_err = abs(loss.item() - ref_loss.item()), abs(aux.item() - ref_aux.item())
    ok = logits_err < args.logits_tol and loss_err < args.loss_tol and aux_err < args.loss_tol
    peer = ""
    if args.bf16_peer:
        with torch.no_grad():
            bf16_logits = forward(model.to(device=args.bf16_peer, dtype=torch.bfloat16), input_ids.to(args.bf16_peer))[0]
        bf16_logits = bf16_logits.float().cpu()
        peer = (f" | transformers bf16 vs fp32 {relative_max_error(bf16_logits, ref_logits):.2e},"
                f" ours vs transformers bf16 {relative_max_error(logits.float(), bf16_logits):.2e}")
    print(f"{line}: logits rel err {logits_err:.2e} loss err {loss_err:.2e} aux err {aux_err:.2e} "
          f"(ref loss {ref_loss.item():.6f} aux {ref_aux.item():.6f}){peer} {'OK' if ok else 'FAIL'}")
    return ok


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tool", required=True, help="path to the shardlm_logits executable")
    parser.add_argument("--seed", type=int, required=True, help="decides every config, weight and token")
    parser.add_argument("--count", type=int, default=4, help="how many random configs to check")
    parser.add_argument("--workdir", help="where config_I/ directories go (default: a new temporary directory)")
    parser.add_argument("--tool-args", default="", help="extra tool arguments, e.g. '--device cuda --dtype bf16'")
    parser.add_argument("--logits-tol", type=float, default=LOGITS_TOLERANCE, help="bound on the logits rel err")
    parser.add_argument("--loss-tol", type=float, default=LOSS_TOLERANCE, help="bound on the loss and aux errors")
    parser.add_argument("--bf16-peer", metavar="DEVICE", help="also run transformers in bf16 on DEVICE (e.g. cuda)")
    args = parser.parse_args()
    if args.bf16_peer:  # deterministic cuBLAS (run_random_cases turns deterministic algorithms on) needs this set
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    return run_random_cases(args, check_case, "check_mixtral_")


if __name__ == "__main__":
    sys.exit(main())
