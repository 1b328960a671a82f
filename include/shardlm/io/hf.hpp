#pragma once
// Hugging Face model directories: config.json plus model.safetensors or a set of shards listed by
// model.safetensors.index.json. Maps our parameter names to the checkpoint's, and reads tensors or parts of
// tensors (a rank's shard) with parallel preads.
#include <torch/nn/module.h>

#include <atomic>
#include <exception>
#include <filesystem>
#include <map>
#include <memory>
#include <mutex>
#include <set>
#include <string>
#include <thread>
#include <vector>

#include "shardlm/core/log.hpp"
#include "shardlm/core/progress.hpp"
#include "shardlm/io/safetensors.hpp"
#include "shardlm/model/config.hpp"

namespace shardlm::io {

/// The checkpoint name of one of our parameters: our names are the transformers names under `model.`,
/// except the LM head which sits at the top.
inline std::string hf_name(const std::string& name) {
  return name.rfind("lm_head.", 0) == 0 ? name : "model." + name;
}

/// The weights of a model directory: which file holds which tensor, files opened lazily.
class HfCheckpoint {
 public:
  explicit HfCheckpoint(std::filesystem::path dir) : dir_(std::move(dir)) {
    if (!std::filesystem::is_directory(dir_)) fail<IoError>(dir_.string(), ": not a directory");
    const auto index = dir_ / "model.safetensors.index.json";
    const auto single = dir_ / "model.safetensors";
    if (std::filesystem::exists(index)) {
      file_of_ = read_weight_map(index);
    } else if (std::filesystem::exists(single)) {
      auto& file = open("model.safetensors");
      for (const auto& t : file.tensors()) file_of_[t.name] = "model.safetensors";
    } else {
      fail<IoError>(dir_.string(), ": no model.safetensors or model.safetensors.index.json");
    }
  }

  const std::filesystem::path& dir() const { return dir_; }
  bool contains(const std::string& name) const { return file_of_.count(name) > 0; }
  const std::map<std::string, std::string>& names() const { return file_of_; }

  /// The file holding `name` and the tensor's header entry; the error names the tensor and directory.
  std::pair<const SafetensorsFile*, const TensorInfo*> locate(const std::string& name) {
    const auto it = file_of_.find(name);
    if (it == file_of_.end()) fail<IoError>(dir_.string(), ": the checkpoint has no tensor '", name, "'");
    const auto& file = open(it->second);
    const auto* info = file.find(name);
    if (!info) fail<IoError>((dir_ / it->second).string(), ": the index lists tensor '", name, "' here but the file does not hold it");
    return {&file, info};
  }

 private:
  const SafetensorsFile& open(const std::string& file) {
    auto& slot = files_[file];
    if (!slot) slot = std::make_unique<SafetensorsFile>(dir_ / file);
    return *slot;
  }

