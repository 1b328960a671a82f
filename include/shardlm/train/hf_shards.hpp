#pragma once
// Hugging Face checkpoints to and from the engine's shards, without ever holding a whole unit on any rank.
//
// Loading: each unit's parameters, flattened in order and padded to the shard group size G, make a FlatUnit;
// rank r owns elements [r S, (r + 1) S). Those elements are pieces of a few tensors, and each piece is one
// contiguous byte range of a safetensors file: every rank reads only its ranges (parallel preads, converted to
// the master dtype on the way), so the job reads the checkpoint once per replica, 1/G of it per rank.
//
// Export: every rank computes the same layout (tensors in unit order, cut into files of at most
// --export-max-file-gb, each file's header); rank 0 creates the files at their final size and writes the
// headers; each rank of the first replica pwrites its shards' pieces (in the export dtype) at their offsets;
// then rank 0 renames the files into place and writes model.safetensors.index.json and config.json.
#include <fcntl.h>
#include <unistd.h>

#include <algorithm>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <map>
#include <memory>
#include <set>
#include <string>
#include <thread>
#include <vector>

#include "shardlm/core/progress.hpp"
#include "shardlm/dist/groups.hpp"
#include "shardlm/engine/engine.hpp"
#include "shardlm/io/hf.hpp"
#include "shardlm/io/safetensors.hpp"
#include "shardlm/model/config.hpp"
#include "shardlm/train/checkpoint.hpp"  // write_file_atomically
#include "shardlm/train/expert_parallel.hpp"

namespace shardlm::train {

/// Read threads per rank: this node's cores shared among its ranks, 2 to 16.
inline int read_threads(int ranks_per_node) {
  return std::clamp(static_cast<int>(std::thread::hardware_concurrency()) / std::max(1, ranks_per_node), 2, 16);
}

/// Fills the engine's master shards from a Hugging Face checkpoint directory (engine::UnitInit's `shard`), or with
/// `frozen` (FrozenSpec with is_frozen and codec) the rows of the frozen groups' shards (FrozenSpec::rows).
class HfShardLoader {
 public:
  /// Checks every tensor the loader reads against the checkpoint (name, shape, floating dtype: every rank sees the
  /// same errors) and sizes this rank's reads for the progress report (shown when `report`). With expert parallelism
  /// (`experts`) the model's expert parameters hold this rank's experts, read from their ranges of the whole tensors.
  HfShardLoader(const std::filesystem::path& dir, engine::UnitModel& model, int group_size, int group_rank, bool report,
                io::ReadOptions read = {}, const engine::FrozenSpec& frozen = {}, ExpertRanges experts = {})
      : ckpt_(dir), read_(read), units_(model.num_units()), frozen_(static_cast<bool>(frozen.is_frozen)), experts_(experts) {
    uint64_t total = 0;
    for (size_t u = 0; u < units_; ++u) {
      std::vector<io::TensorSlice> whole, mine;
      engine::NamedTensors params, expert_params;
      for (auto& item : model.unit_parameters(u))
        if (!frozen_ || frozen.is_frozen(item.first)) (experts_.holds(item.first) ? expert_params : params).push_back(item);
      for (const auto* list : {&params, &expert_params})
        for (const auto& [name, p] : *list)
          for (auto& slice : slices(name, p.sizes().vec(), 0, p.numel())) {
            used_.insert(slice.name);
            whole.push_back(std::move(slice));
          }
      io::check_slices(ckpt_, whole);
      if (frozen_) {
        const engine::FrozenUnit layout("layout", params, group_size, group_rank, frozen.codec);
        for (const auto& [s, row0, rows] : layout.shard_parts())
          for (auto& slice : io::hf_slices(ckpt_, s->name, s->param.sizes().vec(), row0 * s->cols, rows * s->cols))
            mine.push_back(std::move(slice));
      } else {
        const engine::FlatUnit layout("layout", params, group_size, group_rank);
        const engine::FlatUnit expert_layout("experts", expert_params, experts_.group_size, experts_.group_rank);
        for (const auto* l : {&layout, &expert_layout})
          l->for_each_in_shard([&](const engine::Slot& s, int64_t in_param, int64_t, int64_t n) {
            for (auto& slice : slices(s.name, s.param.sizes().vec(), in_param, n)) mine.push_back(std::move(slice));
          });
      }
      total += io::check_slices(ckpt_, mine);
    }
    progress_ = std::make_unique<Progress>("loading " + dir.string(), total, report);
  }

