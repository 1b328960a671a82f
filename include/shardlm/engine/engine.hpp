#pragma once
// The sharded execution engine. The model is cut into units (embedding, each block, final norm + head); each
// unit's parameters form a FlatUnit sharded over the shard group. Forward and backward run unit by unit with
// a local autograd graph per unit:
//
//   forward:  for unit i: wait gathered(i); prefetch gather(i+1)
//                         x_in[i] = x.detach().requires_grad_(); x = unit_i(x_in[i])  (no graph when recomputed)
//                         release(i) when the policy reshards after forward
//   backward: for unit i reversed: wait gathered(i); prefetch gather(i-1); recompute if needed
//                         autograd::backward(out_i, grad_out); grad_out = x_in[i].grad()
//                         reduce-scatter grads(i) on the communication stream (accumulating); release(i)
//   side outputs: a unit may leave a small side tensor (a MoE block's router statistics) whose loss depends on
//             every unit's (a load-balancing loss pooled over layers): forward keeps each unit's side (values in
//             side_outputs()); the caller computes their gradients after the forward and passes them to
//             backward(), which back-propagates autograd::backward({out_i, side_i}, {grad_out, side_grad_i})
//             (a recomputed unit recomputes its side too).
//   step:     all-reduce over replicas (DDP / HybridShard), global grad norm (one all-reduce), clip, AdamW
//
// A unit's frozen parameters (the base under LoRA or DoRA, FrozenSpec) form a second group, a FrozenUnit: gathered
// and released with the unit, never reduced or stepped.
//
// Sharding decides gather/release/reduce, checkpointing what is kept, precision the dtypes of gather (compute),
// reduction and master state. The engine never sees a model flavor: only the UnitModel interface.
#include <torch/csrc/autograd/autograd.h>

#include <cmath>
#include <cstdlib>
#include <concepts>
#include <functional>
#include <map>
#include <optional>
#include <set>
#include <string_view>
#include <vector>

#include "shardlm/core/compat.hpp"
#include "shardlm/core/log.hpp"
#include "shardlm/dist/groups.hpp"
#include "shardlm/engine/flat_unit.hpp"
#include "shardlm/engine/frozen_unit.hpp"
#include "shardlm/engine/streams.hpp"
#include "shardlm/optim/clip.hpp"
#include "shardlm/optim/host_adamw.hpp"
#include "shardlm/policy/policies.hpp"

namespace shardlm::engine {

/// A model the engine can drive: units in order, each unit's own parameters, the units whose parameters a unit
/// also reads (a head tied to the embedding), and one unit's forward.
template <class M>
concept UnitModel = requires(M& m, size_t u, const at::Tensor& x) {
  { m.num_units() } -> std::convertible_to<size_t>;
  { m.unit_parameters(u) } -> std::same_as<NamedTensors>;
  { m.unit_reads(u) } -> std::same_as<std::vector<size_t>>;
  { m.forward_unit(u, x) } -> std::same_as<at::Tensor>;
  { m.is_block(u) } -> std::convertible_to<bool>;
};

/// A UnitModel whose units may leave a side output after each forward_unit (undefined when a unit has none).
template <class M>
concept SideOutputModel = requires(M& m, size_t u) {
  { m.take_side(u) } -> std::same_as<at::Tensor>;
};

struct AdamWHyper {
  double beta1 = 0.9, beta2 = 0.95, eps = 1e-8, weight_decay = 0.1;
};

/// How the engine fills each unit u's trainable group: `params(u, params)` fills the unit's parameters, materialized
/// on the device in the master dtype, before this rank keeps its shard (random initialization); or
/// `shard(u, unit, master_shard)` fills this rank's master shard directly, so the whole unit is never materialized
/// (a checkpoint read by ranges). `params` gets the frozen parameters too unless FrozenSpec::rows reads them.
struct UnitInit {
  std::function<void(size_t, NamedTensors&)> params;
  std::function<void(size_t, const FlatUnit&, at::Tensor&)> shard;
  template <class F>
    requires std::invocable<F&, size_t, NamedTensors&>
  UnitInit(F f) : params(std::move(f)) {}
  template <class F>
    requires std::invocable<F&, size_t, const FlatUnit&, at::Tensor&>
  UnitInit(F f) : shard(std::move(f)) {}
};

template <class Recipe>
struct EnginePolicy {
  using Sharding = typename Recipe::Sharding;
  using Precision = typename Recipe::Precision;
  using Checkpointing = typename Recipe::Checkpointing;
  static constexpr bool params_persist = std::is_same_v<Sharding, sharding::NoShard>;
  static constexpr bool offload = Recipe::Offload::to_host;
  static constexpr bool reshard_after_forward =
      std::is_same_v<Sharding, sharding::FullShard> || std::is_same_v<Sharding, sharding::HybridShard>;
  /// The shard group size the policy implies for a world of W ranks on nodes of N ranks (`hybrid` is
  /// --shard-group-size, 0 meaning one node).
  static int shard_group_size(int world, int ranks_per_node, int hybrid) {
    if constexpr (std::is_same_v<Sharding, sharding::NoShard>) return 1;
    else if constexpr (std::is_same_v<Sharding, sharding::HybridShard>) return hybrid > 0 ? hybrid : ranks_per_node;
    else return world;
  }
};

template <UnitModel Model, class Recipe>
class Engine {
  static_assert(engine_supports<Recipe>, SHARDLM_OFFLOAD_NEEDS_SHARDING);
  using P = EnginePolicy<Recipe>;
  using Precision = typename P::Precision;

