#pragma once
// Gloo through c10d for CPU tensors, so that every sharding policy runs with several processes on a machine
// without a GPU (the CPU tests). c10d's ProcessGroupGloo header needs Gloo's headers (Debian: libgloo-dev);
// the implementation is the one inside libtorch_cpu.
#ifndef USE_C10D_GLOO
#define USE_C10D_GLOO 1
#endif
#include <torch/csrc/distributed/c10d/PrefixStore.hpp>
#include <torch/csrc/distributed/c10d/ProcessGroupGloo.hpp>

#include <chrono>
#include <cstdlib>

#include "shardlm/dist/communicator.hpp"
#include "shardlm/dist/hang_report.hpp"

namespace shardlm::dist {

class GlooCommunicator final : public Communicator {
 public:
  /// Joins the group `name` of `size` processes through `store` (keys are prefixed with the name), listening on
  /// `hostname`'s address; an empty hostname takes GLOO_SOCKET_IFNAME's interface or the machine's host name.
  GlooCommunicator(const c10::intrusive_ptr<c10d::Store>& store, const std::string& name, int rank, int size,
                   const std::string& hostname, std::chrono::milliseconds timeout)
      : name_(name), rank_(rank), size_(size), store_(store), timeout_(timeout) {
    // The timeout is also Gloo's deadline for every collective of the group.
    auto opts = c10d::ProcessGroupGloo::Options::create(timeout);
    const char* ifname = std::getenv("GLOO_SOCKET_IFNAME");
    opts->devices.push_back(!hostname.empty()     ? c10d::ProcessGroupGloo::createDeviceForHostname(hostname)
                            : ifname && *ifname ? c10d::ProcessGroupGloo::createDeviceForInterface(ifname)
                                                : c10d::ProcessGroupGloo::createDefaultDevice());
    auto prefixed = c10::make_intrusive<c10d::PrefixStore>("shardlm/gloo/" + name, store);
    try {
      pg_ = c10::make_intrusive<c10d::ProcessGroupGloo>(prefixed, rank, size, opts);
    } catch (const std::exception& e) {
      fail<Error>("gloo group '", name, "' (rank ", rank, " of ", size, ") could not connect: ", first_line(e.what()));
    }
  }

  int rank() const override { return rank_; }
  int size() const override { return size_; }
  std::string describe() const override { return detail::cat("gloo group '", name_, "' (", size_, " ranks)"); }

  void all_gather(const at::Tensor& out, const at::Tensor& in, const char* label = nullptr) override {
    check(out, "all-gather output", at::kCPU), check(in, "all-gather input", at::kCPU), check_sizes(in, out);
    auto o = out, i = in;
    run("all-gather", label, [&] { return pg_->_allgather_base(o, i); });
  }
  void reduce_scatter(const at::Tensor& out, const at::Tensor& in, Reduce op, const char* label = nullptr) override {
    check(out, "reduce-scatter output", at::kCPU), check(in, "reduce-scatter input", at::kCPU), check_sizes(out, in);
    c10d::ReduceScatterOptions o;
    o.reduceOp = to_c10d(op);
    auto a = out, b = in;
    run("reduce-scatter", label, [&] { return pg_->_reduce_scatter_base(a, b, o); });
  }
  void all_reduce(const at::Tensor& t, Reduce op, const char* label = nullptr) override {
    check(t, "all-reduce", at::kCPU);
    c10d::AllreduceOptions o;
    o.reduceOp = to_c10d(op);
    std::vector<at::Tensor> v{t};
    run("all-reduce", label, [&] { return pg_->allreduce(v, o); });
  }
  void broadcast(const at::Tensor& t, int root, const char* label = nullptr) override {
    check(t, "broadcast", at::kCPU);
    c10d::BroadcastOptions o;
    o.rootRank = root;
    std::vector<at::Tensor> v{t};
    run("broadcast", label, [&] { return pg_->broadcast(v, o); });
  }
  void barrier(const char* label = nullptr) override {
    run("barrier", label, [&] { return pg_->barrier(); });
  }
  void all_to_all(const at::Tensor& out, const at::Tensor& in, const std::vector<int64_t>& recv,
                  const std::vector<int64_t>& send, const char* label = nullptr) override {
    check(out, "all-to-all output", at::kCPU), check(in, "all-to-all input", at::kCPU), check_splits(out, in, recv, send);
    auto o = out, i = in;
    auto r = recv, s = send;  // c10d takes them by non-const reference
    run("all-to-all", label, [&] { return pg_->alltoall_base(o, i, r, s); });
  }

 private:
  static c10d::ReduceOp to_c10d(Reduce op) { return op == Reduce::Sum ? c10d::ReduceOp::SUM : c10d::ReduceOp::MAX; }
  static std::string first_line(const std::string& s) { return s.substr(0, s.find('\n')); }

  /// Runs a collective; when it fails (Gloo's deadline passed, or a peer closed its connection) the error names
  /// it and, from the other ranks' reports (dist/hang_report.hpp), the ranks that did not arrive.
  template <class F>
  void run(const char* kind, const char* label, F&& collective) {
    enter(kind, label);
    const auto start = std::chrono::steady_clock::now();
    try {
      collective()->wait();
    } catch (const Error&) {
      throw;
    } catch (const std::exception& e) {
      const double waited = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
      const double limit = timeout_.count() / 1000.0;
      fail<Error>(describe(), ", rank ", member(rank_), ": ", describe_collective(state_),
                  waited >= 0.95 * limit ? detail::cat(" did not complete within ", limit, " s (--dist-timeout)")
                                         : detail::cat(" failed after ", waited, " s"),
                  ": ", hang_report(*store_, name_, *this, state_, timeout_), " [", first_line(e.what()), "]");
    }
  }

  std::string name_;
  int rank_, size_;
  c10::intrusive_ptr<c10d::Store> store_;
  std::chrono::milliseconds timeout_;
  c10::intrusive_ptr<c10d::Backend> pg_;
};
static_assert(Collectives<GlooCommunicator>);

}  // namespace shardlm::dist
