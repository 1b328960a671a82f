#pragma once
// The collectives the engine needs, behind one interface: NCCL for CUDA tensors (dist/nccl.hpp), Gloo
// through c10d for CPU tensors (dist/gloo.hpp), and a group of one. Buffers are flat and contiguous:
//   all_gather(out [n * size], in [n])        out = concat over ranks of in, in rank order
//   reduce_scatter(out [n], in [n * size])    out = this rank's slice of the reduction of in
//   all_reduce(t), broadcast(t, root), barrier()
//   all_to_all(out [sum recv, ...], in [sum send, ...], recv, send)
//                                             rows in[sum send[<p] .. + send[p]) go to rank p; out holds the rows from
//                                             each rank p in rank order, recv[p] of them (any count may be 0)
// On CUDA a collective is enqueued on the caller's current stream (the engine puts its communication on
// its own stream); on the CPU it has finished when the call returns.
// Each call may carry a label (what it moves: a unit's name, "loss", "grad norm"): a pointer that must outlive
// the call, never copied, so that a hang report (dist/hang_report.hpp) can name the collective, its sequence
// number on this communicator and its label without any cost per call.
#include <ATen/ATen.h>

#include <concepts>
#include <memory>
#include <string>
#include <vector>

#include "shardlm/core/errors.hpp"

namespace shardlm::dist {

enum class Reduce { Sum, Max };

/// The latest collective a rank entered on a communicator: its 1-based sequence number there, its kind and label.
struct CollectiveState {
  int64_t seq = 0;
  const char* kind = "none";    ///< "all-gather", "reduce-scatter", "all-reduce", "broadcast", "barrier"
  const char* label = nullptr;  ///< the caller's label, or null
};

class Communicator {
 public:
  virtual ~Communicator() = default;
  virtual int rank() const = 0;
  virtual int size() const = 0;
  /// "nccl", "gloo" or "self"; with the group's name for messages.
  virtual std::string describe() const = 0;
  virtual void all_gather(const at::Tensor& out, const at::Tensor& in, const char* label = nullptr) = 0;
  virtual void reduce_scatter(const at::Tensor& out, const at::Tensor& in, Reduce op, const char* label = nullptr) = 0;
  virtual void all_reduce(const at::Tensor& t, Reduce op, const char* label = nullptr) = 0;
  virtual void broadcast(const at::Tensor& t, int root, const char* label = nullptr) = 0;
  virtual void barrier(const char* label = nullptr) = 0;
  /// Exchanges rows (slices along dim 0): send[p] rows of `in`, in rank order, go to rank p; `out` receives recv[p]
  /// rows from each rank p, in rank order. The counts of every pair must agree (rank p's send[q] = rank q's recv[p]).
  virtual void all_to_all(const at::Tensor& out, const at::Tensor& in, const std::vector<int64_t>& recv,
                          const std::vector<int64_t>& send, const char* label = nullptr) = 0;

  /// The latest collective this rank entered here.
  const CollectiveState& last_collective() const { return state_; }
  /// The global ranks of the group's ranks (for messages); by default the group ranks themselves.
  void set_members(std::vector<int> global_ranks) { members_ = std::move(global_ranks); }
  int member(int group_rank) const {
    return group_rank < static_cast<int>(members_.size()) ? members_[group_rank] : group_rank;
  }

 protected:
  /// Counts a collective and remembers what it is (no allocation: the strings are not copied).
  void enter(const char* kind, const char* label) {
    ++state_.seq;
    state_.kind = kind;
    state_.label = label;
  }

