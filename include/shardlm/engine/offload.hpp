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
//                                 as soon as it is made (staged and added for later micro-batches); the host steps
//                                 the units one by one, each unit's device copy refreshed while the next is stepped.
//                                 Gradients stay in the compute dtype where that is exact (offload::Rules::grad_dtype)
//                                 and then the host AdamW (optim/host_adamw.hpp) reads them as they are.
#include <ATen/ATen.h>
#include <range/v3/view/zip.hpp>

#include <functional>
#include <memory>
#include <optional>
#include <vector>

#include "shardlm/core/compat.hpp"
#include "shardlm/dist/groups.hpp"
#include "shardlm/engine/flat_unit.hpp"
#include "shardlm/engine/schedule.hpp"
#include "shardlm/engine/streams.hpp"
#include "shardlm/optim/adamw.hpp"
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
  /// Builds the optimizer's tensor lists once every unit is placed.
  void prepare(std::vector<FlatUnit>& units) {
    for (auto& unit : units) {
      if (runs_.empty() || steps_per_unit()) runs_.emplace_back();
      auto add = [&](Runs& r, int64_t a, int64_t b) {
        r.params.push_back(unit.master().narrow(0, a, b - a)), r.grads.push_back(unit.grad().narrow(0, a, b - a));
        r.exp_avg.push_back(unit.exp_avg().narrow(0, a, b - a));
        r.exp_avg_sq.push_back(unit.exp_avg_sq().narrow(0, a, b - a));
        r.steps.push_back(at::zeros({}, unit.master().options().dtype(at::kFloat).pinned_memory(false)));
      };
      for (auto [a, b] : unit.decay_runs()) add(runs_.back().decayed, a, b);
      for (auto [a, b] : unit.plain_runs()) add(runs_.back().plain, a, b);
    }
  }
  /// A step starts (its first micro-batch comes next).
  virtual void begin_step(size_t units) { (void)units; }
  /// Puts unit u's reduction of `flat` (its [padded] gradients in grad_dtype) into its gradient shard; on the
  /// communication stream. Not called for GradientPath::cast_into_shard.
  virtual void reduce(size_t u, FlatUnit& unit, const at::Tensor& flat, dist::ProcessGroups& groups, MicroBatch mb) = 0;
  /// After a micro-batch's backward: what remains of its reduction, then compute waits for the communication.
  virtual void after_backward(std::vector<FlatUnit>& units, dist::ProcessGroups& groups, Streams& streams, MicroBatch mb) = 0;
  /// The squared L2 norm of this rank's gradient shards, an fp32 [1] tensor (on the device or the host).
  virtual at::Tensor grad_norm_sq(std::vector<FlatUnit>& units) = 0;
  /// AdamW on every unit's shard, then what derives from the masters is refreshed.
  void step(std::vector<FlatUnit>& units, const optim::AdamWOptions& hyper, const StepScalars& s) {
    at::NoGradGuard no_grad;
    std::optional<at::Tensor> scale;
    if (s.clip_coef != 1.0)  // the fused kernel divides gradients by the scale
      scale = at::full({}, 1.0 / s.clip_coef, units.front().master().options().dtype(at::kFloat).pinned_memory(false));
    auto adamw = [&](Runs& g, double weight_decay) {
      if (g.params.empty()) return;
      if (grad_dtype_ != precision_.master) {  // gradients kept in the compute dtype beside fp32 masters (host only)
        const optim::AdamWStep step{s.lr, hyper.beta1(), hyper.beta2(), weight_decay, hyper.eps(), s.step, s.clip_coef};
        for (const auto& [param, grad, m, v] : ranges::views::zip(g.params, g.grads, g.exp_avg, g.exp_avg_sq))
          optim::host_adamw(param, grad, m, v, step);
      } else {
        compat::fused_adamw(g.params, g.grads, g.exp_avg, g.exp_avg_sq, g.steps, s.lr, hyper.beta1(), hyper.beta2(),
                            weight_decay, hyper.eps(), scale);
      }
    };
    for (auto&& [runs, unit] : ranges::views::zip(runs_, units)) {
      adamw(runs.decayed, hyper.weight_decay());
      adamw(runs.plain, 0.0);
      if (steps_per_unit()) refresh(unit);  // this unit's device copy moves while the host steps the next
    }
  }
  /// The masters of `unit` changed outside a step (a resumed checkpoint, set values): refresh what derives from them.
  virtual void refresh(FlatUnit& unit) { (void)unit; }
  /// The step count of every shard's AdamW state (a resumed checkpoint).
  void set_step_count(int64_t steps) {
    for (auto& pair : runs_)
      for (auto* r : {&pair.decayed, &pair.plain})
        for (auto& t : r->steps) t.fill_(static_cast<double>(steps));
  }

 protected:
  /// Whether the optimizer steps unit by unit (one pair of tensor lists per unit) rather than all units at once.
  virtual bool steps_per_unit() const = 0;

  at::Device device_;
  precision::Rules precision_;
  at::ScalarType grad_dtype_;

 private:
  // The optimizer's tensor lists: views of every shard, split into runs with and without weight decay, each with its
  // own step count (the fused kernel takes one per tensor).
  struct Runs {
    std::vector<at::Tensor> params, grads, exp_avg, exp_avg_sq, steps;
  };
  struct RunPair {
    Runs decayed, plain;
  };
  std::vector<RunPair> runs_;
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

  void reduce(size_t, FlatUnit& unit, const at::Tensor& flat, dist::ProcessGroups& groups, MicroBatch mb) override {
    if (unit.empty()) return;
    auto& shard_group = groups.shard();
    if (mb.first && shard_group.size() > 1) {  // GradientPath::reduce_scatter_into_shard
      shard_group.reduce_scatter(unit.grad(), flat, dist::Reduce::Sum, unit.name().c_str());
      return;
    }
    at::Tensor part = flat;
    if (shard_group.size() > 1) {
      part = at::empty({unit.shard_numel()}, flat.options());
      shard_group.reduce_scatter(part, flat, dist::Reduce::Sum, unit.name().c_str());
    }
    mb.first ? unit.grad().copy_(part) : unit.grad().add_(part);
  }

  void after_backward(std::vector<FlatUnit>& units, dist::ProcessGroups& groups, Streams& streams, MicroBatch mb) override {
    // Replicas (NoShard, HybridShard) all-reduce the gradient shards once, after the step's last micro-batch.
    if (mb.last && groups.replicate().size() > 1) {
      streams.on_comm([&] {
        for (auto& unit : units)
          if (!unit.empty()) groups.replicate().all_reduce(unit.grad(), dist::Reduce::Sum, unit.name().c_str());
      });
    }
    streams.join();
  }

  at::Tensor grad_norm_sq(std::vector<FlatUnit>& units) override {
    std::vector<at::Tensor> grads;
    for (auto& u : units) grads.push_back(u.grad());
    return optim::global_norm(grads).square().reshape({1});
  }

 private:
  bool steps_per_unit() const override { return false; }
};

