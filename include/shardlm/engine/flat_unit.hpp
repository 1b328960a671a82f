#pragma once
// One unit's flat parameter group. The unit's parameters, flattened in order and padded to a multiple of the
// shard group size G, make one buffer of `padded` elements; this rank owns the contiguous slice
// [r * S, (r + 1) * S), S = padded / G, of the master weights, the gradients and the optimizer state (ShardState,
// placed by the offload policy's storage: engine/offload.hpp).
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
#include "shardlm/engine/unit_model.hpp"

namespace shardlm::engine {

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

/// This rank's shard of a unit's trainable state, each [S], wherever the offload policy keeps it.
struct ShardState {
  at::Tensor master, grad, exp_avg, exp_avg_sq;
  at::Tensor gather_source;  ///< what gathers read: the master shard, or a compute-dtype copy on the device
};

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

  /// Copies this rank's slice of the module's parameters (materialized) into `master_shard`.
  void copy_params_into(at::Tensor& master_shard) const {
    at::NoGradGuard no_grad;
    for_each_in_shard([&](const Slot& s, int64_t in_param, int64_t in_shard, int64_t n) {
      master_shard.narrow(0, in_shard, n).copy_(s.param.detach().reshape(-1).narrow(0, in_param, n));
    });
  }

  /// Takes this rank's state (placed by the offload policy's storage) and points the parameters at the gathered
  /// buffer, in the compute dtype on `device` (released).
  void bind(ShardState state, const at::Device& device, at::ScalarType compute) {
    at::NoGradGuard no_grad;
    state_ = std::move(state);
    gathered_ = at::empty({padded_}, at::TensorOptions().device(device).dtype(compute));
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

  /// Fills the gathered buffer from every rank's shard (on the current stream), cast to the compute dtype.
  void gather(dist::Communicator& shard_group) {
    if (empty()) return;
    at::NoGradGuard no_grad;
    const auto& source = state_.gather_source;
    if (shard_group.size() == 1) {
      gathered_.copy_(source);
    } else {
      const auto send = source.scalar_type() == gathered_.scalar_type() ? source : source.to(gathered_.scalar_type());
      shard_group.all_gather(gathered_, send, name_.c_str());
    }
  }

  void release() {
    resize_storage(gathered_, 0);
    gathered_flag_ = false;
  }

  /// The parameters' gradients as one [padded] buffer in dtype `dtype` (zeros where a parameter got none), or cast
  /// straight into `into` (the gradient shard: GradientPath::cast_into_shard); the parameters' own gradients are
  /// dropped. `keep` is told of every gradient read.
  template <class Keep>
  at::Tensor take_grads(at::ScalarType dtype, Keep&& keep, const at::Tensor* into = nullptr) {
    at::NoGradGuard no_grad;
    auto flat = into ? *into : at::empty({padded_}, gathered_.options().dtype(dtype));
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

  /// The unit's full master weights, gathered from the shard group: (name, tensor) on the gathered buffer's device.
  NamedTensors full_master(dist::Communicator& shard_group) const {
    if (empty()) return {};
    const auto local = state_.master.to(gathered_.device());  // from the host when offloaded
    auto full = at::empty({padded_}, local.options());
    shard_group.all_gather(full, local, name_.c_str());
    NamedTensors out;
    for (const auto& s : slots_) out.emplace_back(s.name, full.narrow(0, s.offset, s.numel).view(s.param.sizes()));
    return out;
  }

  ShardState& state() { return state_; }
  const ShardState& state() const { return state_; }
  at::Tensor& master() { return state_.master; }
  const at::Tensor& master() const { return state_.master; }
  at::Tensor& grad() { return state_.grad; }
  const at::Tensor& grad() const { return state_.grad; }
  at::Tensor& exp_avg() { return state_.exp_avg; }
  const at::Tensor& exp_avg() const { return state_.exp_avg; }
  at::Tensor& exp_avg_sq() { return state_.exp_avg_sq; }
  const at::Tensor& exp_avg_sq() const { return state_.exp_avg_sq; }

 private:
  std::string name_;
  int group_size_, group_rank_;
  std::vector<Slot> slots_;
  int64_t numel_ = 0, padded_ = 0, shard_ = 0;
  std::vector<std::pair<int64_t, int64_t>> decay_runs_;
  ShardState state_;
  at::Tensor gathered_;
  bool gathered_flag_ = false;
};

}  // namespace shardlm::engine