  /// Reads unit u's pieces of this rank's shard into `shard` (the master shard, any device): of its trainable group or,
  /// with expert parallelism, of its experts' group (engine.hpp: both are filled, in that order).
  void fill(size_t u, const engine::FlatUnit& unit, at::Tensor& shard) {
    std::vector<io::TensorSlice> pieces;
    unit.for_each_in_shard([&](const engine::Slot& s, int64_t in_param, int64_t in_shard, int64_t n) {
      for (auto& slice : slices(s.name, s.param.sizes().vec(), in_param, n, shard.narrow(0, in_shard, n)))
        pieces.push_back(std::move(slice));
    });
    io::read_slices(ckpt_, pieces, read_, progress_.get());
    const bool last = experts_.num_experts > 0 ? unit.name().ends_with(" experts") : true;  // each unit's last group
    if (u + 1 == units_ && last) progress_->finish();
  }
  auto filler() {
    return [this](size_t u, const engine::FlatUnit& unit, at::Tensor& shard) { fill(u, unit, shard); };
  }

  /// Reads the rows of unit u's frozen shard (engine::FrozenUnit::shard_parts), in the checkpoint's dtype, on the host.
  std::vector<at::Tensor> frozen_rows(size_t u, const engine::FrozenUnit& unit) {
    SHARDLM_ASSERT(frozen_, "the loader was not made for frozen groups");
    std::vector<io::TensorSlice> slices;
    std::vector<at::Tensor> out;
    for (const auto& [s, row0, rows] : unit.shard_parts()) {
      // the checkpoint's pieces of these rows (Mixtral's experts may be stored one by one: io::hf_slices)
      const auto shape = s->param.sizes().vec();
      const auto first = io::hf_slices(ckpt_, s->name, shape, row0 * s->cols, rows * s->cols);
      const auto dtype = first.empty() ? at::kFloat : io::scalar_type_of(*ckpt_.locate(first.front().name).second);
      out.push_back(at::empty({rows, s->cols}, at::TensorOptions().dtype(dtype)));
      for (auto& slice : io::hf_slices(ckpt_, s->name, shape, row0 * s->cols, rows * s->cols, out.back().view({-1})))
        slices.push_back(std::move(slice));
    }
    io::read_slices(ckpt_, slices, read_, progress_.get());
    if (u + 1 == units_) progress_->finish();
    return out;
  }
  auto frozen_filler() {
    return [this](size_t u, const engine::FrozenUnit& unit) { return frozen_rows(u, unit); };
  }

  io::HfCheckpoint& checkpoint() { return ckpt_; }
  /// Every checkpoint tensor the model uses.
  const std::set<std::string>& used() const { return used_; }

 private:
  /// io::hf_slices of elements [first, first + count) of parameter `name` of shape `shape`; this rank's experts map to
  /// their range of the whole parameter.
  std::vector<io::TensorSlice> slices(const std::string& name, const std::vector<int64_t>& shape, int64_t first,
                                      int64_t count, const at::Tensor& dst = {}) const {
    if (!experts_.holds(name)) return io::hf_slices(ckpt_, name, shape, first, count, dst);
    const auto [whole, at] = experts_.whole(shape);
    return io::hf_slices(ckpt_, name, whole, at + first, count, dst);
  }

