#pragma once
// The one generic transformer block and the decoder around it. Single-device code that reads like the
// math; parallelism, recompute and precision are applied from outside (engine/, train/).
#include <torch/nn/modules/container/modulelist.h>

#include <algorithm>
#include <map>
#include <set>
#include <stdexcept>
#include <string>
#include <string_view>
#include <tuple>
#include <utility>
#include <vector>

#include "shardlm/model/adapter.hpp"
#include "shardlm/model/layers.hpp"
#include "shardlm/model/moe_dispatch.hpp"
#include "shardlm/model/loss.hpp"
#include "shardlm/policy/policies.hpp"

namespace shardlm::model {

/// Pre-norm residual block: h = x + attn(norm1(x)); out = h + ffn(norm2(h)).
template <class Attention, class FeedForward, class Norm>
class TransformerBlockImpl : public torch::nn::Module {
 public:
  TransformerBlockImpl(const ModelConfig& c, const at::TensorOptions& opts)
      : input_layernorm(register_module("input_layernorm", Norm(c, opts))),
        attn(register_module(Attention::ContainedType::hf_name, Attention(c, opts))),
        post_attention_layernorm(register_module("post_attention_layernorm", Norm(c, opts))),
        ffn(register_module(FeedForward::ContainedType::hf_name, FeedForward(c, opts))) {}

  at::Tensor forward(const at::Tensor& x, const ops::Rope& rope) {  // [B, T, C] -> [B, T, C]
    if (selective_) return forward_selective(x, rope);
    const auto h = x + attn->forward(input_layernorm->forward(x), rope);
    return h + ffn->forward(post_attention_layernorm->forward(h));
  }

  /// The same math keeping for backward only the matmul and attention outputs and each norm's input
  /// (checkpointing::Selective; model/selective.hpp). A feed-forward without forward_selective (the MoE, whose own
  /// nodes keep what its experts need) reads a norm that keeps only its input.
  at::Tensor forward_selective(const at::Tensor& x, const ops::Rope& rope) {
    const auto h = x + attn->forward_selective(x, *input_layernorm, rope);
    if constexpr (requires { ffn->forward_selective(h, *post_attention_layernorm); })
      return h + ffn->forward_selective(h, *post_attention_layernorm);
    else
      return h + ffn->forward(post_attention_layernorm->forward_saving_input(h));
  }

  /// What the block keeps for backward when its graph is kept: checkpointing::Rules::selective() or everything.
  void set_checkpointing(const checkpointing::Rules& rules) {
    if (rules.selective() && has_adapter())
      fail<ConfigError>("--checkpointing ", rules.name(), ": ", SHARDLM_SELECTIVE_NEEDS_FULL_FT);
    selective_ = rules.selective();
  }
  bool has_adapter() const {
    if constexpr (requires { ffn->has_adapter(); }) return attn->has_adapter() || ffn->has_adapter();
    else return attn->has_adapter();
  }

  Norm input_layernorm;
  Attention attn;
  Norm post_attention_layernorm;
  FeedForward ffn;

 private:
  bool selective_ = false;
};
template <class Attention, class FeedForward, class Norm>
using TransformerBlock = torch::nn::ModuleHolder<TransformerBlockImpl<Attention, FeedForward, Norm>>;

/// Embedding, a stack of blocks, final norm and LM head (tied to the embedding or not). The engine drives
/// it unit by unit through embed(), block() and head(); forward() runs them all.
template <class Block>
class DecoderImpl : public torch::nn::Module {
 public:
  explicit DecoderImpl(const ModelConfig& c, const at::TensorOptions& opts = at::TensorOptions())
      : embed_tokens(register_module("embed_tokens", Embedding(c.vocab_size, c.hidden_size, opts))),
        norm(register_module("norm", RMSNorm(c, opts))),
        config_(c),
        inv_freq_(ops::rope_inv_freq(c.rope, c.head_dim)) {
    c.validate();
    auto list = register_module("layers", torch::nn::ModuleList());
    for (int64_t i = 0; i < c.num_layers; ++i) {
      layers.push_back(Block(c, opts));
      list->push_back(layers.back());
    }
    if (!c.tie_word_embeddings)
      lm_head = register_module("lm_head", Linear(c.hidden_size, c.vocab_size, /*bias=*/false, opts));
  }

