#pragma once
// Asynchronous checkpoints (--async-save). At a save point the training thread copies this rank's shards (master
// weights, AdamW moments) into host buffers kept for the purpose (pinned, and copied on a side CUDA stream, when
// training on a GPU), and a background thread writes the shard file while training goes on. The copies finish
// before the next optimizer step may change the master shards (the compute stream waits for them).
//
// The background thread issues no collective. Whether every rank has written its file is agreed on the training
// thread: each step's loss all-reduce carries two more numbers, the ranks still writing and the ranks whose write
// failed (votes()); with the sums (the same on every rank) settle() either waits (some rank is still writing),
// commits (every rank's checksums gathered; rank 0: meta.json, COMMITTED, --keep-last) or stops every rank with an
// error, leaving the checkpoint uncommitted. At most one save is in flight: the next save point, the end of the run and a stop first wait for
// it (finish(): one all-reduce). A process that ends with a save in flight (an error) waits for its writer in the
// destructor and commits nothing, so a committed checkpoint is always complete.
#include <ATen/ATen.h>

#include <atomic>
#include <memory>
#include <optional>
#include <string>
#include <thread>
#include <utility>
#include <vector>

#include "shardlm/core/compat.hpp"
#include "shardlm/train/checkpoint.hpp"

#if SHARDLM_HAVE_CUDA
#include <ATen/cuda/CUDAEvent.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#endif

namespace shardlm::train {

class AsyncCheckpointWriter {
 public:
  explicit AsyncCheckpointWriter(const c10::Device& device) : device_(device) {}
  ~AsyncCheckpointWriter() {
    if (thread_.joinable()) thread_.join();
  }
  AsyncCheckpointWriter(const AsyncCheckpointWriter&) = delete;
  AsyncCheckpointWriter& operator=(const AsyncCheckpointWriter&) = delete;

  /// A save was started and is not settled yet (the same on every rank).
  bool in_flight() const { return in_flight_; }
  /// The directory of the latest save started.
  const fs::path& path() const { return path_; }

  /// Starts saving the engine's state at `step` under `dir` (a collective: the directory is made, then every rank
  /// snapshots its shards and starts its writer). No save may be in flight: finish() it first.
  /// `delay`: a test's injected fault (train::Faults::save_delay), waited after the file is written.
  void start(engine::Engine& engine, dist::ProcessGroups& groups, const fs::path& dir, int64_t step,
             const nlohmann::json& run_info, std::chrono::milliseconds delay = {}) {
    SHARDLM_ASSERT(!in_flight_, "an asynchronous save is in flight already");
    path_ = begin_checkpoint(groups, dir, step);
    meta_ = checkpoint_meta(engine, groups, step, run_info);
    units_ = engine.num_units();
    auto file = shard_tensors(engine, groups, path_);
    auto [experts, index] = expert_tensors(engine, groups, path_);  // expert parallelism: this rank's experts' file
    expert_index_ = index;
    expert_files_ = engine.expert_groups() ? groups.expert_parallel() * engine.expert_groups()->shard().size() : 0;
    snapshot(file, buffers_);
    snapshot(experts, expert_buffers_);
    error_.clear();
    crcs_.clear();
    expert_crcs_.clear();
    done_.store(false, std::memory_order_relaxed);
    in_flight_ = true;
    thread_ = std::thread([this, delay, file = std::move(file), experts = std::move(experts)] {
      try {
#if SHARDLM_HAVE_CUDA
        if (copied_) copied_->synchronize();
#endif
        expert_crcs_ = write_shard(experts);
        crcs_ = write_shard(file, delay);
      } catch (const std::exception& e) {
        error_ = e.what();
      }
      done_.store(true, std::memory_order_release);
    });
  }

  /// Before an optimizer step: on CUDA the compute stream waits for the snapshot's copies (no host wait); on the
  /// CPU the copies finished in start().
  void before_update() {
#if SHARDLM_HAVE_CUDA
    if (copy_pending_) {
      copied_->block(c10::cuda::getCurrentCUDAStream(device_.index()));
      copy_pending_ = false;
    }
#endif
  }

  /// This rank's share of the step's all-reduce: (1 while its file is being written, 1 if writing it failed).
  std::pair<float, float> votes() const {
    if (!in_flight_) return {0.f, 0.f};
    const bool done = done_.load(std::memory_order_acquire);
    return {done ? 0.f : 1.f, done && !error_.empty() ? 1.f : 0.f};
  }

