#!/usr/bin/env python3
"""Sharded training gives the same run at every world size.

Trains the same tiny Llama with the same seed, data and global batch at several (ranks x grad-accum) splits,
each under shardlm_launch, and compares every split with one reference run (1 rank, --sharding none): the
losses of every step and the final parameters must agree within --tol (relative: max|a-b| / max|b| per tensor).

  check_equivalence.py --launch build/bin/shardlm_launch --train build/bin/shardlm_train --sharding full \
      --splits 1x4,2x2,4x1 --workdir /tmp/eq

With --hf-tied the runs start from a tiny Hugging Face checkpoint made here by transformers, with the LM head tied
to the embedding (the head unit reads the embedding unit's parameters), instead of the llama3-debug preset.
With --adapter lora|dora every run trains that adapter on the frozen base, and the adapters exported with
--export-adapter (PEFT format) are compared instead of the full weights.
With --masked the data is a token file with a loss mask that leaves runs of targets out (as shardlm_tokenize's
prompts), and every run also evaluates a --eval-fraction split every 2 steps: the losses (normalised by the kept
targets of the global batch) and the eval losses must agree too.
With --preset mixtral-debug the model is a tiny Mixtral (the MoE blocks' router losses pooled over layers through
the engine's side outputs; the logged loss holds router_aux_loss_coef x aux); the aux losses are compared with the
losses. With --grad-norm-tol the gradient norms of every step must agree within it too (relative).
"""
import argparse
import json
import os
import pathlib
import subprocess
import sys
import time

import numpy as np
from safetensors.torch import load_file

CORPUS = "".join(f"the quick brown fox jumps over the lazy dog {i % 7}. shardlm {i % 5}!\n" for i in range(400))


def make_tied_checkpoint(path):
    """A tiny random Llama (GQA, tied embeddings) saved as transformers saves it."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(3)
    config = LlamaConfig(vocab_size=384, hidden_size=96, intermediate_size=160, num_hidden_layers=2,
                         num_attention_heads=6, num_key_value_heads=2, max_position_embeddings=128,
                         tie_word_embeddings=True)
    LlamaForCausalLM(config).save_pretrained(path)


def run(args, workdir, tag, ranks, accum, sharding, extra):
    """One run under shardlm_launch; returns (losses, final weights, seconds)."""
    metrics, weights = workdir / f"{tag}.jsonl", workdir / f"{tag}.safetensors"
    save = ["--save-final", str(weights)]
    if args.adapter != "none":
        weights = workdir / f"{tag}_adapter" / "adapter_model.safetensors"
        save = ["--adapter", args.adapter, "--lora-rank", "4", "--lora-alpha", "8", "--export-adapter", str(weights.parent)]
    data = ["--data", str(workdir / "corpus.bin"), "--eval-fraction", "0.1", "--eval-every", "2"] if args.masked \
        else ["--data", str(workdir / "corpus.txt")]
    model = ["--model-dir", str(workdir / "tied")] if args.hf_tied else ["--preset", args.preset, "--layers", "2"]
    cmd = [args.launch, "--nproc-per-node", str(ranks), "--", args.train, "--sharding", sharding,
           *data, *model, "--seq-len", "32",
           "--micro-batch", str(args.micro_batch), "--grad-accum", str(accum), "--steps", str(args.steps),
           "--lr", "1e-3", "--warmup-steps", "1", "--seed", "7", "--dist-timeout", "60",
           "--metrics", str(metrics), *save, *args.train_args.split(), *extra]
    start = time.time()
    # One thread per rank in every run (the launcher's default for several ranks), so that kernels reduce in the
    # same order everywhere and only the cross-rank summation differs.
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    if p.returncode != 0:
        sys.exit(f"FAIL {tag}: exit {p.returncode}\n$ {' '.join(cmd)}\n{p.stdout}\n{p.stderr}")
    rows = [json.loads(line) for line in metrics.read_text().splitlines()]
    losses = [r["loss"] for r in rows] + [r["eval_loss"] for r in rows if "eval_loss" in r] + \
        [r["aux_loss"] for r in rows if "aux_loss" in r]
    norms = [r["grad_norm"] for r in rows]
    if len(rows) != args.steps:
        sys.exit(f"FAIL {tag}: {len(rows)} metric rows, expected {args.steps}")
    tensors = {name: t.float().numpy() for name, t in load_file(str(weights)).items()}  # bf16 too
    return losses, norms, tensors, time.time() - start


def rel_err(a, b):
    a, b = a.astype(np.float64), b.astype(np.float64)
    return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-30))


def parser():
    """The command line; run() reads the parsed arguments (check_matrix.py parses its own through this)."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--launch", required=True)
    ap.add_argument("--train", required=True)
    ap.add_argument("--sharding", required=True, choices=["none", "grad-op", "full", "hybrid"])
    ap.add_argument("--splits", default="1x4,2x2,4x1", help="RANKSxGRAD_ACCUM,... (the same global batch)")
    ap.add_argument("--shard-group-size", type=int, default=0, help="hybrid: ranks per shard group")
    ap.add_argument("--micro-batch", type=int, default=1)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--tol", type=float, default=1e-5)
    ap.add_argument("--weight-tol", type=float, default=None, help="for the final parameters (default: --tol)")
    ap.add_argument("--grad-norm-tol", type=float, default=None, help="compare the gradient norms too, within this")
    ap.add_argument("--train-args", default="", help="more trainer flags for every run (e.g. '--device cuda')")
    ap.add_argument("--test-args", default="", help="more trainer flags for the runs checked, not the reference "
                    "(e.g. '--offload cpu')")
    ap.add_argument("--preset", default="llama3-debug", help="the model when not --hf-tied (llama3-debug, mixtral-debug)")
    ap.add_argument("--hf-tied", action="store_true", help="start from a tied-embedding HF checkpoint made here")
    ap.add_argument("--adapter", default="none", choices=["none", "lora", "dora"],
                    help="train this adapter on the frozen base and compare the exported adapters")
    ap.add_argument("--masked", action="store_true", help="a .bin token file with a loss mask, and evaluation")
    ap.add_argument("--workdir", required=True)
    return ap


