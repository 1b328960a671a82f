#pragma once
// PEFT adapters on disk: a directory holding adapter_config.json and adapter_model.safetensors, as
// peft's save_pretrained writes them and PeftModel.from_pretrained reads them. Keys are the model's parameter
// names under `base_model.model.` in the transformers layout:
//   base_model.model.model.layers.N.self_attn.q_proj.lora_A.weight    [r, in]
//   base_model.model.model.layers.N.self_attn.q_proj.lora_B.weight    [out, r]
//   base_model.model.model.layers.N.self_attn.q_proj.lora_magnitude_vector   [out]  (DoRA)
#include <array>
#include <filesystem>
#include <fstream>
#include <set>
#include <limits>
#include <map>
#include <string>
#include <vector>

#include "shardlm/core/errors.hpp"
#include "shardlm/core/json.hpp"
#include "shardlm/core/log.hpp"
#include "shardlm/io/hf.hpp"
#include "shardlm/io/safetensors.hpp"
#include "shardlm/model/adapter.hpp"

namespace shardlm::io {

inline constexpr const char* peft_prefix = "base_model.model.";

/// The PEFT key of one of our parameters.
inline std::string peft_key(const std::string& name) { return peft_prefix + hf_name(name); }

/// Our parameter name for a PEFT key (the inverse of peft_key); empty when the key is not of that form.
inline std::string model_name_of_peft_key(const std::string& key) {
  const std::string prefix = peft_prefix;
  if (key.rfind(prefix, 0) != 0) return {};
  const auto hf = key.substr(prefix.size());
  if (hf.rfind("model.", 0) == 0) return hf.substr(6);
  return hf.rfind("lm_head.", 0) == 0 ? hf : std::string();
}

/// adapter_config.json as shardlm reads it: the adapter and the base model it was trained on.
struct PeftAdapter {
  model::AdapterConfig config;
  std::string base_model;                      ///< base_model_name_or_path (may be empty)
  std::map<std::string, at::Tensor> tensors;   ///< our parameter name -> tensor (CPU, as stored)
};

/// Reads a PEFT LoRA/DoRA adapter directory. Errors name the file and the field or key.
inline PeftAdapter read_peft_adapter(const std::filesystem::path& dir) {
  if (std::filesystem::exists(dir) && !std::filesystem::is_directory(dir))
    fail<IoError>(dir.string(), ": not a directory (expected a PEFT adapter directory: adapter_config.json, "
                  "adapter_model.safetensors)");
  const auto config_path = dir / "adapter_config.json";
  const auto json = read_json(config_path);
  const JsonFields<IoError> j(json, config_path.string());
  const auto& where = j.file();
  PeftAdapter out;
  if (const auto type = j.string("peft_type"); type != "LORA")
    fail<IoError>(where, ": peft_type \"", type, "\" is not LORA");
  auto& c = out.config;
  c.kind = j.boolean_or("use_dora", false) ? adapter::DoRA::rules : adapter::LoRA::rules;
  c.rank = j.integer("r", 1, model::AdapterConfig::max_rank);
  c.alpha = j.number("lora_alpha", 0, std::numeric_limits<double>::max());
  c.dropout = j.number_or("lora_dropout", 0.0, 0, 1);
  c.rslora = j.boolean_or("use_rslora", false);
  for (const char* unsupported : {"rank_pattern", "alpha_pattern"})
    if (j.has(unsupported) && !j.value(unsupported).empty())
      fail<IoError>(where, ": \"", unsupported, "\" (per-layer ranks or alphas) is not supported");
  if (const auto bias = j.string_or("bias", "none"); bias != "none")
    fail<IoError>(where, ": bias \"", bias, "\" is not supported: only \"none\"");
  const auto& targets = j.value("target_modules");
  if (!targets.is_array())
    fail<IoError>(where, ": target_modules ", JsonFields<>::shown(targets),
                  " is not a list of module names (a regular expression is not supported)");
  c.targets.clear();
  for (const auto& t : targets) {
    if (!t.is_string()) fail<IoError>(where, ": target_modules holds ", JsonFields<>::shown(t), ", expected module names");
    const auto name = t.get<std::string>();
    if (name.size() < 6 || name.compare(name.size() - 5, 5, "_proj") != 0)
      fail<IoError>(where, ": target module '", name, "' is not one of q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj");
    c.targets.push_back(name.substr(0, name.size() - 5));
  }
  try {
    c.validate();
  } catch (const ConfigError& e) {
    fail<IoError>(where, ": ", e.what());
  }
  if (j.has("base_model_name_or_path") && j.value("base_model_name_or_path").is_string())
    out.base_model = j.string("base_model_name_or_path");
  const auto weights = dir / "adapter_model.safetensors";
  SafetensorsFile file(weights);
  for (const auto& t : file.tensors()) {
    const auto name = model_name_of_peft_key(t.name);
    if (name.empty() || !model::is_adapter_parameter(name))
      fail<IoError>(weights.string(), ": key '", t.name, "' is not a PEFT LoRA key (base_model.model.<module>.lora_A.weight, ...)");
    out.tensors[name] = file.read(t.name);
  }
  return out;
}

/// Writes a PEFT adapter directory: adapter_config.json and adapter_model.safetensors (tensors: our parameter name
/// -> full tensor; written in fp32).
inline void write_peft_adapter(const std::filesystem::path& dir, const model::AdapterConfig& c,
                               const std::string& base_model, const std::vector<std::pair<std::string, at::Tensor>>& tensors) {
  std::filesystem::create_directories(dir);
  nlohmann::ordered_json j;
  j["peft_type"] = "LORA";
  j["task_type"] = "CAUSAL_LM";
  j["base_model_name_or_path"] = base_model;
  j["r"] = c.rank;
  j["lora_alpha"] = c.alpha;
  j["lora_dropout"] = c.dropout;
  j["target_modules"] = c.target_modules();
  j["use_dora"] = c.dora();
  j["use_rslora"] = c.rslora;
  j["bias"] = "none";
  j["fan_in_fan_out"] = false;
  j["init_lora_weights"] = true;
  j["inference_mode"] = true;
  j["modules_to_save"] = nullptr;
  std::vector<std::pair<std::string, at::Tensor>> keyed;
  for (const auto& [name, t] : tensors) keyed.emplace_back(peft_key(name), t.to(at::kFloat));
  save_safetensors(dir / "adapter_model.safetensors", keyed);
  std::ofstream(dir / "adapter_config.json") << j.dump(2) << "\n";
}

/// Copies an adapter's tensors into the adapter parameters of `model` (a single-device model whose adapters were
/// added with the adapter's config). Every adapter parameter must be in the file, with its shape, and every
/// tensor of the file must be used.
inline void load_adapter_weights(torch::nn::Module& model, const PeftAdapter& adapter, const std::string& where) {
  at::NoGradGuard no_grad;
  size_t used = 0;
  for (auto& item : model.named_parameters()) {
    if (!model::is_adapter_parameter(item.key())) continue;
    const auto it = adapter.tensors.find(item.key());
    if (it == adapter.tensors.end()) fail<IoError>(where, ": the adapter has no tensor '", peft_key(item.key()), "'");
    if (it->second.sizes() != item.value().sizes())
      fail<IoError>(where, ": tensor '", peft_key(item.key()), "' has shape ", it->second.sizes(), " but the model needs ",
                    item.value().sizes());
    item.value().copy_(it->second);
    ++used;
  }
  if (used != adapter.tensors.size())
    fail<IoError>(where, ": ", adapter.tensors.size() - used, " adapter tensor(s) match no layer of the model");
}

/// The merged weight of one adapted Linear, as PEFT's merge computes it (in fp32, returned in W's dtype):
///   LoRA: W + s B A;   DoRA: (m / ||W + s B A||_row) * (W + s B A).   W: [out, in], A: [r, in], B: [out, r], m: [out]
inline at::Tensor merged_weight(const at::Tensor& w, const at::Tensor& a, const at::Tensor& b, const at::Tensor& m,
                                double scale) {
  auto merged = w.to(at::kFloat) + scale * at::matmul(b.to(at::kFloat), a.to(at::kFloat));  // [out, in]
  if (m.defined()) merged = merged * (m.to(at::kFloat) / at::linalg_vector_norm(merged, 2, {1}, false)).unsqueeze(1);
  return merged.to(w.scalar_type());
}

/// Writes base + adapter as a Hugging Face checkpoint in `out`: streaming, one weight file of the base at a time
/// (the same file names, dtypes and index), each adapted weight merged (merged_weight); config.json, the index and
/// the tokenizer files copied. Returns the number of merged weights.
inline size_t merge_peft_adapter(const std::filesystem::path& base_dir, const std::filesystem::path& adapter_dir,
                                 const std::filesystem::path& out) {
  namespace fs = std::filesystem;
  const auto adapter = read_peft_adapter(adapter_dir);
  const double scale = adapter.config.scale();
  // module (our name, e.g. layers.0.self_attn.q_proj) -> its A, B and magnitude
  std::map<std::string, std::array<at::Tensor, 3>> modules;
  for (const auto& [name, t] : adapter.tensors) {
    const auto cut = name.find(".lora_");
    const int slot = name.find(".lora_A.") != std::string::npos ? 0 : name.find(".lora_B.") != std::string::npos ? 1 : 2;
    modules[name.substr(0, cut)][slot] = t;
  }
  HfCheckpoint base(base_dir);
  std::set<std::string> files;
  for (const auto& [tensor, file] : base.names()) files.insert(file);
  if (fs::exists(out) && fs::equivalent(out, base_dir)) fail<ConfigError>("--out ", out.string(), " is the base model's directory");
  fs::create_directories(out);
  size_t merged = 0;
  for (const auto& file : files) {
    SafetensorsFile in(base_dir / file);
    std::vector<std::pair<std::string, at::Tensor>> tensors;
    for (const auto& info : in.tensors()) {
      auto t = in.read(info.name);
      const auto name = info.name.rfind("model.", 0) == 0 ? info.name.substr(6) : info.name;
      const auto dot = name.rfind(".weight");
      const auto it = dot != std::string::npos && dot + 7 == name.size() ? modules.find(name.substr(0, dot)) : modules.end();
      if (it != modules.end()) {
        const auto& [a, b, m] = it->second;
        if (!a.defined() || !b.defined()) fail<IoError>(adapter_dir.string(), ": ", it->first, " lacks lora_A or lora_B");
        if (t.dim() != 2 || a.size(1) != t.size(1) || b.size(0) != t.size(0) || (m.defined() && m.size(0) != t.size(0)))
          fail<IoError>(adapter_dir.string(), ": the adapter of ", it->first, " does not fit the base's ", info.name, " ",
                        t.sizes());
        t = merged_weight(t, a, b, m, scale);
        modules.erase(it);
        ++merged;
      }
      tensors.emplace_back(info.name, t);
    }
    save_safetensors(out / file, tensors, in.metadata());
    log::info("shardlm_merge: ", (out / file).string(), " (", tensors.size(), " tensors)");
  }
  if (!modules.empty())
    fail<IoError>(adapter_dir.string(), ": module ", modules.begin()->first, " has no weight in the base model ", base_dir.string());
  for (const char* extra : {"model.safetensors.index.json", "config.json", "generation_config.json", "tokenizer.json",
                            "tokenizer_config.json", "special_tokens_map.json"})
    if (fs::exists(base_dir / extra)) fs::copy_file(base_dir / extra, out / extra, fs::copy_options::overwrite_existing);
  return merged;
}

}  // namespace shardlm::io
