#pragma once
// Sharded training checkpoints. A checkpoint of step s is the directory DIR/step-<s, 8 digits>/ holding
//   shard-<k>-of-<G>.safetensors  shard k of the shard group (written by the ranks of replica 0): per unit u
//                                 the tensors u<u>.master, u<u>.exp_avg, u<u>.exp_avg_sq (this shard, padded)
//   experts-<e>-of-<N>.shard-<k>-of-<Ge>.safetensors   with --expert-parallel N only: the experts [e E/N, (e+1) E/N)
//                                 of each unit, shard k of the ranks holding them (the units' files then hold the rest)
//   meta.json                     step, optimizer steps, world and shard group size, policies, per unit its name,
//                                 element count and padded size, and the CRC32C of every shard tensor
//                                 (train/checkpoint_format.hpp: the format, its checks and the checksums)
//   COMMITTED                     written by rank 0 last, after every rank's files are durable (the checksums'
//                                 all-gather)
// A directory without COMMITTED is never loaded, and never removed by --keep-last (a save may be in progress).
// Loading re-slices: a rank reads, for each unit, only the byte ranges of the saved shards that overlap its own
// shard, so a run resumes on another world size or shard group size; the bytes read are checked against the
// checksums (each rank's pieces combined over the shard group). With expert parallelism in the checkpoint or the run,
// parameters are found by name instead (load_by_layout), so that a run resumes at another N or without it.
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
#include "shardlm/train/checkpoint_format.hpp"

