#pragma once
// Model shapes: presets and Hugging Face config.json (transformers v4 form with `rope_theta` /
// `rope_scaling`, and the v5 form with `rope_parameters`).
#include <nlohmann/json.hpp>

#include <cmath>
#include <cstdint>
#include <limits>
#include <filesystem>
#include <fstream>
#include <string>
#include <string_view>
#include <vector>

#include "shardlm/core/errors.hpp"
#include "shardlm/core/json.hpp"

namespace shardlm::model {

/// Rotary embedding parameters. `type` is "default" (plain RoPE), "linear" or "llama3".
struct RopeConfig {
  std::string type = "default";
  double theta = 10000.0;
  double factor = 1.0;                     ///< llama3 / linear: how much the context was extended
  double low_freq_factor = 1.0;            ///< llama3
  double high_freq_factor = 4.0;           ///< llama3
  int64_t original_max_position_embeddings = 8192;  ///< llama3
};

/// The shape of a decoder-only transformer: Llama 3, or Mixtral (`model_type` "mixtral": a sparse mixture of
/// `num_experts` SwiGLU experts in place of the MLP, `num_experts_per_tok` of them per token).
/// How a MoE model's experts compute (model/moe.hpp). `loop`: one pair of matmuls per expert that got tokens (a host
/// loop; the CPU default). `padded`: the tokens sorted by expert into an [E, max count, C] batch, two batched matmuls
/// (one host sync for the largest count). `grouped`: at::_grouped_mm over the sorted tokens (bf16, sm90/sm100).
/// `automatic`: grouped where compat::has_grouped_mm says it serves, else padded on a GPU, else loop.
enum class ExpertKernel { automatic, loop, padded, grouped };

/// --moe-kernel auto|loop|padded|grouped.
inline ExpertKernel expert_kernel_named(std::string_view s) {
  if (s == "auto") return ExpertKernel::automatic;
  if (s == "loop") return ExpertKernel::loop;
  if (s == "padded") return ExpertKernel::padded;
  if (s == "grouped") return ExpertKernel::grouped;
  fail<ConfigError>("--moe-kernel '", s, "': use auto, loop, padded or grouped");
}

/// How a block's RMSNorm, SwiGLU and RoPE compute on bf16 CUDA tensors. `fused`: the project's CUDA kernels, one per
/// op and direction (model/block_kernels.hpp); `aten`: the ATen ops (model/ops.hpp), which CPU tensors and other
/// dtypes always take. Both round alike (block_kernels.hpp says where the kernels' row sums may differ by a rounding).
enum class BlockKernels { fused, aten };

/// --block-kernels fused|aten.
inline BlockKernels block_kernels_named(std::string_view s) {
  if (s == "fused") return BlockKernels::fused;
  if (s == "aten") return BlockKernels::aten;
  fail<ConfigError>("--block-kernels '", s, "': use fused or aten");
}

/// The largest sizes a config may declare: far beyond any released model (Llama 3.1 405B: hidden 16384, intermediate
/// 53248, 126 layers, 128 heads, a vocabulary of 128256), and small enough that every tensor's element count and the
/// parameter count fit int64 with room to spare, so no product computed from a config.json can overflow.
struct ConfigLimits {
  static constexpr int64_t vocab_size = int64_t{1} << 24;
  static constexpr int64_t hidden_size = int64_t{1} << 20;
  static constexpr int64_t intermediate_size = int64_t{1} << 22;
  static constexpr int64_t layers = int64_t{1} << 14;
  static constexpr int64_t heads = int64_t{1} << 14;
  static constexpr int64_t head_dim = int64_t{1} << 14;
  static constexpr int64_t experts = int64_t{1} << 14;
  static constexpr int64_t positions = int64_t{1} << 31;
  static constexpr double params = 1125899906842624.0;  // 2^50 (1.1e15): 2,800 times Llama 3.1 405B
};

struct ModelConfig {
  std::string model_type = "llama";
  int64_t vocab_size = 0;
  int64_t hidden_size = 0;
  int64_t intermediate_size = 0;
  int64_t num_layers = 0;
  int64_t num_heads = 0;
  int64_t num_kv_heads = 0;
  int64_t head_dim = 0;
  int64_t max_position_embeddings = 8192;
  double rms_norm_eps = 1e-5;
  double initializer_range = 0.02;
  bool tie_word_embeddings = false;
  bool attention_bias = false;
  bool mlp_bias = false;
  RopeConfig rope;
  // Mixtral (num_experts 0: a dense MLP)
  int64_t num_experts = 0;            ///< config.json num_local_experts
  int64_t num_experts_per_tok = 0;    ///< top-k of the router
  double router_aux_loss_coef = 0.0;  ///< weight of the load-balancing loss in the training loss
  bool output_router_logits = false;  ///< transformers adds the aux loss to the loss only when this is true
  double router_z_loss_coef = 0.0;    ///< weight of the router z-loss (shardlm's; transformers' Mixtral has none)
  int64_t sliding_window = 0;         ///< 0: none; sequences longer than it are rejected (not implemented)
  ExpertKernel expert_kernel = ExpertKernel::automatic;  ///< how the experts compute (a run-time choice, not config.json's)
  BlockKernels block_kernels = BlockKernels::fused;      ///< how norms, SwiGLU and RoPE compute (run time, not config.json's)