/// offload::Cpu: the state in host memory, a compute-dtype copy of the master shard on the device.
class HostShards final : public ShardStorage {
 public:
  using ShardStorage::ShardStorage;

  void place(FlatUnit& unit, const std::function<void(at::Tensor&)>& fill) override {
    at::NoGradGuard no_grad;
    const int64_t n = unit.shard_numel();
    // From a GPU: master and gradient shards page-locked (asynchronous copies), exactly sized.
    const bool pin = device_.is_cuda();
    auto zeros = [&](at::ScalarType dtype) { return pin ? compat::pinned_empty(n, dtype).zero_() : at::zeros({n}, dtype); };
    ShardState s;
    s.master = zeros(precision_.master);
    fill(s.master);
    s.grad = zeros(grad_dtype_);
    s.exp_avg = at::zeros_like(s.master);  // never copied: pageable host memory is enough
    s.exp_avg_sq = at::zeros_like(s.master);
    s.gather_source = s.master.to(at::TensorOptions().device(device_).dtype(precision_.compute));
    unit.bind(std::move(s), device_, precision_.compute);
  }

  void begin_step(size_t units) override { unit_norms_.assign(units, at::Tensor()); }

  void reduce(size_t u, FlatUnit& unit, const at::Tensor& flat, dist::ProcessGroups& groups, MicroBatch mb) override {
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
    if (mb.first && mb.last) unit_norms_.at(u) = at::_foreach_norm({part}, 2, at::kFloat)[0];
    if (mb.first) {
      unit.grad().copy_(part, /*non_blocking=*/true);
    } else {
      if (staging_.size() <= u) staging_.resize(u + 1);
      auto& staging = staging_[u];
      if (!staging.defined())
        staging = unit.grad().is_pinned() ? compat::pinned_empty(unit.shard_numel(), unit.grad().scalar_type())
                                          : at::empty_like(unit.grad());
      staging.copy_(part, /*non_blocking=*/true);
      if (staged_.size() <= u) staged_.resize(u + 1, false);
      staged_[u] = true;
    }
  }

