#pragma once
// LoRA and DoRA adapters as PEFT defines them (peft.tuners.lora), for the Linear layers named as targets:
//   LoRA: y = x W^T + b + s * (dropout(x) A^T) B^T                          A: [r, in], B: [out, r]
//   DoRA: g = m / ||W + s B A||_row (the norm detached), m: [out]
//         y = x W^T + b + (g - 1) * (dropout(x) W^T) + g * s * (dropout(x) A^T) B^T
// with s = alpha / r, or alpha / sqrt(r) with rsLoRA. Parameter names follow PEFT's saved keys:
// `q_proj.lora_A.weight`, `q_proj.lora_B.weight`, `q_proj.lora_magnitude_vector`.
#include <cmath>
#include <cstdint>
#include <string>
#include <vector>

#include "shardlm/core/errors.hpp"
#include "shardlm/policy/policies.hpp"

namespace shardlm::model {

/// The adapter of a run. Targets are short names: q, k, v, o (attention), gate, up, down (MLP).
struct AdapterConfig {
  adapter::Rules kind = adapter::None::rules;  ///< the adapter policy: none (full fine-tuning), lora or dora
  int64_t rank = 16;
  double alpha = 16;
  double dropout = 0;
  bool rslora = false;        ///< scale alpha / sqrt(rank) instead of alpha / rank
  std::vector<std::string> targets = {"q", "k", "v", "o", "gate", "up", "down"};

  bool active() const { return kind.active(); }
  bool dora() const { return kind.magnitude; }
  double scale() const { return rslora ? alpha / std::sqrt(static_cast<double>(rank)) : alpha / static_cast<double>(rank); }

  /// The module names of the targets (q -> q_proj, gate -> gate_proj, ...), as PEFT's target_modules lists them.
  std::vector<std::string> target_modules() const {
    std::vector<std::string> out;
    for (const auto& t : targets) out.push_back(t + "_proj");
    return out;
  }

  /// Far past any adapter (ranks are 8 to 256), small enough that r x dims cannot overflow.
  static constexpr int64_t max_rank = int64_t{1} << 16;

  void validate() const {
    if (!active()) return;
    if (rank <= 0 || rank > max_rank) fail<ConfigError>("--lora-rank must lie in 1..", max_rank, ", got ", rank);
    if (!(alpha > 0) || !std::isfinite(alpha)) fail<ConfigError>("--lora-alpha must be positive and finite, got ", alpha);
    if (dropout < 0 || dropout >= 1) fail<ConfigError>("--lora-dropout must lie in [0, 1), got ", dropout);
    if (targets.empty()) fail<ConfigError>("--lora-targets is empty: name some of q,k,v,o,gate,up,down");
    for (const auto& t : targets)
      if (t != "q" && t != "k" && t != "v" && t != "o" && t != "gate" && t != "up" && t != "down")
        fail<ConfigError>("--lora-targets: '", t, "' is not a target: use q, k, v, o, gate, up, down");
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
