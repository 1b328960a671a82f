#pragma once
// The math of one Llama block, as plain functions of tensors: the ATen ops, and with BlockKernels::fused the
// project's CUDA kernels for bf16 GPU tensors (model/block_kernels.hpp, rounding as the ATen ops). Shapes:
//   B = batch, T = time, C = hidden size, H = query heads, Hkv = key/value heads, D = head dim, V = vocab.
#include <ATen/ATen.h>

#include <cmath>
#include <numbers>
#include <utility>

#include "shardlm/core/compat.hpp"
#include "shardlm/model/block_kernels.hpp"
#include "shardlm/model/config.hpp"

namespace shardlm::model::ops {

/// RMSNorm's normalization as transformers computes it: in fp32, cast back to x's dtype (before the weight).
inline at::Tensor rms_normalize(const at::Tensor& x, double eps) {
  return at::rms_norm(x.to(at::kFloat), {x.size(-1)}, std::nullopt, eps).to(x.scalar_type());
}

/// RMSNorm as transformers computes it: normalize in fp32, cast back, then scale by the weight.
inline at::Tensor rms_norm(const at::Tensor& x, const at::Tensor& weight, double eps,
                           BlockKernels kernels = BlockKernels::aten) {
  if (fused::serve_rms_norm(kernels, x, weight)) return fused::RmsNormFunction::apply(x, weight, eps);
  return weight * rms_normalize(x, eps);
}

/// Inverse frequencies of the rotary embedding, [D/2], fp32, with the configured frequency scaling.
inline at::Tensor rope_inv_freq(const RopeConfig& rope, int64_t head_dim) {
  const auto idx = at::arange(0, head_dim, 2, at::kLong).to(at::kFloat);                     // [D/2]
  auto inv_freq = 1.0 / at::pow(rope.theta, idx / static_cast<double>(head_dim));           // [D/2]
  if (rope.type == "linear") return inv_freq / rope.factor;
  if (rope.type != "llama3") return inv_freq;
  // llama3: keep high frequencies, divide low ones by `factor`, blend smoothly in between.
  const double old_len = static_cast<double>(rope.original_max_position_embeddings);
  const double low_wavelen = old_len / rope.low_freq_factor;
  const double high_wavelen = old_len / rope.high_freq_factor;
  const auto wavelen = 2 * std::numbers::pi / inv_freq;
  auto scaled = at::where(wavelen > low_wavelen, inv_freq / rope.factor, inv_freq);
  const auto smooth = (old_len / wavelen - rope.low_freq_factor) / (rope.high_freq_factor - rope.low_freq_factor);
  const auto smoothed = (1 - smooth) * scaled / rope.factor + smooth * scaled;
  const auto medium = at::logical_not(wavelen < high_wavelen).logical_and(at::logical_not(wavelen > low_wavelen));
  return at::where(medium, smoothed, scaled);
}

/// cos and sin tables for positions [0, T), each [T, D] in `dtype` (computed in fp32).
struct Rope {
  at::Tensor cos, sin;
};
inline Rope rope_tables(const at::Tensor& inv_freq, int64_t seq_len, at::ScalarType dtype) {
  const auto pos = at::arange(seq_len, inv_freq.options().dtype(at::kFloat));   // [T]
  const auto freqs = at::outer(pos, inv_freq.to(at::kFloat));                     // [T, D/2]
  const auto emb = at::cat({freqs, freqs}, -1);                                   // [T, D]
  return {emb.cos().to(dtype), emb.sin().to(dtype)};
}

/// Rotates pairs (i, i + D/2) of x [B, heads, T, D] by the position angles.
inline at::Tensor apply_rope(const at::Tensor& x, const Rope& rope) {
  const int64_t half = x.size(-1) / 2;
  const auto x1 = x.narrow(-1, 0, half), x2 = x.narrow(-1, half, half);
  const auto rotated = at::cat({-x2, x1}, -1);
  return x * rope.cos + rotated * rope.sin;
}

/// RoPE on queries [B, H, T, D] and keys [B, Hkv, T, D]: apply_rope on each, or one kernel for both.
inline std::pair<at::Tensor, at::Tensor> rope_qk(const at::Tensor& q, const at::Tensor& k, const Rope& rope,
                                                 BlockKernels kernels = BlockKernels::aten) {
  if (fused::serve(kernels, q)) {
    const auto qk = fused::RopeFunction::apply(q, k, rope.cos, rope.sin);  // [B, T, heads, D] each
    return {qk[0].transpose(1, 2), qk[1].transpose(1, 2)};
  }
  return {apply_rope(q, rope), apply_rope(k, rope)};
}

/// SwiGLU's activation silu(gate) * up.
inline at::Tensor swiglu_product(const at::Tensor& gate, const at::Tensor& up, BlockKernels kernels = BlockKernels::aten) {
  if (fused::serve(kernels, gate) && up.scalar_type() == gate.scalar_type())
    return fused::SwiGLUFunction::apply(gate, up);
  return at::silu(gate) * up;
}

/// Causal grouped-query attention of projected queries [B, T, H*D], keys and values [B, T, Hkv*D]:
/// rotary positions, then softmax attention; returns [B, T, H*D] (before the output projection).
inline at::Tensor attention_heads(const at::Tensor& q_proj, const at::Tensor& k_proj, const at::Tensor& v_proj,
                                  const Rope& rope, int64_t num_heads, int64_t num_kv_heads, int64_t head_dim,
                                  BlockKernels kernels = BlockKernels::aten) {
  const int64_t B = q_proj.size(0), T = q_proj.size(1);
  const auto q_heads = q_proj.view({B, T, num_heads, head_dim}).transpose(1, 2);     // [B, H, T, D]
  const auto k_heads = k_proj.view({B, T, num_kv_heads, head_dim}).transpose(1, 2);  // [B, Hkv, T, D]
  const auto v = v_proj.view({B, T, num_kv_heads, head_dim}).transpose(1, 2);        // [B, Hkv, T, D]
  const auto [q, k] = rope_qk(q_heads, k_heads, rope, kernels);
  const auto y = compat::causal_attention(q, k, v);                       // [B, H, T, D]
  return y.transpose(1, 2).reshape({B, T, num_heads * head_dim});         // [B, T, H*D]
}

/// Causal grouped-query attention over x [B, T, C] with projection weights in the [out, in] layout.
/// Biases may be undefined tensors.
inline at::Tensor attention(const at::Tensor& x, const at::Tensor& wq, const at::Tensor& wk, const at::Tensor& wv,
                            const at::Tensor& wo, const Rope& rope, int64_t num_heads, int64_t num_kv_heads,
                            int64_t head_dim, const at::Tensor& bq = {}, const at::Tensor& bk = {},
                            const at::Tensor& bv = {}, const at::Tensor& bo = {}) {
  const auto y = attention_heads(at::linear(x, wq, bq), at::linear(x, wk, bk), at::linear(x, wv, bv), rope, num_heads,
                                 num_kv_heads, head_dim);  // [B, T, H*D]
  return at::linear(y, wo, bo);                            // [B, T, C]
}

/// SwiGLU feed-forward: down(silu(gate(x)) * up(x)).
inline at::Tensor swiglu(const at::Tensor& x, const at::Tensor& w_gate, const at::Tensor& w_up,
                         const at::Tensor& w_down, const at::Tensor& b_gate = {}, const at::Tensor& b_up = {},
                         const at::Tensor& b_down = {}) {
  return at::linear(at::silu(at::linear(x, w_gate, b_gate)) * at::linear(x, w_up, b_up), w_down, b_down);
}

/// Labels of next tokens: labels shifted left by one, the last position ignored. [B, T]
inline at::Tensor shift_labels(const at::Tensor& labels, int64_t ignore_index = -100) {
  return at::constant_pad_nd(labels.narrow(1, 1, labels.size(1) - 1), {0, 1}, ignore_index);
}

/// Sum of next-token cross-entropy over logits [B, T, V] against already shifted labels [B, T] (label -100
/// ignored), in fp32. The labels are shifted rather than the logits so the [B, T, V] logits are never copied.
inline at::Tensor next_token_loss_sum(const at::Tensor& logits, const at::Tensor& shifted, int64_t ignore_index = -100) {
  return at::cross_entropy_loss(logits.reshape({-1, logits.size(-1)}).to(at::kFloat), shifted.reshape({-1}), {},
                                at::Reduction::Sum, ignore_index);
}

/// Mean next-token cross-entropy, as transformers' causal LM loss with labels = input ids (NaN, as there,
/// when no position has a next token).
inline at::Tensor next_token_loss(const at::Tensor& logits, const at::Tensor& labels, int64_t ignore_index = -100) {
  const auto shifted = shift_labels(labels, ignore_index);
  return next_token_loss_sum(logits, shifted, ignore_index) / shifted.ne(ignore_index).sum();
}

}  // namespace shardlm::model::ops