 public:
  /// Builds the flat units of `model`, whose parameters are placeholders (uninitialized), filled by `init`
  /// (UnitInit: the unit's parameters materialized, or this rank's shard directly). `micro_batches`: the
  /// micro-batches of every optimizer step when it is fixed (0: not known). `frozen` says which parameters are
  /// frozen (none by default), how they are stored and where they come from.
  Engine(Model& model, dist::ProcessGroups& groups, const at::Device& device, const UnitInit& init, AdamWHyper hyper,
         int micro_batches = 0, const FrozenSpec& frozen = {})
      : model_(model), groups_(groups), device_(device), streams_(device), hyper_(hyper) {
    // Offloaded on one rank without replicas, one micro-batch per step: the reduction is the identity and nothing
    // accumulates, so the host gradient keeps the compute dtype with no rounding (mixed-bf16: 2 bytes per
    // parameter instead of 4, what fits full Llama3-8B in the host memory of a one-GPU machine). The host
    // AdamW (optim/host_adamw.hpp) reads bf16 gradients beside fp32 master weights directly.
    if constexpr (P::offload && Precision::compute != Precision::reduce)
      if (micro_batches == 1 && groups.shard().size() == 1 && groups.replicate().size() == 1)
        grad_dtype_ = Precision::compute;
    const size_t n = model_.num_units();
    for (size_t u = 0; u < n; ++u)
      for (auto r : model_.unit_reads(u)) pinned_.insert(r);
    auto master = at::TensorOptions().device(device).dtype(Precision::master);
    auto codec = frozen.codec;
    if (!codec) codec = [](const std::string&, const at::Tensor&) { return plain_codec(Precision::compute); };
    for (size_t u = 0; u < n; ++u) {
      auto params = model_.unit_parameters(u);
      NamedTensors trained, kept;
      for (auto& item : params) (frozen.is_frozen && frozen.is_frozen(item.first) ? kept : trained).push_back(item);
      frozen_.emplace_back(unit_name(u), kept, groups.shard().size(), groups.shard().rank(), codec);
      auto& fixed = frozen_.back();
      SHARDLM_ASSERT(fixed.empty() || frozen.rows || !init.shard, "frozen parameters need FrozenSpec::rows here");
      if (init.shard) {
        units_.emplace_back(unit_name(u), trained, groups.shard().size(), groups.shard().rank());
        auto& unit = units_.back();
        unit.shard_with(master, Precision::compute, grad_dtype_, P::offload,
                        [&](at::Tensor& shard) { init.shard(u, unit, shard); });
      } else {
        auto& materialized = frozen.rows ? trained : params;
        {
          at::NoGradGuard no_grad;
          for (auto& [name, p] : materialized) p.set_data(at::empty(p.sizes(), master));
        }
        init.params(u, materialized);
        units_.emplace_back(unit_name(u), trained, groups.shard().size(), groups.shard().rank());
        units_.back().shard_from_params(master, Precision::compute, grad_dtype_, P::offload);
      }
      if (!fixed.empty())
        fixed.store(frozen.rows ? frozen.rows(u, fixed) : fixed.rows_from_params(), device, Precision::compute, P::offload);
      ready_.emplace_back();
    }
    // The optimizer's tensor lists: views of every shard, split into runs with and without weight decay, each
    // with its own step count (the fused kernel takes one per tensor). On the device one pair of lists covers
    // every unit (two launches); offloaded, each unit has its own pair: the host steps the units one by one,
    // each unit's copy to the device starting while the next is stepped.
    for (auto& unit : units_) {
      if (runs_.empty() || P::offload) runs_.emplace_back();
      auto add = [&](Runs& r, int64_t a, int64_t b) {
        r.params.push_back(unit.master().narrow(0, a, b - a)), r.grads.push_back(unit.grad().narrow(0, a, b - a));
        r.exp_avg.push_back(unit.exp_avg().narrow(0, a, b - a));
        r.exp_avg_sq.push_back(unit.exp_avg_sq().narrow(0, a, b - a));
        r.steps.push_back(at::zeros({}, unit.master().options().dtype(at::kFloat).pinned_memory(false)));
      };
      for (auto [a, b] : unit.decay_runs()) add(runs_.back().decayed, a, b);
      for (auto [a, b] : unit.plain_runs()) add(runs_.back().plain, a, b);
    }
    if constexpr (P::offload) unit_norms_.resize(units_.size());
    if constexpr (P::params_persist) gather_all();
  }