  at::Tensor embed(const at::Tensor& ids) { return embed_tokens->forward(ids); }  // [B, T] -> [B, T, C]

  /// cos/sin tables for sequences of length T, cached per (T, device, dtype).
  const ops::Rope& rope(int64_t seq_len, const at::Device& device, at::ScalarType dtype) {
    if (config_.sliding_window > 0 && seq_len > config_.sliding_window)
      fail<ConfigError>("sequence length ", seq_len, " exceeds the config's sliding_window(", config_.sliding_window,
                        "): sliding-window attention is not implemented; use sequences of at most ",
                        config_.sliding_window, " tokens (or a config with sliding_window null)");
    const auto key = std::make_tuple(seq_len, device.str(), dtype);
    auto it = rope_cache_.find(key);
    if (it == rope_cache_.end())
      it = rope_cache_.emplace(key, ops::rope_tables(inv_freq_.to(device), seq_len, dtype)).first;
    return it->second;
  }

  at::Tensor block(size_t i, const at::Tensor& x, const ops::Rope& rope) { return layers.at(i)->forward(x, rope); }

  /// [B, T, C] -> logits [B, T, V]; after set_loss_targets, the summed loss instead (an fp32 scalar).
  at::Tensor head(const at::Tensor& x) {
    const auto h = norm->forward(x);
    if (loss_targets_.defined())
      return ops::linear_cross_entropy_sum(h, lm_head ? lm_head->weight : embed_tokens->weight,
                                           std::exchange(loss_targets_, at::Tensor()), loss_chunk_, loss_grad_scale_);
    return lm_head ? lm_head->forward(h) : at::linear(h, embed_tokens->weight);
  }

  /// The next forward of the head returns the sum of the next-token cross-entropy against `shifted` [B, T] (labels
  /// already shifted, -100 ignored: ops::next_token_loss_sum of its logits) with the head and the loss fused,
  /// `chunk` tokens at a time (model/loss.hpp): the logits are never whole. `grad_scale`: the factor by which the
  /// sum will be scaled before backward (the gradients computed in the forward carry it). Taken by that forward.
  void set_loss_targets(at::Tensor shifted, int64_t chunk, double grad_scale = 1.0) {
    SHARDLM_ASSERT(chunk > 0, "set_loss_targets: chunk must be > 0, got ", chunk);
    SHARDLM_ASSERT(!lm_head || !lm_head->has_adapter(), "the fused loss needs a head without an adapter");
    loss_targets_ = std::move(shifted), loss_chunk_ = chunk, loss_grad_scale_ = grad_scale;
  }

  // The units the engine drives: 0 the embedding, 1..L the blocks, L+1 the final norm and head.
  size_t num_units() const { return layers.size() + 2; }
  bool is_block(size_t u) const { return u >= 1 && u <= layers.size(); }
  /// Unit u's own parameters with their model names (the head does not own a tied embedding).
  std::vector<std::pair<std::string, at::Tensor>> unit_parameters(size_t u) {
    std::vector<std::pair<std::string, at::Tensor>> out;
    const auto add = [&](const std::string& prefix, torch::nn::Module& m) {
      for (const auto& item : m.named_parameters()) out.emplace_back(prefix + item.key(), item.value());
    };
    if (u == 0) add("embed_tokens.", *embed_tokens);
    else if (is_block(u)) add("layers." + std::to_string(u - 1) + ".", *layers[u - 1]);
    else if (u == num_units() - 1) {
      add("norm.", *norm);
      if (lm_head) add("lm_head.", *lm_head);
    } else throw std::out_of_range("no unit " + std::to_string(u));
    return out;
  }
  /// The other units whose parameters unit u reads: a tied head reads the embedding's.
  std::vector<size_t> unit_reads(size_t u) const {
    return u == num_units() - 1 && !lm_head ? std::vector<size_t>{0} : std::vector<size_t>{};
  }
  /// Unit u forward: token ids [B, T] -> [B, T, C] -> ... -> logits [B, T, V].
  at::Tensor forward_unit(size_t u, const at::Tensor& x) {
    if (u == 0) return embed(x);
    if (is_block(u)) return block(u - 1, x, rope(x.size(1), x.device(), x.scalar_type()));
    return head(x);
  }

