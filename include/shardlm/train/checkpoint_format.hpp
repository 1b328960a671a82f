#pragma once
// Training checkpoints on disk, without LibTorch: what meta.json holds and how every field of it is checked, which
// byte ranges of which shard files a rank reads, and the checksums that verify them. train/checkpoint.hpp saves and
// loads through it; tests/fuzz/fuzz_checkpoint.cpp drives it with arbitrary meta.json and shard files.
//
// meta.json, format 2:
//   format, step, optimizer_steps, world_size, shard_group_size, global_batch (optional), units: [{name, numel,
//   padded}] in unit order, the run's sharding, precision, adapter, quant, layers, hidden_size and seed
//   (informational: the units say what the model is), and
//   checksum: "crc32c", checksums: {"shard-<k>-of-<G>.safetensors": ["<8 hex digits>", ... one per unit]}
// Format 1 (written before checksums existed) has neither checksum key: it loads unverified, with a warning.
//
// A unit's checksum in a shard file is the CRC32C of the bytes of its three tensors there (master, exp_avg,
// exp_avg_sq, in that order) that hold elements of the unit: the shard's part of [0, numel) of the flat buffer. The
// padding after a unit's last element is never read (loading zeroes it), so it is not covered. Loading re-slices, so
// a rank reads pieces of saved tensors; each piece's CRC is computed over the bytes as they are read and moved, by
// CRC32C's linearity, to its place at the end of the covered bytes (PieceCrc). The pieces of a shard group tile the
// covered bytes exactly once, so an xor over the group (an all-reduce of bit counts) gives each file's CRC32C of the
// unit without any rank reading a byte it does not load.
#include <nlohmann/json.hpp>

#include <algorithm>
#include <array>
#include <cstdint>
#include <cstdio>
#include <filesystem>
#include <map>
#include <memory>
#include <string>
#include <string_view>
#include <vector>

#include "shardlm/core/crc32c.hpp"
#include "shardlm/core/errors.hpp"
#include "shardlm/core/json.hpp"
#include "shardlm/io/safetensors_format.hpp"

namespace shardlm::train {

namespace fs = std::filesystem;

/// The format meta.json is written in; 1 (no checksums) is still read.
inline constexpr int64_t checkpoint_format = 2;

/// The three tensors of a unit in a shard file, in file order: u<u>.master, u<u>.exp_avg, u<u>.exp_avg_sq.
inline constexpr std::array<const char*, 3> shard_tensor_kinds = {"master", "exp_avg", "exp_avg_sq"};

inline std::string shard_file_name(int64_t k, int64_t group) { return detail::cat("shard-", k, "-of-", group, ".safetensors"); }
inline std::string shard_tensor_name(size_t unit, size_t kind) { return detail::cat("u", unit, ".", shard_tensor_kinds[kind]); }

/// Elements of [0, numel) that shard file k holds (shards of `shard` elements; the rest of the last ones is padding).
inline int64_t covered_elements(int64_t numel, int64_t shard, int64_t k) {
  return std::clamp<int64_t>(numel - k * shard, 0, shard);
}

/// A unit as errors name it: "unit 3 (block 2)", or "unit 5" where that is its name (the head).
inline std::string unit_label(size_t u, const std::string& name) {
  const auto plain = detail::cat("unit ", u);
  return name.empty() || name == plain ? plain : detail::cat(plain, " (", name, ")");
}

/// A CRC32C as meta.json writes it: 8 lower-case hex digits.
inline std::string crc_text(uint32_t crc) {
  char s[9];
  std::snprintf(s, sizeof s, "%08x", crc);
  return s;
}

/// A checkpoint's meta.json, every field checked before use.
struct CheckpointMeta {
  struct Unit {
    std::string name;
    int64_t numel = 0, padded = 0;
  };
  int64_t format = 0;
  int64_t step = 0;             ///< the optimizer steps the run had taken (data order and learning rate follow)
  int64_t optimizer_steps = 0;  ///< AdamW's step count (steps skipped for non-finite gradients do not count)
  int64_t world_size = 0;
  int64_t shard_group_size = 0;
  int64_t global_batch = 0;     ///< 0: not recorded
  std::vector<Unit> units;
  /// checksums[k][u]: the CRC32C of unit u's covered bytes in shard file k (format >= 2; else empty).
  std::vector<std::vector<uint32_t>> checksums;

