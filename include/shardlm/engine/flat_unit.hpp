#pragma once
// One unit's flat parameter group. The unit's parameters, flattened in order and padded to a multiple of the
// shard group size G, make one buffer of `padded` elements; this rank owns the contiguous slice
// [r * S, (r + 1) * S), S = padded / G, of the master weights, the gradients and the optimizer state.
//
// The module's parameters stay leaf tensors of the model; their data are views of one gathered buffer in the
// compute dtype. Releasing the buffer frees its storage (resized to zero bytes) and gathering fills the same
// storage again, so autograd graphs that saved the parameters stay valid across a release.
#include <ATen/ATen.h>

#include <string>
#include <utility>
#include <vector>

#include "shardlm/core/compat.hpp"
#include "shardlm/core/errors.hpp"
#include "shardlm/dist/communicator.hpp"

namespace shardlm::engine {

using NamedTensors = std::vector<std::pair<std::string, at::Tensor>>;

struct Slot {
  std::string name;
  at::Tensor param;      ///< the module's parameter (its data: a view of the gathered buffer)
  int64_t offset = 0;    ///< first element in the flat buffer
  int64_t numel = 0;
  bool decay = false;    ///< weight decay applies (matrices and embeddings)
};

/// Frees (nbytes 0) or allocates a tensor's storage in place: views of it stay views of it.
inline void resize_storage(const at::Tensor& t, size_t nbytes) {
  auto* impl = t.storage().unsafeGetStorageImpl();
  if (impl->nbytes() == nbytes) return;
  if (nbytes == 0) {
    impl->set_data_ptr_noswap(at::DataPtr(nullptr, t.device()));
  } else {
    SHARDLM_ASSERT(impl->nbytes() == 0, "a storage is only ever freed or filled");
    impl->set_data_ptr_noswap(impl->allocator()->allocate(nbytes));
  }
  impl->set_nbytes(nbytes);
}

class FlatUnit {
 public:
  /// Lays out `params` (name, parameter) for a shard group of `group_size` ranks, this rank being `group_rank`.
  FlatUnit(std::string name, const NamedTensors& params, int group_size, int group_rank)
      : name_(std::move(name)), group_size_(group_size), group_rank_(group_rank) {
    for (const auto& [n, p] : params) {
      slots_.push_back({n, p, numel_, p.numel(), p.dim() >= 2});
      numel_ += p.numel();
    }
    padded_ = (numel_ + group_size - 1) / group_size * group_size;
    shard_ = padded_ / group_size;
    // The decayed runs of this rank's shard, in shard coordinates (adjacent parameters merged).
    const int64_t lo = shard_ * group_rank, hi = lo + shard_;
    for (const auto& s : slots_) {
      const int64_t a = std::max(lo, s.offset), b = std::min(hi, s.offset + s.numel);
      if (!s.decay || a >= b) continue;
      if (!decay_runs_.empty() && decay_runs_.back().second == a - lo) decay_runs_.back().second = b - lo;
      else decay_runs_.emplace_back(a - lo, b - lo);
    }
  }

  const std::string& name() const { return name_; }
  const std::vector<Slot>& slots() const { return slots_; }
  int64_t numel() const { return numel_; }
  int64_t padded() const { return padded_; }
  int64_t shard_numel() const { return shard_; }
  /// [begin, end) element ranges of the shard whose parameters take weight decay.
  const std::vector<std::pair<int64_t, int64_t>>& decay_runs() const { return decay_runs_; }
  /// The rest of the shard (norm scales, biases, padding), as [begin, end) ranges.
  std::vector<std::pair<int64_t, int64_t>> plain_runs() const {
    std::vector<std::pair<int64_t, int64_t>> out;
    int64_t at = 0;
    for (auto [a, b] : decay_runs_) {
      if (a > at) out.emplace_back(at, a);
      at = b;
    }
    if (at < shard_) out.emplace_back(at, shard_);
    return out;
  }

  /// Calls f(slot, first element in the parameter, first element in the shard, count) for each part of a
  /// parameter inside this rank's shard, in order.
  template <class F>
  void for_each_in_shard(F&& f) const {
    const int64_t lo = shard_ * group_rank_;
    for (const auto& s : slots_) {
      const int64_t a = std::max(lo, s.offset), b = std::min(lo + shard_, s.offset + s.numel);
      if (a < b) f(s, a - s.offset, a - lo, b - a);
    }
  }

