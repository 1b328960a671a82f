"""Writes the seed corpus of fuzz_checkpoint (tests/fuzz/fuzz_checkpoint.cpp): valid checkpoints (format 2 with their
CRC32Cs, format 1, one and two shard files, padded units, mixed dtypes) and one malformed case per class.
An input is: a byte choosing the loading world size, the meta.json length (4 bytes, little-endian), meta.json, then
the shard file (every shard file of the checkpoint holds these same bytes). Usage: make_checkpoint_seeds.py OUT_DIR"""
import json
import struct
import sys
from pathlib import Path

TABLE = []
for i in range(256):
    c = i
    for _ in range(8):
        c = (c >> 1) ^ 0x82F63B78 if c & 1 else c >> 1
    TABLE.append(c)


def crc32c(data: bytes, crc: int = 0) -> int:
    c = crc ^ 0xFFFFFFFF
    for b in data:
        c = TABLE[(c ^ b) & 0xFF] ^ (c >> 8)
    return c ^ 0xFFFFFFFF


SIZES = {"F32": 4, "BF16": 2, "F16": 2, "F64": 8}
KINDS = ("master", "exp_avg", "exp_avg_sq")


def shard_file(units, dtypes=("F32", "F32", "F32")):
    """units: saved shard sizes (elements) per unit. Returns (file bytes, {tensor: data bytes})."""
    header, blobs, offset = {}, {}, 0
    for u, n in enumerate(units):
        for kind, dtype in zip(KINDS, dtypes):
            data = bytes((u * 31 + len(blobs) * 7 + i) % 251 for i in range(n * SIZES[dtype]))
            header[f"u{u}.{kind}"] = {"dtype": dtype, "shape": [n], "data_offsets": [offset, offset + len(data)]}
            blobs[f"u{u}.{kind}"] = data
            offset += len(data)
    text = json.dumps(header).encode()
    text += b" " * ((8 - len(text) % 8) % 8)
    return struct.pack("<Q", len(text)) + text + b"".join(blobs.values()), blobs


def meta(units, group, blobs, dtypes=("F32", "F32", "F32"), fmt=2, **changes):
    """units: (numel, padded) per unit; every file holds `blobs`."""
    m = {"format": fmt, "step": 4, "optimizer_steps": 4, "world_size": group, "shard_group_size": group,
         "global_batch": 8, "units": [{"name": f"block {u}", "numel": n, "padded": p} for u, (n, p) in enumerate(units)]}
    if fmt >= 2:
        m["checksum"] = "crc32c"
        m["checksums"] = {}
        for k in range(group):
            crcs = []
            for u, (n, p) in enumerate(units):
                s = p // group
                covered = max(0, min(n - k * s, s))
                crc = 0
                for kind, dtype in zip(KINDS, dtypes):
                    crc = crc32c(blobs[f"u{u}.{kind}"][:covered * SIZES[dtype]], crc)
                crcs.append(f"{crc:08x}")
            m["checksums"][f"shard-{k}-of-{group}.safetensors"] = crcs
    m.update(changes)
    return m


def seed(world: int, m, shard: bytes) -> bytes:
    text = (m if isinstance(m, str) else json.dumps(m)).encode()
    return bytes([world]) + struct.pack("<I", len(text)) + text + shard


def main() -> None:
    out = Path(sys.argv[1])
    out.mkdir(parents=True, exist_ok=True)
    seeds = {}
    one, one_blobs = shard_file([5, 0])
    seeds["valid_g1"] = seed(0, meta([(5, 5), (0, 0)], 1, one_blobs), one)
    seeds["valid_g1_world3"] = seed(2, meta([(5, 5), (0, 0)], 1, one_blobs), one)
    two, two_blobs = shard_file([3])
    seeds["valid_g2"] = seed(1, meta([(6, 6)], 2, two_blobs), two)
    seeds["valid_g2_padded"] = seed(2, meta([(5, 6)], 2, two_blobs), two)
    mixed_types = ("BF16", "F32", "F16")
    mixed, mixed_blobs = shard_file([4, 2], mixed_types)
    seeds["valid_mixed_dtypes"] = seed(1, meta([(4, 4), (2, 2)], 1, mixed_blobs, mixed_types), mixed)
    seeds["valid_format1"] = seed(0, meta([(6, 6)], 2, two_blobs, fmt=1), two)
    bad = meta([(5, 5), (0, 0)], 1, one_blobs)
    bad["checksums"]["shard-0-of-1.safetensors"][0] = "00000000"
    seeds["bad_crc"] = seed(0, bad, one)
    seeds["bad_step"] = seed(0, meta([(5, 5)], 1, one_blobs, step=-1), one)
    seeds["bad_float"] = seed(0, meta([(5, 5)], 1, one_blobs, world_size=1.5), one)
    seeds["bad_group"] = seed(0, meta([(6, 6)], 2, two_blobs, world_size=3), two)
    seeds["bad_padded"] = seed(0, meta([(5, 7)], 1, one_blobs), one)
    seeds["bad_missing"] = seed(0, json.dumps({"format": 2, "step": 1}), one)
    seeds["bad_numel"] = seed(0, meta([(1 << 41, 1 << 41)], 1, one_blobs), one)
    seeds["bad_shard_size"] = seed(0, meta([(8, 8)], 1, one_blobs), one)
    seeds["bad_json"] = seed(0, "{\"format\": 2,", one)
    seeds["bad_deep"] = seed(0, "[" * 200 + "]" * 200, one)
    for name, data in seeds.items():
        (out / name).write_bytes(data)
    print(f"make_checkpoint_seeds: {len(seeds)} seeds in {out}")


if __name__ == "__main__":
    main()
