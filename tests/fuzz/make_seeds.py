"""Writes the fuzzer's seed corpus: small valid safetensors files (one written by the `safetensors` package)
and one file per malformed class. With --model-dirs DIR, also model directories whose index is wrong (for the
shardlm_inspect tests). Usage: make_seeds.py OUT_DIR [--model-dirs DIR]"""
import argparse
import json
import struct
from pathlib import Path


def raw(header, data: bytes) -> bytes:
    text = header if isinstance(header, str) else json.dumps(header, separators=(",", ":"))
    text = text.encode()
    return struct.pack("<Q", len(text)) + text + data


def model_dirs(root: Path) -> None:
    """valid/ (two files and a consistent index) and one directory per index problem."""
    a = {"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}
    b = {"b": {"dtype": "F16", "shape": [2, 2], "data_offsets": [0, 8]}}
    cases = {
        "valid": ({"f1.safetensors": a, "f2.safetensors": b}, {"a": "f1.safetensors", "b": "f2.safetensors"}),
        "missing_file": ({"f1.safetensors": a}, {"a": "f1.safetensors", "b": "f2.safetensors"}),
        "two_files": ({"f1.safetensors": a, "f2.safetensors": {**a, "b": dict(b["b"], data_offsets=[8, 16])}}, {"a": "f1.safetensors", "b": "f2.safetensors"}),
        "wrong_file": ({"f1.safetensors": a, "f2.safetensors": b}, {"a": "f2.safetensors", "b": "f2.safetensors"}),
        "unlisted": ({"f1.safetensors": a, "f2.safetensors": {**b, "c": dict(a["a"], data_offsets=[8, 16])}},
                     {"a": "f1.safetensors", "b": "f2.safetensors"}),
    }
    for name, (files, weight_map) in cases.items():
        d = root / name
        d.mkdir(parents=True, exist_ok=True)
        for f, header in files.items():
            (d / f).write_bytes(raw(header, bytes(max(v["data_offsets"][1] for v in header.values()))))
        (d / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": 16}, "weight_map": weight_map}))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("out")
    ap.add_argument("--model-dirs")
    args = ap.parse_args()
    out = Path(args.out)
    if args.model_dirs:
        model_dirs(Path(args.model_dirs))
    out.mkdir(parents=True, exist_ok=True)
    w = {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}
    seeds = {
        "valid_one": raw({"w": w}, bytes(8)),
        "valid_meta": raw({"__metadata__": {"format": "pt"}, "a": {"dtype": "BF16", "shape": [2, 2], "data_offsets": [0, 8]},
                           "b": {"dtype": "I64", "shape": [], "data_offsets": [8, 16]},
                           "c": {"dtype": "U8", "shape": [0, 3], "data_offsets": [16, 16]}}, bytes(16)),
        "valid_empty": raw({}, b""),
        "bad_json": raw("{not json", b""),
        "bad_array": raw("[1,2]", b""),
        "bad_dtype": raw({"w": dict(w, dtype="F33")}, bytes(8)),
        "bad_shape": raw({"w": dict(w, shape=[-2])}, bytes(8)),
        "bad_reversed": raw({"w": dict(w, shape=[0], data_offsets=[8, 0])}, bytes(8)),
        "bad_past_end": raw({"w": dict(w, shape=[4], data_offsets=[0, 16])}, bytes(8)),
        "bad_size": raw({"w": dict(w, shape=[3])}, bytes(8)),
        "bad_overflow": raw({"w": dict(w, shape=[4294967296, 4294967296, 16])}, bytes(8)),
        "valid_huge_zero": raw({"w": dict(w, shape=[4611686018427387904, 3, 0], data_offsets=[0, 0])}, b""),
        "bad_overlap": raw({"w": w, "v": dict(w, data_offsets=[4, 12])}, bytes(12)),
        "bad_hole": raw({"w": dict(w, data_offsets=[4, 12])}, bytes(12)),
        "bad_trailing": raw({"w": w}, bytes(12)),
        "bad_duplicate": raw('{"w":' + json.dumps(w) + ',"w":' + json.dumps(w) + "}", bytes(8)),
        "bad_metadata": raw({"__metadata__": {"a": 1}}, b""),
        "bad_length": struct.pack("<Q", 1 << 62) + b"{}",
        "bad_short": b"abc",
    }
    for name, data in seeds.items():
        (out / name).write_bytes(data)
    try:  # a file exactly as the reference implementation writes it
        import numpy as np
        from safetensors.numpy import save

        (out / "valid_reference").write_bytes(save({"x": np.arange(6, dtype=np.float16).reshape(2, 3),
                                                     "y": np.ones(3, dtype=np.int32)}, metadata={"format": "pt"}))
    except ImportError:
        pass
    print(f"make_seeds: {len(list(out.iterdir()))} seeds in {out}")


if __name__ == "__main__":
    main()
