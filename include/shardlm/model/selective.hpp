#pragma once
// Selective activation checkpointing (checkpointing::Selective): autograd nodes that keep a block's matmul and
// attention outputs and recompute the cheap elementwise ops in backward. Over the plain ops (model/ops.hpp) autograd
// keeps, per RMSNorm, its fp32 input (a copy unless the compute dtype is fp32), the normalized output for the
// weight's gradient and the scaled output for the projections' weight gradients; per SwiGLU, silu(gate) and
// silu(gate) * up beside gate and up; and, where SDPA returns [B, H, T, D] contiguous, the attention output twice (as
// SDPA returns it and re-laid out for the output projection; a kernel that follows the query's [B, T, H, D] layout,
// as LibTorch 2.11's CPU flash kernel does, makes the re-layout a view). These nodes keep instead:
//
//   rms_norm_linear   x; norm(x) is recomputed in backward (one reduction per row) for the weight gradients and x's
//   swiglu_down       gate and up; silu(gate) * up is recomputed for the down projection's weight gradient
//   heads_linear      the attention output as SDPA returns it (which SDPA keeps anyway); re-laid out in backward
//   rope              nothing but the cos/sin tables (the model's cache)
//   rms_norm          x, for a norm whose reader keeps its output itself (a MoE block's router and experts)
//
// The norm keeps no rstd: recomputing it with the norm lets x's gradient be autograd's own over ops::rms_norm (the
// composite on the CPU, the fused kernel on CUDA), so that nothing differs from the plain path but what is kept.
// Each node's forward is the plain ops' forward (the same ATen ops, the same roundings); its backward makes the
// products autograd makes over them, in the same dtypes, and sums the projections' input gradients in the engine's
// order. A Llama or Mixtral block's gradients then equal the plain path's bit for bit where the norm's input is not
// fp32 (bf16 compute); with fp32 input on the CPU the plain path adds the residual's gradient and the norm's two (the
// composite uses x twice) in one buffer, the node adds the norm's two first: fp32 rounding
// (tests/model/test_model.cpp). With BlockKernels::fused on bf16 GPU tensors the nodes' elementwise work runs in the
// project's kernels (model/block_kernels.hpp), which the plain path's nodes run too: the norm's backward (x's and the
// weight's gradients) in one kernel from the rstd that the recomputed forward gives, SwiGLU's gradients and the
// recomputed product in one pass, RoPE on q and k in one kernel. The forward is then the plain path's bit for bit;
// the gradients may differ by bf16 roundings where the plain path's autograd engine, over its one RoPE node of q and k,
// sums the projections' input gradients in another order (test_block_kernels.cpp states by how much).
// Shapes: B = batch, T = time, C = hidden, N = B x T, O = a projection's outputs.
#include <ATen/ATen.h>
#include <torch/csrc/autograd/autograd.h>
#include <torch/csrc/autograd/custom_function.h>

#include <optional>
#include <utility>
#include <vector>

#include "shardlm/model/ops.hpp"