  io::HfCheckpoint ckpt_;
  io::ReadOptions read_;
  size_t units_;
  bool frozen_;
  ExpertRanges experts_;
  std::set<std::string> used_;
  std::unique_ptr<Progress> progress_;
};

/// The dtype a model directory's weights are declared in (config.json's `dtype`, or `torch_dtype` as transformers
/// 4.x wrote it); bf16 when it declares none (a preset).
inline at::ScalarType checkpoint_dtype(const std::filesystem::path& model_dir) {
  if (model_dir.empty()) return at::kBFloat16;
  nlohmann::json j;
  try {
    j = read_json(model_dir / "config.json");
  } catch (const Error&) {
    return at::kBFloat16;  // load_config already reported an unreadable config
  }
  for (const char* key : {"dtype", "torch_dtype"}) {
    if (!j.contains(key) || !j[key].is_string()) continue;
    const auto name = j[key].get<std::string>();
    if (name == "float32") return at::kFloat;
    if (name == "float16") return at::kHalf;
    if (name == "bfloat16") return at::kBFloat16;
  }
  return at::kBFloat16;
}

struct ExportOptions {
  std::filesystem::path dir;                  ///< written: model*.safetensors (+ index), config.json
  at::ScalarType dtype = at::kBFloat16;       ///< the weights' dtype in the files
  uint64_t max_file_bytes = 5'000'000'000;    ///< a file is cut before it would pass this (one tensor may)
  std::filesystem::path source_dir;           ///< the run's --model-dir: its config.json (and tokenizer) are copied
  model::ModelConfig config;                  ///< written as config.json when there is no source_dir
  ExpertRanges experts;                       ///< expert parallelism: where this rank's experts lie in the whole tensors
};

namespace hf_export {
struct File {
  std::string name;
  std::vector<io::TensorInfo> tensors;
  std::string header;  // the JSON text, padded
  uint64_t size() const { return 8 + header.size() + (tensors.empty() ? 0 : tensors.back().end); }
};
}  // namespace hf_export

/// Writes the engine's master weights as a Hugging Face checkpoint (a collective: every rank calls it). No rank
/// gathers anything: each writes its own shards' bytes. Needs a directory every rank sees (a shared filesystem
/// across nodes). With expert parallelism the files are those of the same model without it: each expert tensor whole,
/// in the same place, each rank writing its experts' shards at their ranges.
inline void export_hf(engine::Engine& engine, dist::ProcessGroups& groups, const ExportOptions& o) {
  namespace fs = std::filesystem;
  engine.settle();  // an offloaded update may still be running
  const bool lead = groups.rank() == 0;
  const char* dtype = io::safetensors_dtype_name(o.dtype);
  const uint64_t element = io::safetensors_dtype_size(dtype);
  // The layout, the same on every rank: tensors in unit order, files cut at max_file_bytes.
  std::vector<hf_export::File> files(1);
  std::map<std::string, std::pair<size_t, size_t>> where;  // tensor -> (file, entry)
  uint64_t in_file = 0, total = 0;
  // A unit's groups (its parameters, then its experts': the experts are a block's last parameters), each with whether
  // this rank writes its shard (the first replica) and where its elements start in the whole tensors.
  struct Group {
    const engine::FlatUnit* unit;
    bool writes;
    bool experts;
  };
  const auto groups_of = [&](size_t u) {
    std::vector<Group> out{{&engine.unit(u), groups.replicate().rank() == 0, false}};
    if (const auto* mine = engine.experts(u)) out.push_back({mine, o.experts.replica == 0, true});
    return out;
  };
  const auto shape_of = [&](const engine::Slot& s, bool experts) {
    return experts ? o.experts.whole(s.param.sizes().vec()) : std::pair{s.param.sizes().vec(), int64_t{0}};
  };
  for (size_t u = 0; u < engine.num_units(); ++u)
    for (const auto& g : groups_of(u))
      for (const auto& s : g.unit->slots()) {
        const auto shape = shape_of(s, g.experts).first;
        int64_t numel = 1;
        for (const auto d : shape) numel *= d;
        const uint64_t bytes = static_cast<uint64_t>(numel) * element;
        if (!files.back().tensors.empty() && in_file + bytes > o.max_file_bytes) files.emplace_back(), in_file = 0;
        where[io::hf_name(s.name)] = {files.size() - 1, files.back().tensors.size()};
        files.back().tensors.push_back({io::hf_name(s.name), dtype, shape});
        in_file += bytes, total += bytes;
      }
  char name[64];
  for (size_t f = 0; f < files.size(); ++f) {
    std::snprintf(name, sizeof name, "model-%05zu-of-%05zu.safetensors", f + 1, files.size());
    files[f].name = files.size() == 1 ? "model.safetensors" : name;
    files[f].header = io::safetensors_header_text(files[f].tensors, {}, (o.dir / files[f].name).string());
  }
  auto tmp_path = [&](const hf_export::File& f) { return (o.dir / (f.name + ".tmp")).string(); };

  // Rank 0 makes the files at their final size with their headers.
  if (lead) {
    fs::create_directories(o.dir);
    for (const auto& f : files) {
      const auto path = tmp_path(f);
      io::detail::Fd fd(::open(path.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644));
      if (fd.get() < 0) fail<IoError>(path, ": cannot create: ", std::strerror(errno));
      if (::ftruncate(fd.get(), static_cast<off_t>(f.size())) != 0)
        fail<IoError>(path, ": cannot size to ", f.size(), " bytes: ", std::strerror(errno));
      const std::string head = io::detail::header_length_bytes(f.header.size()) + f.header;
      io::detail::pwrite_all(fd.get(), head.data(), head.size(), 0, path);
    }
  }
  groups.world().barrier();

  // The first replica writes its shards' pieces; converted in chunks of at most 16 Mi elements.
  {
    uint64_t mine = 0;
    for (size_t u = 0; u < engine.num_units(); ++u)
      for (const auto& g : groups_of(u))
        if (g.writes) g.unit->for_each_in_shard([&](const auto&, int64_t, int64_t, int64_t n) { mine += n * element; });
    Progress progress("exporting to " + o.dir.string(), mine, lead);
    std::map<size_t, io::detail::Fd> fds;
    at::NoGradGuard no_grad;
    constexpr int64_t chunk = 16 << 20;
    for (size_t u = 0; u < engine.num_units(); ++u) {
      for (const auto& g : groups_of(u)) {
        if (!g.writes) continue;
        const auto& unit = *g.unit;
        unit.for_each_in_shard([&](const engine::Slot& s, int64_t in_local, int64_t in_shard, int64_t n) {
          const int64_t in_param = in_local + shape_of(s, g.experts).second;  // in the whole tensor
          const auto [f, e] = where.at(io::hf_name(s.name));
          const auto path = tmp_path(files[f]);
          auto& fd = fds[f];
          if (fd.get() < 0) fd = io::detail::Fd(::open(path.c_str(), O_WRONLY | O_CLOEXEC));
          if (fd.get() < 0) fail<IoError>(path, ": cannot open for writing: ", std::strerror(errno));
          const uint64_t base = 8 + files[f].header.size() + files[f].tensors[e].begin;
          for (int64_t k = 0; k < n; k += chunk) {
            const int64_t m = std::min(chunk, n - k);
            const auto piece = unit.master().narrow(0, in_shard + k, m).to(at::kCPU, o.dtype).contiguous();
            io::detail::pwrite_all(fd.get(), piece.data_ptr(), m * element, base + (in_param + k) * element, path);
            progress.add(m * element);
          }
        });
      }
    }
    for (auto& [f, fd] : fds)
      if (::fsync(fd.get()) != 0) fail<IoError>(tmp_path(files[f]), ": fsync failed: ", std::strerror(errno));
    progress.finish();
  }
  groups.world().barrier();

  // Rank 0 puts the files in place, then the index and config.json.
  if (lead) {
    for (const auto& f : files) {
      io::detail::Fd fd(::open(tmp_path(f).c_str(), O_WRONLY | O_CLOEXEC));
      if (fd.get() < 0 || ::fsync(fd.get()) != 0) fail<IoError>(tmp_path(f), ": fsync failed: ", std::strerror(errno));
      std::error_code ec;
      fs::rename(tmp_path(f), o.dir / f.name, ec);
      if (ec) fail<IoError>((o.dir / f.name).string(), ": cannot rename from ", tmp_path(f), ": ", ec.message());
    }
    if (files.size() > 1) {
      nlohmann::ordered_json index;
      index["metadata"] = {{"total_size", total}};
      auto& map = index["weight_map"];
      for (const auto& f : files)
        for (const auto& t : f.tensors) map[t.name] = f.name;
      write_file_atomically(o.dir / "model.safetensors.index.json", index.dump(2) + "\n");
    } else {
      fs::remove(o.dir / "model.safetensors.index.json");  // an earlier export's: it would hide model.safetensors
    }
    const char* torch_name = o.dtype == at::kFloat ? "float32" : o.dtype == at::kHalf ? "float16" : "bfloat16";
    if (!o.source_dir.empty() && fs::exists(o.source_dir / "config.json")) {
      if (!fs::equivalent(o.source_dir, o.dir))  // exported over the model it was loaded from: keep its files
        for (const char* extra : {"config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
                                "special_tokens_map.json"})
          if (fs::exists(o.source_dir / extra))
            fs::copy_file(o.source_dir / extra, o.dir / extra, fs::copy_options::overwrite_existing);
    } else {
      write_file_atomically(o.dir / "config.json", model::config_to_json(o.config, torch_name).dump(2) + "\n");
    }
    log::info("shardlm: exported ", total, " bytes in ", files.size(), " file(s) (", dtype, ") to ", o.dir.string());
  }
  groups.world().barrier();
}

}  // namespace shardlm::train
