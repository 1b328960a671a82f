#pragma once
// The sharded execution engine. The model is cut into units (embedding, each block, final norm + head); each
// unit's parameters form a FlatUnit sharded over the shard group. Forward and backward run unit by unit with
// a local autograd graph per unit, as the Schedule (engine/schedule.hpp) says:
//
//   forward:  for unit i: wait gathered(i); prefetch gather(i+1)
//                         x_in[i] = x.detach().requires_grad_(); x = unit_i(x_in[i])  (no graph when recomputed)
//                         release(i) when the policy reshards after forward
//   backward: for unit i reversed: wait gathered(i); prefetch gather(i-1); recompute if needed
//                         autograd::backward(out_i, grad_out); grad_out = x_in[i].grad()
//                         reduce grads(i) into the shard on the communication stream (the storage's way); release(i)
//   side outputs: a unit may leave a small side tensor (a MoE block's router statistics) whose loss depends on
//             every unit's (a load-balancing loss pooled over layers): forward keeps each unit's side (values in
//             side_outputs()); the caller computes their gradients after the forward and passes them to
//             backward(), which back-propagates autograd::backward({out_i, side_i}, {grad_out, side_grad_i})
//             (a recomputed unit recomputes its side too).
//   step:     global grad norm (one all-reduce), clip, AdamW where the offload policy's storage keeps the state
//
// A unit's frozen parameters (the base under LoRA or DoRA, FrozenSpec) form a second group, a FrozenUnit: gathered
// and released with the unit, never reduced or stepped.
//
// Expert parallelism (ProcessGroups::expert_parallel() > 1, EngineOptions::is_expert): a unit's experts (this rank's
// share of them) form a second trainable group, a FlatUnit of its own over the expert groups
// (ProcessGroups::expert_groups: sharded over the ranks holding the same experts when the policy shards, replicated
// over them when it does not), with a storage of its own: gathered, released and reduced with the unit by the same
// Schedule answers, stepped with it. The gradient norm counts each of its elements once (clip_grad_norm).
//
// The engine is compiled once per program: it reads the recipe's rules (RecipeRules) through its Schedule and its
// ShardStorage (engine/offload.hpp), and the model through the UnitModel interface; it never sees a model flavor.
#include <torch/csrc/autograd/autograd.h>

#include <cmath>
#include <concepts>
#include <functional>
#include <map>
#include <memory>
#include <optional>
#include <string_view>
#include <type_traits>
#include <vector>

#include "shardlm/core/compat.hpp"
#include "shardlm/core/log.hpp"
#include "shardlm/dist/groups.hpp"
#include "shardlm/engine/flat_unit.hpp"
#include "shardlm/engine/frozen_unit.hpp"
#include "shardlm/engine/offload.hpp"
#include "shardlm/engine/schedule.hpp"
#include "shardlm/engine/streams.hpp"
#include "shardlm/engine/unit_model.hpp"
#include "shardlm/optim/clip.hpp"
#include "shardlm/policy/policies.hpp"