  /// Checks what every collective needs; the error names the group and the tensor's role.
  void check(const at::Tensor& t, const char* role, at::DeviceType device) const {
    if (!t.defined()) fail<InternalError>(describe(), ": the ", role, " tensor is undefined");
    if (t.device().type() != device)
      fail<ConfigError>(describe(), ": the ", role, " tensor is on ", t.device().str(), " but this communicator moves ",
                        c10::DeviceTypeName(device, /*lower_case=*/true),
                        " tensors (NCCL for --device cuda, Gloo for --device cpu)");
    if (!t.is_contiguous()) fail<InternalError>(describe(), ": the ", role, " tensor is not contiguous");
  }
  /// The row counts of an all-to-all: one per rank, none negative, summing to the rows of their buffers.
  void check_splits(const at::Tensor& out, const at::Tensor& in, const std::vector<int64_t>& recv,
                    const std::vector<int64_t>& send) const {
    if (out.dim() < 1 || in.dim() < 1 || out.sizes().slice(1) != in.sizes().slice(1) || out.scalar_type() != in.scalar_type())
      fail<InternalError>(describe(), ": all-to-all buffers ", out.sizes(), " ", out.scalar_type(), " and ", in.sizes(), " ",
                          in.scalar_type(), " differ in row shape or dtype");
    const auto rows = [&](const std::vector<int64_t>& counts, const at::Tensor& t, const char* role) {
      int64_t sum = 0;
      for (const auto c : counts) {
        if (c < 0) fail<InternalError>(describe(), ": all-to-all ", role, " count ", c, " is negative");
        sum += c;
      }
      if (static_cast<int>(counts.size()) != size() || t.size(0) != sum)
        fail<InternalError>(describe(), ": all-to-all ", role, " counts (", counts.size(), " ranks, ", sum,
                            " rows) do not fit a group of ", size(), " and a buffer of ", t.size(0), " rows");
    };
    rows(recv, out, "receive"), rows(send, in, "send");
  }
  void check_sizes(const at::Tensor& small, const at::Tensor& large) const {
    if (large.numel() != small.numel() * size() || large.scalar_type() != small.scalar_type())
      fail<InternalError>(describe(), ": buffers of ", small.numel(), " and ", large.numel(), " elements (",
                          small.scalar_type(), "/", large.scalar_type(), ") do not fit a group of ", size());
  }

  CollectiveState state_;
  std::vector<int> members_;
};

/// What a communicator offers, as a concept: the engine is written against it.
template <class C>
concept Collectives = requires(C& c, const at::Tensor& t) {
  { c.rank() } -> std::convertible_to<int>;
  { c.size() } -> std::convertible_to<int>;
  c.all_gather(t, t);
  c.reduce_scatter(t, t, Reduce::Sum);
  c.all_reduce(t, Reduce::Sum);
  c.broadcast(t, 0);
  c.barrier();
  c.all_to_all(t, t, std::vector<int64_t>{}, std::vector<int64_t>{});
};

/// A group of one process: every collective is a copy or nothing.
class SelfCommunicator final : public Communicator {
 public:
  explicit SelfCommunicator(std::string name = "self") : name_(std::move(name)) {}
  int rank() const override { return 0; }
  int size() const override { return 1; }
  std::string describe() const override { return name_ + " (a group of one)"; }
  void all_gather(const at::Tensor& out, const at::Tensor& in, const char* = nullptr) override {
    if (!out.is_same(in)) out.copy_(in);
  }
  void reduce_scatter(const at::Tensor& out, const at::Tensor& in, Reduce, const char* = nullptr) override {
    if (!out.is_same(in)) out.copy_(in);
  }
  void all_reduce(const at::Tensor&, Reduce, const char* = nullptr) override {}
  void broadcast(const at::Tensor&, int, const char* = nullptr) override {}
  void barrier(const char* = nullptr) override {}
  void all_to_all(const at::Tensor& out, const at::Tensor& in, const std::vector<int64_t>& recv,
                  const std::vector<int64_t>& send, const char* = nullptr) override {
    check_splits(out, in, recv, send);
    if (!out.is_same(in)) out.copy_(in);
  }

 private:
  std::string name_;
};
static_assert(Collectives<SelfCommunicator>);

}  // namespace shardlm::dist
