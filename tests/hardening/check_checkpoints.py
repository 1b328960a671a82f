"""Corrupted training checkpoints: each is refused with an error naming the file, the key or the unit, and exit code 1
(never a signal, never a silent resume); an uncorrupted one, and one written before checksums existed, resume.

A 2-rank FullShard run saves step 2 (two shard files); each case copies that checkpoint, damages one thing, and
resumes it (--resume PATH) with shardlm_train on 1 rank (re-sliced: the checksums of pieces read from both files are
combined) or on 2 ranks through shardlm_launch (the pieces of both ranks combined over the shard group).

Usage: check_checkpoints.py --launch BIN --train BIN --data FILE --workdir DIR [--resume-with BIN]
(--resume-with: another shardlm_train for the resumes, e.g. an older build, to see which cases it fails.)"""
import argparse
import json
import shutil
import struct
import subprocess
import sys
from pathlib import Path

ARGS = ["--layers", "2", "--seq-len", "32", "--micro-batch", "2", "--log-every", "1", "--dist-timeout", "60"]


def edit_meta(change):
    def mutate(ckpt: Path) -> None:
        meta = json.loads((ckpt / "meta.json").read_text())
        change(meta)
        (ckpt / "meta.json").write_text(json.dumps(meta, indent=2))
    return mutate


def flip_byte(file: str, tensor: str):
    """Flips one bit in the middle of a tensor's bytes."""
    def mutate(ckpt: Path) -> None:
        path = ckpt / file
        raw = bytearray(path.read_bytes())
        n = struct.unpack("<Q", raw[:8])[0]
        begin, end = json.loads(raw[8:8 + n])[tensor]["data_offsets"]
        raw[8 + n + (begin + end) // 2] ^= 0x10
        path.write_bytes(bytes(raw))
    return mutate


def without_checksums(meta):
    meta["format"] = 1
    del meta["checksum"], meta["checksums"]


CASES = [
    # (name, mutation, ranks, expected: None = resumes, else a substring of the error)
    ("clean", lambda ckpt: None, 1, None),
    ("format_1", edit_meta(without_checksums), 1, "written before checkpoints carried checksums (format 1)"),
    ("flipped_byte", flip_byte("shard-1-of-2.safetensors", "u1.exp_avg"), 1,
     "shard-1-of-2.safetensors: unit 1 (block 0): its tensors fail their checksum"),
    ("flipped_byte_2_ranks", flip_byte("shard-0-of-2.safetensors", "u3.master"), 2,
     "shard-0-of-2.safetensors: unit 3: its tensors fail their checksum"),
    ("negative_step", edit_meta(lambda m: m.update(step=-3)), 1, "meta.json: field 'step' must be an integer in 0..1099511627776, got -3"),
    ("float_step", edit_meta(lambda m: m.update(step=2.5)), 1, "meta.json: field 'step' must be an integer in 0..1099511627776, got 2.5"),
    ("missing_key", edit_meta(lambda m: m.pop("optimizer_steps")), 1, "meta.json: missing field 'optimizer_steps'"),
    ("zero_world", edit_meta(lambda m: m.update(world_size=0)), 1, "meta.json: field 'world_size' must be an integer in 1..1048576, got 0"),
    ("group_not_dividing", edit_meta(lambda m: m.update(world_size=3)), 1,
     "meta.json: field 'shard_group_size' 2 does not divide field 'world_size' 3"),
    ("huge_numel", edit_meta(lambda m: m["units"][1].update(numel=1 << 45, padded=1 << 45)), 1,
     "meta.json: field 'units[1].numel' must be an integer in 0..1099511627776, got 35184372088832"),
    ("unit_renamed", edit_meta(lambda m: m["units"][2].update(name="block 7")), 1,
     "unit 2 is 'block 7' in the checkpoint and 'block 1' in this model"),
    ("bad_checksum_text", edit_meta(lambda m: m["checksums"]["shard-1-of-2.safetensors"].__setitem__(2, "xyz")), 1,
     "meta.json: field 'checksums.shard-1-of-2.safetensors[2]' is \"xyz\", expected a CRC32C of 8 hex digits"),
    ("newer_format", edit_meta(lambda m: m.update(format=4)), 1, "meta.json: field 'format' must be an integer in 1..3, got 4"),
]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--launch", required=True)
    ap.add_argument("--train", required=True)
    ap.add_argument("--resume-with")
    ap.add_argument("--data", required=True)
    ap.add_argument("--workdir", required=True)
    args = ap.parse_args()
    work = Path(args.workdir)
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    save = subprocess.run([args.launch, "--nproc-per-node", "2", "--", args.train, "--data", args.data, *ARGS, "--steps", "2",
                           "--checkpoint-dir", str(work / "run")], capture_output=True, text=True)
    if save.returncode != 0:
        sys.exit(f"the run that saves the checkpoint failed ({save.returncode}):\n{save.stderr}")
    source = work / "run" / "step-00000002"
    resume = args.resume_with or args.train
    failures = []
    for name, mutate, ranks, expected in CASES:
        ckpt = work / "cases" / name
        shutil.copytree(source, ckpt)
        mutate(ckpt)
        cmd = [resume, "--data", args.data, *ARGS, "--steps", "3", "--resume", str(ckpt)]
        if ranks > 1:
            cmd = [args.launch, "--nproc-per-node", str(ranks), "--", *cmd]
        try:
            r = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
            rc, out = r.returncode, r.stdout + r.stderr
        except subprocess.TimeoutExpired:
            rc, out = "timeout", ""
        if expected is None or name == "format_1":  # resumes (format 1: with its warning)
            ok = rc == 0 and "resumed from" in out and (expected is None or expected in out)
        else:  # refused: exit code 1, the message, on every rank, no crash
            ok = rc == 1 and out.count(expected) >= ranks and "terminate called" not in out
        print(f"{'ok  ' if ok else 'FAIL'} {name}: exit {rc}")
        if not ok:
            failures.append(f"{name}: exit {rc}, expected {'success' if expected is None else repr(expected)}:\n{out[-2000:]}")
    if failures:
        sys.exit("\n\n".join(failures))
    print(f"check_checkpoints: {len(CASES)} cases passed")


if __name__ == "__main__":
    main()