namespace shardlm::engine {

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

/// The engine's run-time options besides the recipe.
struct EngineOptions {
  /// AdamW's hyperparameters (lr comes with each step).
  SHARDLM_ARG(optim::AdamWOptions, adamw);
  /// Micro-batches of every optimizer step when fixed (0: not known).
  SHARDLM_ARG(int64_t, micro_batches) = 0;
  /// Which parameters are frozen (none by default), how they are stored and where they come from.
  SHARDLM_ARG(FrozenSpec, frozen);
  /// After each unit's forward and backward, rank 0 logs the CUDA allocator's current and peak bytes (what the
  /// memory planner predicts, train/memory_plan.hpp).
  SHARDLM_ARG(bool, memory_trace) = false;
  /// Every gather, release, forward, recompute, backward and reduction, in order (tests compare it with the
  /// planner's replay).
  SHARDLM_ARG(std::add_pointer_t<Trace>, trace) = nullptr;
  /// Offloaded: when the host steps (engine/offload.hpp); automatic here means overlapped (the trainer resolves
  /// automatic by the host's memory before it makes the engine).
  SHARDLM_ARG(HostStep, host_step) = HostStep::automatic;
  /// Expert parallelism: which trainable parameters are this rank's experts (a second group of their unit over the
  /// expert groups when the groups have ProcessGroups::expert_parallel() > 1).
  SHARDLM_ARG(std::function<bool(const std::string&)>, is_expert);
};

class Engine {
 public:
  /// Builds the flat units of `model`, whose parameters are placeholders (uninitialized), filled by `init`
  /// (UnitInit: the unit's parameters materialized, or this rank's shard directly), for the recipe `rules`.
  Engine(UnitModel& model, dist::ProcessGroups& groups, const at::Device& device, const RecipeRules& rules,
         const UnitInit& init, EngineOptions options = {})
      : model_(model), groups_(groups), device_(device), streams_(device), options_(std::move(options)),
        schedule_(rules, blocks_of(model), reads_of(model), groups.shard().size()),
        flat_dtype_(schedule_.flat_dtype(groups.replicate().size(), options_.micro_batches())),
        storage_(make_storage(rules.offload, device, rules.precision,
                              schedule_.grad_dtype(groups.replicate().size(), options_.micro_batches()),
                              options_.host_step() == HostStep::automatic ? HostStep::overlapped : options_.host_step())) {
    if (!engine_serves(rules.sharding, rules.offload))
      fail<ConfigError>("--offload ", rules.offload.name, " with --sharding ", rules.sharding.name, ": ",
                        SHARDLM_OFFLOAD_NEEDS_SHARDING);
    model_.set_checkpointing(rules.checkpointing);  // what a kept block saves (the recomputed ones: schedule_)
    model_.set_precision(rules.precision);          // how the blocks' projections multiply (float8 or not)
    if (groups.expert_parallel() > 1 && options_.is_expert()) {
      const auto host_step = options_.host_step() == HostStep::automatic ? HostStep::overlapped : options_.host_step();
      experts_ = std::make_unique<Experts>(groups.expert_groups(rules.sharding.shards_state()), rules, blocks_of(model),
                                           reads_of(model), device, options_.micro_batches(), host_step);
    }
    const auto& precision = rules.precision;
    const auto& frozen = options_.frozen();
    const size_t n = model_.num_units();
    auto master = at::TensorOptions().device(device).dtype(precision.master);
    auto codec = frozen.codec;
    if (!codec) codec = [c = precision.compute](const std::string&, const at::Tensor&) { return plain_codec(c); };
    const bool on_host = rules.offload.host;
    for (size_t u = 0; u < n; ++u) {
      auto params = model_.unit_parameters(u);
      NamedTensors trained, kept, expert;
      for (auto& item : params)
        (frozen.is_frozen && frozen.is_frozen(item.first) ? kept
         : experts_ && options_.is_expert()(item.first)  ? expert
                                                         : trained)
            .push_back(item);
      frozen_.emplace_back(unit_name(u), kept, groups.shard().size(), groups.shard().rank(), codec);
      auto& fixed = frozen_.back();
      SHARDLM_ASSERT(fixed.empty() || frozen.rows || !init.shard, "frozen parameters need FrozenSpec::rows here");
      if (init.shard) {
        units_.emplace_back(unit_name(u), trained, groups.shard().size(), groups.shard().rank());
        auto& unit = units_.back();
        storage_->place(unit, [&](at::Tensor& shard) { init.shard(u, unit, shard); });
      } else {
        auto& materialized = frozen.rows ? trained : params;
        {
          at::NoGradGuard no_grad;
          for (auto& [name, p] : materialized) p.set_data(at::empty(p.sizes(), master));
        }
        init.params(u, materialized);
        units_.emplace_back(unit_name(u), trained, groups.shard().size(), groups.shard().rank());
        auto& unit = units_.back();
        storage_->place(unit, [&](at::Tensor& shard) { unit.copy_params_into(shard); });
      }
      if (experts_) {  // one per unit (empty where a unit has no experts): the storage indexes them as the units
        auto& g = experts_->groups;
        experts_->units.emplace_back(unit_name(u) + " experts", expert, g.shard().size(), g.shard().rank());
        auto& mine = experts_->units.back();
        experts_->storage->place(mine, [&](at::Tensor& shard) {
          if (init.shard) init.shard(u, mine, shard);
          else mine.copy_params_into(shard);
        });
      }
      if (!fixed.empty())
        fixed.store(frozen.rows ? frozen.rows(u, fixed) : fixed.rows_from_params(), device, precision.compute, on_host);
      ready_.emplace_back();
    }
    storage_->prepare(units_);
    if (experts_) experts_->storage->prepare(experts_->units);
    if (schedule_.keeps_all()) gather_all();
  }