def main():
    args = parser().parse_args()
    workdir = pathlib.Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / "corpus.txt").write_text(CORPUS)
    tokens = np.frombuffer(CORPUS.encode(), dtype=np.uint8)
    tokens.astype("<u4").tofile(workdir / "corpus.bin")
    ((np.arange(len(tokens)) // 13) % 3 != 0).astype(np.uint8).tofile(workdir / "corpus.mask")
    if args.hf_tied:
        make_tied_checkpoint(workdir / "tied")
    splits = [tuple(int(v) for v in s.split("x")) for s in args.splits.split(",")]
    global_batches = {r * a for r, a in splits}
    if len(global_batches) != 1:
        sys.exit(f"--splits {args.splits}: the splits must share one global batch (ranks x grad-accum)")
    accum = global_batches.pop()

    ref_losses, ref_norms, ref_weights, secs = run(args, workdir, "reference", 1, accum, "none", [])
    print(f"reference: 1 rank x grad-accum {accum}, --sharding none: losses {['%.6f' % v for v in ref_losses]} ({secs:.1f} s)")
    failed = False
    for ranks, a in splits:
        extra = ["--shard-group-size", str(args.shard_group_size)] if args.shard_group_size and ranks > 1 else []
        extra += args.test_args.split()
        tag = f"{args.sharding}_{ranks}x{a}"
        losses, norms, weights, secs = run(args, workdir, tag, ranks, a, args.sharding, extra)
        loss_err = max(abs(x - y) / abs(y) for x, y in zip(losses, ref_losses))
        norm_err = max(abs(x - y) / abs(y) for x, y in zip(norms, ref_norms))
        if set(weights) != set(ref_weights):
            sys.exit(f"FAIL {tag}: saved tensors differ from the reference: {sorted(set(weights) ^ set(ref_weights))}")
        worst_name, worst = max(((n, rel_err(weights[n], ref_weights[n])) for n in ref_weights), key=lambda t: t[1])
        weight_tol = args.tol if args.weight_tol is None else args.weight_tol
        ok = loss_err <= args.tol and worst <= weight_tol and (args.grad_norm_tol is None or norm_err <= args.grad_norm_tol)
        failed |= not ok
        print(f"{'ok  ' if ok else 'FAIL'} {tag:>14}: loss rel err {loss_err:.2e}, grad norm rel err {norm_err:.2e}, "
              f"worst parameter rel err {worst:.2e} "
              f"({worst_name}), {len(weights)} tensors, {secs:.1f} s")
    if failed:
        sys.exit(f"FAIL: --sharding {args.sharding} differs from the reference by more than {args.tol}")
    print(f"PASS: --sharding {args.sharding} matches the reference within {args.tol}"
          f"{'' if args.weight_tol is None else f' (parameters {args.weight_tol})'} at splits {args.splits}")


if __name__ == "__main__":
    main()
