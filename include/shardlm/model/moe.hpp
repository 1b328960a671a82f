#pragma once
// Sparse mixture of experts (Mixtral): a router picks k of E SwiGLU experts per token, as transformers'
// MixtralSparseMoeBlock does. Shapes: N = tokens (B x T), C = hidden size, E = experts, k = experts per token,
// I = an expert's intermediate size.
//
// The load-balancing loss needs every layer's routing (transformers' load_balancing_loss_func pools all layers'
// router logits): each MoE layer leaves its router statistics (a small fp32 vector, differentiable in the router
// probabilities), and router_loss() pools them after the forward. The engine, which runs each block on a local
// autograd graph, takes them from each block as a side output and back-propagates the gradient router_loss()
// gives them (engine/engine.hpp).
#include <ATen/ATen.h>
#include <torch/csrc/autograd/custom_function.h>
#include <torch/nn/module.h>
#include <torch/nn/pimpl.h>

#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "shardlm/core/compat.hpp"
#include "shardlm/core/errors.hpp"
#include "shardlm/model/config.hpp"
#include "shardlm/model/layers.hpp"
#include "shardlm/model/moe_dispatch.hpp"
#include "shardlm/model/moe_kernels.hpp"

namespace shardlm::model {

namespace ops {

/// The router's choice for N tokens.
struct Routing {
  at::Tensor logits;   // [N, E] in x's dtype
  at::Tensor weights;  // [N, k] fp32: the top-k probabilities renormalized to sum to 1 (Mixtral)
  at::Tensor experts;  // [N, k] int64
};

/// Router linear, softmax in fp32, top-k, renormalized: transformers' MixtralTopKRouter.
inline Routing route_logits(at::Tensor logits, int64_t k) {          // logits [N, E]
  const auto probs = at::softmax(logits.to(at::kFloat), -1);          // [N, E]
  auto [top, experts] = at::topk(probs, k, -1);                      // [N, k] each
  return {std::move(logits), top / top.sum(-1, /*keepdim=*/true), std::move(experts)};
}
inline Routing route(const at::Tensor& x, const at::Tensor& w_router, int64_t k) {  // x [N, C], w [E, C]
  return route_logits(at::linear(x, w_router), k);
}

/// Layout of a layer's router statistics, one fp32 vector of 2E + 2: the sums over the layer's tokens of the
/// router probabilities [0, E) and of the squared log-sum-exp of the logits [E] (both differentiable), the
/// number of top-k picks of each expert [E + 1, 2E + 1) and the number of tokens [2E + 1].
struct RouterStatsLayout {
  int64_t E;
  int64_t size() const { return 2 * E + 2; }
  at::Tensor prob_sum(const at::Tensor& s) const { return s.narrow(-1, 0, E); }
  at::Tensor z_sum(const at::Tensor& s) const { return s.narrow(-1, E, 1).squeeze(-1); }
  at::Tensor counts(const at::Tensor& s) const { return s.narrow(-1, E + 1, E); }
  at::Tensor rows(const at::Tensor& s) const { return s.narrow(-1, 2 * E + 1, 1).squeeze(-1); }
};

/// One layer's router statistics from its logits [N, E]. As transformers' aux loss does, the softmax and the
/// top-k here are taken in the logits' dtype (in fp32 they equal the routing's).
inline at::Tensor router_stats(const at::Tensor& logits, int64_t k) {
  const int64_t N = logits.size(0), E = logits.size(1);
  const auto probs = at::softmax(logits, -1);                                               // [N, E]
  const auto picked = std::get<1>(at::topk(probs, k, -1)).reshape({-1});                    // [N k]
  const auto counts = expert_counts(picked, E).to(at::kFloat);                              // [E]
  const auto z = at::logsumexp(logits.to(at::kFloat), {-1}).square().sum().reshape({1});   // [1]
  const auto rows = at::full({1}, static_cast<double>(N), counts.options());               // [1]
  return at::cat({probs.to(at::kFloat).sum(0), z, counts, rows});                          // [2E + 2]
}

/// xs [N k, C] = x[token]: each token's row once per pick, in sorted order. Its backward sums each token's k rows
/// in pick order in fp32 and casts once (index_select's own backward is an index_add: atomic adds on a GPU, in an
/// order that varies from run to run, each rounded to x's dtype).
struct GatherPicks : torch::autograd::Function<GatherPicks> {
  static at::Tensor forward(torch::autograd::AutogradContext* ctx, const at::Tensor& x, const at::Tensor& token,
                            const at::Tensor& back, int64_t k) {
    ctx->save_for_backward({back});
    ctx->saved_data["k"] = k;
    return x.index_select(0, token);
  }
  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list g) {
    const auto back = ctx->get_saved_variables()[0];
    return {gather_backward(g[0], back, ctx->saved_data["k"].toInt()), at::Tensor(), at::Tensor(), at::Tensor()};
  }
};

/// y [N, C] = sum over token n's picks j of weights[n, j] x ys[back[n k + j]], in fp32 in pick order, cast once to
/// ys' dtype: transformers' grouped path (its weighting and sum are fp32 too). The backward gives the rows of ys
/// and the weights directly (no [N k, C] fp32 product kept, no expanded gradient copied).
struct CombinePicks : torch::autograd::Function<CombinePicks> {
  static at::Tensor forward(torch::autograd::AutogradContext* ctx, const at::Tensor& ys, const at::Tensor& weights,
                            const at::Tensor& order, const at::Tensor& token, const at::Tensor& back) {
    ctx->save_for_backward({ys, weights, order, token, back});
    return combine_forward(ys, weights, back);
  }
  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list g) {
    const auto saved = ctx->get_saved_variables();
    auto [g_ys, g_w] = combine_backward(g[0], saved[0], saved[1], saved[2], saved[3], saved[4]);
    return {std::move(g_ys), std::move(g_w), at::Tensor(), at::Tensor(), at::Tensor()};
  }
};