  /// What each block keeps for backward (the engine hands its recipe's checkpointing rules in: engine/unit_model.hpp).
  /// With Selective, a model with adapters is refused (SHARDLM_SELECTIVE_NEEDS_FULL_FT), and one with float8 linears
  /// (SHARDLM_FP8_NEEDS_PLAIN_CHECKPOINTING).
  void set_checkpointing(const checkpointing::Rules& rules) {
    if (!linears_serve(rules, precision_))
      fail<ConfigError>("--checkpointing ", rules.name(), " with --precision ", precision_.name, ": ",
                        SHARDLM_FP8_NEEDS_PLAIN_CHECKPOINTING);
    for (auto& layer : layers) layer->set_checkpointing(rules);
    checkpointing_ = rules;
  }
  const checkpointing::Rules& checkpointing() const { return checkpointing_; }

  /// How the blocks' projections multiply (precision::Rules::linears; the engine hands its recipe's precision rules
  /// in): q/k/v/o_proj and gate/up/down_proj, by their Hugging Face names; never the embedding, the LM head, a MoE
  /// router (`gate`) or its experts (moe.hpp: at::_grouped_mm in bf16). Float8 needs every such layer's sizes to be
  /// multiples of 16 (at::_scaled_mm's constraint): refused otherwise, on the CPU too, so that a run tried on a CPU
  /// does not fail later on the GPU.
  void set_precision(const precision::Rules& rules) {
    if (!linears_serve(checkpointing_, rules))
      fail<ConfigError>("--precision ", rules.name, " with --checkpointing ", checkpointing_.name(), ": ",
                        SHARDLM_FP8_NEEDS_PLAIN_CHECKPOINTING);
    static constexpr std::string_view projections[] = {"q_proj", "k_proj", "v_proj", "o_proj",
                                                       "gate_proj", "up_proj", "down_proj"};
    for (size_t i = 0; i < layers.size(); ++i)
      for (const auto& item : layers[i]->named_modules("", /*include_self=*/false)) {
        const auto& key = item.key();
        auto* linear = dynamic_cast<LinearImpl*>(item.value().get());
        if (!linear || std::find(std::begin(projections), std::end(projections), key.substr(key.rfind('.') + 1)) ==
                           std::end(projections))
          continue;
        const int64_t out = linear->weight.size(0), in = linear->weight.size(1);
        if (rules.fp8_linears() && (in % 16 != 0 || out % 16 != 0))
          fail<ConfigError>("--precision ", rules.name, ": layers.", i, ".", key, " maps ", in, " to ", out,
                            " features; float8 matmuls (at::_scaled_mm) need both multiples of 16: use --precision "
                            "mixed-bf16 for this model");
        linear->set_compute(rules.linears);
      }
    precision_ = rules;
  }
  const precision::Rules& precision() const { return precision_; }

  /// Unit u's side output of its last forward, handed over once: a MoE block's router statistics
  /// (model/moe.hpp), undefined for every other unit. The engine back-propagates a gradient into it.
  at::Tensor take_side(size_t u) {
    if constexpr (requires(Block& b) { b->ffn->take_router_stats(); }) {
      if (is_block(u)) return layers[u - 1]->ffn->take_router_stats();
    }
    return {};
  }

