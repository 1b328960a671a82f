#pragma once
// Hugging Face model directories: config.json plus model.safetensors or a set of shards listed by
// model.safetensors.index.json. Maps our parameter names to the checkpoint's.
#include <torch/nn/module.h>

#include <filesystem>
#include <fstream>
#include <map>
#include <memory>
#include <set>
#include <string>

#include "shardlm/core/log.hpp"
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

/// Copies named parameters (model names) from the checkpoint, converting dtype; returns the checkpoint names read.
/// Missing tensors and shape mismatches are errors naming the tensor and file.
template <class NamedParams>
std::set<std::string> load_parameters(NamedParams&& params, HfCheckpoint& ckpt) {
  at::NoGradGuard no_grad;
  std::set<std::string> used;
  for (auto&& [key, param] : params) {
    const auto name = hf_name(key);
    auto [file, info] = ckpt.locate(name);
    if (info->shape != param.sizes().vec())
      fail<IoError>(file->path().string(), ": tensor '", name, "' has shape ", c10::IntArrayRef(info->shape),
                    " but the config needs ", param.sizes());
    if (at::isIntegralType(scalar_type_of(*info), /*includeBool=*/true))
      fail<IoError>(file->path().string(), ": tensor '", name, "' has integer dtype ", info->dtype,
                    ": expected a floating-point weight");
    param.copy_(file->read(name));
    used.insert(name);
  }
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
