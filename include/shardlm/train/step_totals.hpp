#pragma once
// A training step's bookkeeping, kept out of the step's code: its one all-reduce (StepTotals: the summed loss and MoE
// aux loss, and every rank's votes: a stop signal received, an asynchronous save still being written or failed) and
// its clock (StepClock: each phase's seconds, the device synchronized at the phase's end).
#include <ATen/ATen.h>
#include <torch/cuda.h>

#include <chrono>
#include <type_traits>

#include "shardlm/core/compat.hpp"
#include "shardlm/dist/communicator.hpp"

namespace shardlm::train {

class StepTotals {
 public:
  explicit StepTotals(const at::Device& device)
      : values_(at::zeros({count}, at::TensorOptions().device(device).dtype(at::kFloat))) {}

  /// A micro-batch's summed loss (an fp32 scalar on the device: no host wait).
  void add_loss(const at::Tensor& sum) { values_.narrow(0, loss, 1) += sum; }
  /// A micro-batch's weighted router loss (added to the loss) and load-balancing term.
  void add_router(const at::Tensor& total, const at::Tensor& aux) {
    values_.narrow(0, loss, 1) += total;
    values_.narrow(0, aux_loss, 1) += aux;
    has_router_ = true;
  }
  /// This rank received a stop signal (preemption).
  void vote_stop() { values_.narrow(0, stop, 1).fill_(1.0); }
  /// This rank's asynchronous save: still writing, and whether its write failed (train/async_save.hpp).
  void vote_save(float writing_now, float write_failed) {
    values_.narrow(0, writing, 1).fill_(writing_now), values_.narrow(0, failed, 1).fill_(write_failed);
  }

  struct Sums {
    double loss = 0, aux = 0;
    double stop = 0;              ///< ranks that received a stop signal
    double writing = 0, failed = 0;  ///< ranks still writing an asynchronous save, and ranks whose write failed
    bool has_router = false;
  };
  /// Sums every rank's totals (a collective over `world`).
  Sums all_reduce(dist::Communicator& world) {
    world.all_reduce(values_, dist::Reduce::Sum, "loss");
    const auto host = values_.cpu();
    const float* v = host.data_ptr<float>();
    return {v[loss], v[aux_loss], v[stop], v[writing], v[failed], has_router_};
  }

 private:
  enum Slot : int64_t { loss, stop, writing, failed, aux_loss, count };
  at::Tensor values_;  // [count] fp32
  bool has_router_ = false;
};

/// Times a step's phases. Made at the step's start, where it also resets the device's peak memory counters (the
/// step's metrics report the peak within it).
class StepClock {
 public:
  using clock = std::chrono::steady_clock;
  explicit StepClock(const at::Device& device) : device_(device) {
    if (device_.is_cuda()) compat::reset_cuda_peak(device_.index());
    start_ = clock::now();
  }
  /// Runs f(), waits for the device, and adds the seconds to `seconds`; returns f's result.
  template <class F>
  auto time(double& seconds, F&& f) {
    const auto t0 = clock::now();
    if constexpr (std::is_void_v<std::invoke_result_t<F&>>) {
      f();
      add(seconds, t0);
    } else {
      auto result = f();
      add(seconds, t0);
      return result;
    }
  }
  /// Seconds since the step started.
  double elapsed() const { return std::chrono::duration<double>(clock::now() - start_).count(); }

 private:
  void add(double& seconds, clock::time_point t0) const {
    if (device_.is_cuda()) torch::cuda::synchronize(device_.index());
    seconds += std::chrono::duration<double>(clock::now() - t0).count();
  }
  at::Device device_;
  clock::time_point start_;
};

}  // namespace shardlm::train
