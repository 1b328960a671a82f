#pragma once
// Sharded training checkpoints. A checkpoint of step s is the directory DIR/step-<s, 8 digits>/ holding
//   shard-<k>-of-<G>.safetensors  shard k of the shard group (written by the ranks of replica 0): per unit u
//                                 the tensors u<u>.master, u<u>.exp_avg, u<u>.exp_avg_sq (this shard, padded)
//   meta.json                     step, optimizer steps, world and shard group size, policies, and per unit
//                                 its name, element count and padded size
//   COMMITTED                     written by rank 0 last, after every rank's files are durable (a barrier)
// A directory without COMMITTED is never loaded, and never removed by --keep-last (a save may be in progress).
// Loading re-slices: a rank reads, for each unit, only the byte ranges of the saved shards that overlap its own
// shard, so a run resumes on another world size or shard group size.
// Training state beyond this is derived: data order and learning rate follow from the step.
#include <fcntl.h>
#include <nlohmann/json.hpp>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <map>
#include <memory>
#include <optional>
#include <string>
#include <thread>
#include <vector>

#include "shardlm/core/compat.hpp"
#include "shardlm/core/errors.hpp"
#include "shardlm/core/json.hpp"
#include "shardlm/core/log.hpp"
#include "shardlm/dist/groups.hpp"
#include "shardlm/engine/engine.hpp"
#include "shardlm/io/safetensors.hpp"

