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
// Format 3 (written with expert parallelism only; a run without it writes format 2) adds
//   experts: {expert_parallel: N, shard_group_size: Ge, units: [{numel, padded, params: [names]}] in unit order,
//             checksums: {"experts-<e>-of-<N>.shard-<k>-of-<Ge>.safetensors": [... one per unit]}}
// The units' numel then counts the parameters other than the experts (the dense part of each unit), and the files
// experts-<e>-of-<N>.shard-<k>-of-<Ge>.safetensors hold, per unit, the flat buffer of the experts
// [e E/N, (e + 1) E/N) of each of its expert parameters (params, in that order: each parameter's elements of those
// experts, contiguous since the experts are the leading dimension), sharded over Ge as the dense units are over G.
// A loader maps its own parameters by name and element range onto these pieces (CheckpointLayout), at any
// expert parallelism, including none.
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
#include <functional>
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

/// The format meta.json is written in: 3 with expert parallelism (its experts' files), else 2; 1 (no checksums) is
/// still read.
inline constexpr int64_t checkpoint_format = 3;
inline constexpr int64_t checkpoint_format_dense = 2;

/// The three tensors of a unit in a shard file, in file order: u<u>.master, u<u>.exp_avg, u<u>.exp_avg_sq.
inline constexpr std::array<const char*, 3> shard_tensor_kinds = {"master", "exp_avg", "exp_avg_sq"};

inline std::string shard_file_name(int64_t k, int64_t group) { return detail::cat("shard-", k, "-of-", group, ".safetensors"); }
/// The file of the experts [e E/N, (e + 1) E/N), shard k of the Ge ranks holding them.
inline std::string expert_file_name(int64_t e, int64_t N, int64_t k, int64_t group) {
  return detail::cat("experts-", e, "-of-", N, ".shard-", k, "-of-", group, ".safetensors");
}
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
  /// Format 3, saved with expert parallelism: the experts' files (expert_parallel 1: none, the units hold them).
  struct Experts {
    int64_t expert_parallel = 1;
    int64_t shard_group_size = 1;                  ///< Ge: the ranks each expert file set is sharded over
    std::vector<Unit> units;                       ///< per unit: the elements of one file set (E/N experts), padded
    std::vector<std::vector<std::string>> params;  ///< per unit: its expert parameters, in flat order
    std::vector<std::vector<uint32_t>> checksums;  ///< [e Ge + k][u], as checksums
    int64_t files() const { return expert_parallel * shard_group_size; }
    std::string file_name(int64_t i) const {
      return expert_file_name(i / shard_group_size, expert_parallel, i % shard_group_size, shard_group_size);
    }
    int64_t saved_shard(size_t u) const { return units[u].padded / shard_group_size; }
  } experts;

  /// More than any count here can be: step x global batch and every byte offset below stay far inside int64.
  static constexpr int64_t max_count = int64_t{1} << 40;
  /// More ranks than any job has had (about 10^5 GPUs): bounds what the checksums' all-reduce holds per unit.
  static constexpr int64_t max_world = int64_t{1} << 20;

  bool has_checksums() const { return !checksums.empty(); }
  bool has_experts() const { return experts.expert_parallel > 1; }
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
    // one list of a CRC32C per unit for each of `files` files named file_name(i), under `key`
    const auto read_checksums = [&](const JsonFields<IoError>& parent, const char* key, int64_t files, auto file_name,
                                    const char* kind, const char* why) {
      const auto sums = parent.object(key);
      if (static_cast<int64_t>(parent.value(key).size()) != files)
        fail<IoError>(where, ": field '", parent.name(key), "' lists ", parent.value(key).size(), " ", kind, ", expected ",
                      files, " (", why, ")");
      std::vector<std::vector<uint32_t>> out(static_cast<size_t>(files));
      for (int64_t k = 0; k < files; ++k) {
        const std::string name = file_name(k);
        const nlohmann::json& list = sums.array(name);
        if (list.size() != m.units.size())
          fail<IoError>(where, ": field '", sums.name(name), "' holds ", list.size(), " checksums, expected one per unit (",
                        m.units.size(), ")");
        for (size_t u = 0; u < list.size(); ++u) {
          const auto& v = list[u];
          const auto text = v.is_string() ? v.get<std::string>() : std::string();
          if (text.size() != 8 || text.find_first_not_of("0123456789abcdef") != std::string::npos)
            fail<IoError>(where, ": field '", sums.name(name), "[", u, "]' is ", JsonFields<>::shown(v),
                          ", expected a CRC32C of 8 hex digits");
          out[static_cast<size_t>(k)].push_back(static_cast<uint32_t>(std::stoul(text, nullptr, 16)));
        }
      }
      return out;
    };
    if (m.format >= 2) {
      if (const auto algorithm = f.string("checksum"); algorithm != "crc32c")
        fail<IoError>(where, ": field 'checksum' is '", algorithm, "', expected 'crc32c'");
      m.checksums = read_checksums(f, "checksums", m.shard_group_size,
                                   [&](int64_t k) { return shard_file_name(k, m.shard_group_size); }, "shard files",
                                   "the shard group size");
    }
    if (m.format >= 3 && f.has("experts")) {
      const auto x = f.object("experts");
      auto& e = m.experts;
      e.expert_parallel = x.integer("expert_parallel", 2, m.world_size);
      if (m.world_size % e.expert_parallel != 0)
        fail<IoError>(where, ": field '", x.name("expert_parallel"), "' ", e.expert_parallel,
                      " does not divide field 'world_size' ", m.world_size);
      e.shard_group_size = x.integer("shard_group_size", 1, m.world_size / e.expert_parallel);
      if ((m.world_size / e.expert_parallel) % e.shard_group_size != 0)
        fail<IoError>(where, ": field '", x.name("shard_group_size"), "' ", e.shard_group_size,
                      " does not divide the ", m.world_size / e.expert_parallel, " ranks holding the same experts");
      if (x.array("units").size() != m.units.size())
        fail<IoError>(where, ": field '", x.name("units"), "' lists ", x.array("units").size(), " units, field 'units' ",
                      m.units.size());
      for (size_t u = 0; u < m.units.size(); ++u) {
        const auto unit = x.element("units", u);
        Unit y;
        y.numel = unit.integer("numel", 0, max_count);
        y.padded = unit.integer("padded", y.numel, max_count);
        if (y.padded % e.shard_group_size != 0 || y.padded - y.numel >= e.shard_group_size)
          fail<IoError>(where, ": field '", unit.name("padded"), "' ", y.padded, " is not the ", y.numel,
                        " elements padded to a multiple of the experts' shard group size ", e.shard_group_size);
        std::vector<std::string> names;
        const auto& list = unit.array("params");
        for (size_t i = 0; i < list.size(); ++i) {
          if (!list[i].is_string() || list[i].get<std::string>().empty())
            fail<IoError>(where, ": field '", unit.name("params"), "[", i, "]' is ", JsonFields<>::shown(list[i]),
                          ", expected a parameter's name");
          if (std::find(names.begin(), names.end(), list[i].get<std::string>()) != names.end())
            fail<IoError>(where, ": field '", unit.name("params"), "[", i, "]' names '", list[i].get<std::string>(),
                          "' a second time");
          names.push_back(list[i].get<std::string>());
        }
        if (names.empty() != (y.numel == 0))
          fail<IoError>(where, ": field '", unit.name("params"), "' lists ", names.size(), " parameters for ", y.numel,
                        " elements");
        e.units.push_back(y);
        e.params.push_back(std::move(names));
      }
      if (m.has_checksums())
        e.checksums = read_checksums(x, "checksums", e.files(), [&](int64_t i) { return e.file_name(i); }, "expert files",
                                     "expert_parallel x shard_group_size");
    }
    return m;
  }
};

