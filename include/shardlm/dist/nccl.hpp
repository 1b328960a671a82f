#pragma once
// NCCL for CUDA tensors, called directly: collectives on the caller's current CUDA stream (the engine's
// communication stream), communicators created non-blocking and polled against a deadline, so that a rank
// that never joins is an error naming the group, not a hang. Collectives are asynchronous, so their deadline is
// kept by a watchdog thread: each one records an event after it; when the oldest has not completed within the
// timeout, the watchdog reports it (kind, sequence number, label, and the ranks that did not arrive, from
// dist/hang_report.hpp), aborts the communicator and ends the process with exit code 1, so that the launcher
// stops the job (the training thread may be blocked in a CUDA call that would never return).
// Built when CMake found NCCL (SHARDLM_WITH_NCCL).
#if SHARDLM_WITH_NCCL
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <nccl.h>
#include <torch/csrc/distributed/c10d/Store.hpp>

#include <atomic>
#include <chrono>
#include <cstdlib>
#include <cstring>
#include <deque>
#include <optional>
#include <mutex>
#include <thread>
#include <vector>

#include "shardlm/core/log.hpp"
#include "shardlm/dist/communicator.hpp"
#include "shardlm/dist/hang_report.hpp"

namespace shardlm::dist {

class NcclCommunicator final : public Communicator {
 public:
  /// Creates the communicator of group `name` on CUDA device `device`: rank 0 of the group publishes the NCCL
  /// id in `store`, the others read it; all wait at most `timeout` for each other.
  NcclCommunicator(const c10::intrusive_ptr<c10d::Store>& store, const std::string& name, int rank, int size,
                   int device, std::chrono::milliseconds timeout)
      : name_(name), rank_(rank), size_(size), device_(device), store_(store), timeout_(timeout) {
    ncclUniqueId id;
    const std::string key = "shardlm/nccl/" + name;
    if (rank == 0) {
      check(ncclGetUniqueId(&id), "ncclGetUniqueId");
      const auto* p = reinterpret_cast<const uint8_t*>(&id);
      store->set(key, std::vector<uint8_t>(p, p + sizeof id));
    } else {
      std::vector<uint8_t> bytes;
      try {
        bytes = store->get(key);
      } catch (const std::exception& e) {
        fail<Error>(describe(), ": rank ", rank, " did not receive the NCCL id from the group's first rank within ",
                    timeout.count() / 1000, " s (did it start?)");
      }
      if (bytes.size() != sizeof id) fail<InternalError>(describe(), ": NCCL id of ", bytes.size(), " bytes");
      std::memcpy(&id, bytes.data(), sizeof id);
    }
    c10::cuda::CUDAGuard guard(static_cast<c10::DeviceIndex>(device));
    ncclConfig_t config = NCCL_CONFIG_INITIALIZER;
    config.blocking = 0;
    const auto r = ncclCommInitRankConfig(&comm_, size, id, rank, &config);
    if (r != ncclSuccess && r != ncclInProgress) check(r, "ncclCommInitRankConfig");
    wait_ready(std::chrono::steady_clock::now() + timeout, "to connect");
    watchdog_ = std::thread([this] { watch(); });
  }
  ~NcclCommunicator() override {
    stopping_ = true;
    if (watchdog_.joinable()) watchdog_.join();
    for (auto& p : pending_) cudaEventDestroy(p.done);
    for (auto e : free_events_) cudaEventDestroy(e);
    if (!comm_) return;
    ncclResult_t state = ncclSuccess;
    ncclCommGetAsyncError(comm_, &state);
    if (state == ncclSuccess) {
      ncclCommFinalize(comm_);
      do ncclCommGetAsyncError(comm_, &state);
      while (state == ncclInProgress);
    }
    state == ncclSuccess ? ncclCommDestroy(comm_) : ncclCommAbort(comm_);
  }
  NcclCommunicator(const NcclCommunicator&) = delete;
  NcclCommunicator& operator=(const NcclCommunicator&) = delete;

  int rank() const override { return rank_; }
  int size() const override { return size_; }
  std::string describe() const override { return detail::cat("nccl group '", name_, "' (", size_, " ranks)"); }

