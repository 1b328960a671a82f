// libFuzzer target: a training checkpoint's meta.json and shard file as the loader reads them
// (train/checkpoint_format.hpp: CheckpointMeta::read, ShardFiles, for_each_saved_piece, PieceCrc). An input is
//   byte 0: the world size the checkpoint is loaded at (1 + byte % 3, simulated ranks in this process)
//   bytes 1..4: the length L of meta.json (little-endian), then L bytes of meta.json, then the shard file,
// written to a directory as meta.json and shard-<k>-of-<G>.safetensors for k < min(G, 3) (the same bytes). Every
// input must be refused with an IoError or loaded; a load must read pieces that tile each rank's part exactly, and
// the checksums combined from the pieces must equal the CRC32C of each file's covered bytes read in one go. Anything
// else (a crash, a sanitizer report, another exception, an allocation sized by the input) is a finding.
#include <shardlm/train/checkpoint_format.hpp>

#include <unistd.h>

#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <optional>
#include <string>
#include <vector>

namespace {
using namespace shardlm;
using namespace shardlm::train;

const fs::path& work_dir() {
  static const fs::path dir = [] {
    std::string tmpl = (fs::temp_directory_path() / "fuzz_checkpoint.XXXXXX").string();
    if (!::mkdtemp(tmpl.data())) std::abort();
    return fs::path(tmpl);
  }();
  return dir;
}

void write(const fs::path& path, const uint8_t* data, size_t n) {
  std::ofstream out(path, std::ios::binary | std::ios::trunc);
  out.write(reinterpret_cast<const char*>(data), static_cast<std::streamsize>(n));
  if (!out) std::abort();
}

/// Loads every unit at `world` simulated ranks; returns normally when the whole checkpoint verified.
void load(const CheckpointMeta& meta, const fs::path& dir, int64_t world) {
  const int64_t G = meta.shard_group_size;
  ShardFiles files(dir, G);
  for (size_t u = 0; u < meta.units.size(); ++u) {
    const int64_t numel = meta.units[u].numel, S = meta.saved_shard(u);
    if (numel == 0) continue;
    const int64_t shard = (numel + world - 1) / world;  // the loading run's shard of this unit
    std::vector<int32_t> sums(meta.has_checksums() ? static_cast<size_t>(G) * 32 : 0);
    for (int64_t r = 0; r < world; ++r) {
      const int64_t lo = std::min(shard * r, numel), hi = std::min(lo + shard, numel);
      std::optional<PieceCrc> crc;
      if (meta.has_checksums()) crc.emplace(static_cast<size_t>(G));
      for (size_t kind = 0; kind < shard_tensor_kinds.size(); ++kind) {
        int64_t next = lo;
        for_each_saved_piece(S, lo, hi, [&](const SavedPiece& p) {
          if (p.file < 0 || p.file >= G || p.begin != next || p.end <= p.begin || p.begin < p.file * S ||
              p.end > (p.file + 1) * S)
            std::abort();  // pieces must tile [lo, hi) inside their saved shards
          next = p.end;
          const auto& t = files.tensor(p.file, u, kind, S);
          const auto [covered, start] = files.covered_bytes(p.file, u, kind, S, covered_elements(numel, S, p.file));
          std::vector<unsigned char> buf(static_cast<size_t>(p.end - p.begin) * t.element_size());  // <= the file
          files.read(p.file, t, p.begin - p.file * S, p.end - p.begin, buf.data(), crc ? &*crc : nullptr, start, covered);
        });
        if (next != hi) std::abort();
      }
      if (crc) {
        const auto counts = crc->counts();
        for (size_t i = 0; i < sums.size(); ++i) sums[i] += counts[i];
      }
    }
    if (!meta.has_checksums()) continue;
    PieceCrc::verify(sums, meta, u, "unit", dir);
    // Verified: the same CRC32C, computed directly over each file's covered bytes, must be what meta.json records.
    for (int64_t k = 0; k < G; ++k) {
      const int64_t covered = covered_elements(numel, S, k);
      if (covered == 0) continue;
      uint32_t crc = 0;
      for (size_t kind = 0; kind < shard_tensor_kinds.size(); ++kind) {
        const auto& t = files.tensor(k, u, kind, S);
        std::vector<unsigned char> buf(static_cast<size_t>(covered) * t.element_size());
        files.file(k).read_bytes(t, 0, buf.size(), buf.data());
        crc = crc32c_extend(crc, buf.data(), buf.size());
      }
      if (crc != meta.checksums[static_cast<size_t>(k)][u]) std::abort();
    }
  }
}
}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  if (size < 5) return 0;
  const int64_t world = 1 + data[0] % 3;
  size_t len = uint32_t{data[1]} | uint32_t{data[2]} << 8 | uint32_t{data[3]} << 16 | uint32_t{data[4]} << 24;
  len = std::min(len, size - 5);
  const auto& dir = work_dir();
  std::vector<fs::path> old;
  for (const auto& entry : fs::directory_iterator(dir)) old.push_back(entry.path());
  for (const auto& path : old) fs::remove(path);
  write(dir / "meta.json", data + 5, len);
  CheckpointMeta meta;
  try {
    meta = CheckpointMeta::read(dir);
  } catch (const IoError&) {
    return 0;
  }
  // Accepted: the invariants the loader relies on.
  const int64_t G = meta.shard_group_size;
  if (G < 1 || meta.world_size % G != 0 || meta.optimizer_steps > meta.step) std::abort();
  for (const auto& u : meta.units)
    if (u.numel < 0 || u.padded < u.numel || u.padded % G != 0 || u.padded - u.numel >= G) std::abort();
  if (meta.has_checksums() && static_cast<int64_t>(meta.checksums.size()) != G) std::abort();
  for (int64_t k = 0; k < std::min<int64_t>(G, 3); ++k) write(dir / shard_file_name(k, G), data + 5 + len, size - 5 - len);
  try {
    load(meta, dir, world);
  } catch (const IoError&) {
  }
  return 0;
}