  bool is_moe() const { return num_experts > 0; }

  /// Throws ConfigError naming the field when the shape cannot work, or is beyond every limit of ConfigLimits.
  void validate(const std::string& origin = "config") const;

  /// Parameters of one block (attention, MLP or router and every expert, two norms).
  int64_t block_params() const { return block_params_with(is_moe() ? num_experts : 1); }
  /// Parameters one token computes with in a block: for Mixtral the router and num_experts_per_tok experts.
  int64_t active_block_params() const { return block_params_with(is_moe() ? num_experts_per_tok : 1); }
  /// Parameters (embedding, blocks, final norm, head when untied).
  int64_t num_params() const {
    return vocab_size * hidden_size * (tie_word_embeddings ? 1 : 2) + num_layers * block_params() + hidden_size;
  }
  /// Training FLOPs per token: 6 x (active parameters less the embedding) + 12 x L x H x head_dim x T for
  /// attention (the count the peer benchmark uses; for Mixtral the router and top-k experts, not every expert).
  double flops_per_token(int64_t seq_len) const {
    const int64_t active = num_params() - num_layers * (block_params() - active_block_params());
    const double matmul_params = static_cast<double>(active - vocab_size * hidden_size) +
                                 (tie_word_embeddings ? static_cast<double>(vocab_size * hidden_size) : 0.0);
    return 6.0 * matmul_params + 12.0 * num_layers * num_heads * head_dim * static_cast<double>(seq_len);
  }

