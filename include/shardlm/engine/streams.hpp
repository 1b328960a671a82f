#pragma once
// The engine's two CUDA streams: compute (the current stream) and communication (gathers, reductions), ordered
// by events so that communication overlaps compute. On the CPU every call is a no-op: Gloo's collectives have
// finished when they return.
#include <ATen/ATen.h>

#include <memory>
#include <optional>

#include "shardlm/core/compat.hpp"

#if SHARDLM_HAVE_CUDA
#include <ATen/cuda/CUDAEvent.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#endif

namespace shardlm::engine {

class Streams {
 public:
  /// A point on a stream that another stream can wait for; empty on the CPU.
#if SHARDLM_HAVE_CUDA
  using Marker = std::shared_ptr<at::cuda::CUDAEvent>;
#else
  using Marker = std::shared_ptr<void>;
#endif

  explicit Streams(const at::Device& device) : cuda_(device.is_cuda()) {
#if SHARDLM_HAVE_CUDA
    if (cuda_) {
      const auto index = device.has_index() ? device.index() : c10::cuda::current_device();
      compute_.emplace(c10::cuda::getCurrentCUDAStream(index));
      comm_.emplace(c10::cuda::getStreamFromPool(/*isHighPriority=*/true, index));
    }
#endif
  }

  bool cuda() const { return cuda_; }

  /// Runs f with the communication stream current, ordered after everything enqueued so far on compute.
  template <class F>
  void on_comm(F&& f) {
#if SHARDLM_HAVE_CUDA
    if (cuda_) {
      at::cuda::CUDAEvent ready;
      ready.record(*compute_);
      ready.block(*comm_);
      c10::cuda::CUDAStreamGuard guard(*comm_);
      f();
      return;
    }
#endif
    f();
  }

  /// The communication stream's position now.
  Marker mark_comm() {
#if SHARDLM_HAVE_CUDA
    if (cuda_) {
      auto e = std::make_shared<at::cuda::CUDAEvent>();
      e->record(*comm_);
      return e;
    }
#endif
    return {};
  }

  /// Compute waits (on the device, not the host) for a marker.
  void compute_waits(const Marker& m) {
#if SHARDLM_HAVE_CUDA
    if (cuda_ && m) m->block(*compute_);
#else
    (void)m;
#endif
  }

  /// Compute waits for all communication enqueued so far.
  void join() { compute_waits(mark_comm()); }

  /// The communication stream waits (on the device) for a marker of another stream: work enqueued on it later
  /// starts after that point (a copy made by the offloaded host step, HostShards).
  void comm_waits(const Marker& m) {
#if SHARDLM_HAVE_CUDA
    if (cuda_ && m) m->block(*comm_);
#else
    (void)m;
#endif
  }

  /// Blocks the calling host thread until the point a marker recorded is reached (nothing on the CPU).
  static void wait_for(const Marker& m) {
#if SHARDLM_HAVE_CUDA
    if (m) m->synchronize();
#else
    (void)m;
#endif
  }

  /// The host waits for everything enqueued on both streams.
  void synchronize() {
#if SHARDLM_HAVE_CUDA
    if (cuda_) comm_->synchronize(), compute_->synchronize();
#endif
  }

  /// Runs f with a stream of its own for `device` current (made on first use by the calling thread: the offloaded host
  /// step's copies to the device) and returns a marker of the point after f's work; on the CPU f runs and nothing is
  /// returned.
  template <class F>
  static Marker on_side_stream(const at::Device& device, F&& f) {
#if SHARDLM_HAVE_CUDA
    if (device.is_cuda()) {
      thread_local std::optional<c10::cuda::CUDAStream> side;
      if (!side) side.emplace(c10::cuda::getStreamFromPool(/*isHighPriority=*/false, device.index()));
      c10::cuda::CUDAStreamGuard guard(*side);
      f();
      auto e = std::make_shared<at::cuda::CUDAEvent>();
      e->record(*side);
      return e;
    }
#endif
    (void)device;
    f();
    return {};
  }

  /// `t`, made on compute, is read by the communication stream: its memory is not reused before that is done.
  void used_by_comm(const at::Tensor& t) {
#if SHARDLM_HAVE_CUDA
    if (cuda_ && t.defined() && t.is_cuda())
      c10::cuda::CUDACachingAllocator::recordStream(t.storage().data_ptr(), *comm_);
#else
    (void)t;
#endif
  }

 private:
  bool cuda_;
#if SHARDLM_HAVE_CUDA
  std::optional<c10::cuda::CUDAStream> compute_, comm_;
#endif
};

}  // namespace shardlm::engine