  /// An offloaded update still running on the host's stepping thread reads the units: it ends first.
  ~Engine() {
    try {
      settle();
    } catch (const std::exception& e) {
      log::warn("shardlm: the last offloaded update failed while the engine closed: ", e.what());
    }
  }
  Engine(const Engine&) = delete;
  Engine& operator=(const Engine&) = delete;

  size_t num_units() const { return units_.size(); }
  const FlatUnit& unit(size_t u) const { return units_.at(u); }
  FlatUnit& unit(size_t u) { return units_.at(u); }
  /// Unit u's frozen group (empty when nothing is frozen).
  const FrozenUnit& frozen(size_t u) const { return frozen_.at(u); }
  /// Expert parallelism: unit u's group of this rank's experts (empty for a unit without experts); null without it.
  const FlatUnit* experts(size_t u) const { return experts_ ? &experts_->units.at(u) : nullptr; }
  FlatUnit* experts(size_t u) { return experts_ ? &experts_->units.at(u) : nullptr; }
  /// Expert parallelism: the groups the experts' shards are over (ProcessGroups::expert_groups); null without it.
  dist::ProcessGroups* expert_groups() { return experts_ ? &experts_->groups : nullptr; }
  /// Unit u's parameters' names in the model's order (how a checkpoint lays out a unit without expert parallelism).
  std::vector<std::string> parameter_names(size_t u) {
    std::vector<std::string> out;
    for (const auto& item : model_.unit_parameters(u)) out.push_back(item.first);
    return out;
  }
  const Schedule& schedule() const { return schedule_; }
  const RecipeRules& rules() const { return schedule_.rules(); }

  /// Runs f() with unit u gathered (its trainable and frozen parameters hold their values), then releases it unless
  /// the policy keeps it.
  template <class F>
  void with_gathered(size_t u, F&& f) {
    ensure_gathered(u);
    f();
    if (schedule_.releases_after_use(u)) release(u);
  }

  /// Sets trainable parameters of unit u to full values (name -> tensor of the parameter's shape; parameters not
  /// named keep theirs): this rank copies its slices into its master shard. Every rank passes the same values.
  void set_trainable(size_t u, const std::map<std::string, at::Tensor>& values) {
    settle();
    at::NoGradGuard no_grad;
    auto& unit = units_.at(u);
    unit.for_each_in_shard([&](const Slot& s, int64_t in_param, int64_t in_shard, int64_t count) {
      const auto it = values.find(s.name);
      if (it == values.end()) return;
      SHARDLM_ASSERT(it->second.numel() == s.numel, "value of ", s.name, " has ", it->second.numel(), " elements");
      unit.master().narrow(0, in_shard, count).copy_(it->second.reshape({-1}).narrow(0, in_param, count));
    });
    storage_->refresh(unit);
    if (unit.is_gathered()) {
      streams_.on_comm([&] { unit.gather(groups_.shard()); });
      streams_.join();
    }
  }

  /// Optimizer steps taken (the AdamW step count of every shard).
  int64_t optimizer_steps() const { return optimizer_steps_; }
  /// The device the engine computes on (collectives take tensors there).
  const at::Device& device() const { return device_; }

  /// After this rank's master shards and AdamW state were replaced (a resumed checkpoint): sets the step count
  /// and refreshes what derives from the masters (device copies under offload, gathered parameters).
  void state_loaded(int64_t optimizer_steps) {
    settle();
    optimizer_steps_ = optimizer_steps;
    storage_->set_step_count(optimizer_steps);
    for (auto& u : units_) storage_->refresh(u);
    if (experts_) {
      experts_->storage->set_step_count(optimizer_steps);
      for (auto& u : experts_->units) experts_->storage->refresh(u);
    }
    if (schedule_.keeps_all()) gather_all();
  }
  dist::ProcessGroups& groups() { return groups_; }

