"""Hugging Face checkpoints through shardlm's sharded load and export, byte for byte.

    check_hf_roundtrip.py --launch shardlm_launch --train shardlm_train --inspect shardlm_inspect --data CORPUS
                          --workdir DIR

Makes tiny random Llama checkpoints with transformers (fp32 index-sharded with a v4 config, bf16 tied and
index-sharded, fp16 with biases in one file), then for each and each world size (1, 2 and 3 ranks of FullShard,
and 2 ranks of NoShard, two replicas of the whole model) runs
    shardlm_launch --nproc-per-node N -- shardlm_train --model-dir SRC --steps 0 --export-dir OUT --export-max-file-gb 5e-5
(each rank reads only its shards' byte ranges; each writes only its shards' bytes) and checks that OUT holds every
tensor of SRC with the same dtype, shape and bytes, in several files listed by a consistent
model.safetensors.index.json (also checked by shardlm_inspect), with SRC's config.json, that transformers loads it
and gives SRC's logits exactly, and that rank 0 reported the load and the export. Then a preset trained two
steps and exported in bf16 (one file, config.json written by shardlm) must hold --save-final's weights in bf16.
"""
import argparse
import json
import os
import re
import subprocess
import sys

import torch
from safetensors import safe_open

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "golden"))
from make_llama_fixtures import (VARIANTS, build_model, load_checkpoint, quiet_transformers,  # noqa: E402
                                 random_input, save_checkpoint)

# name -> (fixture variant whose shape it takes, dtype, config.json form, max_shard_size)
SOURCES = {
    "fp32_sharded_v4": ("gqa_llama3_v4_sharded", torch.float32, "v4", "100KB"),
    "bf16_tied_sharded": ("mha_default_tied_v4", torch.bfloat16, "v5", "60KB"),
    "fp16_bias_single": ("bias_linear_headdim_v5", torch.float16, "v5", None),
}
RUNS = [("full", 1), ("full", 2), ("full", 3), ("none", 2)]


def tensors_of(model_dir):
    """name -> (file, dtype, shape, raw bytes) of every tensor of a checkpoint directory."""
    index = os.path.join(model_dir, "model.safetensors.index.json")
    files = sorted(set(json.load(open(index))["weight_map"].values())) if os.path.exists(index) else ["model.safetensors"]
    out = {}
    for f in files:
        with safe_open(os.path.join(model_dir, f), framework="pt") as st:
            for name in st.keys():
                t = st.get_tensor(name).contiguous()
                assert name not in out, f"{model_dir}: {name} in two files"
                out[name] = (f, t.dtype, tuple(t.shape), t.view(torch.uint8).numpy().tobytes())
    return out


def make_source(workdir, name):
    variant, dtype, form, max_shard = SOURCES[name]
    seed, kwargs, _, _ = VARIANTS[variant]
    model = build_model(kwargs, seed).to(dtype)
    model.config.dtype = dtype
    src = os.path.join(workdir, name)
    save_checkpoint(model, src, form, max_shard)
    return src


