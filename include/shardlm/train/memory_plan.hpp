#pragma once
// The memory planner: predicted bytes per GPU and per host for a model, a recipe (its rules), a world and a
// batch. It replays the engine's schedule (engine/schedule.hpp: the same object the engine asks) on byte counts,
// every micro-batch of a step: what each unit allocates in forward and backward, what the sharding policy keeps
// gathered, what checkpointing keeps saved, how gradients reach their shards, and reports the peak with the
// breakdown at that moment. It records the events it replays (MemoryPlan::trace), which tests compare with the
// engine's own trace for every recipe. Arithmetic only: shardlm_plan answers in milliseconds.
//
// Counted per GPU (bytes of the CUDA caching allocator's peak "allocated"):
//   sharded state        master + gradient + AdamW moments of this rank's shards (offload: the compute-dtype
//                        copy of the shard only; the rest is on the host)
//   gathered parameters  units gathered in the compute dtype (the persistent policies keep all of them)
//   activations          what autograd saves per block (CUDA kernels: flash attention; RMSNorm, SwiGLU and RoPE as
//                        the model's block kernels keep them in bf16, else as the ATen ops do)
//   logits and loss      the head's logits and the fp32 cross-entropy (log-softmax and its gradients); with the
//                        fused head and loss (loss_chunk > 0) one chunk's logits, whose gradients the head's
//                        activations then keep (model/loss.hpp)
//   gradients in flight  a unit's parameter gradients, its flat buffer and the shard slice in the reduce dtype
//                        (--reduce-dtype bf16 halves them; the gradient shards stay in the master dtype)
//   workspace            cuBLAS workspaces of the two streams
//   float8 operands      precision::FP8: one projection's float8 copies while it multiplies (model/fp8_linear.hpp keeps
//                        the plain path's x and W for backward, so the activations do not change)
//   all-to-all buffers   expert parallelism (--expert-parallel N): a MoE layer's rows received for this rank's experts
//                        and their copy grouped by expert (c H per pick, the routing assumed balanced), in forward and
//                        again for the gradients in backward
// With expert parallelism each rank holds E/N of every layer's experts: their state is sharded over the world/N ranks
// holding the same experts (replicated over them when the policy does not shard), the rest of the block over the
// shard group as without it.
// Counted per host: the offloaded state of the host's GPUs (pinned master and gradients, pageable moments,
// staging for gradient accumulation).
// With an adapter (LoRA, DoRA) the sharded state, the gradients and the optimizer are the adapters' only; the frozen
// base is a sharded copy (on the host with offload), in the compute dtype or with the blocks' projections quantized
// (--quant int4|fp8: the bytes of quant/layout.hpp), gathered into the compute dtype like the parameters.
// The adapters' own activations count per target: r values per token (x A^T), and for DoRA also the base and
// adapter outputs (2 x out per token), which autograd keeps for the magnitude's gradient.
#include <algorithm>
#include <cmath>
#include <utility>
#include <cstdint>
#include <sstream>
#include <string>
#include <vector>

#include "shardlm/core/errors.hpp"
#include "shardlm/core/host_memory.hpp"
#include "shardlm/engine/schedule.hpp"
#include "shardlm/model/adapter.hpp"
#include "shardlm/model/config.hpp"
#include "shardlm/policy/policies.hpp"
#include "shardlm/quant/layout.hpp"

namespace shardlm::plan {

/// The run to plan.
struct PlanInput {
  model::ModelConfig model;
  RecipeRules recipe{sharding::FullShard::rules};  ///< the policies (adapter and quantization included)
  int64_t world_size = 1;
  int64_t gpus_per_node = 1;
  int64_t shard_group_size = 0;          ///< hybrid: ranks per shard group (0: one node)
  int64_t expert_parallel = 1;           ///< ranks splitting each MoE layer's experts (--expert-parallel)
  int64_t micro_batch = 1;
  int64_t seq_len = 4096;
  int64_t grad_accum = 1;
  int64_t loss_chunk = 4096;             ///< tokens per chunk of the fused head and loss (0: whole logits)
  engine::HostStep host_step = engine::HostStep::automatic;  ///< offloaded: automatic counts the speculative step's state
  int64_t lora_rank = 16;                ///< with an adapter policy
  std::vector<std::string> lora_targets = {"all"};  ///< as --lora-targets (`all`: the model's projections)
};

struct PlanItem {
  std::string name;
  double bytes = 0;
};

struct MemoryPlan {
  int64_t shard_group = 1;        ///< ranks sharing one copy of the state
  int64_t params = 0;             ///< model parameters
  std::string peak_at;            ///< the schedule event of the GPU peak
  std::vector<PlanItem> gpu;      ///< breakdown of the GPU peak
  std::vector<PlanItem> host;     ///< per host
  engine::Trace trace;            ///< the schedule's events replayed, every micro-batch of the step
  double gpu_peak() const { return sum(gpu); }
  double host_total() const { return sum(host); }