/// meta.json's "checksums" object from each file's CRCs (crcs[k]: one per unit; file_name(k) names file k; by
/// default the shard files).
template <class Name>
nlohmann::json checksums_json(const std::vector<std::vector<uint32_t>>& crcs, Name file_name) {
  nlohmann::json out = nlohmann::json::object();
  for (size_t k = 0; k < crcs.size(); ++k) {
    auto& list = out[file_name(static_cast<int64_t>(k))] = nlohmann::json::array();
    for (const auto crc : crcs[k]) list.push_back(crc_text(crc));
  }
  return out;
}
inline nlohmann::json checksums_json(const std::vector<std::vector<uint32_t>>& crcs) {
  const auto group = static_cast<int64_t>(crcs.size());
  return checksums_json(crcs, [&](int64_t k) { return shard_file_name(k, group); });
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

/// A unit's trained parameters as a checkpoint lays them out, by name: each parameter's elements (of the whole
/// parameter, every expert, as without expert parallelism) as runs in the unit's dense flat buffer (set -1) or in
/// expert file set e (format 3), so that a run at any expert parallelism finds the pieces of its own parameters.
class CheckpointLayout {
 public:
  /// `params`: the unit's trained parameters in the model's order, each with its whole element count; errors name
  /// the checkpoint (`where`) and the unit.
  CheckpointLayout(const CheckpointMeta& meta, size_t u, const std::vector<std::pair<std::string, int64_t>>& params,
                   const std::string& where, const std::string& unit_name) {
    const auto label = unit_label(u, unit_name);
    std::map<std::string, int64_t> whole;
    for (const auto& [name, numel] : params) whole[name] = numel;
    const auto& x = meta.experts;
    std::vector<std::string> experts = meta.has_experts() ? x.params[u] : std::vector<std::string>();
    int64_t flat = 0;
    for (const auto& [name, numel] : params) {
      if (std::find(experts.begin(), experts.end(), name) != experts.end()) continue;
      runs_[name].push_back({-1, flat, 0, numel});
      flat += numel;
    }
    if (flat != meta.units[u].numel)
      fail<IoError>(where, ": ", label, " has ", meta.units[u].numel, " elements", meta.has_experts() ? " besides its experts" : "",
                    " in the checkpoint and ", flat, " in this model");
    if (experts.empty()) return;
    const int64_t N = x.expert_parallel;
    int64_t per_set = 0;
    for (const auto& name : experts) {
      const auto it = whole.find(name);
      if (it == whole.end())
        fail<IoError>(where, ": ", label, ": the checkpoint's expert parameter '", name, "' is not a trained parameter of this unit");
      if (it->second % N != 0)
        fail<IoError>(where, ": ", label, ": parameter '", name, "' has ", it->second,
                      " elements in this model, which its ", N, " expert file sets cannot hold in equal parts");
      per_set += it->second / N;
    }
    if (per_set != x.units[u].numel)
      fail<IoError>(where, ": ", label, " has ", x.units[u].numel, " elements of experts per file set in the checkpoint and ",
                    per_set, " in this model");
    for (int64_t e = 0; e < N; ++e) {
      flat = 0;
      for (const auto& name : experts) {
        const int64_t count = whole[name] / N;
        runs_[name].push_back({e, flat, e * count, count});
        flat += count;
      }
    }
  }

  /// Calls fn(set, first element in the set's flat buffer, count, first element in the range) for each part of
  /// parameter `name`'s elements [whole, whole + n), in order.
  template <class Fn>
  void map(const std::string& name, int64_t whole, int64_t n, Fn&& fn) const {
    const auto it = runs_.find(name);
    SHARDLM_ASSERT(it != runs_.end(), "parameter ", name, " outside the checkpoint's layout");
    for (const auto& r : it->second) {
      const int64_t a = std::max(whole, r.whole), b = std::min(whole + n, r.whole + r.count);
      if (a < b) fn(r.set, r.flat + a - r.whole, b - a, a - whole);
    }
  }

 private:
  struct Run {
    int64_t set = -1, flat = 0, whole = 0, count = 0;  ///< elements [whole, whole + count) at `flat` of `set`
  };
  std::map<std::string, std::vector<Run>> runs_;
};

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
    SHARDLM_ASSERT(meta.has_checksums(), "no checksums to verify");
    check(summed, meta.checksums, u, [&](int64_t k) { return covered_elements(meta.units[u].numel, meta.saved_shard(u), k); },
          [&](int64_t k) { return dir / shard_file_name(k, meta.shard_group_size); }, unit_label(u, unit_name));
  }

  /// As verify(), for files of any naming: `want[k][u]` the CRC meta.json records for file k (path(k)), covered(k)
  /// the unit's elements there (0: skipped), `label` the unit as errors name it.
  template <class Covered, class Path>
  static void check(const std::vector<int32_t>& summed, const std::vector<std::vector<uint32_t>>& want, size_t u,
                    Covered covered, Path path, const std::string& label) {
    SHARDLM_ASSERT(summed.size() == want.size() * 32, "checksum counts of ", summed.size());
    for (size_t k = 0; k < want.size(); ++k) {
      if (covered(static_cast<int64_t>(k)) == 0) continue;
      uint32_t reg = 0;
      for (int b = 0; b < 32; ++b) reg |= static_cast<uint32_t>(summed[k * 32 + b] & 1) << b;
      const uint32_t got = ~reg, expected = want[k][u];
      if (got != expected)
        fail<IoError>(path(static_cast<int64_t>(k)).string(), ": ", label, ": its tensors fail their checksum: CRC32C ",
                      crc_text(got), ", meta.json records ", crc_text(expected),
                      " (the file is corrupt: resume from another checkpoint)");
    }
  }

 private:
  std::vector<uint32_t> acc_;
};

/// The shard files of a checkpoint, opened on first use, each tensor checked before a byte of it is read.
class ShardFiles {
 public:
  ShardFiles(fs::path dir, int64_t group)
      : dir_(std::move(dir)), name_([group](int64_t k) { return shard_file_name(k, group); }) {}
  /// Files named name(k) (an expert file set: CheckpointMeta::Experts::file_name).
  ShardFiles(fs::path dir, std::function<std::string(int64_t)> name) : dir_(std::move(dir)), name_(std::move(name)) {}

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
    if (!f) f = std::make_unique<io::SafetensorsReader>(dir_ / name_(k));
    return *f;
  }

 private:
  fs::path dir_;
  std::function<std::string(int64_t)> name_;
  std::map<int64_t, std::unique_ptr<io::SafetensorsReader>> files_;
};

}  // namespace shardlm::train
