#pragma once
// Where a unit's sharded state lives and where the optimizer steps: the storage of the offload policy. Every piece of
// code that depends on offload is here; the engine calls the storage its offload rules name (make_storage) and does
// not know which one it has.
//
//   DeviceShards (offload::None)  master weights, gradients and AdamW moments on the device; gradients are
//                                 reduce-scattered straight into the shards; the step is LibTorch's fused AdamW over
//                                 every unit at once (two launches: with and without weight decay).
//   HostShards (offload::Cpu)     master weights and gradients in pinned host memory, AdamW moments in pageable host
//                                 memory, and on the device only a compute-dtype copy of the master shard, which
//                                 gathers read. A unit's reduced gradient slice is copied to the host asynchronously
//                                 as soon as it is made (staged and added for later micro-batches). The host AdamW
//                                 (optim/host_adamw.hpp) steps the units one by one, each unit's device copy refreshed
//                                 while the next is stepped, as HostStep says:
//
//   HostStep::sync         after the backward and the norm, before optimizer_step returns (the reference)
//   HostStep::overlapped   after the norm, on a thread of its own, unit by unit in forward order, while the next
//                          forward runs: a unit's gather waits for its update (exact, no extra memory)
//   HostStep::speculative  during the backward, each unit as soon as its gradients are on the host, with clipping
//                          factor 1, from the state into a second copy of it (the same memory traffic as in place);
//                          when the norm then asks for no clipping the copies are swapped in; when it asks for
//                          clipping each unit is stepped again from the state it kept, and when it is not finite the
//                          step is dropped (both counted: HostShards::redone). Clipping tends to last (early training):
//                          after a step that was clipped or dropped the next one steps as overlapped does, and
//                          speculates again after a step that needed no clipping. Bit for bit the sync path's result.
//
// The clipping norm is the same in every mode: without accumulation each unit's norm taken on the device as its
// slice is reduced, with accumulation each unit's norm taken on the host once its sum is complete, combined as
// optim::global_norm combines them.
#include <ATen/ATen.h>

#include <algorithm>
#include <chrono>
#include <condition_variable>
#include <deque>
#include <exception>
#include <functional>
#include <memory>
#include <mutex>
#include <optional>
#include <string_view>
#include <thread>
#include <utility>
#include <vector>

#include "shardlm/core/compat.hpp"
#include "shardlm/dist/groups.hpp"
#include "shardlm/engine/flat_unit.hpp"
#include "shardlm/engine/schedule.hpp"
#include "shardlm/engine/streams.hpp"
#include "shardlm/optim/adamw.hpp"
#include "shardlm/optim/adamw_kernel.hpp"
#include "shardlm/optim/clip.hpp"
#include "shardlm/optim/host_adamw.hpp"

namespace shardlm::engine {

/// One optimizer step's scalars besides the hyperparameters.
struct StepScalars {
  double lr = 0;
  double clip_coef = 1.0;  ///< the gradients' scale (global-norm clipping)
  int64_t step = 1;        ///< the step being taken, counting from 1
};

class ShardStorage {
 public:
  /// Storage for shards whose master weights have dtype `precision.master` on `device`, gathered in
  /// `precision.compute`, with gradient shards of `grad_dtype`.
  ShardStorage(const at::Device& device, const precision::Rules& precision, at::ScalarType grad_dtype)
      : device_(device), precision_(precision), grad_dtype_(grad_dtype) {}
  virtual ~ShardStorage() = default;

  at::ScalarType grad_dtype() const { return grad_dtype_; }

