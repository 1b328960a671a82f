"""Writes the malformed inputs of the hardening tests (tests/hardening/CMakeLists.txt) into OUT: model directories
whose config.json is wrong in one way each, an empty input_ids file, a deeply nested tokenizer.json, and paths that
are directories where a file belongs (or files where a directory belongs). Usage: make_inputs.py OUT"""
import json
import struct
import sys
from pathlib import Path

GOOD = {"model_type": "llama", "vocab_size": 512, "hidden_size": 128, "intermediate_size": 384,
        "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0, "tie_word_embeddings": False}


def model_dir(path: Path, **changes) -> None:
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps({**GOOD, **changes}))


def main() -> None:
    out = Path(sys.argv[1])
    out.mkdir(parents=True, exist_ok=True)
    # config.json: a float where an integer belongs, an integer past any model, a string, sizes whose product is absurd
    model_dir(out / "config_float", hidden_size=128.5)
    model_dir(out / "config_huge_vocab", vocab_size=10**12)
    model_dir(out / "config_string", num_key_value_heads="2")
    model_dir(out / "config_absurd", hidden_size=1 << 20, intermediate_size=1 << 22, num_hidden_layers=1 << 14,
              num_attention_heads=1 << 14, num_key_value_heads=1 << 14, head_dim=64)
    # within every limit, but 2.2e12 parameters: more than any host here holds (an index naming no tensor, so that
    # the checkpoint opens and the whole-model load reaches its memory check)
    model_dir(out / "model_too_big", vocab_size=1 << 24, hidden_size=1 << 16, num_attention_heads=1 << 10,
              num_key_value_heads=1 << 10)
    (out / "model_too_big" / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {}}))
    # a model directory whose config.json is a directory
    (out / "config_is_dir" / "config.json").mkdir(parents=True, exist_ok=True)
    # input_ids of shape [0, 4], and a valid [1, 4]
    for name, shape, ids in (("empty_ids", [0, 4], []), ("ids", [1, 4], [1, 2, 3, 4])):
        header = json.dumps({"input_ids": {"dtype": "I64", "shape": shape, "data_offsets": [0, 8 * len(ids)]}}).encode()
        header += b" " * ((8 - len(header) % 8) % 8)
        data = struct.pack(f"<{len(ids)}q", *ids)
        (out / f"{name}.safetensors").write_bytes(struct.pack("<Q", len(header)) + header + data)
    # a tokenizer.json nested 100000 levels deep (what took gigabytes before failing, in small)
    (out / "deep_tokenizer.json").write_text("[" * 100000 + "]" * 100000)
    # a directory where a file belongs, a file where a directory belongs
    (out / "a_directory.bin").mkdir(exist_ok=True)
    (out / "a_file").write_text("not a directory\n")
    # a committed checkpoint whose meta.json is a directory
    (out / "ckpt" / "step-00000001" / "meta.json").mkdir(parents=True, exist_ok=True)
    (out / "ckpt" / "step-00000001" / "COMMITTED").write_text("")
    print(f"make_inputs: inputs in {out}")


if __name__ == "__main__":
    main()