namespace shardlm::model::ops {

namespace detail {
using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

/// The normalized x [..., C] again in backward, with a graph from `xd` (x detached, requiring its gradient when
/// `input_grad`): the forward's values, and x's gradient as autograd over the plain ops computes it (whichever
/// kernel at::rms_norm runs on this device), for one reduction per row recomputed.
struct Renormalized {
  at::Tensor xd, n;
  Renormalized(const at::Tensor& x, double eps, bool input_grad) {
    at::AutoGradMode grad_mode(input_grad);
    xd = x.detach().requires_grad_(input_grad);
    n = rms_normalize(xd, eps);
  }
  /// x's gradient from n's.
  at::Tensor input_grad(const at::Tensor& dn) const { return torch::autograd::grad({n}, {xd}, {dn})[0]; }
};
/// y [..., O] = x [..., I] W^T: the weight's gradient dy^T x over all leading dimensions, [O, I] (the product
/// autograd's linear backward computes).
inline at::Tensor weight_grad(const at::Tensor& dy, const at::Tensor& x) {
  return dy.reshape({-1, dy.size(-1)}).t().mm(x.reshape({-1, x.size(-1)}));
}
}  // namespace detail

/// RMSNorm (ops::rms_norm) followed by the projections that read its output: [x W_i^T for each W_i]. Keeps x only;
/// the normalized input of the weight gradients (and of x's) is recomputed in backward.
struct RmsNormLinear : torch::autograd::Function<RmsNormLinear> {
  /// `kernels`: fused only where fused::serve_rms_norm said so (rms_norm_linear decides).
  static detail::variable_list forward(detail::AutogradContext* ctx, const at::Tensor& x, const at::Tensor& norm_weight,
                                       at::TensorList weights, double eps, BlockKernels kernels) {  // TensorList: one input each
    const auto h = kernels == BlockKernels::fused ? fused::rms_norm_forward(x, norm_weight, eps).y
                                                  : rms_norm(x, norm_weight, eps);  // [B, T, C]
    detail::variable_list ys;
    for (const auto& w : weights) ys.push_back(at::linear(h, w));  // [B, T, O_i]
    detail::variable_list saved{x, norm_weight};
    saved.insert(saved.end(), weights.begin(), weights.end());
    ctx->save_for_backward(saved);
    ctx->saved_data["eps"] = eps;
    ctx->saved_data["fused"] = kernels == BlockKernels::fused;
    return ys;
  }
  static detail::variable_list backward(detail::AutogradContext* ctx, detail::variable_list dys) {
    const auto saved = ctx->get_saved_variables();
    const auto &x = saved[0], &norm_weight = saved[1];
    const size_t k = saved.size() - 2;
    const double eps = ctx->saved_data["eps"].toDouble();
    const bool kernel = ctx->saved_data["fused"].toBool();
    std::optional<detail::Renormalized> norm;
    at::Tensor n, h, rstd;  // h [B, T, C]: the projections' input, recomputed
    if (kernel) {
      auto out = fused::rms_norm_forward(x, norm_weight, eps);
      h = out.y, rstd = out.rstd;
    } else {
      norm.emplace(x, eps, ctx->needs_input_grad(0));
      n = norm->n.detach();
      h = norm_weight * n;
    }
    detail::variable_list grads(2 + k + 2);  // x, norm weight, each W, (eps, kernels)
    at::Tensor dh;                           // [B, T, C]
    // Summed in the projections' order: over the plain attention autograd's engine adds q's and k's first (their
    // RoPE nodes are the newest, so run first), then v's; with two projections (gate, up) the order does not matter.
    for (size_t i = 0; i < k; ++i) {
      const auto& w = saved[2 + i];
      const auto part = at::matmul(dys[i], w);
      dh = dh.defined() ? dh + part : part;
      if (ctx->needs_input_grad(2 + i)) grads[2 + i] = detail::weight_grad(dys[i], h);  // [O_i, C]
    }
    if (kernel && (ctx->needs_input_grad(0) || ctx->needs_input_grad(1))) {
      auto g = fused::rms_norm_backward(dh, x, norm_weight, rstd);
      if (ctx->needs_input_grad(0)) grads[0] = g.dx;
      if (ctx->needs_input_grad(1)) grads[1] = g.dw;
      return grads;
    }
    if (ctx->needs_input_grad(1)) grads[1] = at::sum_to(dh * n, norm_weight.sizes());     // [C]
    if (ctx->needs_input_grad(0)) grads[0] = norm->input_grad(dh * norm_weight);
    return grads;
  }
};

/// RMSNorm alone (ops::rms_norm) for a reader that keeps its output itself: keeps x, not the fp32 input, rstd and
/// the normalized output that the plain ops keep beside it.
/// With the kernel it keeps rstd [N] too (4 bytes a row) instead of recomputing the norm.
struct RmsNormNode : torch::autograd::Function<RmsNormNode> {
  static at::Tensor forward(detail::AutogradContext* ctx, const at::Tensor& x, const at::Tensor& weight, double eps,
                            BlockKernels kernels) {
    ctx->saved_data["eps"] = eps;
    if (kernels == BlockKernels::fused) {
      auto out = fused::rms_norm_forward(x, weight, eps);
      ctx->save_for_backward({x, weight, out.rstd});
      return out.y;
    }
    ctx->save_for_backward({x, weight});
    return rms_norm(x, weight, eps);
  }
  static detail::variable_list backward(detail::AutogradContext* ctx, detail::variable_list dys) {
    const auto saved = ctx->get_saved_variables();
    const auto &x = saved[0], &weight = saved[1];
    detail::variable_list grads(4);
    if (saved.size() == 3) {  // the kernel's forward
      auto g = fused::rms_norm_backward(dys[0], x, weight, saved[2]);
      if (ctx->needs_input_grad(0)) grads[0] = g.dx;
      if (ctx->needs_input_grad(1)) grads[1] = g.dw;
      return grads;
    }
    const detail::Renormalized norm(x, ctx->saved_data["eps"].toDouble(), ctx->needs_input_grad(0));
    if (ctx->needs_input_grad(1)) grads[1] = at::sum_to(dys[0] * norm.n.detach(), weight.sizes());
    if (ctx->needs_input_grad(0)) grads[0] = norm.input_grad(dys[0] * weight);
    return grads;
  }
};

/// SwiGLU's activation and down projection: silu(gate) * up, times W_down^T. Keeps gate and up (the matmul outputs);
/// the product is recomputed for W_down's gradient.
struct SwiGLUDown : torch::autograd::Function<SwiGLUDown> {
  static at::Tensor forward(detail::AutogradContext* ctx, const at::Tensor& gate, const at::Tensor& up,
                            const at::Tensor& w_down, BlockKernels kernels) {
    ctx->save_for_backward({gate, up, w_down});
    ctx->saved_data["fused"] = kernels == BlockKernels::fused;
    return at::linear(swiglu_product(gate, up, kernels), w_down);  // [B, T, I] -> [B, T, C]
  }
  static detail::variable_list backward(detail::AutogradContext* ctx, detail::variable_list dys) {
    const auto saved = ctx->get_saved_variables();
    const auto &gate = saved[0], &up = saved[1], &w_down = saved[2];
    const auto dprod = at::matmul(dys[0], w_down);  // [B, T, I]
    detail::variable_list grads(4);
    if (ctx->saved_data["fused"].toBool()) {  // dprod, d gate and d up (one buffer), the product: 4 [B, T, I] too
      at::Tensor product;
      auto g = fused::swiglu_backward(dprod, gate, up, ctx->needs_input_grad(2) ? &product : nullptr);
      if (ctx->needs_input_grad(2)) grads[2] = detail::weight_grad(dys[0], product);  // [C, I]
      if (ctx->needs_input_grad(1)) grads[1] = g.d_up;
      if (ctx->needs_input_grad(0)) grads[0] = g.d_gate;
      return grads;
    }
    {  // silu(gate) lives only here: at most 4 [B, T, I] tensors at once (train/memory_plan.hpp counts them)
      const auto act = at::silu(gate);  // [B, T, I]
      if (ctx->needs_input_grad(2)) grads[2] = detail::weight_grad(dys[0], act * up);  // [C, I]
      if (ctx->needs_input_grad(1)) grads[1] = dprod * act;
    }
    if (ctx->needs_input_grad(0)) grads[0] = at::silu_backward(dprod * up, gate);
    return grads;
  }
};

/// The output projection of attention heads y [B, H, T, D] (SDPA's output, which SDPA keeps for its own backward):
/// y re-laid out as [B, T, H*D] times W^T. Keeps y, not its re-laid-out copy.
struct HeadsLinear : torch::autograd::Function<HeadsLinear> {
  static at::Tensor forward(detail::AutogradContext* ctx, const at::Tensor& y, const at::Tensor& w) {
    ctx->save_for_backward({y, w});
    return at::linear(merge(y), w);  // [B, T, C]
  }
  static detail::variable_list backward(detail::AutogradContext* ctx, detail::variable_list dys) {
    const auto saved = ctx->get_saved_variables();
    const auto &y = saved[0], &w = saved[1];
    detail::variable_list grads(2);
    if (ctx->needs_input_grad(1)) grads[1] = detail::weight_grad(dys[0], merge(y));
    if (ctx->needs_input_grad(0)) {
      const int64_t B = y.size(0), H = y.size(1), T = y.size(2), D = y.size(3);
      grads[0] = at::matmul(dys[0], w).view({B, T, H, D}).transpose(1, 2);  // [B, H, T, D]
    }
    return grads;
  }
  static at::Tensor merge(const at::Tensor& y) {  // [B, H, T, D] -> [B, T, H*D]
    return y.transpose(1, 2).reshape({y.size(0), y.size(2), y.size(1) * y.size(3)});
  }
};

/// RoPE (apply_rope) on x [B, heads, T, D]: keeps only the tables (the model's cached cos/sin, not activations);
/// backward rotates the gradient back.
struct RopeNode : torch::autograd::Function<RopeNode> {
  static at::Tensor forward(detail::AutogradContext* ctx, const at::Tensor& x, const at::Tensor& cos,
                            const at::Tensor& sin) {
    ctx->saved_data["cos"] = cos;
    ctx->saved_data["sin"] = sin;
    return apply_rope(x, {cos, sin});
  }
  static detail::variable_list backward(detail::AutogradContext* ctx, detail::variable_list dys) {
    const auto cos = ctx->saved_data["cos"].toTensor(), sin = ctx->saved_data["sin"].toTensor();
    const auto& g = dys[0];
    const int64_t half = g.size(-1) / 2;
    const auto gs = g * sin;  // the rotated x's gradient: rotated = (-x2, x1), so x1 gets gs2 and x2 gets -gs1
    return {g * cos + at::cat({gs.narrow(-1, half, half), -gs.narrow(-1, 0, half)}, -1), at::Tensor(), at::Tensor()};
  }
};

/// RmsNormLinear: [norm(x) W_i^T] for the weights given.
/// Where the kernels serve the tensors: `kernels`, else BlockKernels::aten.
inline BlockKernels served_rms_norm(BlockKernels kernels, const at::Tensor& x, const at::Tensor& weight) {
  return fused::serve_rms_norm(kernels, x, weight) ? BlockKernels::fused : BlockKernels::aten;
}
inline std::vector<at::Tensor> rms_norm_linear(const at::Tensor& x, const at::Tensor& norm_weight, double eps,
                                               const std::vector<at::Tensor>& weights,
                                               BlockKernels kernels = BlockKernels::aten) {
  return RmsNormLinear::apply(x, norm_weight, at::TensorList(weights), eps, served_rms_norm(kernels, x, norm_weight));
}
inline at::Tensor rms_norm_saving_input(const at::Tensor& x, const at::Tensor& weight, double eps,
                                        BlockKernels kernels = BlockKernels::aten) {
  return RmsNormNode::apply(x, weight, eps, served_rms_norm(kernels, x, weight));
}
inline at::Tensor swiglu_down(const at::Tensor& gate, const at::Tensor& up, const at::Tensor& w_down,
                              BlockKernels kernels = BlockKernels::aten) {
  const bool served = fused::serve(kernels, gate) && up.scalar_type() == gate.scalar_type();
  return SwiGLUDown::apply(gate, up, w_down, served ? BlockKernels::fused : BlockKernels::aten);
}
inline at::Tensor heads_linear(const at::Tensor& y, const at::Tensor& w) { return HeadsLinear::apply(y, w); }
inline at::Tensor apply_rope_saving_nothing(const at::Tensor& x, const Rope& rope) {
  return RopeNode::apply(x, rope.cos, rope.sin);
}

/// Attention heads as attention_heads() computes them, with RoPE through RopeNode; returns SDPA's output
/// [B, H, T, D] (for heads_linear).
inline at::Tensor attention_heads_selective(const at::Tensor& q_proj, const at::Tensor& k_proj, const at::Tensor& v_proj,
                                            const Rope& rope, int64_t num_heads, int64_t num_kv_heads, int64_t head_dim,
                                            BlockKernels kernels = BlockKernels::aten) {
  const int64_t B = q_proj.size(0), T = q_proj.size(1);
  const auto q_heads = q_proj.view({B, T, num_heads, head_dim}).transpose(1, 2);     // [B, H, T, D]
  const auto k_heads = k_proj.view({B, T, num_kv_heads, head_dim}).transpose(1, 2);  // [B, Hkv, T, D]
  const auto v = v_proj.view({B, T, num_kv_heads, head_dim}).transpose(1, 2);        // [B, Hkv, T, D]
  // The kernel's node keeps only the tables too.
  const auto [q, k] = fused::serve(kernels, q_heads) ? rope_qk(q_heads, k_heads, rope, kernels)
                                                     : std::pair{apply_rope_saving_nothing(q_heads, rope),
                                                                 apply_rope_saving_nothing(k_heads, rope)};
  return compat::causal_attention(q, k, v);                                                                      // [B, H, T, D]
}

}  // namespace shardlm::model::ops
