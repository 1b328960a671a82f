#pragma once
// LoRA and DoRA adapters as PEFT defines them (peft.tuners.lora), for the Linear layers named as targets:
//   LoRA: y = x W^T + b + s * (dropout(x) A^T) B^T                          A: [r, in], B: [out, r]
//   DoRA: g = m / ||W + s B A||_row (the norm detached), m: [out]
//         y = x W^T + b + (g - 1) * (dropout(x) W^T) + g * s * (dropout(x) A^T) B^T
// with s = alpha / r, or alpha / sqrt(r) with rsLoRA. Parameter names follow PEFT's saved keys:
// `q_proj.lora_A.weight`, `q_proj.lora_B.weight`, `q_proj.lora_magnitude_vector`.
// On a MoE model's fused experts (gate_up_proj [E, 2I, C], down_proj [E, C, I]) each expert e has its own A_e [r, in]
// and B_e [out, r], as PEFT's ParamWrapper (target_parameters) defines them: W_e' = W_e + s B_e A_e (model/moe.hpp).
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <string>
#include <vector>

#include "shardlm/core/errors.hpp"
#include "shardlm/model/config.hpp"
#include "shardlm/policy/policies.hpp"

namespace shardlm::model {

/// The targets a model may name (adapter_targets): attention, Llama's MLP, a MoE's experts and router.
inline constexpr const char* adapter_target_list = "q,k,v,o (attention), gate,up,down (Llama's MLP), gate_up,down "
                                                   "(a MoE's experts), router (a MoE's gate), or all";

/// The adapter of a run. Targets are short names: q, k, v, o (attention), gate, up, down (Llama's MLP), gate_up, down
/// (Mixtral's experts: mlp.experts.gate_up_proj, down_proj), router (Mixtral's mlp.gate); `all` stands for every
/// projection of the model (not the router): resolved(config) expands it.
struct AdapterConfig {
  adapter::Rules kind = adapter::None::rules;  ///< the adapter policy: none (full fine-tuning), lora or dora
  int64_t rank = 16;
  double alpha = 16;
  double dropout = 0;
  bool rslora = false;        ///< scale alpha / sqrt(rank) instead of alpha / rank
  bool experts = false;       ///< for a mixture of experts (resolved() sets it): `down` names the experts' down_proj
  std::vector<std::string> targets = {"all"};  ///< `all`: every projection of the model (resolved)

  bool active() const { return kind.active(); }
  bool dora() const { return kind.magnitude; }
  double scale() const { return rslora ? alpha / std::sqrt(static_cast<double>(rank)) : alpha / static_cast<double>(rank); }

  bool has_target(const std::string& t) const { return std::find(targets.begin(), targets.end(), t) != targets.end(); }
  /// The targets as --lora-targets spells them ("q,k,v").
  std::string target_list() const {
    std::string out;
    for (const auto& t : targets) out += (out.empty() ? "" : ",") + t;
    return out;
  }

  /// The Linear module names of the targets (q -> q_proj, gate -> gate_proj, ...), as PEFT's target_modules lists them;
  /// a MoE's experts and router are PEFT's target_parameters instead (target_parameters()).
  std::vector<std::string> target_modules() const {
    std::vector<std::string> out;
    for (const auto& t : targets)
      if (!experts || (t != "gate_up" && t != "down" && t != "router")) out.push_back(t + "_proj");
    return out;
  }
  /// PEFT's target_parameters of a MoE model's targets (the names PEFT itself writes), in the model's order.
  std::vector<std::string> target_parameters() const {
    std::vector<std::string> out;
    if (!experts) return out;
    if (has_target("router")) out.push_back("gate.weight");
    if (has_target("gate_up")) out.push_back("experts.gate_up_proj");
    if (has_target("down")) out.push_back("experts.down_proj");
    return out;
  }

  /// The leaf name of the Linear modules a target adapts (q -> q_proj, router -> gate); empty for a MoE's experts.
  std::string linear_name(const std::string& t) const {
    if (t == "router") return "gate";
    if (experts && (t == "gate_up" || t == "down")) return {};
    return t + "_proj";
  }

