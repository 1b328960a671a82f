#pragma once
// The engine's two CUDA streams: compute (the current stream) and communication (gathers, reductions), ordered
// by events so that communication overlaps compute. On the CPU every call is a no-op: Gloo's collectives have
// finished when they return.
#include <ATen/ATen.h>

#include <memory>

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

  /// The host waits for everything enqueued on both streams.
  void synchronize() {
#if SHARDLM_HAVE_CUDA
    if (cuda_) comm_->synchronize(), compute_->synchronize();
#endif
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