  /// A few lines for a log or a terminal, in GiB (2^30 bytes: the unit of the trainer's memory metrics).
  std::string table() const {
    std::ostringstream s;
    s.setf(std::ios::fixed);
    s.precision(2);
    s << "per GPU: " << gpu_peak() / gib << " GiB peak (at " << peak_at << ")\n";
    for (const auto& i : gpu) s << "  " << i.name << ": " << i.bytes / gib << " GiB\n";
    s << "per host: " << host_total() / gib << " GiB";
    for (const auto& i : host) s << "\n  " << i.name << ": " << i.bytes / gib << " GiB";
    return s.str();
  }
  static constexpr double gib = 1024.0 * 1024.0 * 1024.0;

 private:
  static double sum(const std::vector<PlanItem>& v) {
    double t = 0;
    for (const auto& i : v) t += i.bytes;
    return t;
  }
};

namespace detail {

/// Whether the model's block kernels run (model/block_kernels.hpp: BlockKernels::fused on bf16 GPU tensors; the
/// planner counts a GPU's kernels, so the compute dtype's size `c` decides).
inline bool block_kernels_run(const model::ModelConfig& m, double c) {
  return m.block_kernels == model::BlockKernels::fused && c == 2;
}

/// Bytes per token that autograd keeps for one block in forward (CUDA kernels), including the block's input, as the
/// block saves with checkpointing rules `ck` (what a block that is not recomputed keeps).
/// c = compute dtype size. Per block: input x (c H); RMSNorm 1 saves its fp32 input (4 H unless the compute
/// dtype is fp32: then it is x itself) and the normalized output (c H); the projections save their input
/// (c H); flash attention saves rotated q, k, v and its output (c (2 Hq + 2 Hkv)) and the fp32 log-sum-exp
/// (4 heads); the output projection saves the re-laid-out attention output (c Hq); RMSNorm 2 saves its fp32
/// input and output (4 H + c H); the MLP saves its input (c H), gate, up, silu(gate) and their product (4 c I).
/// A MoE block instead saves its input, per pick (k per token) the sorted input and the expert output (2 c H) and
/// the expert's intermediates (4 c I), and the router's logits and fp32 probabilities (c E + 8 E).
/// Selective (model/selective.hpp): the input x (RMSNorm 1's input); attention as above, the output projection
/// reading SDPA's own output (0); RMSNorm 2's input h (c H); gate and up (2 c I), or the MoE
/// block's own as above.
/// The block kernels (block_kernels_run) keep less: each RMSNorm its input and the fp32 rstd (4 bytes; RMSNorm 1's
/// input is the block's, counted), SwiGLU gate and up but not silu(gate) (3 c I with the product); with Selective
/// the MoE block's norm keeps rstd beside its input.
inline double block_activation_bytes_per_token(const model::ModelConfig& m, double c, const checkpointing::Rules& ck) {
  const double H = static_cast<double>(m.hidden_size), I = static_cast<double>(m.intermediate_size);
  const double Hq = static_cast<double>(m.num_heads * m.head_dim), Hkv = static_cast<double>(m.num_kv_heads * m.head_dim);
  const double k = static_cast<double>(m.num_experts_per_tok), E = static_cast<double>(m.num_experts);
  const double moe = c * H + k * (2 * c * H + 4 * c * I) + (c + 8) * E;
  const double attention = c * (2 * Hq + 2 * Hkv) + 4 * static_cast<double>(m.num_heads);
  const bool kernels = block_kernels_run(m, c);
  if (ck.selective()) return c * H + attention + c * H + (m.is_moe() ? moe + (kernels ? 4 : 0) : 2 * c * I);
  const double norm1 = kernels ? 4 : (c == 4 ? 0 : 4 * H) + c * H, norm2 = kernels ? c * H + 4 : 4 * H + c * H;
  const double mlp = m.is_moe() ? moe : c * H + (kernels ? 3 : 4) * c * I;
  return c * H + norm1 + c * H + attention + c * Hq + norm2 + mlp;
}

/// Bytes per token the head keeps for backward besides the loss: the final RMSNorm (as in a block; with the block
/// kernels rstd beside its input, the head's input) and the projection's input.
inline double head_forward_bytes_per_token(const model::ModelConfig& m, double c) {
  const double H = static_cast<double>(m.hidden_size);
  if (block_kernels_run(m, c)) return 4 + c * H;
  return (c == 4 ? 0 : 4 * H) + c * H + c * H;
}

/// Bytes per token the loss keeps: the fp32 log-softmax of the logits. The logits themselves are not kept:
/// nothing in backward reads them.
inline double loss_kept_per_token(const model::ModelConfig& m) { return 4 * static_cast<double>(m.vocab_size); }

/// Extra bytes per token at the head's peak, the log-softmax backward: the gradient it receives and the one it
/// makes (fp32 each), beside the kept log-softmax.
inline double head_backward_extra_per_token(const model::ModelConfig& m) {
  return 8 * static_cast<double>(m.vocab_size);
}

/// Extra bytes per token at the forward of the head: the logits (compute dtype) and their fp32 copy (absent
/// when the compute dtype is fp32) while the log-softmax is made.
inline double head_forward_transient_per_token(const model::ModelConfig& m, double c) {
  const double V = static_cast<double>(m.vocab_size);
  return c * V + (c == 4 ? 0 : 4 * V);
}

/// The fused head and loss (model/loss.hpp): bytes per token the head keeps for backward: the norm's as in
/// head_forward_bytes_per_token, and instead of the projection's input the hidden states' gradient (compute dtype),
/// computed in the forward.
inline double fused_head_kept_per_token(const model::ModelConfig& m, double c) {
  const double H = static_cast<double>(m.hidden_size);
  if (block_kernels_run(m, c)) return 4 + c * H;
  return (c == 4 ? 0 : 4 * H) + c * H + c * H;
}

/// The fused head and loss: bytes per token of a chunk while its loss is made: its logits (compute dtype), over which
/// the softmax's gradient is written (on a GPU the kernel of model/loss.hpp works in place).
inline double fused_loss_chunk_per_token(const model::ModelConfig& m, double c) {
  return c * static_cast<double>(m.vocab_size);
}

/// Extra bytes per token while a block's backward starts: the incoming gradient (c H) and the first gradients
/// of the MLP's intermediate (the product's, then silu's and up's: 3 c I; k times for a MoE block's k picks).
/// Selective: the product's gradient, silu(gate) recomputed (or its product with up, for the down projection's
/// weight), up's gradient, then gate's and the product of its making (4 c I).
inline double block_backward_extra_per_token(const model::ModelConfig& m, double c, const checkpointing::Rules& ck) {
  const double picks = m.is_moe() ? static_cast<double>(m.num_experts_per_tok) : 1.0;
  const double intermediates = ck.selective() && !m.is_moe() ? 4 : 3;
  return c * static_cast<double>(m.hidden_size) + intermediates * c * picks * static_cast<double>(m.intermediate_size);
}

/// Extra bytes, over a MoE block's kept activations, when its backward reaches the experts' first projection (the
/// block's peak with many experts and few tokens): every expert weight gradient made (3 E C I values), that
/// projection's output and input gradients (k (2I + C) per token), the experts' intermediates and outputs already
/// freed (k (3I + C) per token).
inline double moe_expert_backward_extra(const model::ModelConfig& m, double c, double tokens, int64_t expert_parallel) {
  if (!m.is_moe()) return 0;
  const double E = static_cast<double>(m.num_experts / expert_parallel), k = static_cast<double>(m.num_experts_per_tok);
  const double C = static_cast<double>(m.hidden_size), I = static_cast<double>(m.intermediate_size);
  return c * (3 * E * C * I + tokens * k * ((2 * I + C) - (3 * I + C)));
}

/// precision::FP8: the bytes one projection's float8 product holds at most besides its inputs and output (model/
/// fp8_linear.hpp), the largest over a block's projections, in forward (`backward` false) or backward: the first
/// operand's scaled copy (c bytes a value) and its codes (1), then the codes and the scaled copy of the second; the
/// fp32 scales are counted as 4 bytes a row. Forward: x [tokens, K] and W [N, K]; backward: dy [tokens, N] and W^T
/// [K, N]. Counted at the block's peak, on top of its other transients: an upper bound (they are not alive at once).
inline double fp8_operand_bytes(const model::ModelConfig& m, double c, double tokens, bool backward) {
  const double H = static_cast<double>(m.hidden_size), I = static_cast<double>(m.intermediate_size);
  const double Hq = static_cast<double>(m.num_heads * m.head_dim), Hkv = static_cast<double>(m.num_kv_heads * m.head_dim);
  double most = 0;
  std::vector<std::pair<double, double>> projections{{H, Hq}, {H, Hkv}, {Hq, H}};  // in K, out N
  if (!m.is_moe()) projections.insert(projections.end(), {{H, I}, {I, H}});        // a MoE block's experts: bf16
  for (const auto& [K, N] : projections) {
    const double rows_a = tokens, cols_a = backward ? N : K, rows_b = backward ? K : N, cols_b = backward ? N : K;
    const double a = rows_a * cols_a, b = rows_b * cols_b;
    most = std::max(most, std::max((c + 1) * a, a + (c + 1) * b) + 4 * (rows_a + rows_b));
  }
  return most;
}

/// The run's adapter targets resolved for the model (model::AdapterConfig::resolved: `all` expanded, each checked).
inline model::AdapterConfig plan_adapter(const PlanInput& in) {
  model::AdapterConfig a;
  a.kind = in.recipe.adapter, a.rank = in.lora_rank, a.targets = in.lora_targets;
  return a.resolved(in.model);
}

/// One target's in and out features, and how many copies of it a block has (a MoE's experts: E; each token reaches k).
struct TargetShape {
  double in, out, copies = 1, per_token = 1;
};
inline TargetShape target_shape(const model::ModelConfig& m, const std::string& t) {
  const double H = static_cast<double>(m.hidden_size), I = static_cast<double>(m.intermediate_size);
  const double Hq = static_cast<double>(m.num_heads * m.head_dim), Hkv = static_cast<double>(m.num_kv_heads * m.head_dim);
  const double E = static_cast<double>(m.num_experts), k = static_cast<double>(m.num_experts_per_tok);
  if (t == "q") return {H, Hq};
  if (t == "k" || t == "v") return {H, Hkv};
  if (t == "o") return {Hq, H};
  if (t == "router") return {H, E};
  if (t == "gate_up") return {H, 2 * I, E, k};
  if (t == "down") return m.is_moe() ? TargetShape{I, H, E, k} : TargetShape{I, H};
  return {H, I};  // gate, up
}

/// Adapter parameters of one block: r (in + out) per target Linear (per expert on a MoE's experts), plus out for DoRA's
/// magnitude.
inline double block_adapter_params(const PlanInput& in) {
  if (!in.recipe.adapter.active()) return 0;
  const auto a = plan_adapter(in);
  const double r = static_cast<double>(a.rank), dora = a.dora() ? 1 : 0;
  double total = 0;
  for (const auto& t : a.targets) {
    const auto s = target_shape(in.model, t);
    total += s.copies * (r * (s.in + s.out) + dora * s.out);
  }
  return total;
}

/// Bytes per token that one block's adapters add to its saved activations (compute dtype `c`): x A^T (r values) per
/// target (per pick on a MoE's experts), and for DoRA the target's base output and adapter output (out values each),
/// kept for m's gradient.
inline double block_adapter_activation_bytes_per_token(const PlanInput& in, double c) {
  if (!in.recipe.adapter.active()) return 0;
  const auto a = plan_adapter(in);
  double total = 0;
  for (const auto& t : a.targets) {
    const auto s = target_shape(in.model, t);
    total += s.per_token * (c * static_cast<double>(a.rank) + (a.dora() ? 2 * c * s.out : 0));
  }
  return total;
}

/// Bytes of one block's frozen base: the projections stored by the quantization policy (train/frozen_base.hpp), the
/// rest (norms, biases) in the compute dtype `c`.
inline double block_frozen_bytes(const PlanInput& in, double c) {
  const auto& m = in.model;
  const auto& q = in.recipe.quant;
  if (!q.quantized) return static_cast<double>(m.block_params()) * c;
  const int64_t H = m.hidden_size, I = m.intermediate_size, Hq = m.num_heads * m.head_dim, Hkv = m.num_kv_heads * m.head_dim;
  const int64_t E = m.num_experts;
  double projections = 0, bytes = 0;
  // a MoE's fused experts are E x 2I rows of H and E x H rows of I (its router stays plain)
  const auto mlp = m.is_moe() ? std::vector<std::pair<int64_t, int64_t>>{{E * 2 * I, H}, {E * H, I}}
                              : std::vector<std::pair<int64_t, int64_t>>{{I, H}, {I, H}, {H, I}};
  auto all = std::vector<std::pair<int64_t, int64_t>>{{Hq, H}, {Hkv, H}, {Hkv, H}, {H, Hq}};
  all.insert(all.end(), mlp.begin(), mlp.end());
  for (auto [rows, cols] : all) {
    projections += static_cast<double>(rows * cols);
    bytes += static_cast<double>(rows * q.row_bytes(cols));
  }
  return bytes + (static_cast<double>(m.block_params()) - projections) * c;
}

}  // namespace detail

/// Predicts the memory of one training step (the engine's schedule replayed on byte counts).
inline MemoryPlan plan_memory(const PlanInput& in) {
  const auto& m = in.model;
  const auto& r = in.recipe;
  m.validate("model");
  auto positive = [](int64_t v, const char* flag) {
    if (v <= 0) fail<ConfigError>("--", flag, " must be positive, got ", v);
  };
  positive(in.world_size, "world-size");
  positive(in.gpus_per_node, "gpus-per-node");
  positive(in.micro_batch, "micro-batch");
  positive(in.seq_len, "seq-len");
  positive(in.grad_accum, "grad-accum");
  if (in.world_size % in.gpus_per_node != 0 && in.world_size > in.gpus_per_node)
    fail<ConfigError>("--world-size ", in.world_size, " is not a multiple of --gpus-per-node ", in.gpus_per_node);
  const bool offload = r.offload.host;

  MemoryPlan plan;
  const int64_t node = std::min(in.gpus_per_node, in.world_size);
  plan.shard_group = r.sharding.group_size(static_cast<int>(in.world_size), static_cast<int>(node),
                                           static_cast<int>(in.shard_group_size));
  if (plan.shard_group < 1 || in.world_size % plan.shard_group != 0)
    fail<ConfigError>("world size ", in.world_size, " is not divisible by the shard group size ", plan.shard_group);
  if (!engine_serves(r.sharding, r.offload))
    fail<ConfigError>("--offload ", r.offload.name, " with --sharding ", r.sharding.name, ": ", SHARDLM_OFFLOAD_NEEDS_SHARDING);
  if (!model_serves(r.checkpointing, r.adapter))
    fail<ConfigError>("--checkpointing ", r.checkpointing.name(), " with --adapter ", r.adapter.name, ": ",
                      SHARDLM_SELECTIVE_NEEDS_FULL_FT);
  if (!linears_serve(r.checkpointing, r.precision))
    fail<ConfigError>("--checkpointing ", r.checkpointing.name(), " with --precision ", r.precision.name, ": ",
                      SHARDLM_FP8_NEEDS_PLAIN_CHECKPOINTING);
  const int64_t G = plan.shard_group;
  plan.params = m.num_params();
  // Expert parallelism: N ranks split each MoE layer's experts; theirs are sharded over the Ge ranks holding the same.
  const int64_t N = in.expert_parallel;
  if (N < 1) fail<ConfigError>("--expert-parallel must be >= 1, got ", N);
  if (N > 1 && !m.is_moe())
    fail<ConfigError>("--expert-parallel ", N, ": this model (model_type '", m.model_type, "') has no experts");
  if (N > 1 && (m.num_experts % N != 0 || in.world_size % N != 0))
    fail<ConfigError>("--expert-parallel ", N, " must divide the number of experts (", m.num_experts, ") and the world size (",
                      in.world_size, ")");
  if (N > 1 && r.adapter.active()) fail<ConfigError>("--adapter with --expert-parallel ", N, ": adapters are not built with expert parallelism (LoRA on Mixtral runs with --expert-parallel 1)");
  const int64_t Ge = N > 1 && r.sharding.shards_state() ? in.world_size / N : 1;
  const double block_experts = N > 1 ? static_cast<double>(3 * m.num_experts * m.hidden_size * m.intermediate_size) : 0;
  const double local_experts = block_experts / static_cast<double>(N);

  // Units: embedding, blocks, final norm + head (the head reads the embedding when tied: kept gathered).
  const int64_t H = m.hidden_size, L = m.num_layers;
  std::vector<double> numel{static_cast<double>(m.vocab_size * H)};
  for (int64_t i = 0; i < L; ++i) numel.push_back(static_cast<double>(m.block_params()));
  numel.push_back(static_cast<double>(H + (m.tie_word_embeddings ? 0 : m.vocab_size * H)));
  const size_t n = numel.size();
  std::vector<bool> blocks(n, true);
  blocks.front() = blocks.back() = false;
  std::vector<std::vector<size_t>> reads(n);
  if (m.tie_word_embeddings) reads.back() = {0};
  const engine::Schedule schedule(r, blocks, reads, G);
  const engine::Schedule expert_schedule(r, blocks, reads, Ge);  // the experts' group (engine.hpp: Experts)

  // With an adapter: trained[u] the adapters' elements (the FlatUnit), numel[u] - trained[u] the frozen base.
  const double adapter_block = detail::block_adapter_params(in);
  std::vector<double> trained(n, 0), padded(n), shard(n), expert_shard(n, 0);
  const auto bytes = [](c10::ScalarType t) { return static_cast<double>(precision::Rules::bytes(t)); };
  const double c = bytes(r.precision.compute), master = bytes(r.precision.master);
  const double tokens = static_cast<double>(in.micro_batch * in.seq_len);
  if (r.quant.quantized && !r.adapter.active())
    fail<ConfigError>("--quant ", r.quant.name, " stores the frozen base quantized: it needs --adapter lora or dora");
  double shard_total = 0, frozen_bytes = 0;
  for (size_t u = 0; u < n; ++u) {
    if (adapter_block > 0) {
      const bool block = u >= 1 && u <= static_cast<size_t>(L);
      trained[u] = block ? adapter_block : 0;
      frozen_bytes += std::ceil((block ? detail::block_frozen_bytes(in, c) : numel[u] * c) / static_cast<double>(G));
      numel[u] += trained[u];
    } else {
      trained[u] = numel[u];
    }
    double expert_pad = 0;
    if (N > 1 && u >= 1 && u <= static_cast<size_t>(L)) {  // this rank's experts: a group of their own
      numel[u] -= block_experts - local_experts, trained[u] -= block_experts;
      const auto e = static_cast<int64_t>(local_experts);
      expert_pad = static_cast<double>((e + Ge - 1) / Ge * Ge);
      expert_shard[u] = expert_pad / static_cast<double>(Ge);
    }
    const auto p = static_cast<int64_t>(trained[u]);
    const double pad = static_cast<double>((p + G - 1) / G * G);
    shard[u] = pad / static_cast<double>(G);
    shard_total += shard[u];
    padded[u] = numel[u] - trained[u] + pad;  // gathered: the frozen values and the adapters
    if (expert_pad > 0) padded[u] += expert_pad - local_experts, trained[u] += local_experts;
  }
  double expert_total = 0;
  for (const auto e : expert_shard) expert_total += e;

  // The gradient shards' dtype and the flat buffers' (the reduce dtype: --reduce-dtype), as the engine picks them
  // (offload::Rules::grad_dtype, Schedule::flat_dtype).
  const double grad_bytes = bytes(schedule.grad_dtype(in.world_size / G, in.grad_accum));
  const double flat_bytes = bytes(schedule.flat_dtype(in.world_size / G, in.grad_accum));
  const int64_t expert_replicas = in.world_size / N / Ge;
  const double expert_grad_bytes = bytes(expert_schedule.grad_dtype(expert_replicas, in.grad_accum));
  const double expert_flat_bytes = bytes(expert_schedule.flat_dtype(expert_replicas, in.grad_accum));
  const double state_per = master * 3 + grad_bytes;  // master, gradient, two moments
  const double state_gpu = offload ? (shard_total + expert_total) * c
                                   : shard_total * state_per + expert_total * (master * 3 + expert_grad_bytes);
  // One MoE layer's exchange at a time: the rows received for this rank's experts and their copy grouped by expert.
  const double exchange =
      N > 1 ? 2 * c * static_cast<double>(m.num_experts_per_tok) * static_cast<double>(H) * tokens : 0.0;
  const double workspace = 2 * 32.0 * (1 << 20);
  const double blk_full =
      (detail::block_activation_bytes_per_token(m, c, r.checkpointing) + detail::block_adapter_activation_bytes_per_token(in, c)) *
      tokens;
  const double blk_input = c * static_cast<double>(H) * tokens;

  // Replay: live bytes per category; every event compares the total with the peak so far.
  struct Live {
    double gathered = 0, acts = 0, logits = 0, grads = 0, fp8 = 0, exchange = 0;
    double total() const { return gathered + acts + logits + grads + fp8 + exchange; }
  } live;
  const bool fp8 = r.precision.fp8_linears();
  const double fp8_forward = fp8 ? detail::fp8_operand_bytes(m, c, tokens, false) : 0;
  const double fp8_backward = fp8 ? detail::fp8_operand_bytes(m, c, tokens, true) : 0;
  std::vector<bool> gathered(n, false);
  Live peak;
  std::string peak_at = "start";
  auto event = [&](const std::string& what) {
    if (live.total() > peak.total()) peak = live, peak_at = what;
  };
  auto note = [&](engine::Event::Kind kind, size_t u) { plan.trace.push_back({kind, u}); };
  auto gather = [&](size_t u) {
    if (gathered[u]) return;
    note(engine::Event::gather, u);
    gathered[u] = true, live.gathered += padded[u] * c;
  };
  auto release = [&](size_t u) {
    if (!gathered[u]) return;
    note(engine::Event::release, u);
    gathered[u] = false, live.gathered -= padded[u] * c;
  };
  const size_t head = n - 1;
  const bool fused = in.loss_chunk > 0, head_trained = !r.adapter.active();
  const double V = static_cast<double>(m.vocab_size);
  if (schedule.keeps_all())
    for (size_t u = 0; u < n; ++u) gathered[u] = true, live.gathered += padded[u] * c;

  for (int64_t a = 0; a < in.grad_accum; ++a) {
    const engine::MicroBatch mb{a == 0, a + 1 == in.grad_accum};
    // Forward.
    std::vector<double> kept(n, 0);
    for (size_t u = 0; u < n; ++u) {
      gather(u);
      if (u + 1 < n) gather(u + 1);
      note(engine::Event::forward, u);
      if (u == head && fused) {
        // the head weight's gradient accumulates over the chunks (a frozen head under an adapter has none)
        kept[u] = detail::fused_head_kept_per_token(m, c) * tokens + (head_trained ? c * V * H : 0);
        live.acts += kept[u];
        live.logits += detail::fused_loss_chunk_per_token(m, c) * std::min(tokens, static_cast<double>(in.loss_chunk));
        event("the loss in forward");
        live.logits = 0;
      } else if (u == head) {
        kept[u] = detail::head_forward_bytes_per_token(m, c) * tokens;
        live.acts += kept[u];
        live.logits += (detail::loss_kept_per_token(m) + detail::head_forward_transient_per_token(m, c)) * tokens;
        event("the loss in forward");
        live.logits -= detail::head_forward_transient_per_token(m, c) * tokens;
      } else if (u > 0) {
        kept[u] = schedule.recomputes(u) ? blk_input : blk_full;
        live.acts += kept[u];
        live.fp8 = fp8_forward;
        event("forward of block " + std::to_string(u - 1));
        live.fp8 = 0;
        live.exchange = exchange;
        event("expert exchange of block " + std::to_string(u - 1));
        live.exchange = 0;
      }
      if (schedule.releases_after_forward(u)) release(u);
    }

    // Backward, unit by unit from the head.
    for (size_t u = n; u-- > 0;) {
      gather(u);
      if (u > 0) gather(u - 1);
      const bool recomputed = schedule.recomputes(u);
      if (recomputed) note(engine::Event::recompute, u);
      note(engine::Event::backward, u);
      if (u == head) {
        // fused: the gradients made in the forward are scaled in place, nothing more
        live.logits += fused ? 0.0 : detail::head_backward_extra_per_token(m) * tokens;
        event("the loss in backward");
        live.logits = 0;
      } else if (u > 0) {
        if (recomputed) live.acts += blk_full - blk_input;
        live.grads += detail::block_backward_extra_per_token(m, c, r.checkpointing) * tokens;
        live.fp8 = std::max(fp8_backward, recomputed ? fp8_forward : 0.0);
        event("backward of block " + std::to_string(u - 1));
        live.fp8 = 0;
        live.grads -= detail::block_backward_extra_per_token(m, c, r.checkpointing) * tokens;
        if (!r.adapter.active() && m.is_moe()) {
          const double experts = detail::moe_expert_backward_extra(m, c, tokens, N);
          live.grads += experts;
          live.exchange = exchange;  // the gradients of the received rows, sent back
          event("expert gradients of block " + std::to_string(u - 1));
          live.grads -= experts;
          live.exchange = 0;
        }
        if (recomputed) live.acts -= blk_full - blk_input;
      }
      live.acts -= kept[u];
      // The unit's parameter gradients (compute dtype), and as the schedule's gradient path says: cast straight into
      // the shard (no flat buffer), or a flat buffer in the flat dtype reduce-scattered into the shard or into a
      // slice of its own (the flat dtype too).
      note(engine::Event::reduce, u);
      const auto path = schedule.gradient_path(mb);
      const double flat = path == engine::GradientPath::cast_into_shard ? 0 : shard[u] * static_cast<double>(G);
      const double slice = schedule.reduces_through_temporary(mb) ? shard[u] : 0;
      live.grads += trained[u] * c + (flat + slice) * flat_bytes;
      if (expert_shard[u] > 0) {  // the experts' flat buffer and slice, over their group
        const auto expert_path = expert_schedule.gradient_path(mb);
        const double eflat = expert_path == engine::GradientPath::cast_into_shard ? 0 : expert_shard[u] * static_cast<double>(Ge);
        live.grads += (eflat + (expert_schedule.reduces_through_temporary(mb) ? expert_shard[u] : 0)) * expert_flat_bytes;
      }
      event(u == 0 ? std::string("the embedding's gradient reduction")
                   : u == head ? std::string("the head's gradient reduction")
                               : "gradient reduction of block " + std::to_string(u - 1));
      live.grads = 0;
      if (schedule.releases_after_backward(mb)) release(u);
    }
  }

  plan.peak_at = peak_at;
  plan.gpu = {{"sharded state", state_gpu},
              {"frozen base (sharded)", offload ? 0.0 : frozen_bytes},
              {"gathered parameters", peak.gathered},
              {"activations", peak.acts},
              {"logits and loss", peak.logits},
              {"gradients in flight", peak.grads},
              {"workspace", workspace}};
  if (fp8) plan.gpu.push_back({"float8 operands", peak.fp8});
  if (N > 1) plan.gpu.push_back({"all-to-all buffers", peak.exchange});
  if (offload) {
    const double gpus = static_cast<double>(node);
    plan.host = {{"master weights and gradients (pinned)",
                  gpus * (shard_total * (master + grad_bytes) + expert_total * (master + expert_grad_bytes))},
                 {"AdamW moments", gpus * (shard_total + expert_total) * 2 * master}};
    if (frozen_bytes > 0) plan.host.push_back({"frozen base (pinned)", gpus * frozen_bytes});
    if (in.grad_accum > 1)
      plan.host.push_back({"gradient staging (pinned)", gpus * (shard_total * grad_bytes + expert_total * expert_grad_bytes)});
    // engine/offload.hpp: a speculative host step writes a second copy of masters (pinned) and moments
    if (in.host_step == engine::HostStep::speculative || in.host_step == engine::HostStep::automatic)
      plan.host.push_back({in.host_step == engine::HostStep::automatic ? "speculative step's second state (when it fits)"
                                                                       : "speculative step's second state",
                           gpus * (shard_total + expert_total) * 3 * master});
  }
  return plan;
}

/// The host bytes one node of the run needs by `plan`: the offloaded state of its ranks (MemoryPlan::host is per
/// host), and, when the ranks compute on the CPU (--device cpu), what the plan counts per GPU for each of them.
inline double host_bytes_needed(const MemoryPlan& plan, int64_t ranks_on_node, bool computes_on_host) {
  return plan.host_total() + (computes_on_host ? static_cast<double>(ranks_on_node) * plan.gpu_peak() : 0.0);
}

/// Refuses a run whose node needs more host memory than `available` (MemAvailable): a ConfigError naming both, per
/// node and per rank, and the flag that starts it anyway. Better now than the OOM killer's SIGKILL in an hour.
inline void check_host_memory(double needed, int64_t ranks_on_node, int64_t available) {
  if (needed <= static_cast<double>(available)) return;
  fail<ConfigError>("this node's ", ranks_on_node, " rank(s) need ", gib_text(needed), " of host memory by the memory plan (",
                    gib_text(needed / static_cast<double>(ranks_on_node)), " each; shardlm_plan shows what for), but ",
                    gib_text(static_cast<double>(available)), " are available (MemAvailable in /proc/meminfo): use more ",
                    "nodes or a smaller model, batch or --seq-len, or pass --skip-memory-check to start anyway");
}

}  // namespace shardlm::plan
