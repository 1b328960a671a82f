#pragma once
// Host-side parallel loops on threads of our own. at::parallel_for's OpenMP backend is inline code whose
// `#pragma omp parallel` is compiled in the caller's translation unit: serial without -fopenmp (and with it, another
// OpenMP runtime than LibTorch's). The thread count is LibTorch's intra-op count (at::get_num_threads(), which the
// trainer sets per rank to its share of the host's cores).
#include <ATen/Parallel.h>
#include <ATen/ThreadLocalState.h>

#include <algorithm>
#include <cstdint>
#include <exception>
#include <thread>
#include <vector>

namespace shardlm {

/// Runs f(begin, end) over [0, n) split into at most at::get_num_threads() contiguous ranges of at least `grain`
/// items, the first on the calling thread. The other threads run with the caller's thread-local LibTorch state
/// (grad mode, dispatch settings); the first exception thrown by any range is rethrown here after all have ended.
template <class F>
void parallel_ranges(int64_t n, int64_t grain, F&& f) {
  const int64_t parts = std::min<int64_t>(std::max(1, at::get_num_threads()), (n + grain - 1) / std::max<int64_t>(grain, 1));
  if (parts <= 1) {
    if (n > 0) f(int64_t{0}, n);
    return;
  }
  const int64_t per = (n + parts - 1) / parts;
  const at::ThreadLocalState state;
  std::vector<std::exception_ptr> errors(static_cast<size_t>(parts));
  auto run = [&](int64_t t) {
    try {
      f(t * per, std::min(n, (t + 1) * per));
    } catch (...) {
      errors[static_cast<size_t>(t)] = std::current_exception();
    }
  };
  std::vector<std::thread> threads;
  for (int64_t t = 1; t < parts && t * per < n; ++t)
    threads.emplace_back([&, t] {
      at::ThreadLocalStateGuard guard(state);
      run(t);
    });
  run(0);
  for (auto& t : threads) t.join();
  for (const auto& e : errors)
    if (e) std::rethrow_exception(e);
}

}  // namespace shardlm
