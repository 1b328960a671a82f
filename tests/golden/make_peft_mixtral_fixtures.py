"""Golden fixtures for shardlm's adapters on Mixtral: a tiny Mixtral base, a PEFT adapter (LoRA on the attention,
the fused experts and the router through PEFT's target_parameters, or DoRA on the attention) with every weight random,
PEFT's logits, loss and adapter gradients, and the adapter after a few AdamW steps.

    .venv/bin/python tests/golden/make_peft_mixtral_fixtures.py --out DIR [--variant NAME ...]

For each variant it writes DIR/NAME/ holding
  base/                  the base model (MixtralForCausalLM.save_pretrained: the per-expert layout, or the fused
                         state_dict: make_mixtral_fixtures.save_checkpoint)
  adapter/               the adapter (PeftModel.save_pretrained: adapter_config.json, adapter_model.safetensors)
  input.safetensors      input_ids  int64 [B, T]
  reference.safetensors  logits     fp32 [B, T, V]
                         loss       fp32 []   CE with labels = input_ids + router_aux_loss_coef x aux loss
                         grad.KEY   fp32      d loss / d adapter tensor, KEY its key in adapter_model.safetensors
                         after.KEY  fp32      the tensor after STEPS steps of torch.optim.AdamW (ADAMW, no decay of
                                              vectors) on that batch
The adapter's A and B are N(0, 0.1) (PEFT would start B at zero, which leaves A without a gradient) and a DoRA
magnitude is PEFT's row norm times 1 + 0.1 N(0, 1). fp32 on CPU, sdpa attention, the experts' eager loop.
"""
import os

import torch
from peft import PeftModel, get_peft_model_state_dict
from safetensors.torch import load_file, save_file
from transformers import MixtralForCausalLM

from make_llama_fixtures import fixture_main, random_input
from make_mixtral_fixtures import TINY, build_model, save_checkpoint
from make_peft_fixtures import peft_model

B, T = 2, 12
STEPS = 3
ADAMW = dict(lr=1e-2, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)
ATTENTION = ["q_proj", "k_proj", "v_proj", "o_proj"]
BASE = dict(TINY, vocab_size=97, output_router_logits=True, router_aux_loss_coef=0.02)

# name -> (seed, Mixtral config kwargs, base layout, LoraConfig kwargs)
VARIANTS = {
    "lora_experts_router": (31, dict(BASE, num_local_experts=4, num_experts_per_tok=2), "per_expert",
                            dict(r=4, lora_alpha=8, target_modules=ATTENTION,
                                 target_parameters=["experts.gate_up_proj", "experts.down_proj", "gate.weight"])),
    "rslora_qv_down_fused": (32, dict(BASE, num_local_experts=6, num_experts_per_tok=3), "fused",
                             dict(r=8, lora_alpha=16, use_rslora=True, target_modules=["q_proj", "v_proj"],
                                  target_parameters=["experts.down_proj"])),
    "dora_attention": (33, dict(BASE, num_local_experts=4, num_experts_per_tok=2), "per_expert",
                       dict(r=4, lora_alpha=8, target_modules=ATTENTION, use_dora=True)),
}


def load_base(path):
    return MixtralForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation="sdpa",
                                              experts_implementation="eager").eval()


def saved_key(param_name):
    """The key of adapter_model.safetensors for a PEFT parameter name."""
    return param_name.replace(".default", "").replace("lora_magnitude_vector.weight", "lora_magnitude_vector")


def make_variant(out_dir, name):
    seed, config_kwargs, layout, lora_kwargs = VARIANTS[name]
    root = os.path.join(out_dir, name)
    base = build_model(config_kwargs, seed)
    save_checkpoint(base, os.path.join(root, "base"), layout, "v5")
    model = peft_model(base, lora_kwargs, seed)
    model.save_pretrained(os.path.join(root, "adapter"))
    input_ids = random_input(base.config.vocab_size, B, T, seed)  # [B, T]
    out = model(input_ids=input_ids, labels=input_ids)  # output_router_logits: the loss holds coef x aux
    out.loss.backward()
    reference = {"logits": out.logits.detach().contiguous(), "loss": out.loss.detach().contiguous()}
    saved = load_file(os.path.join(root, "adapter", "adapter_model.safetensors"))
    trained = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    for param_name, p in trained:
        key = saved_key(param_name)
        assert key in saved, f"{key} not among the saved keys {sorted(saved)}"
        reference["grad." + key] = p.grad.detach().contiguous()
    assert len(trained) == len(saved), "a saved tensor without a gradient"
    # The saved adapter reloads in PEFT with the same logits.
    reloaded = PeftModel.from_pretrained(load_base(os.path.join(root, "base")), os.path.join(root, "adapter"))
    with torch.no_grad():
        again = reloaded(input_ids=input_ids).logits
    assert torch.allclose(again, reference["logits"], rtol=0, atol=1e-6), f"{name}: reloaded adapter differs"
    # A few AdamW steps on the same batch (the gradients above are the first step's).
    # shardlm's optim::AdamW decays matrices only (a DoRA magnitude is a vector)
    groups = [{"params": [p for _, p in trained if p.dim() >= 2]},
              {"params": [p for _, p in trained if p.dim() < 2], "weight_decay": 0.0}]
    optimizer = torch.optim.AdamW(groups, **ADAMW)
    for step in range(STEPS):
        if step > 0:
            optimizer.zero_grad()
            model(input_ids=input_ids, labels=input_ids).loss.backward()
        optimizer.step()
    for key, t in get_peft_model_state_dict(model).items():
        reference["after." + key] = t.detach().contiguous()
    save_file({"input_ids": input_ids.contiguous()}, os.path.join(root, "input.safetensors"))
    save_file(reference, os.path.join(root, "reference.safetensors"))
    print(f"{name}: {lora_kwargs} base={layout} loss={out.loss.item():.6f} adapter tensors={len(saved)}")


def main():
    fixture_main(__doc__, VARIANTS, make_variant)


if __name__ == "__main__":
    main()