  size_t num_units() const { return units_.size(); }
  const FlatUnit& unit(size_t u) const { return units_.at(u); }
  FlatUnit& unit(size_t u) { return units_.at(u); }
  /// Unit u's frozen group (empty when nothing is frozen).
  const FrozenUnit& frozen(size_t u) const { return frozen_.at(u); }

  /// Runs f() with unit u gathered (its trainable and frozen parameters hold their values), then releases it unless
  /// the policy keeps it.
  template <class F>
  void with_gathered(size_t u, F&& f) {
    ensure_gathered(u);
    f();
    if (!P::params_persist && !pinned_.count(u)) release(u);
  }

  /// Sets trainable parameters of unit u to full values (name -> tensor of the parameter's shape; parameters not
  /// named keep theirs): this rank copies its slices into its master shard. Every rank passes the same values.
  void set_trainable(size_t u, const std::map<std::string, at::Tensor>& values) {
    at::NoGradGuard no_grad;
    auto& unit = units_.at(u);
    unit.for_each_in_shard([&](const Slot& s, int64_t in_param, int64_t in_shard, int64_t count) {
      const auto it = values.find(s.name);
      if (it == values.end()) return;
      SHARDLM_ASSERT(it->second.numel() == s.numel, "value of ", s.name, " has ", it->second.numel(), " elements");
      unit.master().narrow(0, in_shard, count).copy_(it->second.reshape({-1}).narrow(0, in_param, count));
    });
    unit.refresh_device_shard();
    if (unit.is_gathered()) {
      streams_.on_comm([&] { unit.gather(groups_.shard()); });
      streams_.join();
    }
  }

  /// Optimizer steps taken (the AdamW step count of every shard).
  int64_t optimizer_steps() const { return optimizer_steps_; }

  /// After this rank's master shards and AdamW state were replaced (a resumed checkpoint): sets the step count
  /// and refreshes what derives from the masters (device shards under offload, gathered parameters).
  void state_loaded(int64_t optimizer_steps) {
    optimizer_steps_ = optimizer_steps;
    for (auto& pair : runs_)
      for (auto* r : {&pair.decayed, &pair.plain})
        for (auto& s : r->steps) s.fill_(static_cast<double>(optimizer_steps));
    if constexpr (P::offload)
      for (auto& u : units_) u.refresh_device_shard();
    if constexpr (P::params_persist) gather_all();
  }
  dist::ProcessGroups& groups() { return groups_; }

  /// Starts an optimizer step: the first micro-batch's backward overwrites the gradient shards (every unit is
  /// reduced in every backward), later ones add to them.
  void begin_step() {
    first_micro_batch_ = true;
    if constexpr (P::offload) unit_norms_.assign(units_.size(), at::Tensor());
  }