  void all_gather(const at::Tensor& out, const at::Tensor& in, const char* label = nullptr) override {
    prepare(out, "all-gather output"), prepare(in, "all-gather input"), check_sizes(in, out);
    enter("all-gather", label);
    enqueue(ncclAllGather(in.data_ptr(), out.data_ptr(), in.numel(), type(in), comm_, stream()), "ncclAllGather");
  }
  void reduce_scatter(const at::Tensor& out, const at::Tensor& in, Reduce op, const char* label = nullptr) override {
    prepare(out, "reduce-scatter output"), prepare(in, "reduce-scatter input"), check_sizes(out, in);
    enter("reduce-scatter", label);
    enqueue(ncclReduceScatter(in.data_ptr(), out.data_ptr(), out.numel(), type(in), to_nccl(op), comm_, stream()),
            "ncclReduceScatter");
  }
  void all_reduce(const at::Tensor& t, Reduce op, const char* label = nullptr) override {
    prepare(t, "all-reduce");
    enter("all-reduce", label);
    enqueue(ncclAllReduce(t.data_ptr(), t.data_ptr(), t.numel(), type(t), to_nccl(op), comm_, stream()), "ncclAllReduce");
  }
  void broadcast(const at::Tensor& t, int root, const char* label = nullptr) override {
    prepare(t, "broadcast");
    enter("broadcast", label);
    enqueue(ncclBroadcast(t.data_ptr(), t.data_ptr(), t.numel(), type(t), root, comm_, stream()), "ncclBroadcast");
  }
  /// Grouped point-to-point calls (NCCL has no all-to-all of variable counts): one send and one receive per peer
  /// with rows to move, the copy to itself on the stream.
  void all_to_all(const at::Tensor& out, const at::Tensor& in, const std::vector<int64_t>& recv,
                  const std::vector<int64_t>& send, const char* label = nullptr) override {
    prepare(out, "all-to-all output"), prepare(in, "all-to-all input"), check_splits(out, in, recv, send);
    enter("all-to-all", label);
    const int64_t row = in.size(0) > 0 ? in.numel() / in.size(0) : (out.size(0) > 0 ? out.numel() / out.size(0) : 0);
    const auto bytes = static_cast<int64_t>(in.element_size()) * row;
    auto* src = static_cast<char*>(in.data_ptr());
    auto* dst = static_cast<char*>(out.data_ptr());
    check(ncclGroupStart(), "ncclGroupStart");
    int64_t s_at = 0, r_at = 0;  // rows before peer p's
    for (int p = 0; p < size_; s_at += send[p], r_at += recv[p], ++p) {
      if (p == rank_) {
        if (send[p] > 0 && cudaMemcpyAsync(dst + r_at * bytes, src + s_at * bytes, send[p] * bytes,
                                           cudaMemcpyDeviceToDevice, stream()) != cudaSuccess)
          fail<Error>(describe(), ", rank ", rank_, ": the all-to-all's copy to itself failed");
        continue;
      }
      if (send[p] > 0) check(ncclSend(src + s_at * bytes, send[p] * row, type(in), p, comm_, stream()), "ncclSend");
      if (recv[p] > 0) check(ncclRecv(dst + r_at * bytes, recv[p] * row, type(out), p, comm_, stream()), "ncclRecv");
    }
    enqueue(ncclGroupEnd(), "ncclGroupEnd");
  }
  /// An all-reduce of one float, waited for on the host.
  void barrier(const char* label = nullptr) override {
    auto t = at::zeros({1}, at::TensorOptions().device(at::kCUDA, device_));
    enter("barrier", label);
    enqueue(ncclAllReduce(t.data_ptr(), t.data_ptr(), 1, ncclFloat32, ncclSum, comm_, stream()), "ncclAllReduce");
    c10::cuda::getCurrentCUDAStream(static_cast<c10::DeviceIndex>(device_)).synchronize();
  }

 private:
  cudaStream_t stream() const { return c10::cuda::getCurrentCUDAStream(static_cast<c10::DeviceIndex>(device_)).stream(); }

  void prepare(const at::Tensor& t, const char* role) const {
    Communicator::check(t, role, at::kCUDA);
    if (t.device().index() != device_)
      fail<ConfigError>(describe(), ": the ", role, " tensor is on ", t.device().str(), ", this rank's GPU is cuda:", device_);
  }

  static ncclRedOp_t to_nccl(Reduce op) { return op == Reduce::Sum ? ncclSum : ncclMax; }

