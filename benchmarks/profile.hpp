#pragma once
// A profile of training steps for the step benchmark (SHARDLM_PROFILE=DIR): LibTorch's Kineto profiler records the
// host ops and the GPU kernels of the steps it spans; rank 0 writes the Chrome trace (DIR/trace_rank0.json, for
// chrome://tracing or Perfetto) and prints where the GPU time went: the kernels by total time, NCCL against the
// rest, and how much of the span the compute kernels kept the GPU busy (the rest: waiting on collectives, the
// host or launches).
#include <torch/csrc/autograd/profiler_kineto.h>

#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <filesystem>
#include <map>
#include <string>
#include <utility>
#include <vector>

#include "shardlm/core/log.hpp"

namespace shardlm::bench {

class StepProfile {
 public:
  /// Starts recording host ops and GPU kernels.
  StepProfile() {
    using namespace torch::profiler::impl;
    const ProfilerConfig config(ProfilerState::KINETO);
    const std::set<ActivityType> activities{ActivityType::CPU, ActivityType::CUDA};
    torch::autograd::profiler::prepareProfiler(config, activities);
    torch::autograd::profiler::enableProfiler(config, activities);
  }

  /// Stops recording; `lead` (rank 0) writes dir/trace_rank0.json and prints the summary of `steps` steps.
  void finish(const std::filesystem::path& dir, bool lead, int64_t steps) {
    auto result = torch::autograd::profiler::disableProfiler();
    if (!lead) return;
    std::filesystem::create_directories(dir);
    result->save((dir / "trace_rank0.json").string());
    summarize(result->events(), steps);
    log::info("shardlm: profile: trace in ", (dir / "trace_rank0.json").string());
  }

 private:
  static bool is_nccl(const std::string& name) { return name.rfind("nccl", 0) == 0; }

  static void summarize(const std::vector<torch::autograd::profiler::KinetoEvent>& events, int64_t steps) {
    std::map<std::string, std::pair<double, int64_t>> by_name;  // kernel -> (ms, launches)
    std::vector<std::pair<uint64_t, uint64_t>> compute;          // [start, end) ns of the non-NCCL kernels
    uint64_t first = UINT64_MAX, last = 0;
    double nccl_ms = 0, compute_ms = 0;
    for (const auto& e : events) {
      if (e.deviceType() != c10::DeviceType::CUDA || e.durationNs() == 0) continue;
      const auto name = e.name();
      auto& [ms, n] = by_name[name];
      ms += e.durationNs() / 1e6, ++n;
      first = std::min(first, e.startNs()), last = std::max(last, e.endNs());
      if (is_nccl(name)) {
        nccl_ms += e.durationNs() / 1e6;
      } else {
        compute_ms += e.durationNs() / 1e6;
        compute.emplace_back(e.startNs(), e.endNs());
      }
    }
    if (by_name.empty()) {
      log::info("shardlm: profile: no GPU kernels recorded");
      return;
    }
    // The union of the compute kernels' intervals: the time the compute streams kept the GPU busy.
    std::sort(compute.begin(), compute.end());
    double busy_ms = 0;
    uint64_t a = 0, b = 0;
    for (const auto& [s, e] : compute) {
      if (s > b) busy_ms += (b - a) / 1e6, a = s, b = e;
      else b = std::max(b, e);
    }
    busy_ms += (b - a) / 1e6;
    const double span_ms = (last - first) / 1e6, per = static_cast<double>(std::max<int64_t>(steps, 1));
    char line[320];
    std::snprintf(line, sizeof line,
                  "shardlm: profile: %lld step(s), per step: GPU span %.1f ms, compute kernels %.1f ms (busy %.1f ms, "
                  "%.0f%% of the span), NCCL kernels %.1f ms",
                  static_cast<long long>(steps), span_ms / per, compute_ms / per, busy_ms / per,
                  100.0 * busy_ms / std::max(span_ms, 1e-9), nccl_ms / per);
    log::info(line);
    std::vector<std::pair<std::string, std::pair<double, int64_t>>> sorted(by_name.begin(), by_name.end());
    std::sort(sorted.begin(), sorted.end(), [](const auto& x, const auto& y) { return x.second.first > y.second.first; });
    // The 20 longest kernels, and the project's own (NVRTC, named shardlm_*) wherever they rank.
    for (size_t i = 0; i < sorted.size(); ++i) {
      const auto& [name, v] = sorted[i];
      if (i >= 20 && name.rfind("shardlm_", 0) != 0) continue;
      std::snprintf(line, sizeof line, "shardlm: profile: %8.2f ms/step %6lld x  %.150s", v.first / per,
                    static_cast<long long>(v.second / std::max<int64_t>(steps, 1)), name.c_str());
      log::info(line);
    }
  }
};

}  // namespace shardlm::bench