  /// Far past any adapter (ranks are 8 to 256), small enough that r x dims cannot overflow.
  static constexpr int64_t max_rank = int64_t{1} << 16;

  void validate() const {
    if (!active()) return;
    if (rank <= 0 || rank > max_rank) fail<ConfigError>("--lora-rank must lie in 1..", max_rank, ", got ", rank);
    if (!(alpha > 0) || !std::isfinite(alpha)) fail<ConfigError>("--lora-alpha must be positive and finite, got ", alpha);
    if (dropout < 0 || dropout >= 1) fail<ConfigError>("--lora-dropout must lie in [0, 1), got ", dropout);
    if (targets.empty()) fail<ConfigError>("--lora-targets is empty: name some of ", adapter_target_list);
    for (const auto& t : targets)
      if (t != "q" && t != "k" && t != "v" && t != "o" && t != "gate" && t != "up" && t != "down" && t != "gate_up" &&
          t != "router" && t != "all")
        fail<ConfigError>("--lora-targets: '", t, "' is not a target: use ", adapter_target_list);
  }

  /// The config for a model: `all` expanded to its projections (Llama: q,k,v,o,gate,up,down; a MoE: q,k,v,o,gate_up,
  /// down), each target checked against the model. On a MoE, the experts' and the router's adapters are PEFT's
  /// ParamWrapper, which has no DoRA and no dropout: those are refused there.
  AdapterConfig resolved(const ModelConfig& m) const {
    validate();
    AdapterConfig out = *this;
    if (!active()) return out;
    const bool moe = m.is_moe();
    if (experts && !moe)
      fail<ConfigError>("an adapter of a mixture of experts (its experts or router targeted) on a ", m.model_type,
                        " model, which has none");
    out.experts = moe;
    out.targets.clear();
    const auto add = [&](const std::string& t) {
      if (!out.has_target(t)) out.targets.push_back(t);
    };
    for (const auto& t : targets) {
      if (t == "all") {
        static const std::vector<std::string> dense{"q", "k", "v", "o", "gate", "up", "down"},
            experts{"q", "k", "v", "o", "gate_up", "down"};
        for (const auto& a : moe ? experts : dense) add(a);
        continue;
      }
      if (moe && (t == "gate" || t == "up"))
        fail<ConfigError>("--lora-targets: this ", m.model_type, " model has no ", t, "_proj: its experts' projections are "
                          "gate_up and down (mlp.experts.gate_up_proj, down_proj), its router is router (mlp.gate)");
      if (!moe && (t == "gate_up" || t == "router"))
        fail<ConfigError>("--lora-targets: '", t, "' names a mixture of experts' ", t == "router" ? "router" : "experts",
                          ", and this ", m.model_type, " model has none: use q,k,v,o,gate,up,down");
      add(t);
    }
    if (moe && !out.target_parameters().empty()) {
      if (dora())
        fail<ConfigError>("--adapter dora: DoRA on a mixture of experts' experts or router is not supported (PEFT's "
                          "adapters on parameters have no DoRA either): use --adapter lora, or --lora-targets q,k,v,o");
      if (dropout > 0)
        fail<ConfigError>("--lora-dropout ", dropout, ": the adapters of a mixture of experts' experts and router have "
                          "no dropout (as PEFT's adapters on parameters): use --lora-dropout 0, or --lora-targets q,k,v,o");
    }
    return out;
  }
};

/// Splits "q,k,v" into its names.
inline std::vector<std::string> split_targets(const std::string& list) {
  std::vector<std::string> out;
  std::string item;
  for (char c : list + ",") {
    if (c == ',') {
      if (!item.empty()) out.push_back(item);
      item.clear();
    } else if (c != ' ') {
      item += c;
    }
  }
  return out;
}

/// Whether a parameter (model name) belongs to an adapter: what a LoRA or DoRA run trains.
inline bool is_adapter_parameter(const std::string& name) {
  return name.find(".lora_A.") != std::string::npos || name.find(".lora_B.") != std::string::npos ||
         name.find("lora_magnitude_vector") != std::string::npos;
}

}  // namespace shardlm::model