  void after_backward(std::vector<FlatUnit>& units, dist::ProcessGroups&, Streams& streams, MicroBatch mb) override {
    device_norm_ = mb.first && mb.last;
    streams.join();
    // The host waits for the gradient copies only when it reads them: staged micro-batches are added now (the next
    // micro-batch reuses the staging buffers), and the optimizer reads after the last one.
    if (mb.last || !mb.first) {
      streams.synchronize();
      for (size_t u = 0; u < units.size() && u < staged_.size(); ++u)
        if (staged_[u]) units[u].grad().add_(staging_[u]), staged_[u] = false;
    }
  }

  at::Tensor grad_norm_sq(std::vector<FlatUnit>& units) override {
    if (device_norm_) {
      // Each unit's norm was taken on the device as its slice was reduced; combined as optim::global_norm combines
      // the host's, so that the clipping coefficient does not depend on where the gradients are. A unit without
      // trainable parameters (a LoRA run's embedding) counts as 0, as its empty host shard does.
      const auto zero = at::zeros({}, at::TensorOptions().device(device_).dtype(at::kFloat));
      std::vector<at::Tensor> norms;
      for (const auto& t : unit_norms_) norms.push_back(t.defined() ? t : zero);
      norms.resize(units.size(), zero);
      return at::stack(norms).norm().square().reshape({1});
    }
    std::vector<at::Tensor> grads;
    for (auto& u : units) grads.push_back(u.grad());
    return optim::global_norm(grads).square().reshape({1});  // this rank's shards
  }

  void refresh(FlatUnit& unit) override {
    at::NoGradGuard no_grad;
    auto& s = unit.state();
    s.gather_source.copy_(s.master.to(s.gather_source.device(), /*non_blocking=*/true));
  }

 private:
  bool steps_per_unit() const override { return true; }

  std::vector<at::Tensor> unit_norms_;  // each unit's gradient norm, taken on the device (one micro-batch per step)
  std::vector<at::Tensor> staging_;     // later micro-batches' slices, added once their copies are done
  std::vector<bool> staged_;
  bool device_norm_ = false;            // this step's backward took the norms on the device
};

/// The storage the offload rules name.
inline std::unique_ptr<ShardStorage> make_storage(const offload::Rules& offload, const at::Device& device,
                                                  const precision::Rules& precision, at::ScalarType grad_dtype) {
  if (offload.host) return std::make_unique<HostShards>(device, precision, grad_dtype);
  return std::make_unique<DeviceShards>(device, precision, grad_dtype);
}

}  // namespace shardlm::engine