  /// With the sums of every rank's votes: when no rank is still writing, settles the save in flight: every rank's
  /// checksums are gathered (a collective) and rank 0 commits, or, when some rank failed, every rank throws and the
  /// checkpoint stays uncommitted.
  void settle(dist::ProcessGroups& groups, double writing, double failed, int64_t keep_last) {
    if (!in_flight_ || writing > 0) return;
    if (thread_.joinable()) thread_.join();  // its file is written: this rank voted 0
    in_flight_ = false;
    if (failed > 0)
      fail<IoError>(path_.string(), ": the asynchronous save failed on ", failed, " rank(s)",
                    error_.empty() ? std::string("; the failing rank's own error says why") : "; on this rank: " + error_,
                    "; the checkpoint stays uncommitted");
    const auto crcs = gather_checksums(groups, device_, units_, crcs_);
    std::vector<std::vector<uint32_t>> experts;
    if (expert_files_ > 0) experts = gather_checksums(groups, device_, units_, expert_crcs_, expert_index_, expert_files_);
    if (groups.rank() == 0) {
      commit_checkpoint(path_, meta_, crcs, keep_last, experts);
      log::info("shardlm: checkpoint ", path_.string(), " committed (written in the background)");
    }
  }

  /// Waits for this rank's writer, then settles the save in flight with the others (a collective: one all-reduce).
  void finish(dist::ProcessGroups& groups, int64_t keep_last) {
    if (!in_flight_) return;
    if (thread_.joinable()) thread_.join();
    auto failed = at::full({1}, error_.empty() ? 0.f : 1.f, at::TensorOptions().device(device_).dtype(at::kFloat));
    groups.world().all_reduce(failed, dist::Reduce::Sum, "checkpoint writers");
    settle(groups, 0, failed.cpu().item<double>(), keep_last);
  }

 private:
  /// Replaces the file's views of the engine's state by copies in host `buffers` of this writer (made once).
  void snapshot(ShardFile& file, std::vector<at::Tensor>& buffers) {
    if (buffers.size() != file.tensors.size()) {
      buffers.clear();
      for (const auto& [name, t] : file.tensors)
        buffers.push_back(device_.is_cuda() ? compat::pinned_empty(t.numel(), t.scalar_type()).view(t.sizes())
                                             : at::empty(t.sizes(), t.scalar_type()));
    }
#if SHARDLM_HAVE_CUDA
    if (device_.is_cuda()) {
      const auto current = c10::cuda::getCurrentCUDAStream(device_.index());
      if (!side_) side_.emplace(c10::cuda::getStreamFromPool(/*isHighPriority=*/false, device_.index()));
      at::cuda::CUDAEvent ready;
      ready.record(current);  // the copies start after the optimizer step that made the state
      ready.block(*side_);
      {
        c10::cuda::CUDAStreamGuard guard(*side_);
        for (size_t i = 0; i < buffers.size(); ++i) buffers[i].copy_(file.tensors[i].second, /*non_blocking=*/true);
      }
      copied_ = std::make_shared<at::cuda::CUDAEvent>();
      copied_->record(*side_);
      copy_pending_ = true;
      for (size_t i = 0; i < buffers.size(); ++i) file.tensors[i].second = buffers[i];
      return;
    }
#endif
    for (size_t i = 0; i < buffers.size(); ++i) {
      buffers[i].copy_(file.tensors[i].second);
      file.tensors[i].second = buffers[i];
    }
  }

  c10::Device device_;
  std::vector<at::Tensor> buffers_;         // host copies of this rank's shards, reused by every save
  std::vector<at::Tensor> expert_buffers_;  // and of its experts' shards (expert parallelism)
  int64_t expert_index_ = -1, expert_files_ = 0;  // this rank's expert file, of how many (0: none)
  std::vector<uint32_t> expert_crcs_;
  fs::path path_;
  nlohmann::json meta_;
  size_t units_ = 0;
  std::vector<uint32_t> crcs_;  // the file's CRC32Cs, written by the writer before done_
  bool in_flight_ = false;
  std::thread thread_;
  std::atomic<bool> done_{false};
  std::string error_;  // written by the writer before done_
#if SHARDLM_HAVE_CUDA
  std::optional<c10::cuda::CUDAStream> side_;
  std::shared_ptr<at::cuda::CUDAEvent> copied_;
  bool copy_pending_ = false;
#endif
};

}  // namespace shardlm::train