  /// More than any count here can be: step x global batch and every byte offset below stay far inside int64.
  static constexpr int64_t max_count = int64_t{1} << 40;
  /// More ranks than any job has had (about 10^5 GPUs): bounds what the checksums' all-reduce holds per unit.
  static constexpr int64_t max_world = int64_t{1} << 20;

  bool has_checksums() const { return !checksums.empty(); }
  /// Elements of each saved shard of unit u.
  int64_t saved_shard(size_t u) const { return units[u].padded / shard_group_size; }

  /// Reads and checks `dir`/meta.json.
  static CheckpointMeta read(const fs::path& dir) {
    const auto file = dir / "meta.json";
    return parse(read_json(file, JsonLimits{uint64_t{1} << 30, 64}), file.string());
  }

  /// Checks a parsed meta.json (`where` names it): every key present with a value of its type in its range, each
  /// unit's padded size a multiple of the shard group holding at least its elements, and (format 2) a checksum of
  /// 8 hex digits for every unit in every shard file. Errors name the file and the key.
  static CheckpointMeta parse(const nlohmann::json& j, const std::string& where) {
    const JsonFields<IoError> f(j, where);
    CheckpointMeta m;
    m.format = f.integer("format", 1, checkpoint_format);
    m.step = f.integer("step", 0, max_count);
    m.optimizer_steps = f.integer("optimizer_steps", 0, m.step);
    m.world_size = f.integer("world_size", 1, max_world);
    m.shard_group_size = f.integer("shard_group_size", 1, m.world_size);
    if (m.world_size % m.shard_group_size != 0)
      fail<IoError>(where, ": field 'shard_group_size' ", m.shard_group_size, " does not divide field 'world_size' ", m.world_size);
    m.global_batch = f.integer_or("global_batch", 0, 1, max_count);
    const auto& units = f.array("units");
    for (size_t u = 0; u < units.size(); ++u) {
      const auto unit = f.element("units", u);
      Unit x;
      x.name = unit.string_or("name", "");
      x.numel = unit.integer("numel", 0, max_count);
      x.padded = unit.integer("padded", x.numel, max_count);
      if (x.padded % m.shard_group_size != 0 || x.padded - x.numel >= m.shard_group_size)
        fail<IoError>(where, ": field '", unit.name("padded"), "' ", x.padded, " is not the ", x.numel,
                      " elements padded to a multiple of the shard group size ", m.shard_group_size);
      m.units.push_back(std::move(x));
    }
    if (m.format >= 2) {
      if (const auto algorithm = f.string("checksum"); algorithm != "crc32c")
        fail<IoError>(where, ": field 'checksum' is '", algorithm, "', expected 'crc32c'");
      const auto sums = f.object("checksums");
      if (static_cast<int64_t>(f.value("checksums").size()) != m.shard_group_size)
        fail<IoError>(where, ": field 'checksums' lists ", f.value("checksums").size(), " shard files, expected ",
                      m.shard_group_size, " (the shard group size)");
      m.checksums.resize(static_cast<size_t>(m.shard_group_size));
      for (int64_t k = 0; k < m.shard_group_size; ++k) {
        const auto key = shard_file_name(k, m.shard_group_size);
        const auto& list = sums.array(key);
        if (list.size() != m.units.size())
          fail<IoError>(where, ": field '", sums.name(key), "' holds ", list.size(), " checksums, expected one per unit (",
                        m.units.size(), ")");
        for (size_t u = 0; u < list.size(); ++u) {
          const auto& v = list[u];
          const auto text = v.is_string() ? v.get<std::string>() : std::string();
          if (text.size() != 8 || text.find_first_not_of("0123456789abcdef") != std::string::npos)
            fail<IoError>(where, ": field '", sums.name(key), "[", u, "]' is ", JsonFields<>::shown(v),
                          ", expected a CRC32C of 8 hex digits");
          m.checksums[static_cast<size_t>(k)].push_back(static_cast<uint32_t>(std::stoul(text, nullptr, 16)));
        }
      }
    }
    return m;
  }
};

/// meta.json's "checksums" object from each shard file's CRCs (crcs[k]: one per unit).
inline nlohmann::json checksums_json(const std::vector<std::vector<uint32_t>>& crcs) {
  nlohmann::json out = nlohmann::json::object();
  const auto group = static_cast<int64_t>(crcs.size());
  for (int64_t k = 0; k < group; ++k) {
    auto& list = out[shard_file_name(k, group)] = nlohmann::json::array();
    for (const auto crc : crcs[static_cast<size_t>(k)]) list.push_back(crc_text(crc));
  }
  return out;
}

/// A piece of a rank's shard that one saved shard holds: elements [begin, end) of the unit's flat buffer, from
/// shard file `file` (whose shard starts at file x saved_shard).
struct SavedPiece {
  int64_t file = 0, begin = 0, end = 0;
};

/// Calls fn(piece) for each piece of elements [lo, hi) (a rank's part of [0, numel)) in saved shards of
/// `saved_shard` elements, in order (one at a time: a hostile shard size costs no memory before the first read fails).
template <class Fn>
void for_each_saved_piece(int64_t saved_shard, int64_t lo, int64_t hi, Fn&& fn) {
  SHARDLM_ASSERT(saved_shard > 0 && lo >= 0, "saved shard ", saved_shard, ", range from ", lo);
  for (int64_t k = lo / saved_shard; k * saved_shard < hi; ++k)
    fn(SavedPiece{k, std::max(lo, k * saved_shard), std::min(hi, (k + 1) * saved_shard)});
}

/// The checksums of one unit's pieces as a rank reads them: per shard file the xor of each piece's CRC register
/// moved to the end of the file's covered bytes of the unit, the piece at byte 0 starting from the CRC's initial
/// value. Xored over the shard group (bit counts summed: counts(), then verify() with the sums), each file's value
/// is the CRC32C of its covered bytes.
class PieceCrc {
 public:
  explicit PieceCrc(size_t files) : acc_(files, 0) {}