  std::filesystem::path dir_;
  std::map<std::string, std::string> file_of_;
  std::map<std::string, std::unique_ptr<SafetensorsFile>> files_;
};

/// Part of one checkpoint tensor to read: elements [first, first + count) of the flattened tensor, into `dst`.
struct TensorSlice {
  std::string name;            ///< checkpoint name
  std::vector<int64_t> shape;  ///< the shape the model needs (checked against the file's)
  int64_t first = 0, count = 0;
  at::Tensor dst;              ///< `count` contiguous elements of a floating dtype, on any device
};

/// How read_slices reads: worker threads, each holding one buffer of at most `chunk_bytes`.
struct ReadOptions {
  int threads = 8;
  uint64_t chunk_bytes = 64ull << 20;
};

namespace detail {
/// The file and header entry of a slice's tensor, after checking it has the shape the model needs and a
/// floating-point dtype (errors name the file and tensor).
inline std::pair<const SafetensorsFile*, const TensorInfo*> checked_slice(HfCheckpoint& ckpt, const TensorSlice& s) {
  auto [file, info] = ckpt.locate(s.name);
  if (info->shape != s.shape)
    fail<IoError>(file->path().string(), ": tensor '", s.name, "' has shape ", c10::IntArrayRef(info->shape),
                  " but the config needs ", c10::IntArrayRef(s.shape));
  if (at::isIntegralType(scalar_type_of(*info), /*includeBool=*/true))
    fail<IoError>(file->path().string(), ": tensor '", s.name, "' has integer dtype ", info->dtype,
                  ": expected a floating-point weight");
  SHARDLM_ASSERT(s.first >= 0 && s.count >= 0 && s.first + s.count <= info->numel(), "slice outside tensor ", s.name);
  return {file, info};
}
}  // namespace detail

/// The checkpoint slices that make elements [first, first + count) of our parameter `name` (shape `shape`),
/// read into `dst` (undefined: only for checking). A parameter is one checkpoint tensor (hf_name), except
/// Mixtral's fused experts when the checkpoint holds the per-expert layout that Mixtral's releases (and
/// transformers' save_pretrained) use: `mlp.experts.gate_up_proj` [E, 2I, C] is the concatenation of
/// `block_sparse_moe.experts.e.w1.weight` then `.w3.weight` ([I, C] each) for e = 0..E-1, `down_proj` [E, C, I]
/// that of `.w2.weight` ([C, I]), and `mlp.gate.weight` is `block_sparse_moe.gate.weight`.
inline std::vector<TensorSlice> hf_slices(const HfCheckpoint& ckpt, const std::string& name,
                                          const std::vector<int64_t>& shape, int64_t first, int64_t count,
                                          const at::Tensor& dst = {}) {
  const auto whole = hf_name(name);
  struct Part {
    std::string name;
    std::vector<int64_t> shape;
  };
  std::vector<Part> parts;
  const auto ends_with = [&](const std::string& suffix) {
    return whole.size() >= suffix.size() && whole.compare(whole.size() - suffix.size(), suffix.size(), suffix) == 0;
  };
  // "model.layers.i." + "block_sparse_moe." when the checkpoint lacks `whole` but has `probe` there
  const auto per_expert = [&](const std::string& suffix, const char* probe) {
    if (!ends_with(suffix) || ckpt.contains(whole)) return std::string();
    auto base = whole.substr(0, whole.size() - suffix.size()) + "block_sparse_moe.";
    return ckpt.contains(base + probe) ? base : std::string();
  };
  if (const auto base = per_expert("mlp.experts.gate_up_proj", "experts.0.w1.weight"); !base.empty() && shape.size() == 3) {
    for (int64_t e = 0; e < shape[0]; ++e)
      for (const char* w : {"w1", "w3"})
        parts.push_back({shardlm::detail::cat(base, "experts.", e, ".", w, ".weight"), {shape[1] / 2, shape[2]}});
  } else if (const auto base = per_expert("mlp.experts.down_proj", "experts.0.w2.weight"); !base.empty() && shape.size() == 3) {
    for (int64_t e = 0; e < shape[0]; ++e)
      parts.push_back({shardlm::detail::cat(base, "experts.", e, ".w2.weight"), {shape[1], shape[2]}});
  } else if (const auto base = per_expert("mlp.gate.weight", "gate.weight"); !base.empty()) {
    parts.push_back({base + "gate.weight", shape});
  } else {
    parts.push_back({whole, shape});
  }
  std::vector<TensorSlice> out;
  int64_t begin = 0;  // the part's first element within the parameter
  for (auto& part : parts) {
    int64_t numel = 1;
    for (auto d : part.shape) numel *= d;
    const int64_t lo = std::max(first, begin), hi = std::min(first + count, begin + numel);
    if (hi > lo || (count == 0 && numel == 0))
      out.push_back({std::move(part.name), std::move(part.shape), lo - begin, std::max<int64_t>(hi - lo, 0),
                     dst.defined() ? dst.narrow(0, lo - first, std::max<int64_t>(hi - lo, 0)) : at::Tensor()});
    begin += numel;
  }
  return out;
}

/// Checks that every slice's tensor exists with the shape the model needs and a floating-point dtype (errors name
/// the file and tensor); returns the number of file bytes the slices cover.
inline uint64_t check_slices(HfCheckpoint& ckpt, const std::vector<TensorSlice>& slices) {
  uint64_t bytes = 0;
  for (const auto& s : slices)
    bytes += static_cast<uint64_t>(s.count) * detail::checked_slice(ckpt, s).second->element_size();
  return bytes;
}

/// Checks the slices as check_slices does, then reads them with preads on `opts.threads` threads, in chunks of at
/// most `opts.chunk_bytes`, converting the file's dtype to each destination's on the way: nothing larger than one
/// chunk per thread is held besides the destinations. A destination on the host in the file's dtype is read into
/// directly. `progress` is told of every chunk.
inline void read_slices(HfCheckpoint& ckpt, const std::vector<TensorSlice>& slices, const ReadOptions& opts = {},
                        Progress* progress = nullptr) {
  struct Chunk {
    const SafetensorsFile* file;
    const TensorInfo* info;
    uint64_t offset, bytes;  // within the tensor's data
    at::Tensor dst;
  };
  std::vector<Chunk> chunks;  // every slice is checked before the first read
  for (const auto& s : slices) {
    auto [file, info] = detail::checked_slice(ckpt, s);
    SHARDLM_ASSERT(s.dst.numel() == s.count && s.dst.is_contiguous(), "destination of ", s.name, " is not ", s.count,
                   " contiguous elements");
    const uint64_t element = info->element_size();
    const int64_t per_chunk = static_cast<int64_t>(std::max<uint64_t>(1, opts.chunk_bytes / element));
    for (int64_t k = 0; k < s.count; k += per_chunk) {
      const int64_t n = std::min(per_chunk, s.count - k);
      chunks.push_back({file, info, static_cast<uint64_t>(s.first + k) * element, static_cast<uint64_t>(n) * element,
                        s.dst.view(-1).narrow(0, k, n)});
    }
  }
  std::atomic<size_t> next{0};
  std::atomic<bool> failed{false};
  std::exception_ptr error;
  std::mutex error_mutex;
  auto work = [&] {
    at::NoGradGuard no_grad;  // thread-local: the destinations may be parameters
    std::vector<char> buffer;
    for (size_t i; !failed && (i = next++) < chunks.size();) {
      try {
        const auto& c = chunks[i];
        const auto type = scalar_type_of(*c.info);
        if (c.dst.is_cpu() && c.dst.scalar_type() == type) {
          c.file->read_bytes(*c.info, c.offset, c.bytes, c.dst.data_ptr());
        } else {
          buffer.resize(std::max<size_t>(buffer.size(), c.bytes));
          c.file->read_bytes(*c.info, c.offset, c.bytes, buffer.data());
          c.dst.copy_(at::from_blob(buffer.data(), {c.dst.numel()}, at::TensorOptions().dtype(type)));
        }
        if (progress) progress->add(c.bytes);
      } catch (...) {
        std::lock_guard<std::mutex> lock(error_mutex);
        if (!error) error = std::current_exception();
        failed = true;
      }
    }
  };
  const size_t threads = std::min<size_t>(std::max(1, opts.threads), chunks.size());
  std::vector<std::thread> pool;
  for (size_t t = 1; t < threads; ++t) pool.emplace_back(work);
  work();
  for (auto& t : pool) t.join();
  if (error) std::rethrow_exception(error);
}

/// Copies named parameters (model names) from the checkpoint, converting dtype; returns the checkpoint names read.
/// Missing tensors and shape mismatches are errors naming the tensor and file.
template <class NamedParams>
std::set<std::string> load_parameters(NamedParams&& params, HfCheckpoint& ckpt, const ReadOptions& opts = {}) {
  std::vector<TensorSlice> slices;
  std::set<std::string> used;
  for (auto&& [key, param] : params) {
    SHARDLM_ASSERT(param.is_contiguous(), "parameter ", key, " is not contiguous");
    for (auto& s : hf_slices(ckpt, key, param.sizes().vec(), 0, param.numel(), param.detach().view(-1))) {
      used.insert(s.name);
      slices.push_back(std::move(s));
    }
  }
  read_slices(ckpt, slices, opts);
  return used;
}

/// Warns about checkpoint tensors the model did not read (`used`: every name read).
inline void warn_unused(const HfCheckpoint& ckpt, const std::set<std::string>& used) {
  std::string unused;
  for (const auto& [name, file] : ckpt.names())
    if (!used.count(name) && name.find("rotary_emb.inv_freq") == std::string::npos &&
        !(name == "lm_head.weight" && !used.count("lm_head.weight")))
      unused += (unused.empty() ? "" : ", ") + name;
  if (!unused.empty()) log::warn(ckpt.dir().string(), ": tensors not used by the model: ", unused);
}

/// Copies every parameter of `model` from the checkpoint (converting dtype) and warns about unused tensors.
inline void load_weights(torch::nn::Module& model, HfCheckpoint& ckpt) {
  std::vector<std::pair<std::string, at::Tensor>> params;
  for (auto& item : model.named_parameters()) params.emplace_back(item.key(), item.value());
  warn_unused(ckpt, load_parameters(params, ckpt));
}

}  // namespace shardlm::io