  /// Places unit's state (zeros: the padding stays zero) with the master shard filled by `fill`, and binds the
  /// unit's gathered buffer.
  virtual void place(FlatUnit& unit, const std::function<void(at::Tensor&)>& fill) = 0;
  /// Called once every unit is placed (the optimizer's tensor lists).
  virtual void prepare(std::vector<FlatUnit>& units) { (void)units; }
  /// A step starts (its first micro-batch comes next) with these scalars (the clipping factor not known yet).
  virtual void begin_step(std::vector<FlatUnit>& units, const optim::AdamWOptions& hyper, const StepScalars& s) {
    (void)units, (void)hyper, (void)s;
  }
  /// Puts unit u's reduction of `flat` (its [padded] gradients in the flat dtype: Schedule::flat_dtype) into its
  /// gradient shard as `path` says; on the communication stream. Not called for GradientPath::cast_into_shard.
  virtual void reduce(size_t u, FlatUnit& unit, const at::Tensor& flat, dist::ProcessGroups& groups, Streams& streams,
                      MicroBatch mb, GradientPath path) = 0;
  /// After a micro-batch's backward: what remains of its reduction, then compute waits for the communication.
  virtual void after_backward(std::vector<FlatUnit>& units, dist::ProcessGroups& groups, Streams& streams, MicroBatch mb) = 0;
  /// The squared L2 norm of this rank's gradient shards, an fp32 [1] tensor (on the device or the host).
  virtual at::Tensor grad_norm_sq(std::vector<FlatUnit>& units) = 0;
  /// The step's AdamW with the clipping factor now known.
  virtual void step(std::vector<FlatUnit>& units, const StepScalars& s) = 0;
  /// The step is dropped (its gradient norm is not finite): the state stays as it was.
  virtual void skip(std::vector<FlatUnit>& units) { (void)units; }
  /// Before unit u is gathered: its update of the last step is done (the communication stream waits for its copy).
  virtual void await(size_t u, Streams& streams) { (void)u, (void)streams; }
  /// Every update done: the state may be read or written (a checkpoint, an export, set values).
  virtual void settle() {}
  /// The masters of `unit` changed outside a step (a resumed checkpoint, set values): refresh what derives from them.
  virtual void refresh(FlatUnit& unit) { (void)unit; }
  /// The step count of every shard's AdamW state (a resumed checkpoint).
  virtual void set_step_count(int64_t steps) { (void)steps; }
  /// Steps whose speculative update was redone or dropped, since the start.
  virtual int64_t redone() const { return 0; }
  /// The host AdamW's work since the start: seconds and bytes moved (offloaded; zeros on the device).
  struct HostWork {
    double seconds = 0, bytes = 0;
  };
  virtual HostWork host_work() const { return {}; }

 protected:
  at::Device device_;
  precision::Rules precision_;
  at::ScalarType grad_dtype_;
};

/// offload::None: the state on the device.
class DeviceShards final : public ShardStorage {
 public:
  using ShardStorage::ShardStorage;

  void place(FlatUnit& unit, const std::function<void(at::Tensor&)>& fill) override {
    at::NoGradGuard no_grad;
    const auto opts = at::TensorOptions().device(device_);
    ShardState s;
    s.master = at::zeros({unit.shard_numel()}, opts.dtype(precision_.master));
    fill(s.master);
    s.grad = at::zeros({unit.shard_numel()}, opts.dtype(grad_dtype_));
    s.exp_avg = at::zeros_like(s.master);
    s.exp_avg_sq = at::zeros_like(s.master);
    s.gather_source = s.master;
    unit.bind(std::move(s), device_, precision_.compute);
  }

  // The optimizer's tensor lists: views of every shard, split into runs with and without weight decay, each with its
  // own step count (the fused kernel takes one per tensor); one pair of lists covers every unit (two launches).
  void prepare(std::vector<FlatUnit>& units) override {
    for (auto& unit : units) {
      auto add = [&](Runs& r, int64_t a, int64_t b) {
        r.params.push_back(unit.master().narrow(0, a, b - a)), r.grads.push_back(unit.grad().narrow(0, a, b - a));
        r.exp_avg.push_back(unit.exp_avg().narrow(0, a, b - a));
        r.exp_avg_sq.push_back(unit.exp_avg_sq().narrow(0, a, b - a));
        r.steps.push_back(at::zeros({}, unit.master().options().dtype(at::kFloat)));
      };
      for (auto [a, b] : unit.decay_runs()) add(decayed_, a, b);
      for (auto [a, b] : unit.plain_runs()) add(plain_, a, b);
      if (!unit.empty() && !kernel_decided_) kernel_ = optim::adamw_kernel_serves(unit.master(), unit.grad()), kernel_decided_ = true;
    }
  }