namespace shardlm::train {

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
///   write_shard          writes the file (fsynced, renamed into place) and returns its tensors' CRC32Cs
///   gather_checksums     a collective: every rank's CRC32Cs, once every rank's file is in place
///   commit_checkpoint    rank 0: meta.json with the checksums, then COMMITTED, then --keep-last
struct ShardFile {
  fs::path path;                                           ///< empty: this rank writes no file (a replica)
  std::vector<std::pair<std::string, at::Tensor>> tensors; ///< u<u>.master, u<u>.exp_avg, u<u>.exp_avg_sq
  std::vector<uint64_t> covered_bytes;                     ///< per tensor: the bytes its checksum covers (not the padding)
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

inline nlohmann::json checkpoint_meta(engine::Engine& engine, dist::ProcessGroups& groups, int64_t step,
                                      const nlohmann::json& run_info) {
  nlohmann::json meta = run_info;
  meta["format"] = engine.expert_groups() ? checkpoint_format : checkpoint_format_dense;
  meta["step"] = step;
  meta["optimizer_steps"] = engine.optimizer_steps();
  meta["world_size"] = groups.size();
  meta["shard_group_size"] = groups.shard().size();
  meta["units"] = nlohmann::json::array();
  for (size_t u = 0; u < engine.num_units(); ++u) {
    const auto& unit = engine.unit(u);
    meta["units"].push_back({{"name", unit.name()}, {"numel", unit.numel()}, {"padded", unit.padded()}});
  }
  if (auto* eg = engine.expert_groups()) {  // the experts' file sets (checkpoint_format.hpp: format 3)
    auto units = nlohmann::json::array();
    for (size_t u = 0; u < engine.num_units(); ++u) {
      const auto& mine = *engine.experts(u);
      auto params = nlohmann::json::array();
      for (const auto& slot : mine.slots()) params.push_back(slot.name);
      units.push_back({{"numel", mine.numel()}, {"padded", mine.padded()}, {"params", params}});
    }
    meta["experts"] = {{"expert_parallel", groups.expert_parallel()}, {"shard_group_size", eg->shard().size()},
                       {"units", units}};
  }
  return meta;
}

/// The expert file set this rank writes with expert parallelism (its experts' shard: file e Ge + k of the
/// experts-<e>-of-<N>.shard-<k>-of-<Ge> files), and that file's index; nothing without it or outside the ranks
/// holding the experts' first replica.
inline std::pair<ShardFile, int64_t> expert_tensors(engine::Engine& engine, dist::ProcessGroups& groups, const fs::path& path) {
  ShardFile file;
  auto* eg = engine.expert_groups();
  if (!eg || eg->replicate().rank() != 0) return {file, -1};
  engine.settle();
  const int64_t e = groups.expert().rank(), N = groups.expert_parallel(), k = eg->shard().rank(), G = eg->shard().size();
  file.path = path / expert_file_name(e, N, k, G);
  for (size_t u = 0; u < engine.num_units(); ++u) {
    auto& unit = *engine.experts(u);
    const auto covered = static_cast<uint64_t>(covered_elements(unit.numel(), unit.shard_numel(), k));
    for (size_t kind = 0; kind < shard_tensor_kinds.size(); ++kind) {
      const auto& t = kind == 0 ? unit.master() : kind == 1 ? unit.exp_avg() : unit.exp_avg_sq();
      file.tensors.emplace_back(shard_tensor_name(u, kind), t);
      file.covered_bytes.push_back(covered * t.element_size());
    }
  }
  return {std::move(file), e * G + k};
}

inline ShardFile shard_tensors(engine::Engine& engine, dist::ProcessGroups& groups, const fs::path& path) {
  engine.settle();  // an offloaded update may still be running
  ShardFile file;
  if (groups.replicate().rank() != 0) return file;
  const int k = groups.shard().rank();
  file.path = path / shard_file_name(k, groups.shard().size());
  for (size_t u = 0; u < engine.num_units(); ++u) {
    auto& unit = engine.unit(u);
    const auto covered = static_cast<uint64_t>(covered_elements(unit.numel(), unit.shard_numel(), k));
    for (size_t kind = 0; kind < shard_tensor_kinds.size(); ++kind) {
      const auto& t = kind == 0 ? unit.master() : kind == 1 ? unit.exp_avg() : unit.exp_avg_sq();
      file.tensors.emplace_back(shard_tensor_name(u, kind), t);
      file.covered_bytes.push_back(covered * t.element_size());
    }
  }
  return file;
}

/// Writes this rank's shard file and returns, per unit, the CRC32C of its three tensors' covered bytes (computed as
/// they are written; none without a file); then waits `delay` (a test's injected fault: a window in which to kill a
/// job mid-save, train::Faults).
inline std::vector<uint32_t> write_shard(const ShardFile& file, std::chrono::milliseconds delay = {}) {
  std::vector<uint32_t> units;
  if (!file.path.empty()) {
    const auto crcs = io::save_safetensors(file.path, file.tensors, {}, file.covered_bytes);
    for (size_t i = 0; i < crcs.size(); i += 3)  // master || exp_avg || exp_avg_sq
      units.push_back(crc32c_combine(crc32c_combine(crcs[i], crcs[i + 1], file.covered_bytes[i + 1]), crcs[i + 2],
                                     file.covered_bytes[i + 2]));
  }
  if (delay.count() > 0) std::this_thread::sleep_for(delay);
  return units;
}

/// A collective, once this rank's file is written: every rank's CRC32Cs (`mine`, empty for a rank that writes no
/// file), as the files' lists for meta.json: of the shard files (k: the writer's rank in its shard group), or of
/// `files` files where this rank's is file `index` (an expert file set). `units`: the engine's.
inline std::vector<std::vector<uint32_t>> gather_checksums(dist::ProcessGroups& groups, const at::Device& device,
                                                           size_t units, const std::vector<uint32_t>& mine,
                                                           int64_t index = -1, int64_t files = -1) {
  if (files < 0) index = groups.shard().rank(), files = groups.shard().size();
  const int64_t n = static_cast<int64_t>(units) + 1;  // [file index or -1, a CRC per unit]
  SHARDLM_ASSERT(mine.empty() || static_cast<int64_t>(mine.size()) == n - 1, "CRCs of ", mine.size(), " tensors");
  auto in = at::full({n}, -1, at::kLong);
  if (!mine.empty()) {
    in[0] = index;
    for (size_t i = 0; i < mine.size(); ++i) in[static_cast<int64_t>(i) + 1] = static_cast<int64_t>(mine[i]);
  }
  auto out = at::empty({n * groups.size()}, at::TensorOptions().dtype(at::kLong).device(device));
  groups.world().all_gather(out, in.to(device), "checkpoint checksums");
  const auto all = out.cpu();
  const auto* p = all.data_ptr<int64_t>();
  std::vector<std::vector<uint32_t>> lists(static_cast<size_t>(files));
  for (int r = 0; r < groups.size(); ++r) {
    const auto* row = p + r * n;
    if (row[0] < 0) continue;
    auto& file = lists[static_cast<size_t>(row[0])];
    for (int64_t i = 1; i < n; ++i) file.push_back(static_cast<uint32_t>(row[i]));
  }
  return lists;
}

/// Rank 0, once every rank's shard file is durable: meta.json with the files' checksums (`expert_crcs`: the expert
/// file sets', with expert parallelism), then the COMMITTED marker, then --keep-last (`keep_last` > 0) removes older
/// checkpoints.
inline void commit_checkpoint(const fs::path& path, nlohmann::json meta, const std::vector<std::vector<uint32_t>>& crcs,
                              int64_t keep_last, const std::vector<std::vector<uint32_t>>& expert_crcs = {}) {
  meta["checksum"] = "crc32c";
  meta["checksums"] = checksums_json(crcs);
  if (meta.contains("experts")) {
    auto& x = meta["experts"];
    const auto N = x.at("expert_parallel").get<int64_t>(), G = x.at("shard_group_size").get<int64_t>();
    SHARDLM_ASSERT(static_cast<int64_t>(expert_crcs.size()) == N * G, "checksums of ", expert_crcs.size(), " expert files");
    x["checksums"] = checksums_json(expert_crcs, [&](int64_t i) { return expert_file_name(i / G, N, i % G, G); });
  }
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
  // views of the state: written before training goes on; the gather waits for every rank's file (fsynced, renamed)
  const auto crcs = write_shard(shard_tensors(engine, groups, path), delay);
  const auto all = gather_checksums(groups, engine.device(), engine.num_units(), crcs);
  std::vector<std::vector<uint32_t>> experts;
  if (auto* eg = engine.expert_groups()) {
    const auto [file, index] = expert_tensors(engine, groups, path);
    experts = gather_checksums(groups, engine.device(), engine.num_units(), write_shard(file), index,
                               groups.expert_parallel() * eg->shard().size());
  }
  if (groups.rank() == 0) commit_checkpoint(path, checkpoint_meta(engine, groups, step, run_info), all, keep_last, experts);
  groups.world().barrier("checkpoint commit");
  return path;
}

/// A collective over `group`: the sum of `values` over its ranks (checksums as bit counts, failure flags).
inline std::vector<int32_t> sum_over(dist::Communicator& group, const at::Device& device, const std::vector<int32_t>& values) {
  auto t = at::tensor(values, at::kInt).to(device);
  group.all_reduce(t, dist::Reduce::Sum, "checkpoint checksums");
  const auto host = t.cpu();
  return std::vector<int32_t>(host.data_ptr<int32_t>(), host.data_ptr<int32_t>() + host.numel());
}

/// Reads `part.numel()` elements of unit u's tensor of `kind` from file k of `files`, starting at element `first` of
/// the file's shard (of `saved_shard` elements, `covered` of them the unit's), into `part`, adding the piece's CRC to
/// `crc` (null: unverified). Straight into the state when it is a host tensor of the saved dtype, else through a
/// host buffer.
inline void read_piece(ShardFiles& files, int64_t k, size_t u, size_t kind, int64_t saved_shard, int64_t covered,
                       int64_t first, at::Tensor part, PieceCrc* crc) {
  const auto& saved = files.tensor(k, u, kind, saved_shard);
  const auto type = io::scalar_type_of(saved);
  const auto [bytes, start] = files.covered_bytes(k, u, kind, saved_shard, covered);
  auto host = part.is_cpu() && part.scalar_type() == type ? part : at::empty({part.numel()}, type);
  files.read(k, saved, first, part.numel(), host.data_ptr(), crc, start, bytes);
  if (!host.is_same(part)) part.copy_(host);
}

/// Loading where the checkpoint or this run has expert parallelism (else load_checkpoint's re-slicing of the unit's
/// flat buffers, which are then laid out alike): each part of this rank's shards, dense and experts, is a range of
/// elements of one parameter, found by name in the checkpoint's layout (CheckpointLayout) and read from the pieces
/// of the files that hold it. The checksums: the first replica of each group (the ranks with replicate rank 0: of
/// the shard group for the units, of the expert groups for the experts) reads every saved element exactly once, so
/// their pieces, xored over the world, give each file's CRC32C (the other replicas read the same bytes, unverified).
/// A failure is kept in `error` (the caller stops every rank together).
inline void load_by_layout(engine::Engine& engine, dist::ProcessGroups& groups, const fs::path& path,
                           const CheckpointMeta& meta, std::string& error) {
  auto* eg = engine.expert_groups();
  const int64_t N = groups.expert_parallel(), e_rank = eg ? groups.expert().rank() : 0;
  const auto& x = meta.experts;
  ShardFiles dense(path, meta.shard_group_size), experts(path, [&x](int64_t i) { return x.file_name(i); });
  const auto world_sum = [&](const std::vector<int32_t>& values) { return sum_over(groups.world(), engine.device(), values); };
  for (size_t u = 0; u < engine.num_units(); ++u) {
    auto& unit = engine.unit(u);
    engine::FlatUnit* mine = eg ? engine.experts(u) : nullptr;
    std::map<std::string, int64_t> whole;  // every trained parameter's elements in the whole model
    for (const auto& slot : unit.slots()) whole[slot.name] = slot.numel;
    if (mine)
      for (const auto& slot : mine->slots()) whole[slot.name] = slot.numel * N;
    std::vector<std::pair<std::string, int64_t>> params;
    for (const auto& name : engine.parameter_names(u))
      if (whole.count(name)) params.emplace_back(name, whole[name]);
    PieceCrc dense_crc(static_cast<size_t>(meta.shard_group_size));
    PieceCrc expert_crc(static_cast<size_t>(meta.has_experts() ? x.files() : 0));
    if (error.empty()) {
      try {
        const CheckpointLayout layout(meta, u, params, path.string(), unit.name());
        // Reads this rank's shard of `flat` (its experts' group when `expert`), adding its pieces' CRCs if `verified`.
        const auto load = [&](engine::FlatUnit& flat, bool expert, bool verified) {
          if (flat.empty()) return;
          for (size_t kind = 0; kind < shard_tensor_kinds.size(); ++kind) {
            at::Tensor& dst = kind == 0 ? flat.master() : kind == 1 ? flat.exp_avg() : flat.exp_avg_sq();
            dst.zero_();
            flat.for_each_in_shard([&](const engine::Slot& slot, int64_t in_param, int64_t in_shard, int64_t n) {
              const int64_t first = (expert ? e_rank * slot.numel : 0) + in_param;
              layout.map(slot.name, first, n, [&](int64_t set, int64_t begin, int64_t count, int64_t offset) {
                const bool ex = set >= 0;
                auto& files = ex ? experts : dense;
                const int64_t saved_shard = ex ? x.saved_shard(u) : meta.saved_shard(u);
                const int64_t numel = ex ? x.units[u].numel : meta.units[u].numel;
                const int64_t base = ex ? set * x.shard_group_size : 0;  // the set's first file
                PieceCrc* crc = verified && meta.has_checksums() ? (ex ? &expert_crc : &dense_crc) : nullptr;
                for_each_saved_piece(saved_shard, begin, begin + count, [&](const SavedPiece& piece) {
                  read_piece(files, base + piece.file, u, kind, saved_shard, covered_elements(numel, saved_shard, piece.file),
                             piece.begin - piece.file * saved_shard,
                             dst.narrow(0, in_shard + offset + piece.begin - begin, piece.end - piece.begin), crc);
                });
              });
            });
          }
        };
        load(unit, false, groups.replicate().rank() == 0);
        if (mine) load(*mine, true, eg->replicate().rank() == 0);
      } catch (const Error& e) {
        error = e.what();
      }
    }
    if (world_sum({error.empty() ? 0 : 1})[0] > 0) {
      if (error.empty())
        error = detail::cat(path.string(), ": ", unit_label(u, unit.name()), " could not be read by another rank (its error says why)");
      continue;
    }
    if (!meta.has_checksums()) continue;
    auto counts = dense_crc.counts();
    const auto more = expert_crc.counts();
    counts.insert(counts.end(), more.begin(), more.end());
    const auto summed = world_sum(counts);
    const auto split = summed.begin() + meta.shard_group_size * 32;
    try {
      PieceCrc::verify(std::vector<int32_t>(summed.begin(), split), meta, u, unit.name(), path);
      if (meta.has_experts())
        PieceCrc::check(
            std::vector<int32_t>(split, summed.end()), x.checksums, u,
            [&](int64_t i) { return covered_elements(x.units[u].numel, x.saved_shard(u), i % x.shard_group_size); },
            [&](int64_t i) { return path / x.file_name(i); }, unit_label(u, unit.name()) + " experts");
    } catch (const Error& e) {
      error = e.what();
    }
  }
}

/// Loads a committed checkpoint into the engine (every rank calls it); returns its meta.json. Each rank reads the
/// pieces of the saved shards that overlap its own shard; their checksums are combined over the shard group unit by
/// unit, with a flag for a rank whose reads failed, so that every rank stops together, with the error of the rank
/// that found it, rather than leaving the others waiting in a collective.
inline CheckpointMeta load_checkpoint(engine::Engine& engine, dist::ProcessGroups& groups, const fs::path& path) {
  if (!fs::is_directory(path)) fail<IoError>(path.string(), ": not a checkpoint directory");
  if (!fs::exists(path / "COMMITTED"))
    fail<IoError>(path.string(), ": not a committed checkpoint (no COMMITTED marker: an interrupted save?)");
  const auto meta = CheckpointMeta::read(path);
  const auto& units = meta.units;
  if (units.size() != engine.num_units())
    fail<IoError>(path.string(), ": the checkpoint has ", units.size(), " units, this model ", engine.num_units(),
                  " (a different model or depth)");
  // Expert parallelism, in the checkpoint or in this run: parameters are mapped by name (load_by_layout).
  const bool by_layout = meta.has_experts() || engine.expert_groups();
  for (size_t u = 0; u < units.size(); ++u) {
    const auto& unit = engine.unit(u);
    if (!units[u].name.empty() && units[u].name != unit.name())
      fail<IoError>(path.string(), ": unit ", u, " is '", units[u].name, "' in the checkpoint and '", unit.name(),
                    "' in this model (a different model)");
    if (!by_layout && units[u].numel != unit.numel())
      fail<IoError>(path.string(), ": ", unit_label(u, unit.name()), " has ", units[u].numel,
                    " elements in the checkpoint and ", unit.numel(), " in this model");
  }
  if (!meta.has_checksums() && groups.rank() == 0)
    log::warn(path.string(), ": written before checkpoints carried checksums (format ", meta.format,
              "): its shards are loaded unverified");
  engine.settle();  // an offloaded update may still be running
  ShardFiles files(path, meta.shard_group_size);
  std::string error;  // this rank's first failure: reported once every rank has reached the end
  const auto device = engine.device();
  const auto group_sum = [&](const std::vector<int32_t>& values) { return sum_over(groups.shard(), device, values); };
  at::NoGradGuard no_grad;
  if (by_layout) load_by_layout(engine, groups, path, meta, error);
  for (size_t u = 0; u < engine.num_units() && !by_layout; ++u) {
    auto& unit = engine.unit(u);
    const int64_t numel = units[u].numel;
    if (numel == 0) continue;  // nothing trains in this unit (a LoRA run's embedding)
    const int64_t saved_shard = meta.saved_shard(u), shard = unit.shard_numel();
    const int64_t lo = std::min(shard * groups.shard().rank(), numel), hi = std::min(lo + shard, numel);
    std::optional<PieceCrc> crc;
    if (meta.has_checksums()) crc.emplace(static_cast<size_t>(meta.shard_group_size));
    if (error.empty()) {
      try {
        for (size_t kind = 0; kind < shard_tensor_kinds.size(); ++kind) {
          at::Tensor& dst = kind == 0 ? unit.master() : kind == 1 ? unit.exp_avg() : unit.exp_avg_sq();
          dst.zero_();
          for_each_saved_piece(saved_shard, lo, hi, [&](const SavedPiece& piece) {
            read_piece(files, piece.file, u, kind, saved_shard, covered_elements(numel, saved_shard, piece.file),
                       piece.begin - piece.file * saved_shard, dst.narrow(0, piece.begin - lo, piece.end - piece.begin),
                       crc ? &*crc : nullptr);
          });
        }
      } catch (const Error& e) {
        error = e.what();
      }
    }
    // Whether every rank of the shard group read its pieces, then their checksums combined (an xor, as bit counts).
    if (group_sum({error.empty() ? 0 : 1})[0] > 0) {
      if (error.empty())
        error = detail::cat(path.string(), ": ", unit_label(u, unit.name()), " could not be read by another rank of the ",
                            "shard group (its error says why)");
      continue;
    }
    if (crc) {
      try {
        PieceCrc::verify(group_sum(crc->counts()), meta, u, unit.name(), path);
      } catch (const Error& e) {
        error = e.what();
      }
    }
  }
  auto failed = at::full({1}, error.empty() ? 0 : 1, at::TensorOptions().dtype(at::kInt).device(device));
  groups.world().all_reduce(failed, dist::Reduce::Sum, "checkpoint loaded");
  if (!error.empty()) fail<IoError>(error);
  if (const auto n = failed.cpu().item<int>(); n > 0)
    fail<IoError>(path.string(), ": loading failed on ", n, " rank(s) (their errors say why)");
  engine.state_loaded(meta.optimizer_steps);
  return meta;
}

}  // namespace shardlm::train