def check_run(args, src, sharding, ranks, reference_logits, input_ids):
    out = os.path.join(args.workdir, f"{os.path.basename(src)}-{sharding}-{ranks}")
    cmd = [args.launch, "--nproc-per-node", str(ranks), "--", args.train, "--model-dir", src, "--data", args.data,
           "--steps", "0", "--seq-len", "8", "--micro-batch", "1", "--sharding", sharding, "--dist-timeout", "60",
           "--export-dir", out, "--export-max-file-gb", "5e-5"]
    run = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ, OMP_NUM_THREADS="1"), timeout=300)
    log = run.stdout + run.stderr
    assert run.returncode == 0, f"{' '.join(cmd)} exited {run.returncode}:\n{log}"
    for what in ("loading", "exporting to"):
        assert re.search(rf"\[rank 0\].*shardlm: {what} .*: [0-9.]+ [MG]B in [0-9.]+ s", log), f"no {what} report:\n{log}"
    assert not re.search(r"\[rank [1-9]\].*B in [0-9.]+ s", log), f"a rank other than 0 reported progress:\n{log}"

    want, got = tensors_of(src), tensors_of(out)
    assert set(got) == set(want), f"{out}: tensors differ: missing {set(want) - set(got)}, extra {set(got) - set(want)}"
    for name, (_, dtype, shape, data) in want.items():
        assert got[name][1:3] == (dtype, shape), f"{out}: {name} is {got[name][1:3]}, expected {(dtype, shape)}"
        assert got[name][3] == data, f"{out}: {name}: bytes differ from {src}"
    files = sorted({f for f, *_ in got.values()})
    assert len(files) > 1, f"{out}: expected several files at --export-max-file-gb 5e-5, got {files}"
    for f in files:
        with safe_open(os.path.join(out, f), framework="pt") as st:
            assert st.metadata() == {"format": "pt"}, f"{out}/{f}: metadata {st.metadata()}"
    index = json.load(open(os.path.join(out, "model.safetensors.index.json")))
    assert index["metadata"]["total_size"] == sum(len(d) for *_, d in got.values()), f"{out}: wrong total_size"
    assert open(os.path.join(out, "config.json")).read() == open(os.path.join(src, "config.json")).read()
    inspect = subprocess.run([args.inspect, "--summary", out], capture_output=True, text=True)
    assert inspect.returncode == 0 and "consistent" in inspect.stdout, f"shardlm_inspect {out}:\n{inspect.stderr}"

    with torch.no_grad():
        logits = load_checkpoint(out).to(torch.float32)(input_ids=input_ids).logits
    assert torch.equal(logits, reference_logits), f"{out}: transformers' logits differ from the source's"
    print(f"{os.path.basename(out)}: {len(got)} tensors byte-identical in {len(files)} files, "
          f"transformers logits identical")


def check_preset(args):
    """A preset trained 2 steps on 2 ranks, exported in bf16 to one file with a written config.json: the export
    holds --save-final's fp32 weights rounded to bf16, and transformers loads it."""
    out, final = os.path.join(args.workdir, "preset-export"), os.path.join(args.workdir, "preset-final.safetensors")
    cmd = [args.launch, "--nproc-per-node", "2", "--", args.train, "--preset", "llama3-debug", "--layers", "2",
           "--data", args.data, "--steps", "2", "--seq-len", "16", "--micro-batch", "1", "--dist-timeout", "60",
           "--save-final", final, "--export-dir", out]
    run = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ, OMP_NUM_THREADS="1"), timeout=300)
    assert run.returncode == 0, f"{' '.join(cmd)} exited {run.returncode}:\n{run.stdout}{run.stderr}"
    assert sorted(f for f in os.listdir(out) if "safetensors" in f) == ["model.safetensors"], os.listdir(out)
    got = tensors_of(out)
    with safe_open(final, framework="pt") as st:
        assert set(st.keys()) == set(got), f"{out}: tensors differ from --save-final's"
        for name in st.keys():
            want = st.get_tensor(name).to(torch.bfloat16).contiguous()
            assert got[name][1:3] == (torch.bfloat16, tuple(want.shape)), f"{out}: {name} is {got[name][1:3]}"
            assert got[name][3] == want.view(torch.uint8).numpy().tobytes(), f"{out}: {name} is not the bf16 weights"
    assert json.load(open(os.path.join(out, "config.json")))["dtype"] == "bfloat16"
    model = load_checkpoint(out)
    assert model.config.num_hidden_layers == 2 and model.config.vocab_size == 512, model.config
    print(f"preset-export: {len(got)} tensors = --save-final rounded to bf16, config.json loaded by transformers")


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    for flag in ("--launch", "--train", "--inspect", "--data", "--workdir"):
        p.add_argument(flag, required=True)
    args = p.parse_args()
    quiet_transformers()
    os.makedirs(args.workdir, exist_ok=True)
    for name in SOURCES:
        src = make_source(args.workdir, name)
        source = load_checkpoint(src).to(torch.float32)
        input_ids = random_input(source.config.vocab_size, 2, 8, 5)
        with torch.no_grad():
            reference_logits = source(input_ids=input_ids).logits
        for sharding, ranks in RUNS:
            check_run(args, src, sharding, ranks, reference_logits, input_ids)
    check_preset(args)
    print("check_hf_roundtrip: all exports byte-identical")


if __name__ == "__main__":
    main()