  void begin_step(std::vector<FlatUnit>&, const optim::AdamWOptions& hyper, const StepScalars&) override { hyper_ = hyper; }

  void reduce(size_t, FlatUnit& unit, const at::Tensor& flat, dist::ProcessGroups& groups, Streams&, MicroBatch mb,
              GradientPath path) override {
    if (unit.empty()) return;
    auto& shard_group = groups.shard();
    if (path == GradientPath::reduce_scatter_into_shard) {
      shard_group.reduce_scatter(unit.grad(), flat, dist::Reduce::Sum, unit.name().c_str());
      return;
    }
    at::Tensor part = flat;
    if (shard_group.size() > 1) {
      part = at::empty({unit.shard_numel()}, flat.options());
      shard_group.reduce_scatter(part, flat, dist::Reduce::Sum, unit.name().c_str());
    }
    mb.first ? unit.grad().copy_(part) : unit.grad().add_(part);  // a reduce dtype other than the shard's: cast
  }

  void after_backward(std::vector<FlatUnit>& units, dist::ProcessGroups& groups, Streams& streams, MicroBatch mb) override {
    // Replicas (NoShard, HybridShard) all-reduce the gradient shards once, after the step's last micro-batch: in the
    // reduce dtype, through one unit's copy at a time where the shards' dtype differs (less than a unit's flat
    // buffer, which the planner counts at the unit's reduction).
    if (mb.last && groups.replicate().size() > 1) {
      streams.on_comm([&] {
        for (auto& unit : units) {
          if (unit.empty()) continue;
          auto& grad = unit.grad();
          if (grad.scalar_type() == precision_.reduce) {
            groups.replicate().all_reduce(grad, dist::Reduce::Sum, unit.name().c_str());
          } else {
            auto sum = grad.to(precision_.reduce);
            groups.replicate().all_reduce(sum, dist::Reduce::Sum, unit.name().c_str());
            grad.copy_(sum);
          }
        }
      });
    }
    streams.join();
  }

  at::Tensor grad_norm_sq(std::vector<FlatUnit>& units) override {
    std::vector<at::Tensor> grads;
    for (auto& u : units) grads.push_back(u.grad());
    return optim::global_norm(grads).square().reshape({1});
  }