  /// [B, T] -> logits [B, T, V]; with `sides`, every unit's side output (take_side) in unit order.
  at::Tensor forward(const at::Tensor& ids, std::vector<at::Tensor>* sides = nullptr) {
    auto x = ids;
    for (size_t u = 0; u < num_units(); ++u) {
      x = forward_unit(u, x);
      auto side = take_side(u);
      if (sides) sides->push_back(std::move(side));
    }
    return x;
  }

  /// Adds the adapter (its targets resolved for this model: AdapterConfig::resolved) to every Linear of the blocks
  /// whose name is a target (q_proj for q, ..., a MoE's gate for router), as PEFT does, and on a MoE to the experts'
  /// gate_up_proj and down_proj (PEFT's target_parameters); each target must name some layer of this model.
  void add_adapters(const AdapterConfig& config) {
    const auto a = config.resolved(config_);
    if (a.active() && checkpointing_.selective())
      fail<ConfigError>("--adapter with --checkpointing ", checkpointing_.name(), ": ", SHARDLM_SELECTIVE_NEEDS_FULL_FT);
    adapter_ = a;
    if (!a.active()) return;
    std::set<std::string> found;
    for (auto& layer : layers) {
      for (const auto& t : a.targets) {
        const auto name = a.linear_name(t);
        if (name.empty()) continue;
        for (const auto& item : layer->named_modules("", /*include_self=*/false)) {
          const auto& key = item.key();
          auto* linear = dynamic_cast<LinearImpl*>(item.value().get());
          if (!linear || key.substr(key.rfind('.') + 1) != name) continue;
          linear->add_adapter(a.rank, a.scale(), a.dropout, a.dora());
          found.insert(t);
        }
      }
      if constexpr (requires { layer->ffn->experts->add_adapter("", 0, 0.0); })
        for (const char* t : {"gate_up", "down"})
          if (a.has_target(t)) layer->ffn->experts->add_adapter(std::string(t) + "_proj", a.rank, a.scale()), found.insert(t);
    }
    for (const auto& t : a.targets)
      if (!found.count(t)) fail<ConfigError>("--lora-targets: this model has no layer for target ", t);
  }
  const AdapterConfig& adapter() const { return adapter_; }

  /// Expert parallelism (model/moe_dispatch.hpp): every MoE layer keeps the experts [first, first + count) and
  /// exchanges rows through the shard's exchange. A model without experts refuses it.
  void set_expert_shard(const ExpertShard& shard) {
    if constexpr (requires(Block& b) { b->ffn->set_expert_shard(shard); }) {
      for (auto& layer : layers) layer->ffn->set_expert_shard(shard);
    } else {
      fail<ConfigError>("--expert-parallel: this model (model_type '", config_.model_type,
                        "') has no experts; expert parallelism applies to a mixture of experts (Mixtral)");
    }
  }

  const ModelConfig& config() const { return config_; }

  Embedding embed_tokens;
  std::vector<Block> layers;
  RMSNorm norm;
  Linear lm_head{nullptr};

 private:
  ModelConfig config_;
  AdapterConfig adapter_;
  checkpointing::Rules checkpointing_ = checkpointing::None::rules;
  precision::Rules precision_ = precision::FP32::rules;  // what set_precision last set (plain linears until then)
  at::Tensor loss_targets_;  // set_loss_targets, for the next forward of the head
  int64_t loss_chunk_ = 0;
  double loss_grad_scale_ = 1.0;
  at::Tensor inv_freq_;  // [D/2], fp32, CPU
  std::map<std::tuple<int64_t, std::string, at::ScalarType>, ops::Rope> rope_cache_;
};
template <class Block>
using Decoder = torch::nn::ModuleHolder<DecoderImpl<Block>>;

}  // namespace shardlm::model