  /// The bytes of a piece: `n` bytes starting `offset` bytes into the file's covered bytes of the unit (`covered`).
  void add(int64_t file, uint64_t offset, const void* data, uint64_t n, uint64_t covered) {
    SHARDLM_ASSERT(offset + n <= covered && static_cast<size_t>(file) < acc_.size(), "piece past the covered bytes");
    const uint32_t reg = crc32c_raw(offset == 0 ? ~0u : 0u, data, n);
    acc_[static_cast<size_t>(file)] ^= crc32c_shift(reg, covered - offset - n);
  }

  /// Each file's register as 32 bit counts of 0 or 1, to be summed over the shard group (then an odd count is a set
  /// bit of the xor).
  std::vector<int32_t> counts() const {
    std::vector<int32_t> out(acc_.size() * 32);
    for (size_t i = 0; i < acc_.size(); ++i)
      for (int b = 0; b < 32; ++b) out[i * 32 + b] = static_cast<int32_t>((acc_[i] >> b) & 1u);
    return out;
  }

  /// With the counts summed over the shard group: throws an IoError naming the shard file and the unit whose covered
  /// bytes do not have the CRC32C meta.json records. Files holding none of the unit's elements are skipped.
  static void verify(const std::vector<int32_t>& summed, const CheckpointMeta& meta, size_t u, const std::string& unit_name,
                     const fs::path& dir) {
    const auto files = static_cast<size_t>(meta.shard_group_size);
    SHARDLM_ASSERT(summed.size() == files * 32 && meta.has_checksums(), "checksum counts of ", summed.size());
    for (size_t k = 0; k < files; ++k) {
      if (covered_elements(meta.units[u].numel, meta.saved_shard(u), static_cast<int64_t>(k)) == 0) continue;
      uint32_t reg = 0;
      for (int b = 0; b < 32; ++b) reg |= static_cast<uint32_t>(summed[k * 32 + b] & 1) << b;
      const uint32_t got = ~reg, want = meta.checksums[k][u];
      if (got != want)
        fail<IoError>((dir / shard_file_name(static_cast<int64_t>(k), meta.shard_group_size)).string(), ": ",
                      unit_label(u, unit_name), ": its tensors fail their checksum: CRC32C ", crc_text(got),
                      ", meta.json records ", crc_text(want), " (the file is corrupt: resume from another checkpoint)");
    }
  }