  /// Takes this rank's slice of the unit's full weights (the module's parameters, materialized) as the master
  /// shard, sets up gradient and optimizer state, and points the parameters at the gathered buffer (released).
  /// With `offload`, master weights, gradients and optimizer state live in host memory (pinned when the device
  /// is a GPU) and the device keeps only this rank's shard in the compute dtype, which gathers read.
  void shard_from_params(const at::TensorOptions& master, at::ScalarType compute, at::ScalarType reduce,
                         bool offload = false) {
    shard_with(master, compute, reduce, offload, [&](at::Tensor& shard) {
      for_each_in_shard([&](const Slot& s, int64_t in_param, int64_t in_shard, int64_t n) {
        shard.narrow(0, in_shard, n).copy_(s.param.detach().reshape(-1).narrow(0, in_param, n));
      });
    });
  }

  /// As shard_from_params, with the master shard (zeros: the padding stays zero) filled by `fill(master_shard)`
  /// instead: the module's parameters are never materialized (a checkpoint read by byte ranges).
  template <class Fill>
  void shard_with(const at::TensorOptions& master, at::ScalarType compute, at::ScalarType reduce, bool offload,
                  Fill&& fill) {
    at::NoGradGuard no_grad;
    const auto device_opts = master;
    const auto state = offload ? master.device(at::kCPU) : master;
    // Offloaded from a GPU: master and gradient shards page-locked (asynchronous copies), exactly sized.
    const bool pin = offload && master.device().is_cuda();
    auto zeros = [&](at::ScalarType dtype) {
      return pin ? compat::pinned_empty(shard_, dtype).zero_() : at::zeros({shard_}, state.dtype(dtype));
    };
    master_ = zeros(state.dtype().toScalarType());
    fill(master_);
    grad_ = zeros(reduce);
    exp_avg_ = at::zeros_like(master_);  // never copied: pageable host memory is enough
    exp_avg_sq_ = at::zeros_like(master_);
    if (offload) device_shard_ = master_.to(device_opts.dtype(compute));
    gathered_ = at::empty({padded_}, device_opts.dtype(compute));
    for (auto& s : slots_) s.param.set_data(gathered_.narrow(0, s.offset, s.numel).view(s.param.sizes()));
    release();
  }

  bool is_gathered() const { return gathered_flag_; }
  /// A unit without parameters of this group (a LoRA run's embedding): nothing to gather, reduce or step.
  bool empty() const { return padded_ == 0; }

  /// Allocates the gathered buffer (on the current stream): call before gather() on the compute stream.
  void allocate() {
    resize_storage(gathered_, static_cast<size_t>(padded_) * gathered_.element_size());
    gathered_flag_ = true;
  }

  bool offloaded() const { return device_shard_.defined(); }

  /// Fills the gathered buffer from every rank's shard (on the current stream): the master shard cast to the
  /// compute dtype, or with offload the device's compute-dtype copy of it.
  void gather(dist::Communicator& shard_group) {
    if (empty()) return;
    at::NoGradGuard no_grad;
    const auto& source = offloaded() ? device_shard_ : master_;
    if (shard_group.size() == 1) {
      gathered_.copy_(source);
    } else {
      const auto send = source.scalar_type() == gathered_.scalar_type() ? source : source.to(gathered_.scalar_type());
      shard_group.all_gather(gathered_, send, name_.c_str());
    }
  }

  /// With offload, copies the updated master shard to the device's compute-dtype shard (on the current stream).
  void refresh_device_shard() {
    if (!offloaded()) return;
    at::NoGradGuard no_grad;
    device_shard_.copy_(master_.to(device_shard_.device(), /*non_blocking=*/true));
  }

  void release() {
    resize_storage(gathered_, 0);
    gathered_flag_ = false;
  }

  /// Whether take_grads may write straight into the gradient shard: one rank in the shard group (the shard is the
  /// whole unit and the reduction is the identity), on the device, the step's first micro-batch.
  bool grads_into_shard(const dist::Communicator& shard_group, at::ScalarType reduce, bool first_micro_batch) const {
    return first_micro_batch && shard_group.size() == 1 && !offloaded() && !empty() && shard_ == padded_ &&
           grad_.scalar_type() == reduce;
  }

