#pragma once
// Host-side parallel loops on a pool of threads of our own, kept between calls. at::parallel_for's OpenMP backend is
// inline code whose `#pragma omp parallel` is compiled in the caller's translation unit: serial without -fopenmp
// (and with it, another OpenMP runtime than LibTorch's). The thread count is LibTorch's intra-op count
// (at::get_num_threads(), which the trainer sets per rank to its share of the host's cores). The host optimizer of an
// offloaded run calls it once per unit per step: threads started per call would cost more than a small unit's step.
#include <ATen/Parallel.h>
#include <ATen/ThreadLocalState.h>

#include <algorithm>
#include <condition_variable>
#include <cstdint>
#include <exception>
#include <functional>
#include <memory>
#include <mutex>
#include <thread>
#include <vector>

namespace shardlm {

/// A fork-join pool: run(parts, f) calls f(0..parts-1), part 0 on the calling thread, the others on the pool's
/// threads, and returns when all are done. One run at a time (callers serialize; the pool is per process).
class ThreadPool {
 public:
  explicit ThreadPool(int threads) {
    for (int t = 1; t < threads; ++t) workers_.emplace_back([this, t] { work(t); });
  }
  ~ThreadPool() {
    {
      std::lock_guard<std::mutex> lock(mutex_);
      stop_ = true;
    }
    wake_.notify_all();
    for (auto& w : workers_) w.join();
  }
  ThreadPool(const ThreadPool&) = delete;
  ThreadPool& operator=(const ThreadPool&) = delete;

  int size() const { return static_cast<int>(workers_.size()) + 1; }
  /// Whether this thread is running a part of some run (a nested run would wait for itself: it runs serially).
  static bool inside() { return inside_flag(); }

  /// Calls part(t) for t in [0, parts) (parts <= size()), part 0 here; every part's exceptions are caught and the
  /// first is rethrown once all have ended.
  void run(int parts, const std::function<void(int)>& part) {
    std::lock_guard<std::mutex> one_run(run_mutex_);
    parts = std::clamp(parts, 1, size());
    errors_.assign(static_cast<size_t>(parts), nullptr);
    {
      std::lock_guard<std::mutex> lock(mutex_);
      task_ = &part, parts_ = parts, pending_ = parts - 1, ++generation_;
    }
    wake_.notify_all();
    call(0);
    std::unique_lock<std::mutex> lock(mutex_);
    done_.wait(lock, [&] { return pending_ == 0; });
    task_ = nullptr;
    lock.unlock();
    for (const auto& e : errors_)
      if (e) std::rethrow_exception(e);
  }

  /// The process's pool of at::get_num_threads() threads (made again when that count changes; a run still using the
  /// old one keeps it alive).
  static std::shared_ptr<ThreadPool> shared() {
    static std::mutex m;
    static std::shared_ptr<ThreadPool> pool;
    std::lock_guard<std::mutex> lock(m);
    const int n = std::max(1, at::get_num_threads());
    if (!pool || pool->size() != n) pool = std::make_shared<ThreadPool>(n);
    return pool;
  }

 private:
  static bool& inside_flag() {
    thread_local bool inside = false;
    return inside;
  }
  void call(int t) {
    inside_flag() = true;
    try {
      (*task_)(t);
    } catch (...) {
      errors_[static_cast<size_t>(t)] = std::current_exception();
    }
    inside_flag() = false;
  }
  void work(int t) {
    uint64_t seen = 0;
    for (;;) {
      {
        std::unique_lock<std::mutex> lock(mutex_);
        wake_.wait(lock, [&] { return stop_ || generation_ != seen; });
        if (stop_) return;
        seen = generation_;
        if (t >= parts_) continue;
      }
      call(t);
      std::lock_guard<std::mutex> lock(mutex_);
      if (--pending_ == 0) done_.notify_one();
    }
  }

  std::vector<std::thread> workers_;
  std::mutex mutex_, run_mutex_;
  std::condition_variable wake_, done_;
  const std::function<void(int)>* task_ = nullptr;
  std::vector<std::exception_ptr> errors_;
  int parts_ = 0, pending_ = 0;
  uint64_t generation_ = 0;
  bool stop_ = false;
};

/// Runs f(begin, end) over [0, n) split into at most at::get_num_threads() contiguous ranges of at least `grain`
/// items, the first on the calling thread, the others on ThreadPool::shared(), with the caller's thread-local
/// LibTorch state (grad mode, dispatch settings); the first exception thrown by any range is rethrown here after all
/// have ended.
template <class F>
void parallel_ranges(int64_t n, int64_t grain, F&& f) {
  const int64_t parts = std::min<int64_t>(std::max(1, at::get_num_threads()), (n + grain - 1) / std::max<int64_t>(grain, 1));
  if (parts <= 1 || ThreadPool::inside()) {
    if (n > 0) f(int64_t{0}, n);
    return;
  }
  const int64_t per = (n + parts - 1) / parts;
  const at::ThreadLocalState state;
  ThreadPool::shared()->run(static_cast<int>(parts), [&](int t) {
    const int64_t begin = t * per, end = std::min(n, (t + 1) * per);
    if (begin >= end) return;
    if (t == 0) return f(begin, end);
    at::ThreadLocalStateGuard guard(state);
    f(begin, end);
  });
}

}  // namespace shardlm
