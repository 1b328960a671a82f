"""Peer for the adapter benchmarks: Hugging Face transformers Llama + peft LoRA/DoRA + PyTorch FSDP2 (each decoder
layer and the model wrapped with fully_shard, bf16 compute, fp32 reduction), as the adapter tutorials run it.
Random weights of a preset's dimensions (no checkpoint), random tokens. Run under torchrun; prints one JSON line
with tokens/s per GPU, the step's parts and the peak memory, like the peer_fsdp2.py benchmark it sits beside.

  torchrun --standalone --nproc-per-node 1 scripts/peer_lora.py --preset llama3-8b --layers 8 --seq 4096 --batch 2
"""
import argparse
import json
import os
import time

import torch
import torch.distributed as dist
from peft import LoraConfig, get_peft_model
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from transformers import LlamaConfig, LlamaForCausalLM

DIMS = {  # hidden, intermediate, layers, heads, kv heads
    "llama3-8b": (4096, 14336, 32, 32, 8),
    "llama3-70b": (8192, 28672, 80, 64, 8),
    "llama3-405b": (16384, 53248, 126, 128, 8),
}
TARGETS = {"q": "q_proj", "k": "k_proj", "v": "v_proj", "o": "o_proj", "gate": "gate_proj", "up": "up_proj",
           "down": "down_proj"}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="llama3-8b", choices=sorted(DIMS))
    ap.add_argument("--layers", type=int, default=0)
    ap.add_argument("--seq", type=int, default=4096)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--alpha", type=float, default=32)
    ap.add_argument("--targets", default="q,k,v,o,gate,up,down")
    ap.add_argument("--dora", action="store_true")
    ap.add_argument("--ac", action="store_true", help="activation checkpointing of every layer")
    a = ap.parse_args()
    dist.init_process_group("nccl")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    H, I, L, heads, kv = DIMS[a.preset]
    cfg = LlamaConfig(vocab_size=128256, hidden_size=H, intermediate_size=I, num_hidden_layers=a.layers or L,
                      num_attention_heads=heads, num_key_value_heads=kv, max_position_embeddings=131072,
                      rope_theta=500000.0, use_cache=False)
    cfg._attn_implementation = "sdpa"
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg).to(device="cuda", dtype=torch.bfloat16)  # the frozen base in bf16
    lora = LoraConfig(r=a.rank, lora_alpha=a.alpha, target_modules=[TARGETS[t] for t in a.targets.split(",")],
                      lora_dropout=0.0, use_dora=a.dora, task_type="CAUSAL_LM")
    model = get_peft_model(model, lora)
    for p in model.parameters():  # adapters in the base's dtype (bf16)
        if p.requires_grad:
            p.data = p.data.to(torch.bfloat16)
    if a.ac:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    for layer in model.base_model.model.model.layers:
        fully_shard(layer, mp_policy=mp)
    fully_shard(model, mp_policy=mp)
    trained = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(trained, lr=1e-4, fused=True)
    n_trained = sum(p.numel() for p in trained)
    g = torch.Generator(device="cpu").manual_seed(rank)
    times, parts = [], []
    torch.cuda.reset_peak_memory_stats()
    for step in range(a.warmup + a.steps):
        x = torch.randint(0, cfg.vocab_size, (a.batch, a.seq), generator=g).cuda()
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        out = model(input_ids=x, labels=x)
        torch.cuda.synchronize()
        t1 = time.perf_counter()
        out.loss.backward()
        torch.cuda.synchronize()
        t2 = time.perf_counter()
        opt.step()
        opt.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        t3 = time.perf_counter()
        if step >= a.warmup:
            times.append(t3 - t0)
            parts.append((t1 - t0, t2 - t1, t3 - t2))
    med = sorted(times)[len(times) // 2]
    if rank == 0:
        print(json.dumps(dict(peer="hf+peft+fsdp2", preset=a.preset, layers=cfg.num_hidden_layers, world=world, seq=a.seq,
                              batch=a.batch, adapter="dora" if a.dora else "lora", rank=a.rank, ac=a.ac,
                              trained_params=n_trained, step_s=round(med, 4),
                              fwd_bwd_opt_s=[round(sorted(p[i] for p in parts)[len(parts) // 2], 4) for i in range(3)],
                              tokens_per_s_per_gpu=round(a.batch * a.seq / med, 1),
                              peak_alloc_gb=round(torch.cuda.max_memory_allocated() / 2**30, 2),
                              peak_reserved_gb=round(torch.cuda.max_memory_reserved() / 2**30, 2),
                              loss=round(out.loss.item(), 4))), flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