 private:
  int64_t block_params_with(int64_t experts) const {
    const int64_t c = hidden_size, q = num_heads * head_dim, kv = num_kv_heads * head_dim;
    const int64_t attn = c * q + 2 * c * kv + q * c + (attention_bias ? q + 2 * kv + c : 0);
    const int64_t mlp = 3 * c * intermediate_size + (mlp_bias ? 2 * intermediate_size + c : 0);
    const int64_t router = is_moe() ? num_experts * c : 0;
    return attn + experts * mlp + router + 2 * c;
  }
};

inline void ModelConfig::validate(const std::string& origin) const {
  using L = ConfigLimits;
  auto size = [&](int64_t v, int64_t hi, const char* field) {
    if (v < 1 || v > hi) fail<ConfigError>(origin, ": ", field, " must lie in 1..", hi, ", got ", v);
  };
  size(vocab_size, L::vocab_size, "vocab_size");
  size(hidden_size, L::hidden_size, "hidden_size");
  size(intermediate_size, L::intermediate_size, "intermediate_size");
  size(num_layers, L::layers, "num_hidden_layers");
  size(num_heads, L::heads, "num_attention_heads");
  size(num_kv_heads, L::heads, "num_key_value_heads");
  size(head_dim, L::head_dim, "head_dim");
  size(max_position_embeddings, L::positions, "max_position_embeddings");
  if (num_heads % num_kv_heads != 0)
    fail<ConfigError>(origin, ": num_attention_heads(", num_heads, ") is not a multiple of num_key_value_heads(",
                      num_kv_heads, ")");
  if (head_dim % 2 != 0) fail<ConfigError>(origin, ": head_dim(", head_dim, ") must be even for rotary embeddings");
  auto finite_positive = [&](double v, const char* field) {
    if (!(v > 0) || !std::isfinite(v)) fail<ConfigError>(origin, ": ", field, " must be positive and finite, got ", v);
  };
  finite_positive(rms_norm_eps, "rms_norm_eps");
  finite_positive(rope.theta, "rope_theta");
  if (!(initializer_range >= 0) || !std::isfinite(initializer_range))
    fail<ConfigError>(origin, ": initializer_range must be >= 0 and finite, got ", initializer_range);
  if (rope.type != "default" && rope.type != "llama3" && rope.type != "linear")
    fail<ConfigError>(origin, ": rope type '", rope.type, "' is not supported: use default, linear or llama3");
  if (rope.type != "default") finite_positive(rope.factor, "rope factor");
  if (rope.type == "llama3") {
    finite_positive(rope.low_freq_factor, "low_freq_factor");
    finite_positive(rope.high_freq_factor, "high_freq_factor");
    size(rope.original_max_position_embeddings, L::positions, "original_max_position_embeddings");
    if (!(rope.high_freq_factor > rope.low_freq_factor))
      fail<ConfigError>(origin, ": llama3 rope needs high_freq_factor(", rope.high_freq_factor, ") > low_freq_factor(",
                        rope.low_freq_factor, ")");
  }
  if (model_type == "mixtral") {
    size(num_experts, L::experts, "num_local_experts");
    size(num_experts_per_tok, L::experts, "num_experts_per_tok");
    if (num_experts_per_tok > num_experts)
      fail<ConfigError>(origin, ": num_experts_per_tok(", num_experts_per_tok, ") exceeds num_local_experts(",
                        num_experts, ")");
    if (mlp_bias) fail<ConfigError>(origin, ": mlp_bias is not supported for Mixtral experts");
    for (const auto& [v, field] :
         {std::pair{router_aux_loss_coef, "router_aux_loss_coef"}, {router_z_loss_coef, "router_z_loss_coef"}})
      if (!(v >= 0) || !std::isfinite(v)) fail<ConfigError>(origin, ": ", field, " must be >= 0 and finite, got ", v);
  } else if (num_experts != 0) {
    fail<ConfigError>(origin, ": num_local_experts is set but model_type is '", model_type, "' (expected 'mixtral')");
  }
  if (sliding_window < 0 || sliding_window > L::positions)
    fail<ConfigError>(origin, ": sliding_window must lie in 1..", L::positions, " or be null, got ", sliding_window);
  // The parameter count in floating point first: with every size within its limit it is the products of a few of
  // them that could pass int64, and num_params() multiplies in int64.
  const long double c = hidden_size, q = static_cast<long double>(num_heads) * head_dim,
                    kv = static_cast<long double>(num_kv_heads) * head_dim, experts = is_moe() ? num_experts : 1;
  const long double block = 2 * c * q + 2 * c * kv + experts * 3 * c * intermediate_size + (is_moe() ? num_experts * c : 0);
  const long double params = static_cast<long double>(vocab_size) * c * 2 + num_layers * block;
  if (params > L::params)
    fail<ConfigError>(origin, ": ", static_cast<double>(params), " parameters (", num_layers, " layers of ",
                      static_cast<double>(block), ", a vocabulary of ", vocab_size, " x ", hidden_size,
                      ") is over the limit of ", L::params, ": check the sizes");
}

inline std::vector<std::string> preset_names() {
  return {"llama3-debug", "llama3-8b", "llama3-70b", "llama3-405b", "mixtral-debug", "mixtral-8x7b", "mixtral-8x22b"};
}

/// A named preset; `layers` > 0 overrides the number of layers.
inline ModelConfig preset(const std::string& name, int64_t layers = 0) {
  ModelConfig c;
  c.rope = {"llama3", 500000.0, 8.0, 1.0, 4.0, 8192};
  c.max_position_embeddings = 131072;
  auto dims = [&](int64_t vocab, int64_t hidden, int64_t inter, int64_t n_layers, int64_t heads, int64_t kv) {
    c.vocab_size = vocab, c.hidden_size = hidden, c.intermediate_size = inter, c.num_layers = n_layers;
    c.num_heads = heads, c.num_kv_heads = kv, c.head_dim = hidden / heads;
  };
  if (name == "llama3-debug") {
    dims(512, 128, 384, 4, 4, 2);
    c.max_position_embeddings = 2048;
  } else if (name == "llama3-8b") {
    dims(128256, 4096, 14336, 32, 32, 8);
  } else if (name == "llama3-70b") {
    dims(128256, 8192, 28672, 80, 64, 8);
  } else if (name == "llama3-405b") {
    dims(128256, 16384, 53248, 126, 128, 8);
  } else if (name == "mixtral-debug" || name == "mixtral-8x7b" || name == "mixtral-8x22b") {
    // As the released config.json files, except output_router_logits: true, so training includes the aux loss.
    c.model_type = "mixtral", c.rope = {"default", 1000000.0}, c.max_position_embeddings = 32768;
    c.num_experts = 8, c.num_experts_per_tok = 2, c.router_aux_loss_coef = 0.02, c.output_router_logits = true;
    if (name == "mixtral-debug") {
      dims(512, 128, 256, 4, 4, 2);
      c.num_experts = 4, c.max_position_embeddings = 2048;
    } else if (name == "mixtral-8x7b") {
      dims(32000, 4096, 14336, 32, 32, 8);
    } else {
      dims(32768, 6144, 16384, 56, 48, 8);
      c.max_position_embeddings = 65536, c.router_aux_loss_coef = 0.001;
    }
  } else {
    std::string known;
    for (const auto& n : preset_names()) known += (known.empty() ? "" : ", ") + n;
    fail<ConfigError>("unknown preset '", name, "': use one of ", known);
  }
  if (layers > 0) c.num_layers = layers;
  if (layers < 0) fail<ConfigError>("--layers must be positive, got ", layers);
  c.validate("preset " + name);
  return c;
}

namespace detail {
inline void read_rope_scaling(const JsonFields<ConfigError>& s, RopeConfig& rope) {
  rope.type = s.has("rope_type") ? s.string("rope_type") : s.string_or("type", "default");
  constexpr double big = 1e12;  // a factor or frequency factor past this is not a context extension
  rope.factor = s.number_or("factor", 1.0, 0, big);
  if (rope.type == "llama3") {
    rope.factor = s.number("factor", 0, big);
    rope.low_freq_factor = s.number("low_freq_factor", 0, big);
    rope.high_freq_factor = s.number("high_freq_factor", 0, big);
    rope.original_max_position_embeddings = s.integer_or("original_max_position_embeddings",
                                                         rope.original_max_position_embeddings, 1, ConfigLimits::positions);
  } else if (rope.type == "linear") {
    rope.factor = s.number("factor", 0, big);
  }
}
}  // namespace detail

/// Reads a parsed Hugging Face config.json (`origin` names it in errors): every field taken with its type and range
/// checked (an integer field refuses 4096.5 and 4096.0 alike), then the whole validated.
inline ModelConfig config_from_json(const nlohmann::json& j, const std::string& origin) {
  using L = ConfigLimits;
  const JsonFields<ConfigError> f(j, origin);
  constexpr double unbounded = std::numeric_limits<double>::max();
  ModelConfig c;
  c.model_type = f.string_or("model_type", "llama");
  if (c.model_type != "llama" && c.model_type != "mixtral")
    fail<ConfigError>(origin, ": model_type '", c.model_type, "' is not supported here: expected 'llama' or 'mixtral'");
  const auto act = f.string_or("hidden_act", "silu");
  if (act != "silu") fail<ConfigError>(origin, ": hidden_act '", act, "' is not supported: Llama and Mixtral use 'silu'");
  if (c.model_type == "mixtral") {
    c.num_experts = f.integer("num_local_experts", 1, L::experts);
    c.num_experts_per_tok = f.integer("num_experts_per_tok", 1, L::experts);
    c.router_aux_loss_coef = f.number_or("router_aux_loss_coef", 0.001, 0, unbounded);
    c.output_router_logits = f.boolean_or("output_router_logits", false);
    c.router_z_loss_coef = f.number_or("router_z_loss_coef", 0.0, 0, unbounded);
    c.sliding_window = f.integer_or("sliding_window", 0, 1, L::positions);
    const double jitter = f.number_or("router_jitter_noise", 0.0, -unbounded, unbounded);
    if (jitter != 0.0)
      fail<ConfigError>(origin, ": router_jitter_noise ", jitter, " is not supported: set it to 0 (Mixtral's default)");
  }
  c.vocab_size = f.integer("vocab_size", 1, L::vocab_size);
  c.hidden_size = f.integer("hidden_size", 1, L::hidden_size);
  c.intermediate_size = f.integer("intermediate_size", 1, L::intermediate_size);
  c.num_layers = f.integer("num_hidden_layers", 1, L::layers);
  c.num_heads = f.integer("num_attention_heads", 1, L::heads);
  c.num_kv_heads = f.integer_or("num_key_value_heads", c.num_heads, 1, L::heads);
  c.head_dim = f.integer_or("head_dim", c.hidden_size / c.num_heads, 1, L::head_dim);
  c.max_position_embeddings = f.integer_or("max_position_embeddings", 2048, 1, L::positions);
  c.rms_norm_eps = f.number_or("rms_norm_eps", 1e-6, 0, unbounded);
  c.initializer_range = f.number_or("initializer_range", 0.02, 0, unbounded);
  c.tie_word_embeddings = f.boolean_or("tie_word_embeddings", false);
  c.attention_bias = f.boolean_or("attention_bias", false);
  c.mlp_bias = f.boolean_or("mlp_bias", false);
  c.rope.original_max_position_embeddings = c.max_position_embeddings;  // transformers' fallback
  if (f.has("rope_parameters")) {  // transformers v5
    const auto p = f.object("rope_parameters");
    detail::read_rope_scaling(p, c.rope);
    c.rope.theta = p.number("rope_theta", 0, unbounded);
  } else {  // transformers v4
    c.rope.theta = f.number_or("rope_theta", 10000.0, 0, unbounded);
    if (f.has("rope_scaling")) detail::read_rope_scaling(f.object("rope_scaling"), c.rope);
  }
  c.validate(origin);
  return c;
}

/// A Hugging Face config.json (transformers v5 form) for `c`, with `dtype` the weights' dtype ("bfloat16", ...):
/// what an export from a preset writes. config_from_json reads it back to `c`.
inline nlohmann::ordered_json config_to_json(const ModelConfig& c, const std::string& dtype) {
  nlohmann::ordered_json rope = {{"rope_type", c.rope.type}, {"rope_theta", c.rope.theta}};
  if (c.rope.type != "default") rope["factor"] = c.rope.factor;
  if (c.rope.type == "llama3") {
    rope["low_freq_factor"] = c.rope.low_freq_factor;
    rope["high_freq_factor"] = c.rope.high_freq_factor;
    rope["original_max_position_embeddings"] = c.rope.original_max_position_embeddings;
  }
  nlohmann::ordered_json j = {{"architectures", {c.is_moe() ? "MixtralForCausalLM" : "LlamaForCausalLM"}},
          {"model_type", c.model_type}, {"hidden_act", "silu"},
          {"vocab_size", c.vocab_size}, {"hidden_size", c.hidden_size}, {"intermediate_size", c.intermediate_size},
          {"num_hidden_layers", c.num_layers}, {"num_attention_heads", c.num_heads},
          {"num_key_value_heads", c.num_kv_heads}, {"head_dim", c.head_dim},
          {"max_position_embeddings", c.max_position_embeddings}, {"rms_norm_eps", c.rms_norm_eps},
          {"initializer_range", c.initializer_range}, {"tie_word_embeddings", c.tie_word_embeddings},
          {"attention_bias", c.attention_bias}, {"mlp_bias", c.mlp_bias}, {"rope_parameters", rope}, {"dtype", dtype}};
  if (c.is_moe()) {
    j["num_local_experts"] = c.num_experts, j["num_experts_per_tok"] = c.num_experts_per_tok;
    j["router_aux_loss_coef"] = c.router_aux_loss_coef, j["output_router_logits"] = c.output_router_logits;
    j["router_jitter_noise"] = 0.0;
    j["sliding_window"] = c.sliding_window > 0 ? nlohmann::ordered_json(c.sliding_window) : nlohmann::ordered_json();
    if (c.router_z_loss_coef != 0.0) j["router_z_loss_coef"] = c.router_z_loss_coef;
  }
  return j;
}

/// Reads `path` (a config.json file, or a model directory holding one).
inline ModelConfig load_config(std::filesystem::path path) {
  if (!std::filesystem::exists(path))
    fail<IoError>(path.string(), ": does not exist (expected a model directory or its config.json)");
  if (std::filesystem::is_directory(path)) path /= "config.json";
  if (!std::filesystem::exists(path))
    fail<IoError>("cannot open ", path.string(), ": a Hugging Face model directory needs a config.json");
  return config_from_json(read_json(path), path.string());
}

}  // namespace shardlm::model
