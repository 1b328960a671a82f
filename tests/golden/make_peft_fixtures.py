"""Golden fixtures for shardlm's LoRA and DoRA: a tiny Llama base, a PEFT adapter with every weight random, and
PEFT's logits, loss and adapter gradients.

    .venv/bin/python tests/golden/make_peft_fixtures.py --out DIR [--variant NAME ...]

For each variant it writes DIR/NAME/ holding
  base/                  the base model (LlamaForCausalLM.save_pretrained)
  adapter/               the adapter (PeftModel.save_pretrained: adapter_config.json, adapter_model.safetensors)
  input.safetensors      input_ids  int64 [B, T]
  reference.safetensors  logits     fp32 [B, T, V]
                         loss       fp32 []   with labels = input_ids
                         grad.KEY   fp32      d loss / d adapter tensor, KEY its key in adapter_model.safetensors
The adapter's A and B are N(0, 0.1) (PEFT would start B at zero, which leaves A without a gradient) and a DoRA
magnitude is PEFT's row norm times 1 + 0.1 N(0, 1), so that every gradient is exercised. fp32 on CPU, sdpa attention.
"""
import argparse
import os

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file, save_file

from make_llama_fixtures import LLAMA3_ROPE, TINY, build_model, quiet_transformers, random_input

B, T = 2, 12
ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
BASE = dict(TINY, vocab_size=97, num_key_value_heads=2, rope_parameters=LLAMA3_ROPE, tie_word_embeddings=False)

# name -> (seed, LoraConfig kwargs)
VARIANTS = {
    "lora_all": (21, dict(r=4, lora_alpha=8, target_modules=ALL)),
    "dora_rslora_qvdown": (22, dict(r=4, lora_alpha=16, target_modules=["q_proj", "v_proj", "down_proj"], use_dora=True,
                                    use_rslora=True)),
    "dora_all": (23, dict(r=8, lora_alpha=4, target_modules=ALL, use_dora=True)),
}


def peft_model(base, lora_kwargs, seed):
    model = get_peft_model(base, LoraConfig(task_type="CAUSAL_LM", init_lora_weights=False, lora_dropout=0.0, **lora_kwargs))
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_A" in name or "lora_B" in name:
                p.copy_(0.1 * torch.randn(p.shape, generator=gen))
        for name, p in model.named_parameters():  # after A and B: the norm PEFT takes includes s B A
            if "lora_magnitude_vector" in name:
                p.mul_(1 + 0.1 * torch.randn(p.shape, generator=gen))
    return model


def make_variant(out_dir, name):
    seed, lora_kwargs = VARIANTS[name]
    root = os.path.join(out_dir, name)
    base = build_model(BASE, seed)
    base.save_pretrained(os.path.join(root, "base"))
    model = peft_model(base, lora_kwargs, seed)
    model.save_pretrained(os.path.join(root, "adapter"))
    input_ids = random_input(base.config.vocab_size, B, T, seed)  # [B, T]
    out = model(input_ids=input_ids, labels=input_ids)
    out.loss.backward()
    reference = {"logits": out.logits.detach().contiguous(), "loss": out.loss.detach().contiguous()}
    saved = load_file(os.path.join(root, "adapter", "adapter_model.safetensors"))
    for param_name, p in model.named_parameters():
        if p.requires_grad:
            key = param_name.replace(".default", "").replace("lora_magnitude_vector.weight", "lora_magnitude_vector")
            assert key in saved, f"{key} not among the saved keys"
            reference["grad." + key] = p.grad.detach().contiguous()
    assert len(reference) - 2 == len(saved), "a saved tensor without a gradient"
    save_file({"input_ids": input_ids.contiguous()}, os.path.join(root, "input.safetensors"))
    save_file(reference, os.path.join(root, "reference.safetensors"))
    # The saved adapter reloads in PEFT with the same logits.
    reloaded = PeftModel.from_pretrained(build_model(BASE, seed), os.path.join(root, "adapter"))
    with torch.no_grad():
        again = reloaded(input_ids=input_ids).logits
    assert torch.allclose(again, reference["logits"], rtol=0, atol=1e-6), f"{name}: reloaded adapter differs"
    print(f"{name}: {lora_kwargs} loss={out.loss.item():.6f} adapter tensors={len(saved)}")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--variant", action="append", choices=sorted(VARIANTS))
    args = parser.parse_args()
    quiet_transformers()
    torch.use_deterministic_algorithms(True)
    for name in args.variant or VARIANTS:
        make_variant(args.out, name)


if __name__ == "__main__":
    main()