  /// Starts an optimizer step at learning rate `lr`: the first micro-batch's backward overwrites the gradient shards
  /// (every unit is reduced in every backward), later ones add to them. (An offloaded step may start on the host
  /// before the backward ends: it needs the rate now.)
  void begin_step(double lr = 0) {
    micro_batch_ = MicroBatch{};
    lr_ = lr;
    storage_->begin_step(units_, options_.adamw(), StepScalars{lr, 1.0, optimizer_steps_ + 1});
    if (experts_) experts_->storage->begin_step(experts_->units, options_.adamw(), StepScalars{lr, 1.0, optimizer_steps_ + 1});
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
      note(Event::forward, u);
      if (schedule_.recomputes(u)) {
        at::NoGradGuard no_grad;
        rng_[u] = generator().get_state();  // the recompute draws the same dropout masks
        x = model_.forward_unit(u, x_in_[u]);
        side_values_[u] = model_.take_side(u);
      } else {
        x = model_.forward_unit(u, x_in_[u]);
        if (u + 1 < n) out_[u] = x;  // the last unit's backward starts from the loss, not from its output
        side_[u] = model_.take_side(u);
        if (side_[u].defined()) side_values_[u] = side_[u].detach();
      }
      memory_trace("forward", u);
      if (schedule_.releases_after_forward(u)) release(u);
    }
    return x;
  }

  /// Every unit's side output of the last forward (detached; undefined for units without one).
  const std::vector<at::Tensor>& side_outputs() const { return side_values_; }

  /// Backward from `loss` (a scalar of the last unit's graph, already scaled) through every unit; reduces each
  /// unit's gradients into its shard as soon as they are complete. `last` ends the step's accumulation.
  /// `side_grads` (empty, or one per unit, undefined where none): the gradients of the side outputs.
  void backward(const at::Tensor& loss, bool last, const std::vector<at::Tensor>& side_grads = {}) {
    SHARDLM_ASSERT(side_grads.empty() || side_grads.size() == units_.size(), "side_grads has ", side_grads.size(),
                   " entries for ", units_.size(), " units");
    micro_batch_.last = last;
    const size_t n = units_.size();
    at::Tensor grad_out;
    for (size_t u = n; u-- > 0;) {
      ensure_gathered(u);
      if (u > 0) prefetch(u - 1);
      if (schedule_.recomputes(u)) {
        note(Event::recompute, u);
        auto gen = generator();
        const auto now = gen.get_state();
        gen.set_state(rng_[u]);
        out_[u] = model_.forward_unit(u, x_in_[u]);
        side_[u] = model_.take_side(u);
        gen.set_state(now);
      }
      note(Event::backward, u);
      std::vector<at::Tensor> outputs, grads;
      if (u + 1 == n) outputs.push_back(loss), grads.push_back(at::ones_like(loss));
      else if (out_[u].requires_grad()) outputs.push_back(out_[u]), grads.push_back(grad_out);  // not: a frozen embedding
      if (u < side_grads.size() && side_grads[u].defined() && side_[u].defined() && side_[u].requires_grad())
        outputs.push_back(side_[u]), grads.push_back(side_grads[u]);
      if (!outputs.empty()) torch::autograd::backward(outputs, grads);
      grad_out = u > 0 ? x_in_[u].grad() : at::Tensor();
      out_[u] = at::Tensor(), x_in_[u] = at::Tensor(), side_[u] = at::Tensor();
      reduce(u);
      memory_trace("backward", u);
      if (schedule_.releases_after_backward(micro_batch_)) release(u);
    }
    storage_->after_backward(units_, groups_, streams_, micro_batch_);
    if (experts_) experts_->storage->after_backward(experts_->units, experts_->groups, streams_, micro_batch_);
    micro_batch_.first = false;
  }

  /// The global L2 norm of the gradients (one all-reduce over the shard group; with expert parallelism the experts'
  /// squares are summed over the ranks holding the same experts and then over the expert group, so that each
  /// element counts once). When it exceeds max_norm
  /// (> 0), the next optimizer_step() scales the gradients by max_norm / (norm + 1e-6) inside the AdamW kernel (no
  /// pass of its own). Returns the norm.
  double clip_grad_norm(double max_norm) {
    at::Tensor sq = storage_->grad_norm_sq(units_);
    if (groups_.shard().size() > 1) {
      sq = sq.to(device_);  // offloaded gradients are on the host; NCCL reduces device tensors
      groups_.shard().all_reduce(sq, dist::Reduce::Sum, "grad norm");
    }
    if (experts_) {
      auto& g = experts_->groups;
      at::Tensor esq = experts_->storage->grad_norm_sq(experts_->units).to(device_);
      if (g.shard().size() > 1) g.shard().all_reduce(esq, dist::Reduce::Sum, "expert grad norm");
      g.expert().all_reduce(esq, dist::Reduce::Sum, "expert grad norm");
      sq = sq.to(device_) + esq;
    }
    const double norm = std::sqrt(sq.item<double>());
    clip_coef_ = max_norm > 0 && std::isfinite(norm) && norm > max_norm ? max_norm / (norm + 1e-6) : 1.0;
    return norm;
  }

