"""shardlm_plot writes a valid PNG of a metrics JSONL: the signature, every chunk's CRC, an IHDR of the asked size
(8-bit RGB), IDAT inflating to height x (1 + 3 x width) bytes of unfiltered rows, and the colours of the three
curves (train loss, eval loss, tokens/s) present; and a malformed line is an error naming file and line."""
import argparse
import json
import math
import os
import struct
import subprocess
import sys
import zlib

p = argparse.ArgumentParser()
p.add_argument("--plot", required=True)
p.add_argument("--workdir", required=True)
a = p.parse_args()
os.makedirs(a.workdir, exist_ok=True)
metrics, png = os.path.join(a.workdir, "m.jsonl"), os.path.join(a.workdir, "m.png")
with open(metrics, "w") as f:
    for s in range(1, 101):
        row = {"step": s, "loss": 6 * math.exp(-s / 30) + 1, "tokens_per_s": 1000 + 100 * math.sin(s), "mfu": None}
        if s % 25 == 0:
            row["eval_loss"] = row["loss"] + 0.3
        f.write(json.dumps(row) + "\n")
subprocess.run([a.plot, "--metrics", metrics, "--output", png, "--width", "640", "--height", "480"], check=True)
data = open(png, "rb").read()
assert data[:8] == b"\x89PNG\r\n\x1a\n", "no PNG signature"
pos, chunks = 8, []
while pos < len(data):
    (length,) = struct.unpack(">I", data[pos:pos + 4])
    kind, body = data[pos + 4:pos + 8], data[pos + 8:pos + 8 + length]
    (crc,) = struct.unpack(">I", data[pos + 8 + length:pos + 12 + length])
    assert crc == zlib.crc32(kind + body), f"bad CRC in chunk {kind}"
    chunks.append((kind, body))
    pos += 12 + length
assert [k for k, _ in chunks] == [b"IHDR", b"IDAT", b"IEND"], [k for k, _ in chunks]
w, h, depth, colour = struct.unpack(">IIBB", chunks[0][1][:10])
assert (w, h, depth, colour) == (640, 480, 8, 2), (w, h, depth, colour)
raw = zlib.decompress(chunks[1][1])
assert len(raw) == h * (1 + 3 * w), len(raw)
rows = [raw[y * (1 + 3 * w):(y + 1) * (1 + 3 * w)] for y in range(h)]
assert all(r[0] == 0 for r in rows), "a row with a filter other than none"
pixels = {bytes(r[1 + 3 * x:4 + 3 * x]) for r in rows for x in range(w)}
for name, rgb in {"train loss": (31, 119, 180), "eval loss": (255, 127, 14), "tokens/s": (44, 160, 44)}.items():
    assert bytes(rgb) in pixels, f"no {name} curve (colour {rgb})"
with open(metrics, "a") as f:
    f.write("{not json\n")
r = subprocess.run([a.plot, "--metrics", metrics, "--output", png], capture_output=True, text=True)
assert r.returncode == 1 and "m.jsonl:101: malformed JSON" in r.stderr, (r.returncode, r.stderr)
print(f"shardlm_plot: {w}x{h} PNG, {len(data)} bytes, CRCs valid, 3 curves drawn; a malformed line is named")
