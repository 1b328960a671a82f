#pragma once
// Learning-rate schedule: linear warmup, then cosine decay to min_ratio x the peak.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <numbers>

namespace shardlm::optim {

struct CosineSchedule {
  double peak_lr = 3e-4;
  int64_t warmup_steps = 0;
  int64_t total_steps = 1;
  double min_ratio = 0.1;

  /// The learning rate of update `step` (0-based).
  double at(int64_t step) const {
    if (step < warmup_steps) return peak_lr * static_cast<double>(step + 1) / static_cast<double>(warmup_steps);
    const int64_t decay = std::max<int64_t>(1, total_steps - warmup_steps);
    const double progress = std::clamp(static_cast<double>(step - warmup_steps) / static_cast<double>(decay), 0.0, 1.0);
    return peak_lr * (min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + std::cos(std::numbers::pi * progress)));
  }
};

}  // namespace shardlm::optim
