#pragma once
// Leaf modules with Hugging Face parameter names. They are built on any device (meta included) without
// initializing: weights are filled by init_weights() or loaded from a checkpoint.
#include <torch/nn/module.h>
#include <torch/nn/pimpl.h>

#include <memory>

#include "shardlm/model/config.hpp"
#include "shardlm/model/fp8_linear.hpp"
#include "shardlm/model/ops.hpp"
#include "shardlm/model/selective.hpp"
#include "shardlm/policy/policies.hpp"

namespace shardlm::model {

/// y = x W^T (+ b), W: [out, in]; with an adapter (add_adapter), LoRA or DoRA on top (model/adapter.hpp). The base
/// product x W^T is computed as set_compute says (float8 under precision::FP8, model/fp8_linear.hpp); an adapter's own
/// layers stay in the compute dtype.
class LinearImpl : public torch::nn::Module {
 public:
  LinearImpl(int64_t in, int64_t out, bool bias, const at::TensorOptions& opts)
      : weight(register_parameter("weight", at::empty({out, in}, opts))) {
    if (bias) this->bias = register_parameter("bias", at::empty({out}, opts));
  }

  at::Tensor forward(const at::Tensor& x) {
    auto y = base(x, /*with_bias=*/true);
    if (!lora_A) return y;
    const bool drop = is_training() && dropout_ > 0;
    const auto xd = drop ? at::dropout(x, dropout_, /*train=*/true) : x;
    const auto lora = lora_B->forward(lora_A->forward(xd));  // [..., out]
    if (!lora_magnitude_vector.defined()) return y + scale_ * lora;
    // DoRA, as PEFT computes it: the row norm of W + s B A is a constant for autograd.
    const auto delta = at::matmul(lora_B->weight, lora_A->weight).detach();                   // [out, in]
    const auto norm = at::linalg_vector_norm(weight.detach() + scale_ * delta, 2, {1}, false);  // [out]
    const auto g = lora_magnitude_vector / norm;                                                // [out]
    const auto base_out = drop ? base(xd, /*with_bias=*/false) : bias.defined() ? y - bias : y;  // x W^T
    return y + (g - 1) * base_out + g * (scale_ * lora);
  }

  /// How the base product multiplies (the decoder sets the blocks' projections from precision::Rules::linears).
  void set_compute(precision::LinearCompute compute) { compute_ = compute; }
  precision::LinearCompute compute() const { return compute_; }

  /// Adds LoRA (A [r, in], B [out, r]) and with DoRA the magnitude m [out], uninitialized; `scale` is s.
  void add_adapter(int64_t rank, double scale, double dropout, bool dora) {
    const auto opts = weight.options();
    const int64_t out = weight.size(0), in = weight.size(1);
    if (dora) lora_magnitude_vector = register_parameter("lora_magnitude_vector", at::empty({out}, opts));
    lora_A = register_module("lora_A", std::make_shared<LinearImpl>(in, rank, false, opts));
    lora_B = register_module("lora_B", std::make_shared<LinearImpl>(rank, out, false, opts));
    scale_ = scale, dropout_ = dropout;
  }
  bool has_adapter() const { return lora_A != nullptr; }

  at::Tensor weight, bias;
  at::Tensor lora_magnitude_vector;             // DoRA only
  std::shared_ptr<LinearImpl> lora_A, lora_B;   // with an adapter only

 private:
  /// x W^T, plus b when `with_bias`.
  at::Tensor base(const at::Tensor& x, bool with_bias) {
    if (compute_ == precision::LinearCompute::plain) return at::linear(x, weight, with_bias ? bias : at::Tensor());
    auto y = fp8::linear(x, weight);
    return with_bias && bias.defined() ? y + bias : y;
  }

  double scale_ = 0, dropout_ = 0;
  precision::LinearCompute compute_ = precision::LinearCompute::plain;
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
      : weight(register_parameter("weight", at::empty({c.hidden_size}, opts))), eps_(c.rms_norm_eps),
        kernels_(c.block_kernels) {}
  at::Tensor forward(const at::Tensor& x) { return ops::rms_norm(x, weight, eps_, kernels_); }
  /// The same output, keeping only x for backward (checkpointing::Selective; the norm recomputed in backward).
  at::Tensor forward_saving_input(const at::Tensor& x) { return ops::rms_norm_saving_input(x, weight, eps_, kernels_); }
  double eps() const { return eps_; }
  BlockKernels kernels() const { return kernels_; }
  at::Tensor weight;