/// silu(h[:, :I]) * h[:, I:] for h [M, 2I] (gate columns first, then up). Keeps only h for the backward and writes
/// h's gradient into one [M, 2I] tensor (autograd's narrow backward adds two zero-filled [M, 2I] tensors).
struct SwiGLU : torch::autograd::Function<SwiGLU> {
  static at::Tensor forward(torch::autograd::AutogradContext* ctx, const at::Tensor& h) {
    ctx->save_for_backward({h});
    const int64_t I = h.size(-1) / 2;
    return at::silu(h.narrow(-1, 0, I)) * h.narrow(-1, I, I);
  }
  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list g) {
    const auto h = ctx->get_saved_variables()[0];
    const int64_t I = h.size(-1) / 2;
    const auto gate = h.narrow(-1, 0, I), up = h.narrow(-1, I, I);
    auto gh = at::empty_like(h);
    auto g_gate = gh.narrow(-1, 0, I), g_up = gh.narrow(-1, I, I);
    at::mul_out(g_up, g[0], at::silu(gate));                                                  // d/d up
    at::silu_backward_out(g_gate, g[0] * up, gate);                                           // d/d gate
    return {std::move(gh)};
  }
};

/// Per-expert LoRA factors of the experts' projections (PEFT's ParamWrapper math: W_e' = W_e + s B_e A_e), undefined
/// where a projection has no adapter: gate_up A [E, r, C], B [E, 2I, r]; down A [E, r, I], B [E, C, r].
struct ExpertLoraFactors {
  at::Tensor gate_up_A, gate_up_B, down_A, down_B;
  double scale = 0;
  int64_t rank() const { return gate_up_A.defined() ? gate_up_A.size(1) : down_A.defined() ? down_A.size(1) : 0; }
};

/// The kernel `kernel` resolves to for rows of x's device and dtype (ExpertKernel::automatic: the best that serves;
/// with an adapter of rank `rank`, the grouped product must serve it too).
inline ExpertKernel resolve_kernel(ExpertKernel kernel, const at::Tensor& x, int64_t C, int64_t I, int64_t rank = 0) {
  if (kernel != ExpertKernel::automatic) return kernel;
  return compat::has_grouped_mm(x.device(), x.scalar_type(), {C, I, 2 * I, rank > 0 ? rank : C}) ? ExpertKernel::grouped
         : x.is_cuda()                                                                            ? ExpertKernel::padded
                                                                                                  : ExpertKernel::loop;
}

