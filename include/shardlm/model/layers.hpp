#pragma once
// Leaf modules with Hugging Face parameter names. They are built on any device (meta included) without
// initializing: weights are filled by init_weights() or loaded from a checkpoint.
#include <torch/nn/module.h>
#include <torch/nn/pimpl.h>

#include "shardlm/model/config.hpp"
#include "shardlm/model/ops.hpp"

namespace shardlm::model {

/// y = x W^T (+ b), W: [out, in].
class LinearImpl : public torch::nn::Module {
 public:
  LinearImpl(int64_t in, int64_t out, bool bias, const at::TensorOptions& opts)
      : weight(register_parameter("weight", at::empty({out, in}, opts))) {
    if (bias) this->bias = register_parameter("bias", at::empty({out}, opts));
  }
  at::Tensor forward(const at::Tensor& x) { return at::linear(x, weight, bias); }
  at::Tensor weight, bias;
};
TORCH_MODULE(Linear);

/// Token embedding table [V, C].
class EmbeddingImpl : public torch::nn::Module {
 public:
  EmbeddingImpl(int64_t vocab, int64_t dim, const at::TensorOptions& opts)
      : weight(register_parameter("weight", at::empty({vocab, dim}, opts))) {}
  at::Tensor forward(const at::Tensor& ids) { return at::embedding(weight, ids); }  // [B, T] -> [B, T, C]
  at::Tensor weight;
};
TORCH_MODULE(Embedding);

/// RMSNorm over the last dimension with a learned scale.
class RMSNormImpl : public torch::nn::Module {
 public:
  RMSNormImpl(const ModelConfig& c, const at::TensorOptions& opts)
      : weight(register_parameter("weight", at::empty({c.hidden_size}, opts))), eps_(c.rms_norm_eps) {}
  at::Tensor forward(const at::Tensor& x) { return ops::rms_norm(x, weight, eps_); }
  at::Tensor weight;

 private:
  double eps_;
};
TORCH_MODULE(RMSNorm);

/// Grouped-query causal self-attention with rotary positions (Llama 3).
class GroupedQueryAttentionImpl : public torch::nn::Module {
 public:
  GroupedQueryAttentionImpl(const ModelConfig& c, const at::TensorOptions& opts)
      : q_proj(register_module("q_proj", Linear(c.hidden_size, c.num_heads * c.head_dim, c.attention_bias, opts))),
        k_proj(register_module("k_proj", Linear(c.hidden_size, c.num_kv_heads * c.head_dim, c.attention_bias, opts))),
        v_proj(register_module("v_proj", Linear(c.hidden_size, c.num_kv_heads * c.head_dim, c.attention_bias, opts))),
        o_proj(register_module("o_proj", Linear(c.num_heads * c.head_dim, c.hidden_size, c.attention_bias, opts))),
        num_heads_(c.num_heads), num_kv_heads_(c.num_kv_heads), head_dim_(c.head_dim) {}
  static constexpr const char* hf_name = "self_attn";

  at::Tensor forward(const at::Tensor& x, const ops::Rope& rope) {
    return ops::attention(x, q_proj->weight, k_proj->weight, v_proj->weight, o_proj->weight, rope, num_heads_,
                          num_kv_heads_, head_dim_, q_proj->bias, k_proj->bias, v_proj->bias, o_proj->bias);
  }
  Linear q_proj, k_proj, v_proj, o_proj;

 private:
  int64_t num_heads_, num_kv_heads_, head_dim_;
};
TORCH_MODULE(GroupedQueryAttention);

/// SwiGLU feed-forward (Llama 3 MLP).
class SwiGLUImpl : public torch::nn::Module {
 public:
  SwiGLUImpl(const ModelConfig& c, const at::TensorOptions& opts)
      : gate_proj(register_module("gate_proj", Linear(c.hidden_size, c.intermediate_size, c.mlp_bias, opts))),
        up_proj(register_module("up_proj", Linear(c.hidden_size, c.intermediate_size, c.mlp_bias, opts))),
        down_proj(register_module("down_proj", Linear(c.intermediate_size, c.hidden_size, c.mlp_bias, opts))) {}
  static constexpr const char* hf_name = "mlp";

  at::Tensor forward(const at::Tensor& x) {
    return ops::swiglu(x, gate_proj->weight, up_proj->weight, down_proj->weight, gate_proj->bias, up_proj->bias,
                       down_proj->bias);
  }
  Linear gate_proj, up_proj, down_proj;
};
TORCH_MODULE(SwiGLU);

}  // namespace shardlm::model
