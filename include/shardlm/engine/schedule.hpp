#pragma once
// The engine's schedule: for each unit, when it is gathered, released and recomputed, and how its gradients reach
// its shard, decided by the recipe's rules. The engine (engine/engine.hpp) drives its loops by these answers and the
// memory planner (train/memory_plan.hpp) replays the same answers on byte counts, so the two cannot drift; both
// can record what they did as a Trace, and tests compare the traces for every recipe. Torch-free.
//
//   forward  (unit u = 0 .. n-1):  gather u (if not gathered), gather u+1 (prefetch), forward u,
//                                  release u if releases_after_forward(u)
//   backward (unit u = n-1 .. 0):  gather u, gather u-1 (prefetch), recompute u if recomputes(u), backward u,
//                                  reduce u (gradient_path), release u if releases_after_backward(last micro-batch)
#include <cstddef>
#include <cstdint>
#include <set>
#include <string>
#include <string_view>
#include <vector>

#include "shardlm/core/errors.hpp"
#include "shardlm/policy/policies.hpp"

namespace shardlm::engine {

/// How a unit's gradients reach this rank's gradient shard in a micro-batch.
enum class GradientPath {
  cast_into_shard,            ///< one rank in the shard group, shards on the device, first micro-batch: the
                              ///< gradients are cast straight into the shard (no flat buffer, nothing to reduce)
  reduce_scatter_into_shard,  ///< shards on the device, first micro-batch, reduced in the shards' dtype: a flat buffer,
                              ///< reduce-scattered into the shard
  through_slice,              ///< later micro-batches, offload, or a reduce dtype other than the shards': a flat buffer,
                              ///< reduced into a slice (with more than one rank in the group a temporary of its own)
                              ///< that is added to or copied (cast) into the shard
};

/// A micro-batch's place in its optimizer step.
struct MicroBatch {
  bool first = true;  ///< the step's first: its gradients overwrite the shards
  bool last = true;   ///< the step's last: accumulation ends
};

/// When an offloaded run's host step runs (HostShards; --offload-step).
enum class HostStep {
  automatic,    ///< speculative where its second copy of the state fits the host's memory, else overlapped
  sync,         ///< after the backward and the norm, before the step returns
  overlapped,   ///< after the norm, during the next forward
  speculative,  ///< during the backward, redone when the norm asks for clipping
};

/// --offload-step auto|sync|overlapped|speculative.
inline HostStep host_step_named(std::string_view s) {
  if (s == "auto") return HostStep::automatic;
  if (s == "sync") return HostStep::sync;
  if (s == "overlapped") return HostStep::overlapped;
  if (s == "speculative") return HostStep::speculative;
  fail<ConfigError>("--offload-step '", s, "': use auto, sync, overlapped or speculative");
}
inline const char* host_step_name(HostStep s) {
  switch (s) {
    case HostStep::automatic: return "auto";
    case HostStep::sync: return "sync";
    case HostStep::overlapped: return "overlapped";
    case HostStep::speculative: return "speculative";
  }
  return "?";
}

/// What the engine does to a unit: the events of a Trace.
struct Event {
  enum Kind { gather, release, forward, recompute, backward, reduce } kind;
  size_t unit;
  bool operator==(const Event&) const = default;
  std::string str() const {
    static const char* names[] = {"gather", "release", "forward", "recompute", "backward", "reduce"};
    return std::string(names[kind]) + " " + std::to_string(unit);
  }
};
using Trace = std::vector<Event>;

class Schedule {
 public:
  /// `blocks[u]`: unit u is a transformer block (recomputed by the checkpointing policy); `reads[u]`: the other units
  /// whose parameters unit u reads (a tied head reads the embedding's): those stay gathered while a step runs.
  Schedule(const RecipeRules& rules, std::vector<bool> blocks, const std::vector<std::vector<size_t>>& reads,
           int64_t shard_group)
      : rules_(rules), blocks_(std::move(blocks)), shard_group_(shard_group) {
    for (const auto& r : reads) pinned_.insert(r.begin(), r.end());
  }

  size_t num_units() const { return blocks_.size(); }
  const RecipeRules& rules() const { return rules_; }
  int64_t shard_group() const { return shard_group_; }

  /// Every unit stays gathered (gathered at start and again after each update).
  bool keeps_all() const { return rules_.sharding.keeps_parameters; }
  /// A unit read by another one stays gathered while a step runs.
  bool pinned(size_t u) const { return pinned_.count(u) > 0; }
  /// The unit's forward keeps no graph: its backward recomputes it.
  bool recomputes(size_t u) const {
    return blocks_.at(u) && rules_.checkpointing.recomputes(static_cast<int64_t>(block_index(u)));
  }
  /// Released after its forward (never the last unit, whose backward follows at once, nor a pinned one).
  bool releases_after_forward(size_t u) const {
    return rules_.sharding.releases_after_forward() && u + 1 < num_units() && !pinned(u);
  }
  /// Released after its backward of micro-batch `mb`.
  bool releases_after_backward(MicroBatch mb) const { return rules_.sharding.releases_after_backward(mb.last); }
  /// Released after a use outside a step (Engine::with_gathered).
  bool releases_after_use(size_t u) const { return !keeps_all() && !pinned(u); }
  /// How the gradients of micro-batch `mb` reach the shard.
  GradientPath gradient_path(MicroBatch mb) const {
    if (!mb.first || rules_.offload.host) return GradientPath::through_slice;
    if (shard_group_ == 1) return GradientPath::cast_into_shard;
    // The device's gradient shards are in the master dtype (offload::Rules::grad_dtype).
    const auto& p = rules_.precision;
    return p.reduce == p.master ? GradientPath::reduce_scatter_into_shard : GradientPath::through_slice;
  }
  /// Whether a micro-batch's reduction needs a slice of its own beside the flat buffer (with one rank in the shard
  /// group the flat buffer is the reduced value).
  bool reduces_through_temporary(MicroBatch mb) const {
    return gradient_path(mb) == GradientPath::through_slice && shard_group_ > 1;
  }
  /// The dtype of the gradient shards (offload::Rules::grad_dtype) with `replicas` ranks holding each shard and
  /// `micro_batches` per step (0: not fixed).
  c10::ScalarType grad_dtype(int64_t replicas, int64_t micro_batches) const {
    return rules_.offload.grad_dtype(rules_.precision, shard_group_, replicas, micro_batches);
  }
  /// The dtype of a unit's flat gradient buffer, which the collectives read: the reduce dtype (--reduce-dtype), or,
  /// with one rank per shard group and no replicas (nothing is reduced), the gradient shards' dtype.
  c10::ScalarType flat_dtype(int64_t replicas, int64_t micro_batches) const {
    return shard_group_ == 1 && replicas == 1 ? grad_dtype(replicas, micro_batches) : rules_.precision.reduce;
  }

 private:
  size_t block_index(size_t u) const {
    size_t b = 0;
    for (size_t i = 0; i < u; ++i) b += blocks_[i] ? 1 : 0;
    return b;
  }

  RecipeRules rules_;
  std::vector<bool> blocks_;
  int64_t shard_group_;
  std::set<size_t> pinned_;
};

}  // namespace shardlm::engine