/// ys [M, C] = expert(xs) row by row for rows sorted by expert, counts [E] of each (on xs' device), with gate_up
/// [E, 2I, C] and down [E, C, I]: the expert computation of one rank's picks, or of the rows an expert-parallel rank
/// received for its experts (model/moe_dispatch.hpp). With `lora`, each adapted projection adds s (x A_e^T) B_e^T to
/// its expert's rows through the same kernel as the weights (a grouped or batched product of the sorted rows with the
/// experts' A, then with their B): r (in + out) values per row and never a weight-sized [E, out, in] delta (PEFT's
/// ParamWrapper makes W + s B A, whole, at every forward).
inline at::Tensor experts_on_sorted(const at::Tensor& xs, const at::Tensor& gate_up, const at::Tensor& down,
                                    const at::Tensor& counts, ExpertKernel kernel,
                                    const ExpertLoraFactors* lora = nullptr) {
  const int64_t E = gate_up.size(0), I = down.size(2), C = xs.size(1);
  kernel = resolve_kernel(kernel, xs, C, I, lora ? lora->rank() : 0);
  // in w^T (+ s (in A^T) B^T), `mm(a, w)` being the kernel's product of the rows by their experts' w^T
  const at::Tensor none;
  const auto project = [&](const auto& mm, const at::Tensor& in, const at::Tensor& w, const at::Tensor& A,
                           const at::Tensor& B) {
    auto y = mm(in, w);
    return A.defined() ? y + lora->scale * mm(mm(in, A), B) : y;
  };
  const auto& gu_A = lora ? lora->gate_up_A : none;
  const auto& gu_B = lora ? lora->gate_up_B : none;
  const auto& d_A = lora ? lora->down_A : none;
  const auto& d_B = lora ? lora->down_B : none;
  const auto swiglu = [](const at::Tensor& h) { return SwiGLU::apply(h); };
  if (kernel == ExpertKernel::grouped) {
#if TORCH_VERSION_MAJOR > 2 || TORCH_VERSION_MINOR >= 8
    const auto offs = at::cumsum(counts, 0).to(at::kInt);                             // [E]
    const auto mm = [&](const at::Tensor& a, const at::Tensor& w) { return at::_grouped_mm(a, w.transpose(1, 2), offs); };
    const auto h = project(mm, xs, gate_up, gu_A, gu_B);                              // [M, 2I]
    return project(mm, swiglu(h), down, d_A, d_B);                                   // [M, C]
#else
    fail<ConfigError>("SHARDLM_MOE_KERNEL=grouped needs LibTorch 2.8 or newer (at::_grouped_mm)");
#endif
  }
  if (kernel == ExpertKernel::padded) {
    const auto sorted = at::repeat_interleave(at::arange(E, counts.options()), counts, std::nullopt, xs.size(0));  // [M]
    const auto starts = at::cumsum(counts, 0) - counts;                               // [E]
    const auto pos = at::arange(sorted.size(0), sorted.options()) - starts.index_select(0, sorted);  // [M]
    const int64_t cap = sorted.size(0) > 0 ? counts.max().item<int64_t>() : 0;
    c10::List<std::optional<at::Tensor>> at_slot;
    at_slot.push_back(sorted), at_slot.push_back(pos);
    const auto padded = at::index_put(at::zeros({E, cap, C}, xs.options()), at_slot, xs);  // [E, cap, C]
    const auto mm = [](const at::Tensor& a, const at::Tensor& w) { return at::bmm(a, w.transpose(1, 2)); };
    const auto h = project(mm, padded, gate_up, gu_A, gu_B);                          // [E, cap, 2I]
    return at::index(project(mm, swiglu(h), down, d_A, d_B), at_slot);               // [M, C]
  }
  const auto n = counts.cpu();
  std::vector<at::Tensor> parts;
  for (int64_t e = 0, first = 0; e < E; first += n[e].item<int64_t>(), ++e) {
    const int64_t m = n[e].item<int64_t>();
    if (m == 0) continue;
    const auto mm = [e](const at::Tensor& a, const at::Tensor& w) { return at::linear(a, w[e]); };
    const auto h = project(mm, xs.narrow(0, first, m), gate_up, gu_A, gu_B);          // [m, 2I]
    parts.push_back(project(mm, swiglu(h), down, d_A, d_B));                           // [m, C]
  }
  return parts.empty() ? at::zeros({0, C}, xs.options()) : at::cat(parts);
}