  /// AdamW on this rank's shards at begin_step's rate, where the storage keeps them (engine/offload.hpp), clipping
  /// entering as the gradients' scale; then the parameters of the persistent policies are gathered again. An
  /// offloaded step may go on after this returns: each unit's next gather waits for its update.
  void optimizer_step() {
    storage_->step(units_, StepScalars{lr_, clip_coef_, optimizer_steps_ + 1});
    if (experts_) experts_->storage->step(experts_->units, StepScalars{lr_, clip_coef_, optimizer_steps_ + 1});
    clip_coef_ = 1.0;
    ++optimizer_steps_;
    if (schedule_.keeps_all()) gather_all();
  }

  /// The step is dropped (a non-finite gradient norm): the state stays as it was, whatever was stepped ahead.
  void skip_step() {
    storage_->skip(units_);
    if (experts_) experts_->storage->skip(experts_->units);
    clip_coef_ = 1.0;
  }

  /// Waits until every update is done: the shards may then be read or written directly (checkpoints, exports).
  void settle() {
    storage_->settle();
    if (experts_) experts_->storage->settle();
  }

  /// Offloaded steps whose speculative host update was redone or dropped (HostStep::speculative), since the start.
  int64_t redone_steps() const { return storage_->redone(); }  // the experts' storage redoes the same steps
  /// Offloaded: the host AdamW's seconds and bytes since the start.
  ShardStorage::HostWork host_work() const {
    auto w = storage_->host_work();
    if (experts_) w.seconds += experts_->storage->host_work().seconds, w.bytes += experts_->storage->host_work().bytes;
    return w;
  }

  /// Unit u's full master weights (every rank takes part; collective over the shard group).
  NamedTensors full_master(size_t u) {
    settle();
    return units_.at(u).full_master(groups_.shard());
  }

  /// Expert parallelism: unit u's experts, every expert of the layer (gathered over the ranks holding the same experts,
  /// then over the expert group, whose rank r holds experts [r E/N, (r + 1) E/N)); every rank takes part. Empty without.
  NamedTensors full_experts(size_t u) {
    if (!experts_) return {};
    settle();
    auto& g = experts_->groups;
    NamedTensors out;
    for (auto& [name, local] : experts_->units.at(u).full_master(g.shard())) {
      auto sizes = local.sizes().vec();
      sizes[0] *= g.expert().size();
      auto full = at::empty(sizes, local.options());
      g.expert().all_gather(full, local.contiguous(), "experts");
      out.emplace_back(name, std::move(full));
    }
    return out;
  }

 private:
  static std::vector<bool> blocks_of(const UnitModel& m) {
    std::vector<bool> out;
    for (size_t u = 0; u < m.num_units(); ++u) out.push_back(m.is_block(u));
    return out;
  }
  static std::vector<std::vector<size_t>> reads_of(const UnitModel& m) {
    std::vector<std::vector<size_t>> out;
    for (size_t u = 0; u < m.num_units(); ++u) out.push_back(m.unit_reads(u));
    return out;
  }

  std::string unit_name(size_t u) const {
    return u == 0 ? "embedding" : model_.is_block(u) ? detail::cat("block ", u - 1) : detail::cat("unit ", u);
  }

  void note(Event::Kind kind, size_t u) {
    if (options_.trace()) options_.trace()->push_back({kind, u});
  }

  /// EngineOptions::memory_trace: rank 0 logs the CUDA allocator's current and peak bytes.
  void memory_trace(const char* phase, size_t u) {
    if (!options_.memory_trace() || !device_.is_cuda() || groups_.world().rank() != 0) return;
    const auto mem = compat::cuda_memory(device_.index());
    constexpr double gib = 1024.0 * 1024.0 * 1024.0;
    log::info("shardlm: memory after ", phase, " of ", unit_name(u), ": allocated ", mem.allocated / gib, " GiB, peak ",
              mem.peak_allocated / gib, " GiB");
  }

