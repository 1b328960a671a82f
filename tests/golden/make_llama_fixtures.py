"""Golden fixtures for shardlm's Llama: tiny Hugging Face checkpoints with transformers' logits, loss and grads.

    .venv/bin/python tests/golden/make_llama_fixtures.py --out DIR [--variant NAME ...]

For each variant (default: all of VARIANTS) it writes DIR/NAME/ holding
  config.json, generation_config.json, model*.safetensors  LlamaForCausalLM.save_pretrained (config.json in the
                                                           v5 form, or rewritten into the v4 form transformers 4.x wrote)
  input.safetensors      input_ids  int64 [B, T]   random tokens
  reference.safetensors  logits     fp32 [B, T, V]
                         loss       fp32 []        transformers' loss with labels = input_ids
                         grad.NAME  fp32 [...]     d loss / d NAME for every NAME in model.named_parameters()
Everything is fp32 on CPU with attn_implementation="sdpa" and a fixed seed per variant, so reruns are byte-identical.
check_logits.py imports the helpers here (random model, v4 rewrite, reload check).
"""
import argparse
import json
import os

import torch
import transformers
from safetensors.torch import save_file
from transformers import LlamaConfig, LlamaForCausalLM

B, T = 2, 12
LLAMA3_ROPE = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 16}  # small: scaling bites at head_dim 16
TINY = dict(hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4,
            max_position_embeddings=128)

# name -> (seed, LlamaConfig kwargs, config.json form, max_shard_size or None)
VARIANTS = {
    "gqa_llama3_untied_v5": (11, dict(TINY, vocab_size=97, num_key_value_heads=2, rope_parameters=LLAMA3_ROPE,
                                      tie_word_embeddings=False), "v5", None),
    "mha_default_tied_v4": (12, dict(TINY, vocab_size=113, num_key_value_heads=4, tie_word_embeddings=True,
                                     rope_parameters={"rope_type": "default", "rope_theta": 10000.0}), "v4", None),
    "gqa_llama3_v4_sharded": (13, dict(TINY, vocab_size=131, num_key_value_heads=2, rope_parameters=LLAMA3_ROPE,
                                       tie_word_embeddings=False), "v4", "100KB"),
    "bias_linear_headdim_v5": (14, dict(TINY, vocab_size=101, num_key_value_heads=2, head_dim=24, attention_bias=True,
                                        mlp_bias=True, tie_word_embeddings=False,
                                        rope_parameters={"rope_type": "linear", "rope_theta": 10000.0, "factor": 2.0}),
                               "v5", None),
}


def quiet_transformers():
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()


def build_model(config_kwargs, seed):
    """A random fp32 Llama: every parameter ~ N(0, 0.1), except norm weights = 1 + 0.1 * N(0, 1)."""
    config = LlamaConfig(**config_kwargs, attn_implementation="sdpa")
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).to(torch.float32).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("norm.weight"):
                param.copy_(1 + 0.1 * torch.randn_like(param))
            else:
                param.normal_(0.0, 0.1)
    return model


def rewrite_config_v4(model_dir):
    """Turn the v5 config.json into the form transformers 4.x wrote: top-level rope_theta, rope_scaling, torch_dtype."""
    path = os.path.join(model_dir, "config.json")
    with open(path) as f:
        config = json.load(f)
    rope = dict(config.pop("rope_parameters"))
    config["rope_theta"] = rope.pop("rope_theta")
    config["rope_scaling"] = None if rope["rope_type"] == "default" else rope
    if "dtype" in config:
        config["torch_dtype"] = config.pop("dtype")
    with open(path, "w") as f:
        json.dump(config, f, indent=2, sort_keys=True)
        f.write("\n")


def save_checkpoint(model, model_dir, form, max_shard_size=None):
    kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(model_dir, **kwargs)
    if form == "v4":
        rewrite_config_v4(model_dir)


def load_checkpoint(model_dir):
    return LlamaForCausalLM.from_pretrained(model_dir, dtype=torch.float32, attn_implementation="sdpa").eval()


def forward(model, input_ids):
    """(logits fp32 [B, T, V], loss fp32 []) as transformers computes them with labels = input_ids."""
    out = model(input_ids=input_ids, labels=input_ids)
    return out.logits, out.loss


def check_reload(model_dir, input_ids, logits):
    """The saved directory must load back into transformers and give bit-identical logits."""
    with torch.no_grad():
        reloaded, _ = forward(load_checkpoint(model_dir), input_ids)
    assert torch.equal(reloaded, logits), f"{model_dir}: reloaded logits differ by {(reloaded - logits).abs().max()}"


def random_input(vocab_size, batch, time, seed):
    return torch.randint(vocab_size, (batch, time), generator=torch.Generator().manual_seed(seed))  # [B, T]


def make_variant(out_dir, name):
    seed, config_kwargs, form, max_shard_size = VARIANTS[name]
    model_dir = os.path.join(out_dir, name)
    model = build_model(config_kwargs, seed)
    input_ids = random_input(model.config.vocab_size, B, T, seed)  # [B, T]
    logits, loss = forward(model, input_ids)  # [B, T, V], []
    loss.backward()
    reference = {"logits": logits.detach().contiguous(), "loss": loss.detach().contiguous()}
    for param_name, param in model.named_parameters():  # tied lm_head is not listed: its grad is in embed_tokens
        reference["grad." + param_name] = param.grad.detach().contiguous()

    save_checkpoint(model, model_dir, form, max_shard_size)
    save_file({"input_ids": input_ids.contiguous()}, os.path.join(model_dir, "input.safetensors"))
    save_file(reference, os.path.join(model_dir, "reference.safetensors"))
    check_reload(model_dir, input_ids, reference["logits"])

    shards = [f for f in os.listdir(model_dir) if f.startswith("model") and f.endswith(".safetensors")]
    print(f"{name}: V={model.config.vocab_size} heads={model.config.num_attention_heads}/"
          f"{model.config.num_key_value_heads} head_dim={model.config.head_dim} "
          f"rope={model.config.rope_parameters['rope_type']} tied={model.config.tie_word_embeddings} form={form} "
          f"weight_files={len(shards)} loss={loss.item():.6f} grads={len(reference) - 2} reload=identical")


def fixture_main(doc, variants, make):
    """The command line of a fixture script: --out DIR, --variant NAME (repeatable; default every variant)."""
    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    parser.add_argument("--out", required=True, help="directory to write one subdirectory per variant into")
    parser.add_argument("--variant", action="append", choices=sorted(variants), help="variant to make (default: all)")
    args = parser.parse_args()
    quiet_transformers()
    torch.use_deterministic_algorithms(True)
    for name in args.variant or variants:
        make(args.out, name)


def main():
    fixture_main(__doc__, VARIANTS, make_variant)


if __name__ == "__main__":
    main()