  void step(std::vector<FlatUnit>&, const StepScalars& s) override {
    at::NoGradGuard no_grad;
    ++steps_;
    if (kernel_) {  // one launch per contiguous run (optim/adamw_kernel.hpp): the fused kernel's update, bit for bit
      optim::AdamWStep a;
      a.step = steps_, a.lr = s.lr, a.beta1 = hyper_.beta1(), a.beta2 = hyper_.beta2(), a.eps = hyper_.eps();
      a.grad_coef = s.clip_coef;
      for (auto [runs, weight_decay] : {std::pair<Runs*, double>{&decayed_, hyper_.weight_decay()}, {&plain_, 0.0}}) {
        a.weight_decay = weight_decay;
        for (size_t i = 0; i < runs->params.size(); ++i)
          optim::adamw_run(runs->params[i], runs->grads[i], runs->exp_avg[i], runs->exp_avg_sq[i], a);
      }
      return;
    }
    std::optional<at::Tensor> scale;
    if (s.clip_coef != 1.0)  // the fused kernel divides gradients by the scale
      scale = at::full({}, 1.0 / s.clip_coef, at::TensorOptions().device(device_).dtype(at::kFloat));
    for (auto [runs, weight_decay] : {std::pair<Runs*, double>{&decayed_, hyper_.weight_decay()}, {&plain_, 0.0}}) {
      if (runs->params.empty()) continue;
      if (runs->grads.front().scalar_type() == precision_.master) {
        compat::fused_adamw(runs->params, runs->grads, runs->exp_avg, runs->exp_avg_sq, runs->steps, s.lr,
                            hyper_.beta1(), hyper_.beta2(), weight_decay, hyper_.eps(), scale);
        continue;
      }
      // The fused kernel takes gradients in the masters' dtype: compute-dtype shards (nothing reduced) are widened,
      // exactly, one run at a time (the CPU, or a GPU without the kernel), so the copy is one run's, not the model's.
      for (size_t i = 0; i < runs->params.size(); ++i)
        compat::fused_adamw({runs->params[i]}, {runs->grads[i].to(precision_.master)}, {runs->exp_avg[i]},
                            {runs->exp_avg_sq[i]}, {runs->steps[i]}, s.lr, hyper_.beta1(), hyper_.beta2(), weight_decay,
                            hyper_.eps(), scale);
    }
  }

  void set_step_count(int64_t steps) override {
    steps_ = steps;
    for (auto* r : {&decayed_, &plain_})
      for (auto& t : r->steps) t.fill_(static_cast<double>(steps));
  }

 private:
  struct Runs {
    std::vector<at::Tensor> params, grads, exp_avg, exp_avg_sq, steps;  ///< steps: the fused kernel's, on the device
  };
  Runs decayed_, plain_;
  bool kernel_ = false, kernel_decided_ = false;  ///< the project's AdamW kernel steps (CUDA, fp32 masters)
  int64_t steps_ = 0;                             ///< the kernel's step count
  optim::AdamWOptions hyper_;
};

/// offload::Cpu: the state in host memory, a compute-dtype copy of the master shard on the device; the host step
/// as `mode` says (HostStep; automatic resolved by the caller).
class HostShards final : public ShardStorage {
 public:
  HostShards(const at::Device& device, const precision::Rules& precision, at::ScalarType grad_dtype, HostStep mode)
      : ShardStorage(device, precision, grad_dtype), mode_(mode) {
    SHARDLM_ASSERT(mode != HostStep::automatic, "HostShards needs a resolved HostStep");
    if (mode_ != HostStep::sync) stepper_ = std::thread([this] { work(); });
  }
  ~HostShards() override {
    {
      std::lock_guard<std::mutex> lock(mutex_);
      stop_ = true;
    }
    wake_.notify_all();
    if (stepper_.joinable()) stepper_.join();
  }

  HostStep mode() const { return mode_; }

  void place(FlatUnit& unit, const std::function<void(at::Tensor&)>& fill) override {
    at::NoGradGuard no_grad;
    const int64_t n = unit.shard_numel();
    ShardState s;
    s.master = pinned_zeros(n, precision_.master);
    fill(s.master);
    s.grad = pinned_zeros(n, grad_dtype_);
    s.exp_avg = at::zeros_like(s.master);  // never copied: pageable host memory is enough
    s.exp_avg_sq = at::zeros_like(s.master);
    // A copy of its own even where the dtype and device match (fp32 on the CPU): a speculative step writes it while
    // the masters must stay as they were.
    s.gather_source = s.master.to(at::TensorOptions().device(device_).dtype(precision_.compute), /*non_blocking=*/false,
                                  /*copy=*/true);
    Slot slot;
    if (mode_ == HostStep::speculative)  // the second copy of the state a speculative step writes
      slot.spare = {pinned_zeros(n, precision_.master), at::zeros_like(s.exp_avg), at::zeros_like(s.exp_avg_sq)};
    unit.bind(std::move(s), device_, precision_.compute);
    slots_.push_back(std::move(slot));
  }