/// y [N, C] = sum over the k picks of weight x expert(x), expert(x) = down(silu(gate(x)) * up(x)) with
/// gate_up [E, 2I, C] (gate rows first, then up) and down [E, C, I]: transformers' MixtralExperts. With an active
/// expert shard, gate_up and down hold this rank's experts only and the rows travel to their experts' ranks and back
/// (model/moe_dispatch.hpp). `lora`: the experts' adapters (experts_on_sorted).
inline at::Tensor moe_experts(const at::Tensor& x, const at::Tensor& gate_up, const at::Tensor& down, const Routing& r,
                              ExpertKernel kernel, const ExpertShard& shard, const ExpertLoraFactors* lora = nullptr) {
  const int64_t E = shard.active() ? gate_up.size(0) * shard.exchange->size() : gate_up.size(0);
  const auto s = sort_picks(r.experts, E);
  const auto xs = GatherPicks::apply(x, s.token, s.back, s.k);                         // [N k, C]
  at::Tensor ys;                                                                       // [N k, C]
  if (!shard.active()) {
    ys = experts_on_sorted(xs, gate_up, down, s.counts, kernel, lora);
  } else {
    const auto routes = expert_routes(s.counts, *shard.exchange);
    const auto xr = ExchangeRows::apply(xs, shard.exchange, routes.recv, routes.send);  // [R, C] by source rank
    const auto xe = xr.index_select(0, routes.by_expert);                              // [R, C] by local expert
    // No row here: no kernel, but a result still on xe's graph, so that this rank's backward runs both reverse
    // exchanges as its peers do.
    const auto ye = xe.size(0) > 0 ? experts_on_sorted(xe, gate_up, down, routes.counts, kernel, lora) : xe.clone();
    const auto back = at::empty_like(routes.by_expert).scatter_(
        0, routes.by_expert, at::arange(routes.by_expert.size(0), routes.by_expert.options()));
    ys = ExchangeRows::apply(ye.index_select(0, back), shard.exchange, routes.send, routes.recv);
  }
  return CombinePicks::apply(ys, r.weights, s.order, s.token, s.back);                 // [N, C]
}
/// moe_experts on one rank (no expert parallelism).
inline at::Tensor moe_experts(const at::Tensor& x, const at::Tensor& gate_up, const at::Tensor& down, const Routing& r,
                              ExpertKernel kernel = ExpertKernel::automatic, const ExpertLoraFactors* lora = nullptr) {
  return moe_experts(x, gate_up, down, r, kernel, ExpertShard{}, lora);
}

}  // namespace ops

/// Pooled router losses of one forward: the load-balancing loss (transformers' load_balancing_loss_func,
/// E x sum_e F_e x P_e over every layer's tokens), the router z-loss (mean over layers and tokens of
/// logsumexp(logits)^2) and `total`, the term the training loss adds: router_aux_loss_coef x aux when
/// output_router_logits (as transformers adds it), plus router_z_loss_coef x z. Differentiable in the stats.
struct RouterLoss {
  at::Tensor aux, z, total;  // fp32 scalars
};

/// The router loss of the stats the MoE layers left (undefined entries, units without a router, are skipped).
/// Undefined tensors when there are none.
inline RouterLoss router_loss(const std::vector<at::Tensor>& stats, const ModelConfig& c) {
  std::vector<at::Tensor> defined;
  for (const auto& s : stats)
    if (s.defined()) defined.push_back(s);
  if (defined.empty()) return {};
  const ops::RouterStatsLayout layout{c.num_experts};
  const auto sum = at::stack(defined).sum(0);  // [2E + 2]
  const auto rows = layout.rows(sum);
  const auto tokens_per_expert = layout.counts(sum).detach() / rows;
  const auto prob_per_expert = layout.prob_sum(sum) / rows;
  RouterLoss out;
  out.aux = (tokens_per_expert * prob_per_expert).sum() * static_cast<double>(c.num_experts);
  out.z = layout.z_sum(sum) / rows;
  out.total = out.aux * (c.output_router_logits ? c.router_aux_loss_coef : 0.0) + out.z * c.router_z_loss_coef;
  return out;
}

/// One expert projection's LoRA factors, named as an adapted Linear's (`gate_up_proj_lora.lora_A.weight`): A [E, r, in]
/// and B [E, out, r], expert by expert (io/peft.hpp converts them to and from PEFT's [E r, in] and [out, r E]).
class ExpertLoraImpl : public torch::nn::Module {
 public:
  ExpertLoraImpl(int64_t experts, int64_t in, int64_t out, int64_t rank, const at::TensorOptions& opts)
      : lora_A(register_module("lora_A", std::make_shared<torch::nn::Module>())
                   ->register_parameter("weight", at::empty({experts, rank, in}, opts))),
        lora_B(register_module("lora_B", std::make_shared<torch::nn::Module>())
                   ->register_parameter("weight", at::empty({experts, out, rank}, opts))) {}
  at::Tensor lora_A, lora_B;
};
TORCH_MODULE(ExpertLora);

