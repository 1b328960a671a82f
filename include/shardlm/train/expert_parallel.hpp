#pragma once
// Expert parallelism in the trainer (--expert-parallel N): what a run may combine it with, the exchange of rows the
// model's MoE layers use (model/moe_dispatch.hpp) over the expert group (dist/groups.hpp), and the initialization of
// this rank's experts with the values a run without expert parallelism gives them.
#include <ATen/ATen.h>

#include <string>
#include <utility>
#include <vector>

#include "shardlm/core/errors.hpp"
#include "shardlm/dist/communicator.hpp"
#include "shardlm/dist/groups.hpp"
#include "shardlm/engine/unit_model.hpp"
#include "shardlm/model/config.hpp"
#include "shardlm/model/init.hpp"
#include "shardlm/model/moe_dispatch.hpp"
#include "shardlm/train/options.hpp"

namespace shardlm::train {

/// Whether a parameter of the model is a MoE layer's experts' (what expert parallelism splits).
inline bool is_expert_parameter(const std::string& name) { return name.find(".mlp.experts.") != std::string::npos; }

/// Refuses --expert-parallel N where it cannot work: a model without experts, N not dividing the experts or the world,
/// and what this release does not do with it yet (each named).
inline void check_expert_parallel(const TrainOptions& o, const model::ModelConfig& c, int world) {
  const int64_t N = o.dist().expert_parallel();
  if (N == 1) return;
  if (!c.is_moe())
    fail<ConfigError>("--expert-parallel ", N, ": this model (model_type '", c.model_type,
                      "') has no experts; expert parallelism applies to a mixture of experts (Mixtral)");
  if (c.num_experts % N != 0 || world % N != 0)
    fail<ConfigError>("--expert-parallel ", N, " must divide the number of experts (num_local_experts ", c.num_experts,
                      ") and the world size (", world, " ranks): each group of ", N,
                      " consecutive ranks holds every expert, E/N of them per rank");
  const auto refuse = [&](bool set, const char* flag, const char* why) {
    if (set) fail<ConfigError>(flag, " with --expert-parallel ", N, ": ", why);
  };
  refuse(!o.adapter().kind().empty() && o.adapter().kind() != "none", "--adapter",
         "adapters are not built with expert parallelism (LoRA on Mixtral runs with --expert-parallel 1; or train the whole model)");
}

/// The model's exchange of rows over a communicator (the expert group): an all-to-all of variable counts.
class CommunicatorExchange final : public model::ExpertExchange {
 public:
  explicit CommunicatorExchange(dist::Communicator& group) : group_(group) {}
  int size() const override { return group_.size(); }
  int rank() const override { return group_.rank(); }
  at::Tensor exchange(const at::Tensor& rows, const std::vector<int64_t>& recv, const std::vector<int64_t>& send) override {
    auto sizes = rows.sizes().vec();
    sizes[0] = 0;
    for (const auto r : recv) sizes[0] += r;
    auto out = at::empty(sizes, rows.options());  // [sum recv, ...]
    group_.all_to_all(out, rows, recv, send, "expert tokens");
    return out;
  }

 private:
  dist::Communicator& group_;
};

/// This rank's place in expert parallelism over `groups` (inactive with one rank per expert group).
inline model::ExpertShard expert_shard(dist::ProcessGroups& groups, const model::ModelConfig& c) {
  auto& ep = groups.expert();
  if (ep.size() == 1) return {};
  const int64_t count = c.num_experts / ep.size();
  return {c10::make_intrusive<CommunicatorExchange>(ep), ep.rank() * count, count};
}

/// Where this rank's experts lie in the whole model's parameters (checkpoints are read and written in the whole
/// layout: the same files at any --expert-parallel), and the group their shards are over (engine.hpp: Experts).
struct ExpertRanges {
  int64_t first = 0, num_experts = 0;  ///< this rank's first expert of each layer, and the layer's experts (0: inactive)
  int group_size = 1, group_rank = 0;  ///< the ranks the expert shards are over (ProcessGroups::expert_groups' shard)
  int replica = 0;                     ///< this rank among those holding the same expert shard (replica 0 exports)
  bool holds(const std::string& name) const { return num_experts > 0 && is_expert_parameter(name); }
  /// For an expert parameter of local shape `local` (this rank's experts first): the whole parameter's shape and the
  /// element where this rank's part of it starts (the experts are its leading dimension: their elements contiguous).
  std::pair<std::vector<int64_t>, int64_t> whole(std::vector<int64_t> local) const {
    int64_t per_expert = 1;
    for (size_t i = 1; i < local.size(); ++i) per_expert *= local[i];
    local[0] = num_experts;
    return {std::move(local), first * per_expert};
  }
};

/// This rank's ExpertRanges with `groups` and a policy that shards (`sharded`) or replicates the experts' state;
/// inactive without expert parallelism.
inline ExpertRanges expert_ranges(dist::ProcessGroups& groups, const model::ModelConfig& c, bool sharded) {
  if (groups.expert_parallel() == 1) return {};
  const int64_t count = c.num_experts / groups.expert_parallel();
  auto& over = sharded ? groups.expert_data() : groups.expert();  // a group of one when replicated: expert_groups
  return {groups.expert().rank() * count, c.num_experts, sharded ? over.size() : 1, sharded ? over.rank() : 0,
          sharded ? 0 : groups.expert_data().rank()};
}

/// Initializes a unit's parameters as init_parameters does for the whole model (one generator per unit, seeded with
/// `seed`), where the experts' parameters hold only the experts [first, first + count) of `num_experts`: each draws the
/// rows of its experts (model::init_parameter_rows), so that every expert starts as it does without expert parallelism.
inline void init_with_expert_rows(engine::NamedTensors& params, double std, uint64_t seed, int64_t first,
                                  int64_t num_experts) {
  engine::NamedTensors shapes;  // the whole model's shapes (meta tensors: nothing allocated)
  std::vector<model::RowSpan> spans;
  for (size_t i = 0; i < params.size(); ++i) {
    const auto& [name, p] = params[i];
    auto sizes = p.sizes().vec();
    const int64_t cols = p.dim() == 0 ? 1 : p.size(-1), rows = cols ? p.numel() / cols : 0;
    int64_t row0 = 0;
    if (is_expert_parameter(name)) {
      row0 = first * rows / p.size(0);  // rows of one expert: rows / local experts
      sizes[0] = num_experts;
    }
    shapes.emplace_back(name, at::empty(sizes, at::TensorOptions().device(at::kMeta).dtype(p.scalar_type())));
    spans.push_back({i, row0, rows});
  }
  const auto values = model::init_parameter_rows(shapes, std, seed, spans);
  at::NoGradGuard no_grad;
  for (size_t i = 0; i < params.size(); ++i) params[i].second.copy_(values[i].view(params[i].second.sizes()));
}

}  // namespace shardlm::train