  void begin_step(std::vector<FlatUnit>& units, const optim::AdamWOptions& hyper, const StepScalars& s) override {
    auto next = std::make_shared<StepState>();
    next->scalars = s, next->hyper = hyper;
    next->speculating = mode_ == HostStep::speculative && !last_clipped_;
    next->norms.assign(units.size(), at::Tensor());
    next->normed.assign(units.size(), false);
    for (size_t u = 0; u < units.size(); ++u) next->normed[u] = units[u].empty();
    std::lock_guard<std::mutex> lock(mutex_);
    step_ = std::move(next);  // the tasks of the last step keep theirs
  }

  void reduce(size_t u, FlatUnit& unit, const at::Tensor& flat, dist::ProcessGroups& groups, Streams& streams,
              MicroBatch mb, GradientPath) override {
    if (unit.empty()) return;
    auto& shard_group = groups.shard();
    at::Tensor part = flat;
    if (shard_group.size() > 1) {
      part = at::empty({unit.shard_numel()}, flat.options());
      shard_group.reduce_scatter(part, flat, dist::Reduce::Sum, unit.name().c_str());
    }
    if (groups.replicate().size() > 1) groups.replicate().all_reduce(part, dist::Reduce::Sum, unit.name().c_str());
    // Without accumulation the device takes each slice's norm as it is made (the kernel of optim::global_norm), so
    // that the host need not read the gradients for the clipping norm.
    auto& slot = slots_[u];
    const bool device_norm = mb.first && mb.last;
    if (device_norm) step_->norms[u] = at::_foreach_norm({part}, 2, at::kFloat)[0], step_->normed[u] = true;
    if (mb.first) {
      unit.grad().copy_(part, /*non_blocking=*/true);
    } else {
      if (!slot.staging.defined())
        slot.staging = unit.grad().is_pinned() ? compat::pinned_empty(unit.shard_numel(), unit.grad().scalar_type())
                                               : at::empty_like(unit.grad());
      slot.staging.copy_(part, /*non_blocking=*/true);
      slot.staged = true;
    }
    if (step_->speculating && mb.last) {
      // The unit's gradients are complete once this copy lands: its step starts then, on the stepper thread.
      enqueue([this, u, &unit, copied = streams.mark_comm(), step = step_, device_norm] {
        speculate(u, unit, copied, *step, device_norm);
      });
    }
  }

  void after_backward(std::vector<FlatUnit>& units, dist::ProcessGroups&, Streams& streams, MicroBatch mb) override {
    step_->device_norms = mb.first && mb.last;
    streams.join();
    if (step_->speculating && mb.last) return;  // the stepper adds the staged slices, unit by unit
    // The host waits for the gradient copies only when it reads them: staged micro-batches are added now (the next
    // micro-batch reuses the staging buffers), and the optimizer reads after the last one.
    if (mb.last || !mb.first) {
      streams.synchronize();
      for (size_t u = 0; u < units.size(); ++u) add_staged(u, units[u]);
    }
  }

  at::Tensor grad_norm_sq(std::vector<FlatUnit>& units) override {
    // Each unit's norm, taken on the device as its slice was reduced (one micro-batch) or on the host once its sum
    // was complete, combined as optim::global_norm combines them: the clipping factor does not depend on where, or
    // when, the norms were taken. A unit without trainable parameters (a LoRA run's embedding) counts as 0.
    auto& st = *step_;
    if (!st.device_norms) {
      if (st.speculating) {
        std::unique_lock<std::mutex> lock(mutex_);
        done_.wait(lock, [&] {
          return error_ || std::all_of(st.normed.begin(), st.normed.end(), [](uint8_t b) { return b != 0; });
        });
        rethrow(lock);
      }
      for (size_t u = 0; u < units.size(); ++u)
        if (!st.norms[u].defined() && !units[u].empty()) st.norms[u] = host_norm(units[u]);
    }
    const auto where = st.device_norms ? device_ : at::Device(at::kCPU);
    const auto zero = at::zeros({}, at::TensorOptions().device(where).dtype(at::kFloat));
    std::vector<at::Tensor> norms;
    for (const auto& t : st.norms) norms.push_back(t.defined() ? t : zero);
    return at::stack(norms).norm().square().reshape({1});
  }

