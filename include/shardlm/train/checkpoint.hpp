#pragma once
// Sharded training checkpoints. A checkpoint of step s is the directory DIR/step-<s, 8 digits>/ holding
//   shard-<k>-of-<G>.safetensors  shard k of the shard group (written by the ranks of replica 0): per unit u
//                                 the tensors u<u>.master, u<u>.exp_avg, u<u>.exp_avg_sq (this shard, padded)
//   meta.json                     step, optimizer steps, world and shard group size, policies, and per unit
//                                 its name, element count and padded size
//   COMMITTED                     written by rank 0 last, after every rank's files are durable (a barrier)
// A directory without COMMITTED is never loaded. Loading re-slices: a rank reads, for each unit, the parts of
// the saved shards that overlap its own shard, so a run resumes on another world size or shard group size.
// Training state beyond this is derived: data order and learning rate follow from the step.
#include <nlohmann/json.hpp>

#include <cstdio>
#include <filesystem>
#include <fstream>
#include <optional>
#include <string>

#include "shardlm/core/errors.hpp"
#include "shardlm/core/log.hpp"
#include "shardlm/dist/groups.hpp"
#include "shardlm/engine/flat_unit.hpp"
#include "shardlm/io/safetensors.hpp"

namespace shardlm::train {

namespace fs = std::filesystem;

inline fs::path checkpoint_path(const fs::path& dir, int64_t step) {
  char name[32];
  std::snprintf(name, sizeof name, "step-%08lld", static_cast<long long>(step));
  return dir / name;
}

/// The newest committed checkpoint under `dir`, if any.
inline std::optional<fs::path> latest_checkpoint(const fs::path& dir) {
  std::optional<fs::path> best;
  int64_t best_step = -1;
  if (!fs::is_directory(dir)) return best;
  for (const auto& entry : fs::directory_iterator(dir)) {
    const auto name = entry.path().filename().string();
    if (name.rfind("step-", 0) != 0 || !fs::exists(entry.path() / "COMMITTED")) continue;
    const int64_t step = std::atoll(name.c_str() + 5);
    if (step > best_step) best_step = step, best = entry.path();
  }
  return best;
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

/// Saves the engine's state at `step` under `dir` (a collective: every rank calls it).
template <class Engine>
fs::path save_checkpoint(Engine& engine, dist::ProcessGroups& groups, const fs::path& dir, int64_t step,
                         const nlohmann::json& run_info) {
  const auto path = checkpoint_path(dir, step);
  auto& shard = groups.shard();
  if (groups.rank() == 0) {
    if (fs::exists(path / "COMMITTED")) fail<IoError>(path.string(), ": a committed checkpoint of this step exists already");
    fs::create_directories(path);
  }
  groups.world().barrier();
  if (groups.replicate().rank() == 0) {
    std::vector<std::pair<std::string, at::Tensor>> tensors;
    for (size_t u = 0; u < engine.num_units(); ++u) {
      const auto& unit = engine.unit(u);
      const auto tag = "u" + std::to_string(u) + ".";
      tensors.emplace_back(tag + "master", unit.master().cpu());
      tensors.emplace_back(tag + "exp_avg", unit.exp_avg().cpu());
      tensors.emplace_back(tag + "exp_avg_sq", unit.exp_avg_sq().cpu());
    }
    io::save_safetensors(path / detail::cat("shard-", shard.rank(), "-of-", shard.size(), ".safetensors"), tensors);
  }
  groups.world().barrier();  // every shard file is durable (save_safetensors fsyncs and renames)
  if (groups.rank() == 0) {
    nlohmann::json meta = run_info;
    meta["format"] = 1;
    meta["step"] = step;
    meta["optimizer_steps"] = engine.optimizer_steps();
    meta["world_size"] = groups.size();
    meta["shard_group_size"] = shard.size();
    meta["units"] = nlohmann::json::array();
    for (size_t u = 0; u < engine.num_units(); ++u) {
      const auto& unit = engine.unit(u);
      meta["units"].push_back({{"name", unit.name()}, {"numel", unit.numel()}, {"padded", unit.padded()}});
    }
    write_file_atomically(path / "meta.json", meta.dump(2) + "\n");
    write_file_atomically(path / "COMMITTED", "");
  }
  groups.world().barrier();
  return path;
}

/// Loads a committed checkpoint into the engine (every rank calls it); returns its meta.json.
template <class Engine>
nlohmann::json load_checkpoint(Engine& engine, dist::ProcessGroups& groups, const fs::path& path) {
  if (!fs::exists(path / "COMMITTED"))
    fail<IoError>(path.string(), ": not a committed checkpoint (no COMMITTED marker: an interrupted save?)");
  nlohmann::json meta;
  try {
    meta = nlohmann::json::parse(std::ifstream(path / "meta.json"));
  } catch (const std::exception& e) {
    fail<IoError>((path / "meta.json").string(), ": cannot parse: ", e.what());
  }
  const auto& units = meta.at("units");
  if (units.size() != engine.num_units())
    fail<IoError>(path.string(), ": the checkpoint has ", units.size(), " units, this model ", engine.num_units(),
                  " (a different model or depth)");
  const int64_t saved_group = meta.at("shard_group_size").get<int64_t>();
  std::map<int64_t, std::unique_ptr<io::SafetensorsFile>> files;
  auto file = [&](int64_t k) -> io::SafetensorsFile& {
    auto& f = files[k];
    if (!f) f = std::make_unique<io::SafetensorsFile>(path / detail::cat("shard-", k, "-of-", saved_group, ".safetensors"));
    return *f;
  };
  at::NoGradGuard no_grad;
  for (size_t u = 0; u < engine.num_units(); ++u) {
    auto& unit = engine.unit(u);
    const int64_t numel = units[u].at("numel").get<int64_t>(), padded = units[u].at("padded").get<int64_t>();
    if (numel != unit.numel())
      fail<IoError>(path.string(), ": unit ", u, " (", unit.name(), ") has ", numel, " elements in the checkpoint and ",
                    unit.numel(), " in this model");
    const int64_t saved_shard = padded / saved_group, shard = unit.shard_numel();
    const int64_t lo = shard * groups.shard().rank(), hi = std::min(lo + shard, numel);
    for (const char* what : {"master", "exp_avg", "exp_avg_sq"}) {
      auto& dst = std::string(what) == "master" ? unit.master() : std::string(what) == "exp_avg" ? unit.exp_avg() : unit.exp_avg_sq();
      dst.zero_();
      for (int64_t k = lo / saved_shard; k * saved_shard < hi; ++k) {
        const int64_t a = std::max(lo, k * saved_shard), b = std::min(hi, (k + 1) * saved_shard);
        const auto name = detail::cat("u", u, ".", what);
        const auto saved = file(k).read(name);
        if (saved.numel() != saved_shard)
          fail<IoError>(file(k).path().string(), ": tensor '", name, "' has ", saved.numel(), " elements, expected ", saved_shard);
        dst.narrow(0, a - lo, b - a).copy_(saved.narrow(0, a - k * saved_shard, b - a));
      }
    }
  }
  engine.state_loaded(meta.at("optimizer_steps").get<int64_t>());
  return meta;
}

}  // namespace shardlm::train