  /// Starts gathering unit u on the communication stream (allocating on compute) unless it is there or coming.
  void prefetch(size_t u) {
    auto& unit = units_[u];
    auto& fixed = frozen_[u];
    if (unit.is_gathered()) return;
    note(Event::gather, u);
    storage_->await(u, streams_);  // its update of the last step is done (offloaded: it may still be running)
    if (experts_) experts_->storage->await(u, streams_);
    unit.allocate();
    fixed.allocate();
    if (experts_) experts_->units[u].allocate();
    streams_.on_comm([&] {
      unit.gather(groups_.shard());
      fixed.gather(groups_.shard());
      if (experts_) experts_->units[u].gather(experts_->groups.shard());
    });
    ready_[u] = streams_.mark_comm();
  }

  void ensure_gathered(size_t u) {
    prefetch(u);
    streams_.compute_waits(ready_[u]);
    ready_[u] = {};
  }

  void release(size_t u) {
    if (!units_[u].is_gathered()) return;
    note(Event::release, u);
    units_[u].release(), frozen_[u].release();
    if (experts_) experts_->units[u].release();
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
      FlatUnit* mine = experts(u);
      if (mine && !mine->is_gathered()) mine->allocate();
      streams_.on_comm([&] {
        unit.gather(groups_.shard());
        if (frozen_too) fixed.gather(groups_.shard());
        if (mine) mine->gather(experts_->groups.shard());
      });
    }
    streams_.join();
  }

  void reduce(size_t u) {
    auto& unit = units_[u];
    note(Event::reduce, u);
    streams_.on_comm([&] {
      const auto path = schedule_.gradient_path(micro_batch_);
      const bool cast = path == GradientPath::cast_into_shard && !unit.empty();
      const auto flat = unit.take_grads(flat_dtype_, [&](const at::Tensor& g) { streams_.used_by_comm(g); },
                                        cast ? &unit.grad() : nullptr);
      // cast: nothing to reduce now (replicas, if any, all-reduce the shards after the last micro-batch)
      if (!cast) storage_->reduce(u, unit, flat, groups_, streams_, micro_batch_, path);
      if (experts_) reduce_experts(u);
    });
  }

  /// Unit u's experts into their shards, as reduce() does the unit's other parameters, over the expert groups.
  void reduce_experts(size_t u) {
    auto& e = *experts_;
    auto& mine = e.units[u];
    const auto path = e.schedule.gradient_path(micro_batch_);
    const bool cast = path == GradientPath::cast_into_shard && !mine.empty();
    const auto flat = mine.take_grads(e.flat_dtype, [&](const at::Tensor& g) { streams_.used_by_comm(g); },
                                      cast ? &mine.grad() : nullptr);
    if (!cast) e.storage->reduce(u, mine, flat, e.groups, streams_, micro_batch_, path);
  }

  /// The second trainable group of every unit under expert parallelism: its groups, its schedule (the gradient paths
  /// of its shard group size), its units and their storage.
  struct Experts {
    Experts(dist::ProcessGroups g, const RecipeRules& rules, std::vector<bool> blocks,
            const std::vector<std::vector<size_t>>& reads, const at::Device& device, int64_t micro_batches, HostStep step)
        : groups(std::move(g)),
          schedule(rules, std::move(blocks), reads, groups.shard().size()),
          flat_dtype(schedule.flat_dtype(groups.replicate().size(), micro_batches)),
          storage(make_storage(rules.offload, device, rules.precision,
                               schedule.grad_dtype(groups.replicate().size(), micro_batches), step)) {}
    dist::ProcessGroups groups;
    Schedule schedule;
    at::ScalarType flat_dtype;
    std::vector<FlatUnit> units;
    std::unique_ptr<ShardStorage> storage;  // after the units: destroyed before them
  };

  UnitModel& model_;
  dist::ProcessGroups& groups_;
  at::Device device_;
  Streams streams_;
  EngineOptions options_;
  Schedule schedule_;
  at::ScalarType flat_dtype_;  // of the flat gradient buffers the collectives read (Schedule::flat_dtype)
  std::vector<FlatUnit> units_;
  std::vector<FrozenUnit> frozen_;
  std::unique_ptr<ShardStorage> storage_;  // after the units: destroyed (its stepping thread joined) before them
  std::unique_ptr<Experts> experts_;       // expert parallelism only
  std::vector<Streams::Marker> ready_;
  std::vector<at::Tensor> x_in_, out_, rng_;  // rng_: generator state before a recomputed unit's forward
  std::vector<at::Tensor> side_, side_values_;  // each unit's side output: with its graph, and detached
  MicroBatch micro_batch_;
  double lr_ = 0;
  double clip_coef_ = 1.0;
  int64_t optimizer_steps_ = 0;
};

}  // namespace shardlm::engine