  void step(std::vector<FlatUnit>& units, const StepScalars& s) override {
    // The step's scalars are begin_step's (the speculative tasks read them now); the clipping factor travels with each
    // task.
    const bool speculated = step_->speculating;
    last_clipped_ = s.clip_coef != 1.0;
    if (mode_ == HostStep::sync) {
      for (size_t u = 0; u < units.size(); ++u) {
        if (units[u].empty()) continue;
        adamw(units[u], current(units[u]), current(units[u]), *step_, s.clip_coef);
        slots_[u].refreshed = copy_to_device(units[u]);  // moves while the host steps the next unit
      }
      return;
    }
    // In forward order: the next forward needs unit 0 first.
    for (size_t u = 0; u < units.size(); ++u) {
      if (units[u].empty()) continue;
      FlatUnit& unit = units[u];
      std::function<void()> task;
      if (!speculated) {  // overlapped, or speculative after a clipped step
        task = [this, u, &unit, step = step_, coef = s.clip_coef] {
          adamw(unit, current(unit), current(unit), *step, coef);
          finish(u, copy_to_device(unit));
        };
      } else if (s.clip_coef == 1.0) {  // the speculative update stands
        task = [this, u, &unit] {
          swap_in(u, unit);
          finish(u, slots_[u].refreshed);
        };
      } else {  // clipping: step again from the state kept
        task = [this, u, &unit, step = step_, coef = s.clip_coef] {
          Streams::wait_for(slots_[u].refreshed);  // the speculative copy still reads the spare masters
          adamw(unit, current(unit), slots_[u].spare, *step, coef);
          auto copied = copy_to_device(unit, slots_[u].spare);
          swap_in(u, unit);
          finish(u, copied);
        };
      }
      pending(u);
      enqueue(std::move(task));
    }
    if (speculated && s.clip_coef != 1.0) ++redone_;
  }

  void skip(std::vector<FlatUnit>& units) override {
    last_clipped_ = true;
    if (!step_->speculating) return;
    for (size_t u = 0; u < units.size(); ++u) {
      if (units[u].empty()) continue;
      FlatUnit& unit = units[u];
      pending(u);
      enqueue([this, u, &unit] { finish(u, copy_to_device(unit)); });  // the device copy back to the state kept
    }
    ++redone_;
  }

  void await(size_t u, Streams& streams) override {
    if (u >= slots_.size()) return;
    if (mode_ != HostStep::sync) {
      std::unique_lock<std::mutex> lock(mutex_);
      done_.wait(lock, [&] { return slots_[u].done >= slots_[u].wanted || error_; });
      rethrow(lock);
    }
    streams.comm_waits(slots_[u].refreshed);  // the gather reads the copy on the device
  }

  void settle() override {
    if (mode_ != HostStep::sync) {
      std::unique_lock<std::mutex> lock(mutex_);
      done_.wait(lock, [&] { return (queue_.empty() && !busy_) || error_; });
      rethrow(lock);
    }
    for (auto& slot : slots_) Streams::wait_for(slot.refreshed);
  }

  void refresh(FlatUnit& unit) override {
    at::NoGradGuard no_grad;
    auto& s = unit.state();
    s.gather_source.copy_(s.master.to(s.gather_source.device(), /*non_blocking=*/true));
  }

  int64_t redone() const override { return redone_; }
  HostWork host_work() const override {
    std::lock_guard<std::mutex> lock(mutex_);
    return work_;
  }