namespace shardlm::train {

namespace fs = std::filesystem;

inline fs::path checkpoint_path(const fs::path& dir, int64_t step) {
  char name[32];
  std::snprintf(name, sizeof name, "step-%08lld", static_cast<long long>(step));
  return dir / name;
}

/// The committed checkpoints under `dir`, oldest first, as (step, directory).
inline std::vector<std::pair<int64_t, fs::path>> committed_checkpoints(const fs::path& dir) {
  std::vector<std::pair<int64_t, fs::path>> out;
  if (!fs::is_directory(dir)) return out;
  for (const auto& entry : fs::directory_iterator(dir)) {
    const auto name = entry.path().filename().string();
    if (name.rfind("step-", 0) != 0 || !fs::exists(entry.path() / "COMMITTED")) continue;
    out.emplace_back(std::atoll(name.c_str() + 5), entry.path());
  }
  std::sort(out.begin(), out.end());
  return out;
}

/// The newest committed checkpoint under `dir`, if any.
inline std::optional<fs::path> latest_checkpoint(const fs::path& dir) {
  const auto all = committed_checkpoints(dir);
  if (all.empty()) return std::nullopt;
  return all.back().second;
}

/// --keep-last K (K > 0), by rank 0 right after the checkpoint of step `newest` committed: removes the committed
/// checkpoints older than it beyond the newest K, counting it. Left alone: every directory without COMMITTED (a save
/// in progress, of this run or another process, or one that died: nothing is ever loaded from them), and committed
/// checkpoints of later steps (another run's, e.g. before --resume none). A checkpoint is first renamed out of the
/// step-* names, so that a removal cut short leaves nothing --resume could pick; such leftovers are removed here too.
/// Returns the removed directories; failures are warnings, not errors (training goes on).
inline std::vector<fs::path> prune_checkpoints(const fs::path& dir, int64_t newest, int64_t keep) {
  std::vector<fs::path> removed;
  if (keep <= 0) return removed;
  std::vector<fs::path> older;
  for (const auto& [step, path] : committed_checkpoints(dir))
    if (step < newest) older.push_back(path);
  const size_t drop = older.size() > static_cast<size_t>(keep - 1) ? older.size() - static_cast<size_t>(keep - 1) : 0;
  std::error_code ec;
  for (size_t i = 0; i < drop; ++i) {
    const auto doomed = dir / (".removing-" + older[i].filename().string());
    fs::rename(older[i], doomed, ec);
    if (ec) {
      log::warn("--keep-last: cannot remove ", older[i].string(), ": ", ec.message());
      continue;
    }
    removed.push_back(older[i]);
  }
  std::vector<fs::path> leftovers;
  for (const auto& entry : fs::directory_iterator(dir, ec))
    if (entry.path().filename().string().rfind(".removing-step-", 0) == 0) leftovers.push_back(entry.path());
  for (const auto& path : leftovers) {
    compat::remove_all(path);
    if (fs::exists(path)) log::warn("--keep-last: cannot remove all of ", path.string());
  }
  return removed;
}

/// Writes `text` to `path` through a temporary file, fsynced, then renamed.
inline void write_file_atomically(const fs::path& path, const std::string& text) {
  const auto tmp = path.string() + ".tmp";
  {
    std::ofstream out(tmp, std::ios::trunc);
    out << text;
    out.flush();
    if (!out) fail<IoError>(tmp, ": cannot write");
  }
  const int fd = ::open(tmp.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd >= 0) ::fsync(fd), ::close(fd);
  if (std::rename(tmp.c_str(), path.c_str()) != 0) fail<IoError>(path.string(), ": cannot rename the temporary file into place");
}

/// The parts of a save, shared by the synchronous one (save_checkpoint) and the asynchronous one
/// (train/async_save.hpp):
///   begin_checkpoint     a collective: rank 0 creates the directory (refusing a committed one), every rank waits
///   checkpoint_meta      meta.json's content, taken when the state is (the optimizer step count moves on)
///   shard_tensors        this rank's shard file: views of the engine's state, or nothing outside replica 0
///   write_shard          writes the file (fsynced, renamed into place)
///   commit_checkpoint    rank 0, once every rank's file is in place: meta.json, then COMMITTED, then --keep-last
struct ShardFile {
  fs::path path;                                           ///< empty: this rank writes no file (a replica)
  std::vector<std::pair<std::string, at::Tensor>> tensors; ///< u<u>.master, u<u>.exp_avg, u<u>.exp_avg_sq
};

inline fs::path begin_checkpoint(dist::ProcessGroups& groups, const fs::path& dir, int64_t step) {
  const auto path = checkpoint_path(dir, step);
  if (groups.rank() == 0) {
    if (fs::exists(path / "COMMITTED")) fail<IoError>(path.string(), ": a committed checkpoint of this step exists already");
    fs::create_directories(path);
  }
  groups.world().barrier("checkpoint directory");
  return path;
}

inline nlohmann::json checkpoint_meta(const engine::Engine& engine, dist::ProcessGroups& groups, int64_t step,
                                      const nlohmann::json& run_info) {
  nlohmann::json meta = run_info;
  meta["format"] = 1;
  meta["step"] = step;
  meta["optimizer_steps"] = engine.optimizer_steps();
  meta["world_size"] = groups.size();
  meta["shard_group_size"] = groups.shard().size();
  meta["units"] = nlohmann::json::array();
  for (size_t u = 0; u < engine.num_units(); ++u) {
    const auto& unit = engine.unit(u);
    meta["units"].push_back({{"name", unit.name()}, {"numel", unit.numel()}, {"padded", unit.padded()}});
  }
  return meta;
}

inline ShardFile shard_tensors(engine::Engine& engine, dist::ProcessGroups& groups, const fs::path& path) {
  engine.settle();  // an offloaded update may still be running
  ShardFile file;
  if (groups.replicate().rank() != 0) return file;
  file.path = path / detail::cat("shard-", groups.shard().rank(), "-of-", groups.shard().size(), ".safetensors");
  for (size_t u = 0; u < engine.num_units(); ++u) {
    auto& unit = engine.unit(u);
    const auto tag = "u" + std::to_string(u) + ".";
    file.tensors.emplace_back(tag + "master", unit.master());
    file.tensors.emplace_back(tag + "exp_avg", unit.exp_avg());
    file.tensors.emplace_back(tag + "exp_avg_sq", unit.exp_avg_sq());
  }
  return file;
}

/// Writes this rank's shard file; then waits `delay` (a test's injected fault: a window in which to kill a job
/// mid-save, train::Faults).
inline void write_shard(const ShardFile& file, std::chrono::milliseconds delay = {}) {
  if (!file.path.empty()) io::save_safetensors(file.path, file.tensors);
  if (delay.count() > 0) std::this_thread::sleep_for(delay);
}

/// Rank 0, once every rank's shard file is durable: meta.json, then the COMMITTED marker, then --keep-last
/// (`keep_last` > 0) removes older checkpoints.
inline void commit_checkpoint(const fs::path& path, const nlohmann::json& meta, int64_t keep_last) {
  write_file_atomically(path / "meta.json", meta.dump(2) + "\n");
  write_file_atomically(path / "COMMITTED", "");
  for (const auto& old : prune_checkpoints(path.parent_path(), meta.at("step").get<int64_t>(), keep_last))
    log::info("shardlm: removed ", old.string(), " (--keep-last ", keep_last, ")");
}

/// Saves the engine's state at `step` under `dir` and waits until it is committed (a collective: every rank calls
/// it). `keep_last` > 0 then keeps only the newest that many committed checkpoints.
inline fs::path save_checkpoint(engine::Engine& engine, dist::ProcessGroups& groups, const fs::path& dir, int64_t step,
                                const nlohmann::json& run_info, int64_t keep_last = 0, std::chrono::milliseconds delay = {}) {
  const auto path = begin_checkpoint(groups, dir, step);
  write_shard(shard_tensors(engine, groups, path), delay);  // views of the state: written before training goes on
  groups.world().barrier("checkpoint shards");      // every shard file is durable (save_safetensors fsyncs and renames)
  if (groups.rank() == 0) commit_checkpoint(path, checkpoint_meta(engine, groups, step, run_info), keep_last);
  groups.world().barrier("checkpoint commit");
  return path;
}

/// A checkpoint's meta.json, every field checked before use (CheckpointMeta::read).
struct CheckpointMeta {
  struct Unit {
    std::string name;
    int64_t numel = 0, padded = 0;
  };
  int64_t step = 0;             ///< the optimizer steps the run had taken (data order and learning rate follow)
  int64_t optimizer_steps = 0;  ///< AdamW's step count (steps skipped for non-finite gradients do not count)
  int64_t world_size = 0;
  int64_t shard_group_size = 0;
  int64_t global_batch = 0;     ///< 0: not recorded
  std::vector<Unit> units;