 private:
  std::vector<uint32_t> acc_;
};

/// The shard files of a checkpoint, opened on first use, each tensor checked before a byte of it is read.
class ShardFiles {
 public:
  ShardFiles(fs::path dir, int64_t group) : dir_(std::move(dir)), group_(group) {}

  /// Shard file k's tensor of `kind` of unit u: present, of `saved_shard` elements and a floating dtype.
  const io::TensorInfo& tensor(int64_t k, size_t u, size_t kind, int64_t saved_shard) {
    auto& f = file(k);
    const auto name = shard_tensor_name(u, kind);
    const auto& t = f.info(name);
    if (t.numel() != saved_shard)
      fail<IoError>(f.path().string(), ": tensor '", name, "' has ", t.numel(), " elements, expected ", saved_shard,
                    " (meta.json's padded size over the shard group)");
    if (t.dtype != "F32" && t.dtype != "BF16" && t.dtype != "F16" && t.dtype != "F64")
      fail<IoError>(f.path().string(), ": tensor '", name, "' has dtype ", t.dtype, ", expected a floating dtype (F32, BF16, F16, F64)");
    return t;
  }

  /// The bytes of unit u that shard file k covers (its elements in the three tensors, in their dtypes), and where
  /// those of `kind` start among them: what PieceCrc needs to place a piece. (Each tensor is checked.)
  std::pair<uint64_t, uint64_t> covered_bytes(int64_t k, size_t u, size_t kind, int64_t saved_shard, int64_t covered) {
    uint64_t total = 0, start = 0;
    for (size_t j = 0; j < shard_tensor_kinds.size(); ++j) {
      if (j == kind) start = total;
      total += static_cast<uint64_t>(covered) * tensor(k, u, j, saved_shard).element_size();
    }
    return {total, start};
  }

  /// Reads elements [first, first + count) of shard file k's tensor `t` into `dst`, 256 KiB at a time, adding each
  /// chunk's CRC to `crc` while it is in the cache (larger chunks cost the CRC more: docs/checkpoints.md) (`at`:
  /// where the tensor's covered bytes start among the unit's `covered` bytes in the file; covered_bytes()).
  void read(int64_t k, const io::TensorInfo& t, int64_t first, int64_t count, void* dst, PieceCrc* crc, uint64_t at,
            uint64_t covered) {
    const uint64_t size = t.element_size(), begin = static_cast<uint64_t>(first) * size;
    const uint64_t n = static_cast<uint64_t>(count) * size;
    constexpr uint64_t chunk = uint64_t{256} << 10;
    auto* out = static_cast<unsigned char*>(dst);
    for (uint64_t done = 0; done < n; done += chunk) {
      const uint64_t len = std::min(chunk, n - done);
      file(k).read_bytes(t, begin + done, len, out + done);
      if (crc) crc->add(k, at + begin + done, out + done, len, covered);
    }
  }

  io::SafetensorsReader& file(int64_t k) {
    auto& f = files_[k];
    if (!f) f = std::make_unique<io::SafetensorsReader>(dir_ / shard_file_name(k, group_));
    return *f;
  }

 private:
  fs::path dir_;
  int64_t group_;
  std::map<int64_t, std::unique_ptr<io::SafetensorsReader>> files_;
};

}  // namespace shardlm::train