 private:
  /// What the tasks of one step share: its scalars and its gradient norms.
  struct StepState {
    StepScalars scalars;
    optim::AdamWOptions hyper;
    std::vector<at::Tensor> norms;  // each unit's gradient norm (device or host)
    std::vector<uint8_t> normed;    // norms[u] is set (or unit u has no shard); bytes: threads set different units
    bool device_norms = false;      // taken on the device (one micro-batch)
    bool speculating = false;       // the units step during the backward
  };
  struct Slot {
    optim::AdamWState spare;    // speculative: the state the step writes
    at::Tensor staging;         // a later micro-batch's slice, until added
    bool staged = false;
    int64_t wanted = 0, done = 0;  // updates enqueued and finished
    Streams::Marker refreshed;  // the last copy of masters to the device
  };

  at::Tensor pinned_zeros(int64_t n, at::ScalarType dtype) const {
    // From a GPU: page-locked (asynchronous copies), exactly sized (compat::pinned_empty).
    return device_.is_cuda() ? compat::pinned_empty(n, dtype).zero_() : at::zeros({n}, dtype);
  }

  static optim::AdamWState current(FlatUnit& unit) { return {unit.master(), unit.exp_avg(), unit.exp_avg_sq()}; }
  static at::Tensor host_norm(FlatUnit& unit) { return at::_foreach_norm({unit.grad()}, 2, at::kFloat)[0]; }

  void add_staged(size_t u, FlatUnit& unit) {
    auto& slot = slots_[u];
    if (slot.staged) unit.grad().add_(slot.staging), slot.staged = false;
  }

  /// AdamW on unit's shard from state `in` into `out` (the same state: in place), the gradients scaled by `coef`:
  /// each run of the shard with its weight decay (matrices and embeddings) or without.
  void adamw(FlatUnit& unit, const optim::AdamWState& in, const optim::AdamWState& out, const StepState& st,
             double coef) {
    at::NoGradGuard no_grad;
    const auto t0 = std::chrono::steady_clock::now();
    const auto& h = st.hyper;
    auto run = [&](int64_t a, int64_t b, double weight_decay) {
      auto part = [&](const at::Tensor& t) { return t.narrow(0, a, b - a); };
      const optim::AdamWStep step{st.scalars.lr, h.beta1(), h.beta2(), weight_decay, h.eps(), st.scalars.step, coef};
      optim::host_adamw({part(in.param), part(in.exp_avg), part(in.exp_avg_sq)}, part(unit.grad()),
                        {part(out.param), part(out.exp_avg), part(out.exp_avg_sq)}, step);
    };
    for (auto [a, b] : unit.decay_runs()) run(a, b, h.weight_decay());
    for (auto [a, b] : unit.plain_runs()) run(a, b, 0.0);
    const double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    std::lock_guard<std::mutex> lock(mutex_);
    work_.seconds += s;
    work_.bytes += static_cast<double>(unit.shard_numel() *
                                       optim::host_adamw_bytes_per_element(precision_.master, unit.grad().scalar_type()));
  }

  /// Copies master weights (the unit's, or `from`'s) to the unit's compute-dtype copy on the device, asynchronously
  /// on a stream of the calling thread, in pieces of 16 Mi elements (the cast's temporary on the device stays small
  /// while the GPU trains beside it); the marker of its end.
  Streams::Marker copy_to_device(FlatUnit& unit, const optim::AdamWState& from = {}) const {
    const auto& master = from.param.defined() ? from.param : unit.master();
    auto& target = unit.state().gather_source;
    return Streams::on_side_stream(device_, [&] {
      at::NoGradGuard no_grad;
      constexpr int64_t piece = int64_t{16} << 20;
      for (int64_t a = 0; a < master.numel(); a += piece) {
        const int64_t n = std::min(piece, master.numel() - a);
        target.narrow(0, a, n).copy_(master.narrow(0, a, n).to(target.device(), /*non_blocking=*/true));
      }
    });
  }

