#pragma once
// PEFT adapters on disk: a directory holding adapter_config.json and adapter_model.safetensors, as
// peft's save_pretrained writes them and PeftModel.from_pretrained reads them. Keys are the model's parameter
// names under `base_model.model.` in the transformers layout:
//   base_model.model.model.layers.N.self_attn.q_proj.lora_A.weight    [r, in]
//   base_model.model.model.layers.N.self_attn.q_proj.lora_B.weight    [out, r]
//   base_model.model.model.layers.N.self_attn.q_proj.lora_magnitude_vector   [out]  (DoRA)
// A MoE's fused experts are PEFT's target_parameters, adapted by nested ParamWrappers around `mlp.experts`: the
// parameter wrapped last (down_proj when both are targeted) owns `mlp.experts.lora_A.weight`, the one inside it
// `mlp.experts.base_layer.lora_A.weight`. Their A is [E r, in] (expert e's rows e r .. e r + r - 1) and B [out, r E]
// (expert e's columns j E + e): we hold A [E, r, in] and B [E, out, r] and convert on the way (to_peft, from_peft).
// The router (`mlp.gate`, a 2-D target parameter) has a Linear's keys and layout.
#include <algorithm>
#include <array>
#include <filesystem>
#include <fstream>
#include <set>
#include <limits>
#include <map>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "shardlm/core/errors.hpp"
#include "shardlm/core/json.hpp"
#include "shardlm/core/log.hpp"
#include "shardlm/io/hf.hpp"
#include "shardlm/io/safetensors.hpp"
#include "shardlm/model/adapter.hpp"

