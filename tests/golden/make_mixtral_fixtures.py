"""Golden fixtures for shardlm's Mixtral: tiny Hugging Face checkpoints with transformers' logits, losses and grads.

    .venv/bin/python tests/golden/make_mixtral_fixtures.py --out DIR [--variant NAME ...]

For each variant (default: all of VARIANTS) it writes DIR/NAME/ holding
  config.json, model*.safetensors  the checkpoint in one of the two layouts transformers 5 reads:
                                   per_expert  MixtralForCausalLM.save_pretrained (what it writes: the released
                                               block_sparse_moe.experts.E.w1/w2/w3 + block_sparse_moe.gate names)
                                   fused       the model's own state_dict (mlp.experts.gate_up_proj [E, 2I, C],
                                               mlp.experts.down_proj [E, C, I], mlp.gate.weight)
  input.safetensors      input_ids  int64 [B, T]
  reference.safetensors  logits     fp32 [B, T, V]
                         loss       fp32 []   transformers' loss with labels = input_ids (CE, plus
                                              router_aux_loss_coef x aux_loss when output_router_logits)
                         aux_loss   fp32 []   load_balancing_loss_func over every layer's router logits
                         grad.NAME  fp32 [...] d loss / d NAME (transformers' own names: the fused layout)
Everything is fp32 on CPU, attn_implementation="sdpa", experts_implementation="eager" (the per-expert loop:
transformers' default grouped_mm needs 16-byte strides on the CPU), a fixed seed per variant; each checkpoint is reloaded by
transformers and must give bit-identical logits. check_mixtral_logits.py imports the helpers here.
"""
import json
import os

import torch
from safetensors.torch import save_file
from transformers import MixtralConfig, MixtralForCausalLM

from make_llama_fixtures import fixture_main, random_input, rewrite_config_v4

B, T = 2, 12
TINY = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            max_position_embeddings=128, rope_parameters={"rope_type": "default", "rope_theta": 1000000.0})

# name -> (seed, MixtralConfig kwargs, layout, config.json form, max_shard_size or None)
VARIANTS = {
    "e4_top2_per_expert": (21, dict(TINY, vocab_size=97, num_local_experts=4, num_experts_per_tok=2,
                                    output_router_logits=True, router_aux_loss_coef=0.02), "per_expert", "v5", None),
    "e6_top3_fused_tied": (22, dict(TINY, vocab_size=89, num_local_experts=6, num_experts_per_tok=3,
                                    output_router_logits=True, router_aux_loss_coef=0.1, tie_word_embeddings=True),
                           "fused", "v5", None),
    "e4_top2_no_aux_v4_sharded": (23, dict(TINY, vocab_size=101, num_local_experts=4, num_experts_per_tok=2,
                                           output_router_logits=False, router_aux_loss_coef=0.05),
                                  "per_expert", "v4", "60KB"),
}


def build_model(config_kwargs, seed):
    """A random fp32 Mixtral: every parameter ~ N(0, 0.1), except norm weights = 1 + 0.1 * N(0, 1)."""
    config = MixtralConfig(**config_kwargs, attn_implementation="sdpa", experts_implementation="eager")
    torch.manual_seed(seed)
    model = MixtralForCausalLM(config).to(torch.float32).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("norm.weight"):
                param.copy_(1 + 0.1 * torch.randn_like(param))
            else:
                param.normal_(0.0, 0.1)
    return model


def save_checkpoint(model, model_dir, layout, form, max_shard_size=None):
    if layout == "per_expert":
        model.save_pretrained(model_dir, **({"max_shard_size": max_shard_size} if max_shard_size else {}))
    else:
        assert max_shard_size is None, "the fused layout is written as one file"
        os.makedirs(model_dir, exist_ok=True)
        model.config.save_pretrained(model_dir)
        state = {k: v.contiguous() for k, v in model.state_dict().items()
                 if not (k == "lm_head.weight" and model.config.tie_word_embeddings)}
        save_file(state, os.path.join(model_dir, "model.safetensors"), metadata={"format": "pt"})
    if form == "v4":
        rewrite_config_v4(model_dir)


def load_checkpoint(model_dir):
    return MixtralForCausalLM.from_pretrained(model_dir, dtype=torch.float32, attn_implementation="sdpa",
                                              experts_implementation="eager").eval()


def forward(model, input_ids):
    """(logits [B, T, V], loss [], aux_loss []) as transformers reports them with labels = input_ids: the loss
    holds router_aux_loss_coef x aux_loss only when the config's output_router_logits is true."""
    out = model(input_ids=input_ids, labels=input_ids, output_router_logits=True)  # aux_loss whatever the config
    loss = out.loss if model.config.output_router_logits else model(input_ids=input_ids, labels=input_ids).loss
    return out.logits, loss, out.aux_loss


def check_reload(model_dir, input_ids, logits):
    """The saved directory must load back into transformers and give bit-identical logits."""
    with torch.no_grad():
        reloaded, _, _ = forward(load_checkpoint(model_dir), input_ids)
    assert torch.equal(reloaded, logits), f"{model_dir}: reloaded logits differ by {(reloaded - logits).abs().max()}"


def make_variant(out_dir, name):
    seed, config_kwargs, layout, form, max_shard_size = VARIANTS[name]
    model_dir = os.path.join(out_dir, name)
    model = build_model(config_kwargs, seed)
    input_ids = random_input(model.config.vocab_size, B, T, seed)  # [B, T]
    logits, loss, aux_loss = forward(model, input_ids)
    loss.backward()
    reference = {"logits": logits.detach().contiguous(), "loss": loss.detach().contiguous(),
                 "aux_loss": aux_loss.detach().float().contiguous()}
    for param_name, param in model.named_parameters():
        reference["grad." + param_name] = param.grad.detach().contiguous()

    save_checkpoint(model, model_dir, layout, form, max_shard_size)
    save_file({"input_ids": input_ids.contiguous()}, os.path.join(model_dir, "input.safetensors"))
    save_file(reference, os.path.join(model_dir, "reference.safetensors"))
    check_reload(model_dir, input_ids, reference["logits"])
    with open(os.path.join(model_dir, "config.json")) as f:
        assert json.load(f)["model_type"] == "mixtral"
    shards = [f for f in os.listdir(model_dir) if f.startswith("model") and f.endswith(".safetensors")]
    print(f"{name}: E={model.config.num_local_experts} k={model.config.num_experts_per_tok} layout={layout} "
          f"form={form} weight_files={len(shards)} loss={loss.item():.6f} aux={aux_loss.item():.6f} "
          f"grads={len(reference) - 3} reload=identical")


def main():
    fixture_main(__doc__, VARIANTS, make_variant)


if __name__ == "__main__":
    main()