 private:
  double eps_;
  BlockKernels kernels_;
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
        num_heads_(c.num_heads), num_kv_heads_(c.num_kv_heads), head_dim_(c.head_dim), kernels_(c.block_kernels) {}
  static constexpr const char* hf_name = "self_attn";

  at::Tensor forward(const at::Tensor& x, const ops::Rope& rope) {
    return o_proj->forward(ops::attention_heads(q_proj->forward(x), k_proj->forward(x), v_proj->forward(x), rope,
                                                num_heads_, num_kv_heads_, head_dim_, kernels_));
  }
  /// forward(norm(x)) keeping only the matmul and attention outputs (checkpointing::Selective): the norm fused with
  /// q, k and v (model/selective.hpp), RoPE keeping nothing, the output projection reading SDPA's own output.
  template <class Norm>
  at::Tensor forward_selective(const at::Tensor& x, Norm& norm, const ops::Rope& rope) {
    auto qkv = ops::rms_norm_linear(x, norm.weight, norm.eps(), {q_proj->weight, k_proj->weight, v_proj->weight},
                                    norm.kernels());
    if (q_proj->bias.defined())
      qkv[0] = qkv[0] + q_proj->bias, qkv[1] = qkv[1] + k_proj->bias, qkv[2] = qkv[2] + v_proj->bias;
    const auto y = ops::attention_heads_selective(qkv[0], qkv[1], qkv[2], rope, num_heads_, num_kv_heads_, head_dim_,
                                                  kernels_);
    const auto out = ops::heads_linear(y, o_proj->weight);  // [B, T, C]
    return o_proj->bias.defined() ? out + o_proj->bias : out;
  }
  bool has_adapter() const {
    return q_proj->has_adapter() || k_proj->has_adapter() || v_proj->has_adapter() || o_proj->has_adapter();
  }
  Linear q_proj, k_proj, v_proj, o_proj;

 private:
  int64_t num_heads_, num_kv_heads_, head_dim_;
  BlockKernels kernels_;
};
TORCH_MODULE(GroupedQueryAttention);

/// SwiGLU feed-forward (Llama 3 MLP).
class SwiGLUImpl : public torch::nn::Module {
 public:
  SwiGLUImpl(const ModelConfig& c, const at::TensorOptions& opts)
      : gate_proj(register_module("gate_proj", Linear(c.hidden_size, c.intermediate_size, c.mlp_bias, opts))),
        up_proj(register_module("up_proj", Linear(c.hidden_size, c.intermediate_size, c.mlp_bias, opts))),
        down_proj(register_module("down_proj", Linear(c.intermediate_size, c.hidden_size, c.mlp_bias, opts))),
        kernels_(c.block_kernels) {}
  static constexpr const char* hf_name = "mlp";

  at::Tensor forward(const at::Tensor& x) {
    return down_proj->forward(ops::swiglu_product(gate_proj->forward(x), up_proj->forward(x), kernels_));
  }
  /// forward(norm(x)) keeping only x, gate and up (checkpointing::Selective, model/selective.hpp).
  template <class Norm>
  at::Tensor forward_selective(const at::Tensor& x, Norm& norm) {
    auto gu = ops::rms_norm_linear(x, norm.weight, norm.eps(), {gate_proj->weight, up_proj->weight},
                                   norm.kernels());  // [B, T, I] x 2
    if (gate_proj->bias.defined()) gu[0] = gu[0] + gate_proj->bias, gu[1] = gu[1] + up_proj->bias;
    const auto out = ops::swiglu_down(gu[0], gu[1], down_proj->weight, kernels_);  // [B, T, C]
    return down_proj->bias.defined() ? out + down_proj->bias : out;
  }
  bool has_adapter() const { return gate_proj->has_adapter() || up_proj->has_adapter() || down_proj->has_adapter(); }
  Linear gate_proj, up_proj, down_proj;

 private:
  BlockKernels kernels_;
};
TORCH_MODULE(SwiGLU);

}  // namespace shardlm::model