namespace shardlm::io {

inline constexpr const char* peft_prefix = "base_model.model.";

namespace detail {
inline constexpr std::string_view gate_up_lora = ".experts.gate_up_proj_lora.", down_lora = ".experts.down_proj_lora.";
inline constexpr std::string_view peft_outer = ".experts.", peft_inner = ".experts.base_layer.";
/// `s` with its first `from` replaced by `to`; `s` itself when it has none.
inline std::string replaced(const std::string& s, std::string_view from, std::string_view to) {
  const auto at = s.find(from);
  return at == std::string::npos ? s : s.substr(0, at) + std::string(to) + s.substr(at + from.size());
}
}  // namespace detail

/// The PEFT key of one of our parameters, for an adapter of config `c` (which of a MoE's experts it adapts decides the
/// nesting of PEFT's wrappers).
inline std::string peft_key(const std::string& name, const model::AdapterConfig& c) {
  const auto key = peft_prefix + hf_name(name);
  if (key.find(detail::down_lora) != std::string::npos) return detail::replaced(key, detail::down_lora, detail::peft_outer);
  return detail::replaced(key, detail::gate_up_lora, c.has_target("down") ? detail::peft_inner : detail::peft_outer);
}

/// Our parameter name for a PEFT key (the inverse of peft_key); empty when the key is not of that form.
inline std::string model_name_of_peft_key(const std::string& key, const model::AdapterConfig& c) {
  const std::string prefix = peft_prefix;
  if (key.rfind(prefix, 0) != 0) return {};
  auto hf = key.substr(prefix.size());
  if (hf.find(detail::peft_inner) != std::string::npos) {
    if (!c.has_target("gate_up") || !c.has_target("down")) return {};
    hf = detail::replaced(hf, detail::peft_inner, detail::gate_up_lora);
  } else if (hf.find(".experts.lora_") != std::string::npos) {
    if (!c.has_target("gate_up") && !c.has_target("down")) return {};
    hf = detail::replaced(hf, detail::peft_outer, c.has_target("down") ? detail::down_lora : detail::gate_up_lora);
  }
  if (hf.rfind("model.", 0) == 0) return hf.substr(6);
  return hf.rfind("lm_head.", 0) == 0 ? hf : std::string();
}

/// Whether one of our parameters is a MoE expert projection's LoRA factor (held per expert: ExpertLoraImpl).
inline bool is_expert_lora(const std::string& name) {
  return name.find(detail::gate_up_lora) != std::string::npos || name.find(detail::down_lora) != std::string::npos;
}

/// An adapter tensor in PEFT's layout: an expert projection's A [E, r, in] -> [E r, in], B [E, out, r] -> [out, r E].
inline at::Tensor to_peft(const std::string& name, const at::Tensor& t) {
  if (!is_expert_lora(name)) return t;
  if (name.find(".lora_A.") != std::string::npos) return t.reshape({-1, t.size(2)});
  return t.permute({1, 2, 0}).reshape({t.size(1), -1});
}

/// The inverse of to_peft for an adapter of rank `rank`; errors name `where` and the key.
inline at::Tensor from_peft(const std::string& name, const at::Tensor& t, int64_t rank, const std::string& where,
                            const std::string& key) {
  if (!is_expert_lora(name)) return t;
  const bool a = name.find(".lora_A.") != std::string::npos;
  const int64_t n = t.dim() == 2 ? t.size(a ? 0 : 1) : 0;
  if (n == 0 || n % rank != 0)
    fail<IoError>(where, ": tensor '", key, "' has shape ", t.sizes(), ": an experts' ", a ? "lora_A needs [E r, in]" : "lora_B needs [out, r E]",
                  " with r = ", rank);
  if (a) return t.view({n / rank, rank, t.size(1)});
  return t.view({t.size(0), rank, n / rank}).permute({2, 0, 1}).contiguous();
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
  const auto add = [&](const std::string& t) {
    if (!c.has_target(t)) c.targets.push_back(t);
  };
  for (const auto& t : targets) {
    if (!t.is_string()) fail<IoError>(where, ": target_modules holds ", JsonFields<>::shown(t), ", expected module names");
    const auto name = t.get<std::string>();
    if (name == "gate") {  // a MoE's router, which PEFT adapts as a target parameter
      add("router"), c.experts = true;
      continue;
    }
    if (name.size() < 6 || name.compare(name.size() - 5, 5, "_proj") != 0)
      fail<IoError>(where, ": target module '", name, "' is not one of q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, "
                    "down_proj, gate (a MoE's router)");
    add(name.substr(0, name.size() - 5));
  }
  // A MoE's experts and router: PEFT's target_parameters, module path suffixes (`experts.gate_up_proj`,
  // `mlp.experts.down_proj`, `gate.weight`).
  if (j.has("target_parameters") && !j.value("target_parameters").is_null()) {
    const auto& params = j.value("target_parameters");
    if (!params.is_array()) fail<IoError>(where, ": target_parameters ", JsonFields<>::shown(params), " is not a list");
    const auto ends = [](const std::string& s, std::string_view suffix) {
      return s.size() >= suffix.size() && s.compare(s.size() - suffix.size(), suffix.size(), suffix) == 0 &&
             (s.size() == suffix.size() || s[s.size() - suffix.size() - 1] == '.');
    };
    for (const auto& t : params) {
      const auto name = t.is_string() ? t.get<std::string>() : std::string();
      if (ends(name, "experts.gate_up_proj")) add("gate_up");
      else if (ends(name, "experts.down_proj")) add("down");
      else if (ends(name, "gate.weight")) add("router");
      else
        fail<IoError>(where, ": target parameter ", JsonFields<>::shown(t), " is not one of experts.gate_up_proj, "
                      "experts.down_proj, gate.weight (a Mixtral's experts and router)");
      c.experts = true;
    }
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
    const auto name = model_name_of_peft_key(t.name, c);
    if (name.empty() || !model::is_adapter_parameter(name))
      fail<IoError>(weights.string(), ": key '", t.name, "' is not a PEFT LoRA key (base_model.model.<module>.lora_A.weight, ",
                    "...) of the targets of ", config_path.string());
    out.tensors[name] = from_peft(name, file.read(t.name), c.rank, weights.string(), t.name);
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
  if (c.experts) j["target_parameters"] = c.target_parameters();
  j["use_dora"] = c.dora();
  j["use_rslora"] = c.rslora;
  j["bias"] = "none";
  j["fan_in_fan_out"] = false;
  j["init_lora_weights"] = true;
  j["inference_mode"] = true;
  j["modules_to_save"] = nullptr;
  std::vector<std::pair<std::string, at::Tensor>> keyed;
  for (const auto& [name, t] : tensors) keyed.emplace_back(peft_key(name, c), to_peft(name, t.to(at::kFloat)));
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
    const auto key = peft_key(item.key(), adapter.config);
    if (it == adapter.tensors.end()) fail<IoError>(where, ": the adapter has no tensor '", key, "'");
    if (it->second.sizes() != item.value().sizes())
      fail<IoError>(where, ": tensor '", key, "' has shape ", to_peft(item.key(), it->second).sizes(), " but the model needs ",
                    to_peft(item.key(), item.value()).sizes());
    item.value().copy_(it->second);
    ++used;
  }
  if (used != adapter.tensors.size())
    fail<IoError>(where, ": ", adapter.tensors.size() - used, " adapter tensor(s) match no layer of the model");
}

/// The merged weight of one adapted Linear, as PEFT's merge computes it (in fp32, returned in W's dtype):
///   LoRA: W + s B A;   DoRA: (m / ||W + s B A||_row) * (W + s B A).   W: [out, in], A: [r, in], B: [out, r], m: [out]
/// A MoE's experts merge expert by expert: W [E, out, in], A [E, r, in], B [E, out, r] (no DoRA).
inline at::Tensor merged_weight(const at::Tensor& w, const at::Tensor& a, const at::Tensor& b, const at::Tensor& m,
                                double scale) {
  auto merged = w.to(at::kFloat) + scale * at::matmul(b.to(at::kFloat), a.to(at::kFloat));  // [(E,) out, in]
  if (m.defined()) merged = merged * (m.to(at::kFloat) / at::linalg_vector_norm(merged, 2, {1}, false)).unsqueeze(1);
  return merged.to(w.scalar_type());
}

namespace detail {
/// Where Mixtral's released per-expert weight `layers.L.block_sparse_moe.experts.E.wX.weight` lies in the fused
/// experts: expert E of `layers.L.mlp.experts.gate_up_proj` (w1: rows [0, I), w3: rows [I, 2I)) or of down_proj (w2).
struct ExpertPart {
  std::string module;  ///< the fused projection's adapter (our name)
  int64_t expert = 0;
  char w = 0;          ///< '1', '2' or '3'
};
inline std::optional<ExpertPart> expert_part(const std::string& name) {
  constexpr std::string_view mid = ".block_sparse_moe.experts.";
  const auto at = name.find(mid);
  if (at == std::string::npos) return std::nullopt;
  const auto rest = name.substr(at + mid.size());  // "E.wX.weight"
  const auto dot = rest.find('.');
  if (dot == std::string::npos || dot == 0 || dot > 9 || rest.find_first_not_of("0123456789") != dot || rest.size() != dot + 10 ||
      rest.compare(dot, 2, ".w") != 0 || rest[dot + 2] < '1' || rest[dot + 2] > '3' || rest.compare(dot + 3, 7, ".weight") != 0)
    return std::nullopt;
  ExpertPart p;
  p.w = rest[dot + 2];
  p.expert = std::stoll(rest.substr(0, dot));
  p.module = name.substr(0, at) + (p.w == '2' ? ".mlp.experts.down_proj_lora" : ".mlp.experts.gate_up_proj_lora");
  return p;
}

/// Expert `part.expert`'s weight `t` (w1, w3 [I, C] or w2 [C, I]) plus its rows of s B_e A_e, in fp32, in t's dtype.
inline at::Tensor merged_expert_part(const at::Tensor& t, const at::Tensor& a, const at::Tensor& b, double scale,
                                     const ExpertPart& part, const std::string& adapter, const std::string& tensor) {
  if (!a.defined() || !b.defined() || a.dim() != 3 || b.dim() != 3 || t.dim() != 2 || part.expert >= a.size(0))
    fail<IoError>(adapter, ": the adapter of ", part.module, " does not fit the base's ", tensor, " ", t.sizes());
  auto delta = scale * at::matmul(b[part.expert].to(at::kFloat), a[part.expert].to(at::kFloat));  // [out, in]
  if (part.w != '2') delta = delta.narrow(0, part.w == '1' ? 0 : delta.size(0) / 2, delta.size(0) / 2);
  if (delta.sizes() != t.sizes())
    fail<IoError>(adapter, ": the adapter of ", part.module, " does not fit the base's ", tensor, " ", t.sizes());
  return (t.to(at::kFloat) + delta).to(t.scalar_type());
}
}  // namespace detail

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
  std::set<std::string> used;  // the modules merged into some weight
  for (const auto& file : files) {
    SafetensorsFile in(base_dir / file);
    std::vector<std::pair<std::string, at::Tensor>> tensors;
    for (const auto& info : in.tensors()) {
      auto t = in.read(info.name);
      const auto name = info.name.rfind("model.", 0) == 0 ? info.name.substr(6) : info.name;
      const auto dot = name.rfind(".weight");
      // a Linear's `X.weight` has the adapter `X`; a MoE's fused `mlp.experts.X_proj`, `mlp.experts.X_proj_lora`
      auto it = dot != std::string::npos && dot + 7 == name.size() ? modules.find(name.substr(0, dot)) : modules.end();
      if (it == modules.end()) it = modules.find(name + "_lora");
      if (it == modules.end() && dot != std::string::npos)  // Mixtral's released router name
        it = modules.find(detail::replaced(name.substr(0, dot), ".block_sparse_moe.gate", ".mlp.gate"));
      if (it == modules.end()) {  // Mixtral's released per-expert weights: a slice of a fused expert adapter's delta
        const auto part = detail::expert_part(name);
        const auto pm = part ? modules.find(part->module) : modules.end();
        if (pm != modules.end()) {
          t = detail::merged_expert_part(t, pm->second[0], pm->second[1], scale, *part, adapter_dir.string(), info.name);
          used.insert(pm->first);
          ++merged;
        }
      } else {
        const auto& [a, b, m] = it->second;
        if (!a.defined() || !b.defined()) fail<IoError>(adapter_dir.string(), ": ", it->first, " lacks lora_A or lora_B");
        const int64_t d = t.dim();
        if (d != a.dim() || d < 2 || a.size(-1) != t.size(-1) || b.size(-2) != t.size(-2) || (d == 3 && a.size(0) != t.size(0)) ||
            (m.defined() && m.size(0) != t.size(0)))
          fail<IoError>(adapter_dir.string(), ": the adapter of ", it->first, " does not fit the base's ", info.name, " ",
                        t.sizes());
        t = merged_weight(t, a, b, m, scale);
        used.insert(it->first);
        ++merged;
      }
      tensors.emplace_back(info.name, t);
    }
    save_safetensors(out / file, tensors, in.metadata());
    log::info("shardlm_merge: ", (out / file).string(), " (", tensors.size(), " tensors)");
  }
  for (const auto& [module, factors] : modules)
    if (!used.count(module))
      fail<IoError>(adapter_dir.string(), ": module ", module, " has no weight in the base model ", base_dir.string());
  for (const char* extra : {"model.safetensors.index.json", "config.json", "generation_config.json", "tokenizer.json",
                            "tokenizer_config.json", "special_tokens_map.json"})
    if (fs::exists(base_dir / extra)) fs::copy_file(base_dir / extra, out / extra, fs::copy_options::overwrite_existing);
  return merged;
}

}  // namespace shardlm::io