/// The experts' weights in transformers' fused layout: gate_up_proj [E, 2I, C], down_proj [E, C, I]; with add_adapter,
/// per-expert LoRA factors of either.
class MoeExpertsImpl : public torch::nn::Module {
 public:
  MoeExpertsImpl(const ModelConfig& c, const at::TensorOptions& opts)
      : gate_up_proj(register_parameter("gate_up_proj",
                                        at::empty({c.num_experts, 2 * c.intermediate_size, c.hidden_size}, opts))),
        down_proj(register_parameter("down_proj",
                                     at::empty({c.num_experts, c.hidden_size, c.intermediate_size}, opts))) {}

  /// Adds LoRA factors (uninitialized) to `gate_up_proj` or `down_proj`; `scale` is s.
  void add_adapter(const std::string& param, int64_t rank, double scale) {
    SHARDLM_ASSERT(param == "gate_up_proj" || param == "down_proj", "no expert projection ", param);
    const bool gate_up = param == "gate_up_proj";
    const auto& w = gate_up ? gate_up_proj : down_proj;  // [E, out, in]
    (gate_up ? gate_up_lora : down_lora) =
        register_module(param + "_lora", ExpertLora(w.size(0), w.size(2), w.size(1), rank, w.options()));
    scale_ = scale;
  }
  bool has_adapter() const { return !gate_up_lora.is_empty() || !down_lora.is_empty(); }
  /// The factors moe_experts adds (undefined where a projection has none).
  ops::ExpertLoraFactors lora() const {
    ops::ExpertLoraFactors out;
    if (!gate_up_lora.is_empty()) out.gate_up_A = gate_up_lora->lora_A, out.gate_up_B = gate_up_lora->lora_B;
    if (!down_lora.is_empty()) out.down_A = down_lora->lora_A, out.down_B = down_lora->lora_B;
    out.scale = scale_;
    return out;
  }

  at::Tensor gate_up_proj, down_proj;
  ExpertLora gate_up_lora{nullptr}, down_lora{nullptr};

 private:
  double scale_ = 0;
};
TORCH_MODULE(MoeExperts);

/// Mixtral's sparse MoE feed-forward (transformers' MixtralSparseMoeBlock, names `mlp.gate`, `mlp.experts`).
class SparseMoeImpl : public torch::nn::Module {
 public:
  SparseMoeImpl(const ModelConfig& c, const at::TensorOptions& opts)
      : gate(register_module("gate", Linear(c.hidden_size, c.num_experts, /*bias=*/false, opts))),
        experts(register_module("experts", MoeExperts(c, opts))),
        kernel(c.expert_kernel),
        top_k_(c.num_experts_per_tok) {}
  static constexpr const char* hf_name = "mlp";

  at::Tensor forward(const at::Tensor& x) {  // [B, T, C] -> [B, T, C]
    const auto flat = x.reshape({-1, x.size(-1)});                          // [N, C]
    const auto r = ops::route_logits(gate->forward(flat), top_k_);          // with the router's adapter, if any
    stats_ = ops::router_stats(r.logits, top_k_);                           // [2E + 2]
    if (!experts->has_adapter())
      return ops::moe_experts(flat, experts->gate_up_proj, experts->down_proj, r, kernel, shard_).view(x.sizes());
    const auto lora = experts->lora();
    return ops::moe_experts(flat, experts->gate_up_proj, experts->down_proj, r, kernel, shard_, &lora).view(x.sizes());
  }
  bool has_adapter() const { return gate->has_adapter() || experts->has_adapter(); }
  /// Expert parallelism: this layer keeps only the experts [shard.first, shard.first + shard.count) (their
  /// parameters become placeholders of that many experts, which the engine fills) and exchanges rows with the
  /// expert group's other ranks (model/moe_dispatch.hpp).
  void set_expert_shard(ExpertShard shard) {
    at::NoGradGuard no_grad;
    for (auto* p : {&experts->gate_up_proj, &experts->down_proj}) {
      auto sizes = p->sizes().vec();
      sizes[0] = shard.count;
      p->set_data(at::empty(sizes, p->options()));
    }
    shard_ = std::move(shard);
  }
  const ExpertShard& expert_shard() const { return shard_; }
  /// The router statistics of the last forward (ops::RouterStatsLayout), handed over once.
  at::Tensor take_router_stats() { return std::exchange(stats_, at::Tensor()); }

  Linear gate;
  MoeExperts experts;
  ExpertKernel kernel;  ///< ModelConfig::expert_kernel (--moe-kernel)

 private:
  int64_t top_k_;
  at::Tensor stats_;
  ExpertShard shard_;  // expert parallelism: inactive by default
};
TORCH_MODULE(SparseMoe);

}  // namespace shardlm::model