  /// Reads and checks `path`/meta.json: every key present with an integer in its range, each unit's padded size a
  /// multiple of the shard group holding at least its elements. Errors name the file and the key.
  static CheckpointMeta read(const fs::path& dir) {
    const auto file = dir / "meta.json";
    const auto j = read_json(file);
    const auto where = file.string();
    if (!j.is_object()) fail<IoError>(where, ": must hold a JSON object, got ", j.type_name());
    auto integer = [&](const nlohmann::json& obj, const std::string& key, int64_t lo, int64_t hi, const std::string& in = "") {
      if (!obj.contains(key)) fail<IoError>(where, ": no \"", in, key, "\" key");
      const auto& v = obj[key];
      if (!v.is_number_integer())
        fail<IoError>(where, ": \"", in, key, "\" must be an integer, got ", v.is_number() ? v.dump() : v.type_name());
      const auto x = v.get<int64_t>();
      if (x < lo || x > hi) fail<IoError>(where, ": \"", in, key, "\" is ", x, ", expected ", lo, "..", hi);
      return x;
    };
    constexpr int64_t huge = int64_t{1} << 50;  // more than any count here can be
    CheckpointMeta m;
    m.step = integer(j, "step", 0, huge);
    m.optimizer_steps = integer(j, "optimizer_steps", 0, m.step);
    m.world_size = integer(j, "world_size", 1, 1 << 24);
    m.shard_group_size = integer(j, "shard_group_size", 1, m.world_size);
    if (m.world_size % m.shard_group_size != 0)
      fail<IoError>(where, ": \"shard_group_size\" ", m.shard_group_size, " does not divide \"world_size\" ", m.world_size);
    if (j.contains("global_batch")) m.global_batch = integer(j, "global_batch", 1, huge);
    if (!j.contains("units") || !j["units"].is_array()) fail<IoError>(where, ": no \"units\" list");
    for (size_t u = 0; u < j["units"].size(); ++u) {
      const auto& unit = j["units"][u];
      const auto in = detail::cat("units[", u, "].");
      if (!unit.is_object()) fail<IoError>(where, ": \"units[", u, "]\" must be an object");
      Unit x;
      if (unit.contains("name") && unit["name"].is_string()) x.name = unit["name"].get<std::string>();
      x.numel = integer(unit, "numel", 0, huge, in);
      x.padded = integer(unit, "padded", x.numel, huge, in);
      if (x.padded % m.shard_group_size != 0 || x.padded - x.numel >= m.shard_group_size)
        fail<IoError>(where, ": \"", in, "padded\" ", x.padded, " is not the ", x.numel, " elements padded to a multiple of ",
                      "the shard group size ", m.shard_group_size);
      m.units.push_back(std::move(x));
    }
    return m;
  }
};

/// Loads a committed checkpoint into the engine (every rank calls it); returns its meta.json.
inline CheckpointMeta load_checkpoint(engine::Engine& engine, dist::ProcessGroups& groups, const fs::path& path) {
  if (!fs::is_directory(path)) fail<IoError>(path.string(), ": not a checkpoint directory");
  if (!fs::exists(path / "COMMITTED"))
    fail<IoError>(path.string(), ": not a committed checkpoint (no COMMITTED marker: an interrupted save?)");
  const auto meta = CheckpointMeta::read(path);
  const auto& units = meta.units;
  if (units.size() != engine.num_units())
    fail<IoError>(path.string(), ": the checkpoint has ", units.size(), " units, this model ", engine.num_units(),
                  " (a different model or depth)");
  const int64_t saved_group = meta.shard_group_size;
  engine.settle();
  std::map<int64_t, std::unique_ptr<io::SafetensorsFile>> files;
  auto file = [&](int64_t k) -> io::SafetensorsFile& {
    auto& f = files[k];
    if (!f) f = std::make_unique<io::SafetensorsFile>(path / detail::cat("shard-", k, "-of-", saved_group, ".safetensors"));
    return *f;
  };
  at::NoGradGuard no_grad;
  for (size_t u = 0; u < engine.num_units(); ++u) {
    auto& unit = engine.unit(u);
    const int64_t numel = units[u].numel, padded = units[u].padded;
    if (numel != unit.numel())
      fail<IoError>(path.string(), ": unit ", u, " (", unit.name(), ") has ", numel, " elements in the checkpoint and ",
                    unit.numel(), " in this model");
    if (numel == 0) continue;  // nothing trains in this unit (a LoRA run's embedding)
    const int64_t saved_shard = padded / saved_group, shard = unit.shard_numel();
    const int64_t lo = shard * groups.shard().rank(), hi = std::min(lo + shard, numel);
    for (auto [what, dst] : {std::pair<const char*, at::Tensor*>{"master", &unit.master()},
                             {"exp_avg", &unit.exp_avg()}, {"exp_avg_sq", &unit.exp_avg_sq()}}) {
      dst->zero_();
      const auto name = detail::cat("u", u, ".", what);
      for (int64_t k = lo / saved_shard; k * saved_shard < hi; ++k) {
        const auto& saved = file(k).info(name);
        if (saved.numel() != saved_shard)
          fail<IoError>(file(k).path().string(), ": tensor '", name, "' has ", saved.numel(), " elements, expected ", saved_shard);
        const auto type = io::scalar_type_of(saved);
        if (!at::isFloatingType(type))
          fail<IoError>(file(k).path().string(), ": tensor '", name, "' has dtype ", saved.dtype, ", expected a floating dtype");
        // Only the overlap [a, b) of saved shard k and this rank's shard is read: straight into the state when
        // it is a host tensor of the saved dtype, else through a host buffer of that size.
        const int64_t a = std::max(lo, k * saved_shard), b = std::min(hi, (k + 1) * saved_shard);
        auto part = dst->narrow(0, a - lo, b - a);
        auto host = part.is_cpu() && part.scalar_type() == type ? part : at::empty({b - a}, at::TensorOptions().dtype(type));
        const uint64_t size = saved.element_size();
        file(k).read_bytes(saved, (a - k * saved_shard) * size, (b - a) * size, host.data_ptr());
        if (!host.is_same(part)) part.copy_(host);
      }
    }
  }
  engine.state_loaded(meta.optimizer_steps);
  return meta;
}

}  // namespace shardlm::train