  /// The parameters' gradients as one [padded] buffer in dtype `reduce` (zeros where a parameter got none);
  /// the parameters' own gradients are dropped. `keep` is told of every gradient read. With `into_shard` (see
  /// grads_into_shard) the buffer is the gradient shard itself: nothing is left to reduce.
  template <class Keep>
  at::Tensor take_grads(at::ScalarType reduce, Keep&& keep, bool into_shard = false) {
    at::NoGradGuard no_grad;
    auto flat = into_shard ? grad_ : at::empty({padded_}, gathered_.options().dtype(reduce));
    if (padded_ > numel_) flat.narrow(0, numel_, padded_ - numel_).zero_();
    for (auto& s : slots_) {
      auto& g = s.param.mutable_grad();
      auto dst = flat.narrow(0, s.offset, s.numel);
      if (g.defined()) {
        dst.copy_(g.reshape(-1));
        keep(g);
      } else {
        dst.zero_();
      }
      g = at::Tensor();
    }
    return flat;
  }

  /// Puts this rank's slice of the group's reduction of `flat` (in the gradient shard's dtype) into the gradient
  /// shard: the first micro-batch of a step writes it (on the device the reduce-scatter writes straight into the
  /// shard: no zeroing pass, no temporary slice, no add), later ones add to it. With offload the slice is first
  /// all-reduced over `replicas` (when there are some) and copied to host memory, asynchronously: the first
  /// micro-batch copies into the gradient shard, later ones into a staging buffer that finish_host_grads() adds
  /// once the copies are done. With `norm`, the slice's L2 norm (fp32) is stored there, computed on the device, so
  /// that the host need not read the gradients for the norm.
  void reduce_into_shard(dist::Communicator& shard_group, const at::Tensor& flat, dist::Communicator& replicas,
                         bool first_micro_batch, at::Tensor* norm = nullptr) {
    if (empty()) return;
    if (!offloaded() && first_micro_batch && shard_group.size() > 1) {
      shard_group.reduce_scatter(grad_, flat, dist::Reduce::Sum, name_.c_str());
      return;
    }
    at::Tensor part = flat;
    if (shard_group.size() > 1) {
      part = at::empty({shard_}, flat.options());
      shard_group.reduce_scatter(part, flat, dist::Reduce::Sum, name_.c_str());
    }
    if (!offloaded()) {
      first_micro_batch ? grad_.copy_(part) : grad_.add_(part);
      return;
    }
    if (replicas.size() > 1) replicas.all_reduce(part, dist::Reduce::Sum, name_.c_str());
    if (norm) *norm = at::_foreach_norm({part}, 2, at::kFloat)[0];  // the kernel of optim::global_norm
    if (first_micro_batch) {
      grad_.copy_(part, /*non_blocking=*/true);
    } else {
      if (!staging_.defined())
        staging_ = grad_.is_pinned() ? compat::pinned_empty(shard_, grad_.scalar_type()) : at::empty_like(grad_);
      staging_.copy_(part, /*non_blocking=*/true);
      staged_ = true;
    }
  }

  /// Adds the staged gradients of an offloaded unit (call after the copies have completed).
  void finish_host_grads() {
    if (staged_) grad_.add_(staging_);
    staged_ = false;
  }

  /// The unit's full master weights, gathered from the shard group: (name, tensor) on the master's device.
  NamedTensors full_master(dist::Communicator& shard_group) const {
    if (empty()) return {};
    const auto local = master_.to(gathered_.device());  // from the host when offloaded
    auto full = at::empty({padded_}, local.options());
    shard_group.all_gather(full, local, name_.c_str());
    NamedTensors out;
    for (const auto& s : slots_) out.emplace_back(s.name, full.narrow(0, s.offset, s.numel).view(s.param.sizes()));
    return out;
  }

  at::Tensor& master() { return master_; }
  const at::Tensor& master() const { return master_; }
  at::Tensor& grad() { return grad_; }
  const at::Tensor& grad() const { return grad_; }
  at::Tensor& exp_avg() { return exp_avg_; }
  const at::Tensor& exp_avg() const { return exp_avg_; }
  at::Tensor& exp_avg_sq() { return exp_avg_sq_; }
  const at::Tensor& exp_avg_sq() const { return exp_avg_sq_; }

 private:
  std::string name_;
  int group_size_, group_rank_;
  std::vector<Slot> slots_;
  int64_t numel_ = 0, padded_ = 0, shard_ = 0;
  std::vector<std::pair<int64_t, int64_t>> decay_runs_;
  at::Tensor master_, grad_, exp_avg_, exp_avg_sq_, gathered_;
  at::Tensor device_shard_, staging_;  // offload only
  bool staged_ = false;
  bool gathered_flag_ = false;
};

}  // namespace shardlm::engine