  /// Runs every unit forward on `input` (token ids); returns the last unit's output with its local graph.
  at::Tensor forward(const at::Tensor& input) {
    const size_t n = units_.size();
    x_in_.assign(n, at::Tensor());
    out_.assign(n, at::Tensor());
    rng_.assign(n, at::Tensor());
    side_.assign(n, at::Tensor());
    side_values_.assign(n, at::Tensor());
    at::Tensor x = input;
    for (size_t u = 0; u < n; ++u) {
      ensure_gathered(u);
      if (u + 1 < n) prefetch(u + 1);
      x_in_[u] = u == 0 ? x : x.detach().requires_grad_(true);
      if (recompute(u)) {
        at::NoGradGuard no_grad;
        rng_[u] = generator().get_state();  // the recompute draws the same dropout masks
        x = model_.forward_unit(u, x_in_[u]);
        side_values_[u] = take_side(u);
      } else {
        x = model_.forward_unit(u, x_in_[u]);
        if (u + 1 < n) out_[u] = x;  // the last unit's backward starts from the loss, not from its output
        side_[u] = take_side(u);
        if (side_[u].defined()) side_values_[u] = side_[u].detach();
      }
      trace("forward", u);
      if (P::reshard_after_forward && u + 1 < n && !pinned_.count(u)) release(u);
    }
    return x;
  }

  /// Every unit's side output of the last forward (detached; undefined for units without one).
  const std::vector<at::Tensor>& side_outputs() const { return side_values_; }

  /// Backward from `loss` (a scalar of the last unit's graph, already scaled) through every unit; reduces each
  /// unit's gradients into its shard as soon as they are complete. `last_micro_batch` ends the accumulation.
  /// `side_grads` (empty, or one per unit, undefined where none): the gradients of the side outputs.
  void backward(const at::Tensor& loss, bool last_micro_batch, const std::vector<at::Tensor>& side_grads = {}) {
    SHARDLM_ASSERT(side_grads.empty() || side_grads.size() == units_.size(), "side_grads has ", side_grads.size(),
                   " entries for ", units_.size(), " units");
    const size_t n = units_.size();
    // Offload without accumulation: the device sums the squared gradient slices as they are reduced.
    device_norm_ = P::offload && first_micro_batch_ && last_micro_batch;
    at::Tensor grad_out;
    for (size_t u = n; u-- > 0;) {
      ensure_gathered(u);
      if (u > 0) prefetch(u - 1);
      if (recompute(u)) {
        auto gen = generator();
        const auto now = gen.get_state();
        gen.set_state(rng_[u]);
        out_[u] = model_.forward_unit(u, x_in_[u]);
        side_[u] = take_side(u);
        gen.set_state(now);
      }
      std::vector<at::Tensor> outputs, grads;
      if (u + 1 == n) outputs.push_back(loss), grads.push_back(at::ones_like(loss));
      else if (out_[u].requires_grad()) outputs.push_back(out_[u]), grads.push_back(grad_out);  // not: a frozen embedding
      if (u < side_grads.size() && side_grads[u].defined() && side_[u].defined() && side_[u].requires_grad())
        outputs.push_back(side_[u]), grads.push_back(side_grads[u]);
      if (!outputs.empty()) torch::autograd::backward(outputs, grads);
      grad_out = u > 0 ? x_in_[u].grad() : at::Tensor();
      out_[u] = at::Tensor(), x_in_[u] = at::Tensor(), side_[u] = at::Tensor();
      reduce(u);
      trace("backward", u);
      if (!P::params_persist && (P::reshard_after_forward || last_micro_batch)) release(u);
    }
    if (!P::offload && last_micro_batch && groups_.replicate().size() > 1) {
      streams_.on_comm([&] {
        for (auto& unit : units_)
          if (!unit.empty()) groups_.replicate().all_reduce(unit.grad(), dist::Reduce::Sum, unit.name().c_str());
      });
    }
    streams_.join();
    // Offload: the host waits for the gradient copies only when it reads them: staged micro-batches are added
    // now (the next micro-batch reuses the staging buffers), and the optimizer reads after the last one.
    if constexpr (P::offload) {
      if (last_micro_batch || !first_micro_batch_) {
        streams_.synchronize();
        for (auto& unit : units_) unit.finish_host_grads();
      }
    }
    first_micro_batch_ = false;
  }

