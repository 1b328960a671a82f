#pragma once
// The policy tags and their composition. A tag is the one place that says what its policy does: each family has a
// small `Rules` struct of constants and the decisions that follow from them (CUTLASS-style), and each tag holds its
// `rules`. The engine, its schedule, the memory planner, checkpoint metadata, the log line and the CLI all ask the
// rules; nothing else re-derives a policy. A recipe is a `Policies<...>` of one tag from each family, in any order;
// families left out take their default. `Recipe::rules()` is the recipe as values (RecipeRules): the code below the
// policy boundary (engine, trainer) is compiled once per program and reads them (docs/architecture.md).
#include <c10/core/ScalarType.h>

#include <cstdint>
#include <string>
#include <string_view>
#include <type_traits>

#include "shardlm/quant/layout.hpp"

namespace shardlm {

template <class...>
inline constexpr bool dependent_false = false;

namespace sharding {
/// The ranks that share one copy of the sharded state (the shard group).
enum class Group {
  one_rank,   ///< every rank holds everything (replicas only)
  all_ranks,  ///< the whole world
  node,       ///< --shard-group-size ranks, by default the ranks of one node; replicated across groups
};
/// What a sharding policy decides: whether gathered parameters persist, when a unit is released, and which ranks
/// share a shard. Gradients are reduce-scattered inside the shard group, then all-reduced over the replicas (the
/// ranks holding the same shard); with a shard group of one rank that is an all-reduce (DDP).
struct Rules {
  std::string_view name;
  bool keeps_parameters;        ///< every unit stays gathered, re-gathered after each update (replicated parameters)
  bool reshards_after_forward;  ///< a unit is released after its forward and gathered again for its backward (ZeRO-3)
  Group group;
  /// The shard group size for `world` ranks on nodes of `per_node`, with --shard-group-size `flag` (0: one node).
  constexpr int group_size(int world, int per_node, int flag) const {
    return group == Group::one_rank ? 1 : group == Group::all_ranks ? world : flag > 0 ? flag : per_node;
  }
  /// Whether --shard-group-size applies.
  constexpr bool takes_group_size() const { return group == Group::node; }
  /// Whether gradients and optimizer state are sharded (offload moves only sharded state to the host).
  constexpr bool shards_state() const { return group != Group::one_rank; }
  /// Whether a unit (not the last: its backward follows at once; not one another unit reads) is released after its
  /// forward.
  constexpr bool releases_after_forward() const { return reshards_after_forward; }
  /// Whether a unit is released after its backward of a micro-batch: ZeRO-2 keeps what it gathered until the
  /// step's last micro-batch.
  constexpr bool releases_after_backward(bool last_micro_batch) const {
    return !keeps_parameters && (reshards_after_forward || last_micro_batch);
  }
};
/// Replicated parameters, all-reduced gradients (DDP).
struct NoShard { static constexpr Rules rules{"none", true, false, Group::one_rank}; };
/// ZeRO-2: gradients and optimizer state sharded; gathered parameters kept from forward to backward.
struct ShardGradOp { static constexpr Rules rules{"grad-op", false, false, Group::all_ranks}; };
/// ZeRO-3: parameters, gradients and optimizer state sharded; parameters gathered per unit.
struct FullShard { static constexpr Rules rules{"full", false, true, Group::all_ranks}; };
/// FullShard inside a group of ranks (a node by default), replicated across groups.
struct HybridShard { static constexpr Rules rules{"hybrid", false, true, Group::node}; };
}  // namespace sharding

namespace checkpointing {
/// What a block whose graph is kept (not recomputed whole) saves for backward.
enum class Saved {
  everything,      ///< what autograd saves over the plain ops: every elementwise op's inputs and outputs too
  matmul_outputs,  ///< the matmul and attention outputs and each RMSNorm's input: the normalized
                   ///< inputs of the projections and SwiGLU's silu(gate) * up are recomputed in backward
};
/// Which blocks are recomputed in backward (their activations are not kept from the forward), and what the others
/// save.
struct Rules {
  int every;  ///< 0: none; k: blocks 0, k, 2k, ... (every-block: k = 1)
  Saved saved = Saved::everything;
  constexpr bool recomputes(int64_t block) const { return every > 0 && block % every == 0; }
  /// Whether a kept block saves only its matmul outputs (model/selective.hpp's autograd nodes).
  constexpr bool selective() const { return saved == Saved::matmul_outputs; }
  /// none, every-block, every-K or selective (the --checkpointing values).
  std::string name() const {
    if (selective()) return "selective";  // Selective's every is 0: no tag recomputes whole blocks beside it
    return every == 0 ? "none" : every == 1 ? "every-block" : "every-" + std::to_string(every);
  }
};
/// Keep every activation for backward.
struct None { static constexpr Rules rules{0}; };
/// Recompute each block in backward.
struct EveryBlock { static constexpr Rules rules{1}; };
/// Recompute every k-th block (the others keep every activation).
template <int K>
struct EveryNth {
  static_assert(K >= 1, "EveryNth<k> needs k >= 1: EveryNth<1> is EveryBlock");
  static constexpr Rules rules{K};
};
/// Selective activation checkpointing: no block is recomputed whole; each keeps its matmul and attention outputs and
/// recomputes the cheap elementwise ops (RMSNorm's output, SwiGLU's product) in backward.
struct Selective { static constexpr Rules rules{0, Saved::matmul_outputs}; };
}  // namespace checkpointing

namespace precision {
/// The dtypes of the master weights and optimizer state, of the gathered parameters and the compute, and of the
/// gradient reduction. Each policy reduces in its master dtype; --reduce-dtype (policy/dispatch.hpp) may change
/// `reduce` of a run's rules, never the policy's name: the collectives then run in it, while the gradient shards,
/// where micro-batches accumulate and the optimizer reads, stay in the master dtype (offload::Rules::grad_dtype).
/// How the transformer blocks' linear layers multiply: q/k/v/o and gate/up/down (the dense MLP and the attention),
/// never the embedding, the LM head, a MoE router or its experts.
enum class LinearCompute {
  plain,        ///< in the compute dtype (at::linear)
  fp8_rowwise,  ///< float8 e4m3 with dynamic row-wise power-of-two scales (model/fp8_linear.hpp)
};
struct Rules {
  std::string_view name;
  c10::ScalarType master, compute, reduce;
  LinearCompute linears = LinearCompute::plain;
  static constexpr int64_t bytes(c10::ScalarType t) { return t == c10::ScalarType::Float ? 4 : 2; }
  /// Whether --reduce-dtype changed the policy's reduction (every policy reduces in its master dtype).
  constexpr bool reduce_overridden() const { return reduce != master; }
  /// Whether the blocks' projections compute in float8.
  constexpr bool fp8_linears() const { return linears == LinearCompute::fp8_rowwise; }
};
/// fp32 everywhere.
struct FP32 { static constexpr Rules rules{"fp32", c10::ScalarType::Float, c10::ScalarType::Float, c10::ScalarType::Float}; };
/// fp32 master weights and optimizer state, bf16 gather and compute, fp32 gradient reduction.
struct MixedBF16 {
  static constexpr Rules rules{"mixed-bf16", c10::ScalarType::Float, c10::ScalarType::BFloat16, c10::ScalarType::Float};
};
/// bf16 parameters and optimizer state (8 bytes per parameter of training state).
struct PureBF16 {
  static constexpr Rules rules{"pure-bf16", c10::ScalarType::BFloat16, c10::ScalarType::BFloat16, c10::ScalarType::BFloat16};
};
/// MixedBF16 (fp32 master weights and optimizer state, bf16 compute elsewhere, fp32 gradient reduction) with the
/// blocks' projections in float8 e4m3: dynamic row-wise scales, torchao's "rowwise with high-precision grad_weight"
/// recipe (forward and input gradient in fp8 through at::_scaled_mm on sm90+, the weight gradient in bf16; an exact
/// emulation on the CPU). model/fp8_linear.hpp says why each choice.
struct FP8 {
  static constexpr Rules rules{"fp8", c10::ScalarType::Float, c10::ScalarType::BFloat16, c10::ScalarType::Float,
                               LinearCompute::fp8_rowwise};
};
}  // namespace precision

/// The name of a reduce dtype, as --reduce-dtype and checkpoint metadata write it.
constexpr const char* reduce_dtype_name(c10::ScalarType t) { return t == c10::ScalarType::Float ? "fp32" : "bf16"; }

namespace offload {
/// Where the sharded state lives and where the optimizer steps (engine/offload.hpp holds the two storages).
struct Rules {
  std::string_view name;
  bool host;  ///< master weights, gradients and AdamW state in host memory (pinned on a GPU); the step on the host
  /// The dtype of the gradient shards, where micro-batches accumulate and the optimizer reads: the master dtype
  /// (a bf16 reduction's sums are widened into fp32 shards, as FSDP2 does: accumulation never rounds to bf16),
  /// except with one micro-batch per step, where nothing accumulates. With one rank per shard group and no replicas
  /// nothing is reduced either: the shards keep the gradients as autograd made them, in the compute dtype, on the
  /// device or the host (mixed-bf16: 2 bytes per parameter instead of 4, and no cast; what fits full Llama3-8B in the
  /// host memory of a one-GPU machine); the optimizer reads them as they are. Offloaded, the host keeps a reduction's
  /// sums as they arrive, in the reduce dtype. `micro_batches` 0: not fixed.
  constexpr c10::ScalarType grad_dtype(const precision::Rules& p, int64_t shard_group, int64_t replicas,
                                       int64_t micro_batches) const {
    if (micro_batches != 1) return p.master;
    if (shard_group == 1 && replicas == 1) return p.compute;
    return host ? p.reduce : p.master;
  }
};
struct None { static constexpr Rules rules{"none", false}; };
/// Sharded master params, grads and optimizer state in pinned host memory; the optimizer step on the host.
struct Cpu { static constexpr Rules rules{"cpu", true}; };
}  // namespace offload

namespace adapter {
/// Which parameters train.
struct Rules {
  std::string_view name;
  bool trains_base;  ///< every weight trains (full fine-tuning); else the base is frozen and adapters train
  bool magnitude;    ///< DoRA: a trained magnitude per output row beside the low-rank factors
  constexpr bool active() const { return !trains_base; }
  constexpr bool operator==(const Rules&) const = default;
};
/// Full fine-tuning: every parameter trained.
struct None { static constexpr Rules rules{"none", true, false}; };
/// LoRA on a frozen base (rank, alpha, dropout, rsLoRA and targets are run-time options).
struct LoRA { static constexpr Rules rules{"lora", false, false}; };
/// DoRA: LoRA plus a trained magnitude per output row.
struct DoRA { static constexpr Rules rules{"dora", false, true}; };
}  // namespace adapter

// The quantization policies of the frozen base: quant::NoQuant (the base in the compute dtype), quant::Int4 (4.5 bits
// per value), quant::FP8 (8.25 bits per value, e4m3 with row scales). Their rules (quant::Rules: bytes per row) are in
// quant/layout.hpp; the tags, with their kernels, in quant/policies.hpp. Declared here so that a recipe can name one.
namespace quant {
struct NoQuant;
struct Int4;
struct FP8;
}  // namespace quant

/// A recipe as values: the rules of its tags. What the engine, the trainer, the planner and checkpoint metadata read.
struct RecipeRules {
  sharding::Rules sharding = sharding::NoShard::rules;
  checkpointing::Rules checkpointing = checkpointing::None::rules;
  offload::Rules offload = offload::None::rules;
  precision::Rules precision = precision::FP32::rules;
  adapter::Rules adapter = adapter::None::rules;
  quant::Rules quant = quant::no_quant_rules;
  /// "full / every-block / cpu / mixed-bf16": the log line's and shardlm_train's names.
  std::string describe() const {
    return std::string(sharding.name) + " / " + checkpointing.name() + " / " + std::string(offload.name) +
           " / " + std::string(precision.name) +
           (precision.reduce_overridden() ? std::string(" (reduce ") + reduce_dtype_name(precision.reduce) + ")" : "");
  }
};

/// What the engine refuses, with the message that its static_assert and shardlm_train's run-time dispatch give.
#define SHARDLM_OFFLOAD_NEEDS_SHARDING                                                                   \
  "offload::Cpu moves sharded state to the host: use sharding::FullShard, ShardGradOp or HybridShard (NoShard " \
  "would keep a full replica of the optimizer state in every rank's host memory)"
/// Whether the engine serves a recipe's combination of sharding and offload.
constexpr bool engine_serves(const sharding::Rules& s, const offload::Rules& o) { return !o.host || s.shards_state(); }

#define SHARDLM_SELECTIVE_NEEDS_FULL_FT                                                                        \
  "checkpointing::Selective fuses each RMSNorm with the plain projections that read it, which an adapter's "  \
  "LoRA/DoRA path would bypass: with adapter::LoRA or DoRA use checkpointing::None, EveryBlock or EveryNth<K>"
/// Whether the model serves a recipe's combination of checkpointing and adapter.
constexpr bool model_serves(const checkpointing::Rules& c, const adapter::Rules& a) { return !c.selective() || !a.active(); }

#define SHARDLM_FP8_NEEDS_PLAIN_CHECKPOINTING                                                                     \
  "precision::FP8 computes the blocks' projections through the float8 Linear, which checkpointing::Selective's fused " \
  "RMSNorm + projection nodes bypass: with precision::FP8 use checkpointing::None, EveryBlock or EveryNth<K>"
/// Whether the model serves a recipe's combination of checkpointing and precision.
constexpr bool linears_serve(const checkpointing::Rules& c, const precision::Rules& p) {
  return !c.selective() || !p.fp8_linears();
}

namespace detail {
template <class T, template <class> class IsFamily, class Default, class... Ps>
struct pick;
template <class T, template <class> class IsFamily, class Default>
struct pick<T, IsFamily, Default> { using type = Default; };
template <class T, template <class> class IsFamily, class Default, class P, class... Ps>
struct pick<T, IsFamily, Default, P, Ps...> {
  using type = std::conditional_t<IsFamily<P>::value, P, typename pick<T, IsFamily, Default, Ps...>::type>;
};
// A tag belongs to the family whose Rules its `rules` are.
template <class P, class R>
concept has_rules_of = requires { { P::rules } -> std::convertible_to<const R&>; };
template <class P> struct is_sharding : std::bool_constant<has_rules_of<P, sharding::Rules>> {};
template <class P> struct is_checkpointing : std::bool_constant<has_rules_of<P, checkpointing::Rules>> {};
template <class P> struct is_offload : std::bool_constant<has_rules_of<P, offload::Rules>> {};
template <class P> struct is_precision : std::bool_constant<has_rules_of<P, precision::Rules>> {};
template <class P> struct is_adapter : std::bool_constant<has_rules_of<P, adapter::Rules>> {};
// The quantization tags are complete only with quant/policies.hpp: a recipe names them while they may be incomplete.
template <class P> struct is_quant : std::bool_constant<std::is_same_v<P, quant::NoQuant> || std::is_same_v<P, quant::Int4> || std::is_same_v<P, quant::FP8>> {};
template <class P> struct is_policy : std::bool_constant<is_sharding<P>::value || is_checkpointing<P>::value || is_offload<P>::value || is_precision<P>::value || is_adapter<P>::value || is_quant<P>::value> {};
template <template <class> class IsFamily, class... Ps>
inline constexpr int count_of = (0 + ... + int(IsFamily<Ps>::value));
}  // namespace detail

/// A recipe: one tag per family, in any order; missing families default to
/// NoShard, checkpointing::None, offload::None, FP32, adapter::None, quant::NoQuant.
/// The adapter changes which parameters train and the quantization how the frozen ones are stored; like every other
/// family they reach the code below the policy boundary as rules, so no recipe adds an instantiation of its own.
template <class... Ps>
struct Policies {
  static_assert((detail::is_policy<Ps>::value && ...),
                "Policies<...> takes only policy tags: sharding::*, checkpointing::*, offload::*, precision::*, adapter::*, quant::*");
  static_assert(detail::count_of<detail::is_sharding, Ps...> <= 1, "Policies<...> names two sharding policies: keep one");
  static_assert(detail::count_of<detail::is_checkpointing, Ps...> <= 1, "Policies<...> names two checkpointing policies: keep one");
  static_assert(detail::count_of<detail::is_offload, Ps...> <= 1, "Policies<...> names two offload policies: keep one");
  static_assert(detail::count_of<detail::is_precision, Ps...> <= 1, "Policies<...> names two precision policies: keep one");
  static_assert(detail::count_of<detail::is_adapter, Ps...> <= 1, "Policies<...> names two adapter policies: keep one");
  static_assert(detail::count_of<detail::is_quant, Ps...> <= 1, "Policies<...> names two quantization policies: keep one");
  using Sharding = typename detail::pick<void, detail::is_sharding, sharding::NoShard, Ps...>::type;
  using Checkpointing = typename detail::pick<void, detail::is_checkpointing, checkpointing::None, Ps...>::type;
  using Offload = typename detail::pick<void, detail::is_offload, offload::None, Ps...>::type;
  using Precision = typename detail::pick<void, detail::is_precision, precision::FP32, Ps...>::type;
  using Adapter = typename detail::pick<void, detail::is_adapter, adapter::None, Ps...>::type;
  using Quant = typename detail::pick<void, detail::is_quant, quant::NoQuant, Ps...>::type;
  static_assert(std::is_same_v<Quant, quant::NoQuant> || Adapter::rules.active(),
                "quant::Int4 and quant::FP8 store the frozen base quantized: name adapter::LoRA or adapter::DoRA too "
                "(full fine-tuning trains every weight, so nothing is frozen)");
  static_assert(engine_serves(Sharding::rules, Offload::rules), SHARDLM_OFFLOAD_NEEDS_SHARDING);
  static_assert(model_serves(Checkpointing::rules, Adapter::rules), SHARDLM_SELECTIVE_NEEDS_FULL_FT);
  static_assert(linears_serve(Checkpointing::rules, Precision::rules), SHARDLM_FP8_NEEDS_PLAIN_CHECKPOINTING);

  /// The recipe as values (the quantization tag is complete by the time this is called: shardlm.hpp).
  static constexpr RecipeRules rules() {
    return {Sharding::rules, Checkpointing::rules, Offload::rules, Precision::rules, Adapter::rules, Quant::rules};
  }
};

}  // namespace shardlm