  ncclDataType_t type(const at::Tensor& t) const {
    switch (t.scalar_type()) {
      case at::kFloat: return ncclFloat32;
      case at::kBFloat16: return ncclBfloat16;
      case at::kHalf: return ncclFloat16;
      case at::kDouble: return ncclFloat64;
      case at::kLong: return ncclInt64;
      case at::kInt: return ncclInt32;
      case at::kByte: return ncclUint8;
      default: fail<InternalError>(describe(), ": no NCCL type for ", t.scalar_type());
    }
  }

  void check(ncclResult_t r, const char* what) const {
    if (r == ncclSuccess) return;
    const char* last = comm_ ? ncclGetLastError(comm_) : nullptr;
    fail<Error>(describe(), ", rank ", rank_, ": ", what, " failed: ", ncclGetErrorString(r),
                last && *last ? detail::cat(" (", last, ")") : std::string());
  }

  /// A non-blocking communicator may return ncclInProgress: poll until the call is enqueued. Then the watchdog
  /// follows the collective (an event recorded after it on its stream).
  void enqueue(ncclResult_t r, const char* what) {
    if (r == ncclInProgress) wait_ready(std::chrono::steady_clock::now() + timeout_, what);
    else check(r, what);
    std::lock_guard<std::mutex> lock(mutex_);  // one lock per collective; the watchdog takes it every 100 ms
    cudaEvent_t done = nullptr;
    if (!free_events_.empty()) done = free_events_.back(), free_events_.pop_back();
    if (!done && cudaEventCreateWithFlags(&done, cudaEventDisableTiming) != cudaSuccess)
      fail<Error>(describe(), ", rank ", rank_, ": cannot create a CUDA event for the collective watchdog");
    if (cudaEventRecord(done, stream()) != cudaSuccess)
      fail<Error>(describe(), ", rank ", rank_, ": cannot record the collective watchdog's CUDA event");
    pending_.push_back({done, std::chrono::steady_clock::now(), state_});
  }

  /// The watchdog thread: retires completed collectives; reports the oldest one when it is late and ends the
  /// process (see the top of the file).
  void watch() {
    c10::cuda::CUDAGuard guard(static_cast<c10::DeviceIndex>(device_));
    while (!stopping_) {
      std::optional<Pending> late;
      {
        std::lock_guard<std::mutex> lock(mutex_);
        while (!pending_.empty() && cudaEventQuery(pending_.front().done) != cudaErrorNotReady) {
          free_events_.push_back(pending_.front().done);
          pending_.pop_front();
        }
        if (!pending_.empty() && std::chrono::steady_clock::now() - pending_.front().enqueued > timeout_)
          late = pending_.front();
      }
      if (late) {
        const auto report = hang_report(*store_, name_, *this, late->what, timeout_);
        log::info("shardlm: error: ", describe(), ", rank ", member(rank_), ": ", describe_collective(late->what),
                  " did not complete within ", timeout_.count() / 1000.0, " s (--dist-timeout): ", report,
                  "; aborting the communicator and exiting");
        ncclCommAbort(comm_);
        std::_Exit(1);
      }
      std::this_thread::sleep_for(std::chrono::milliseconds(100));
    }
  }

  void wait_ready(std::chrono::steady_clock::time_point deadline, const char* what) {
    ncclResult_t state = ncclInProgress;
    while (true) {
      check(ncclCommGetAsyncError(comm_, &state), "ncclCommGetAsyncError");
      if (state != ncclInProgress) break;
      if (std::chrono::steady_clock::now() > deadline) {
        ncclCommAbort(comm_);
        comm_ = nullptr;
        fail<Error>(describe(), ", rank ", rank_, ": timed out waiting ", what, " (a rank that never joined, or a hang)");
      }
      std::this_thread::yield();
    }
    check(state, what);
  }

  struct Pending {
    cudaEvent_t done;
    std::chrono::steady_clock::time_point enqueued;
    CollectiveState what;
  };

  std::string name_;
  int rank_, size_, device_;
  c10::intrusive_ptr<c10d::Store> store_;
  std::chrono::milliseconds timeout_;
  ncclComm_t comm_ = nullptr;
  std::mutex mutex_;                     // pending_ and free_events_, shared with the watchdog
  std::deque<Pending> pending_;          // enqueued collectives not yet seen complete, oldest first
  std::vector<cudaEvent_t> free_events_; // events of completed collectives, for reuse
  std::atomic<bool> stopping_{false};
  std::thread watchdog_;
};
static_assert(Collectives<NcclCommunicator>);

}  // namespace shardlm::dist
#endif  // SHARDLM_WITH_NCCL