  /// The global L2 norm of the gradients (one all-reduce over the shard group). When it exceeds max_norm
  /// (> 0), the next optimizer_step() scales the gradients by max_norm / (norm + 1e-6) inside the fused
  /// kernel (no pass of its own). Returns the norm.
  double clip_grad_norm(double max_norm) {
    at::Tensor sq;
    if (device_norm_) {
      // Each unit's norm was taken on the device as its slice was reduced; combined as optim::global_norm combines
      // the host's, so that the clipping coefficient does not depend on where the gradients are.
      // A unit without trainable parameters (a LoRA run's embedding) counts as 0, as its empty host shard does.
      const auto zero = at::zeros({}, at::TensorOptions().device(device_).dtype(at::kFloat));
      std::vector<at::Tensor> norms;
      for (const auto& t : unit_norms_) norms.push_back(t.defined() ? t : zero);
      sq = at::stack(norms).norm().square().reshape({1});
    } else {
      std::vector<at::Tensor> grads;
      for (auto& u : units_) grads.push_back(u.grad());
      sq = optim::global_norm(grads).square().reshape({1});  // this rank's shards
    }
    if (groups_.shard().size() > 1) {
      sq = sq.to(device_);  // offloaded gradients are on the host; NCCL reduces device tensors
      groups_.shard().all_reduce(sq, dist::Reduce::Sum, "grad norm");
    }
    const double norm = std::sqrt(sq.item<double>());
    clip_coef_ = max_norm > 0 && std::isfinite(norm) && norm > max_norm ? max_norm / (norm + 1e-6) : 1.0;
    return norm;
  }

  /// AdamW on this rank's shards: two fused launches (LibTorch's kernel, on the device or the host), runs with
  /// decoupled weight decay (matrices and embeddings) and runs without; clipping enters as the kernel's gradient
  /// scale. Offloaded bf16 gradients beside fp32 master weights (see the constructor) go through the host AdamW
  /// of optim/host_adamw.hpp instead, which reads them as they are. Then the device shards of an offloaded run
  /// and the parameters of the persistent policies are refreshed.
  void optimizer_step(double lr) {
    at::NoGradGuard no_grad;
    std::optional<at::Tensor> scale;
    if (clip_coef_ != 1.0)  // the kernel divides gradients by the scale
      scale = at::full({}, 1.0 / clip_coef_, units_.front().master().options().dtype(at::kFloat).pinned_memory(false));
    auto adamw = [&](Runs& g, double weight_decay) {
      if (g.params.empty()) return;
      if (grad_dtype_ != Precision::master) {
        const optim::AdamWStep s{lr, hyper_.beta1, hyper_.beta2, weight_decay, hyper_.eps, optimizer_steps_ + 1, clip_coef_};
        for (size_t k = 0; k < g.params.size(); ++k)
          optim::host_adamw(g.params[k], g.grads[k], g.exp_avg[k], g.exp_avg_sq[k], s);
      } else {
        compat::fused_adamw(g.params, g.grads, g.exp_avg, g.exp_avg_sq, g.steps, lr, hyper_.beta1, hyper_.beta2,
                            weight_decay, hyper_.eps, scale);
      }
    };
    for (size_t i = 0; i < runs_.size(); ++i) {
      adamw(runs_[i].decayed, hyper_.weight_decay);
      adamw(runs_[i].plain, 0.0);
      // Offloaded: unit i's device shard is refreshed (an asynchronous copy from pinned memory) while the host
      // steps the next unit.
      if constexpr (P::offload) units_[i].refresh_device_shard();
    }
    clip_coef_ = 1.0;
    ++optimizer_steps_;
    if constexpr (P::params_persist) gather_all();
  }

  /// Unit u's full master weights (every rank takes part; collective over the shard group).
  NamedTensors full_master(size_t u) { return units_.at(u).full_master(groups_.shard()); }

 private:
  std::string unit_name(size_t u) const {
    return u == 0 ? "embedding" : model_.is_block(u) ? detail::cat("block ", u - 1) : detail::cat("unit ", u);
  }