  /// The speculative step of unit u (stepper thread): once its gradients are on the host, the staged slice added and
  /// its norm taken when the norm is the host's, AdamW with factor 1 into the spare state, whose masters are copied
  /// to the device (the next forward reads them if the update stands).
  void speculate(size_t u, FlatUnit& unit, const Streams::Marker& copied, StepState& st, bool device_norm) {
    Streams::wait_for(copied);
    add_staged(u, unit);
    if (!device_norm) {
      auto norm = host_norm(unit);
      std::lock_guard<std::mutex> lock(mutex_);
      st.norms[u] = std::move(norm), st.normed[u] = true;
    }
    done_.notify_all();
    auto& slot = slots_[u];
    adamw(unit, current(unit), slot.spare, st, 1.0);
    auto marker = copy_to_device(unit, slot.spare);
    std::lock_guard<std::mutex> lock(mutex_);
    slot.refreshed = std::move(marker);
  }

  /// The spare state becomes the unit's state (the update stands).
  void swap_in(size_t u, FlatUnit& unit) {
    auto& s = unit.state();
    auto& spare = slots_[u].spare;
    std::swap(s.master, spare.param), std::swap(s.exp_avg, spare.exp_avg), std::swap(s.exp_avg_sq, spare.exp_avg_sq);
  }

  void pending(size_t u) {
    std::lock_guard<std::mutex> lock(mutex_);
    ++slots_[u].wanted;
  }

  void finish(size_t u, Streams::Marker copied) {
    {
      std::lock_guard<std::mutex> lock(mutex_);
      slots_[u].refreshed = std::move(copied);
      ++slots_[u].done;
    }
    done_.notify_all();
  }

  void enqueue(std::function<void()> task) {
    {
      std::lock_guard<std::mutex> lock(mutex_);
      queue_.push_back(std::move(task));
    }
    wake_.notify_one();
  }

  void rethrow(std::unique_lock<std::mutex>& lock) {
    if (!error_) return;
    auto e = error_;  // kept: every later wait fails the same way
    lock.unlock();
    std::rethrow_exception(e);
  }

  /// The stepper thread: runs the tasks in order; an error stops it and is rethrown by the next wait on it.
  void work() {
    for (;;) {
      std::function<void()> task;
      {
        std::unique_lock<std::mutex> lock(mutex_);
        wake_.wait(lock, [&] { return stop_ || !queue_.empty(); });
        if (stop_ && queue_.empty()) return;
        task = std::move(queue_.front());
        queue_.pop_front();
        busy_ = true;
      }
      try {
        task();
      } catch (...) {
        std::lock_guard<std::mutex> lock(mutex_);
        error_ = std::current_exception();
        queue_.clear();
      }
      {
        std::lock_guard<std::mutex> lock(mutex_);
        busy_ = false;
      }
      done_.notify_all();
    }
  }

  HostStep mode_;
  std::vector<Slot> slots_;
  std::shared_ptr<StepState> step_ = std::make_shared<StepState>();
  int64_t redone_ = 0;
  bool last_clipped_ = false;  // the last step was clipped or dropped: the next one does not speculate
  HostWork work_;
  mutable std::mutex mutex_;
  std::condition_variable wake_, done_;
  std::deque<std::function<void()>> queue_;
  bool busy_ = false, stop_ = false;
  std::exception_ptr error_;
  std::thread stepper_;
};

/// The storage the offload rules name; `host_step` resolved (not automatic) for offload::Cpu.
inline std::unique_ptr<ShardStorage> make_storage(const offload::Rules& offload, const at::Device& device,
                                                  const precision::Rules& precision, at::ScalarType grad_dtype,
                                                  HostStep host_step) {
  if (offload.host) return std::make_unique<HostShards>(device, precision, grad_dtype, host_step);
  return std::make_unique<DeviceShards>(device, precision, grad_dtype);
}

}  // namespace shardlm::engine