  /// SHARDLM_MEMORY_TRACE=1: after each unit's forward and backward, rank 0 logs the CUDA allocator's current
  /// and peak bytes (what the memory planner predicts, train/memory_plan.hpp).
  void trace(const char* phase, size_t u) {
    if (!trace_) return;
    const auto mem = compat::cuda_memory(device_.index());
    constexpr double gib = 1024.0 * 1024.0 * 1024.0;
    log::info("shardlm: memory after ", phase, " of ", unit_name(u), ": allocated ", mem.allocated / gib, " GiB, peak ",
              mem.peak_allocated / gib, " GiB");
  }

  at::Tensor take_side(size_t u) {
    if constexpr (SideOutputModel<Model>) return model_.take_side(u);
    else return {};
  }

  bool recompute(size_t u) const {
    constexpr int every = P::Checkpointing::every;
    if constexpr (every == 0) return false;
    else return model_.is_block(u) && (u - 1) % every == 0;
  }

  /// Starts gathering unit u on the communication stream (allocating on compute) unless it is there or coming.
  void prefetch(size_t u) {
    auto& unit = units_[u];
    auto& fixed = frozen_[u];
    if (unit.is_gathered()) return;
    unit.allocate();
    fixed.allocate();
    streams_.on_comm([&] {
      unit.gather(groups_.shard());
      fixed.gather(groups_.shard());
    });
    ready_[u] = streams_.mark_comm();
  }

  void ensure_gathered(size_t u) {
    prefetch(u);
    streams_.compute_waits(ready_[u]);
    ready_[u] = {};
  }

  void release(size_t u) {
    if (units_[u].is_gathered()) units_[u].release(), frozen_[u].release();
  }

  at::Generator generator() const { return at::globalContext().defaultGenerator(device_); }

  /// Gathers every unit again from the master shards (the persistent policies, after each update).
  void gather_all() {
    for (size_t u = 0; u < units_.size(); ++u) {
      auto& unit = units_[u];
      auto& fixed = frozen_[u];  // gathered once: it never changes
      if (!unit.is_gathered()) unit.allocate();
      const bool frozen_too = !fixed.is_gathered();
      if (frozen_too) fixed.allocate();
      streams_.on_comm([&] {
        unit.gather(groups_.shard());
        if (frozen_too) fixed.gather(groups_.shard());
      });
    }
    streams_.join();
  }

  void reduce(size_t u) {
    auto& unit = units_[u];
    streams_.on_comm([&] {
      // One rank in the shard group, first micro-batch: the gradients are cast straight into the shard.
      const bool direct = unit.grads_into_shard(groups_.shard(), grad_dtype_, first_micro_batch_);
      const auto flat = unit.take_grads(grad_dtype_, [&](const at::Tensor& g) { streams_.used_by_comm(g); }, direct);
      if (direct) return;  // replicas, if any, all-reduce the shards after the last micro-batch
      unit.reduce_into_shard(groups_.shard(), flat, groups_.replicate(), first_micro_batch_,
                             device_norm_ ? &unit_norms_[u] : nullptr);
    });
  }

  Model& model_;
  dist::ProcessGroups& groups_;
  at::Device device_;
  Streams streams_;
  AdamWHyper hyper_;
  std::vector<FlatUnit> units_;
  std::vector<FrozenUnit> frozen_;
  std::vector<Streams::Marker> ready_;
  std::set<size_t> pinned_;
  std::vector<at::Tensor> x_in_, out_, rng_;  // rng_: generator state before a recomputed unit's forward
  std::vector<at::Tensor> side_, side_values_;  // each unit's side output: with its graph, and detached
  bool first_micro_batch_ = true;
  struct Runs {
    std::vector<at::Tensor> params, grads, exp_avg, exp_avg_sq, steps;
  };
  struct RunPair {
    Runs decayed, plain;
  };
  std::vector<RunPair> runs_;  // one pair for every unit, or (offload) one per unit
  std::vector<at::Tensor> unit_norms_;  // offload: each unit's gradient norm, taken on the device
  at::ScalarType grad_dtype_ = Precision::reduce;  // of the gradient shards (see the constructor)
  bool device_norm_ = false;   // this step's backward sums it (offload, one micro-batch)
  double clip_coef_ = 1.0;
  int64_t optimizer_steps_ = 0;
  bool trace_ = device_.is_cuda() && groups_.world().rank() == 0 && std::getenv("SHARDLM_MEMORY_TRACE") &&
                std::string_view(std::getenv("SHARDLM_MEMORY_TRACE")) == "1";
};

}  // namespace shardlm::engine
