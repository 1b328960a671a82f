#pragma once
// Per-step metrics: the log line and the JSONL record (keys per DESIGN.md).
#include <nlohmann/json.hpp>

#include <cstdio>
#include <fstream>
#include <string>

#include "shardlm/core/compat.hpp"
#include "shardlm/core/errors.hpp"

namespace shardlm::train {

struct StepMetrics {
  int64_t step = 0;          ///< 1-based number of the optimizer step
  double loss = 0, grad_norm = 0, lr = 0;
  double aux_loss = -1;      ///< MoE: the load-balancing loss (mean over micro-batches and ranks); < 0: no router
  double tokens_per_s = 0;
  double mfu = -1;           ///< < 0: no peak known (CPU)
  double step_s = 0, data_s = 0, forward_s = 0, backward_s = 0, optimizer_s = 0;
  double mem_alloc_gb = 0, mem_reserved_gb = 0;
  int64_t tokens = 0;
  int64_t loss_tokens = 0;   ///< targets of the global batch in the loss (those the loss mask keeps)
  double eval_loss = -1;     ///< < 0: no evaluation after this step
  int64_t eval_tokens = 0;   ///< validation targets the eval loss is the mean over
  double save_s = 0;         ///< seconds the training thread was blocked by checkpointing after (or within) this step
  bool skipped = false;      ///< non-finite gradients: no update
  bool host_step_redone = false;  ///< offloaded, speculative host step: its update was redone (clipping) or dropped
  double host_step_s = -1;   ///< offloaded: seconds of host AdamW since the last step's end (overlapped work included)
  double host_step_gbs = -1; ///< offloaded: the host AdamW's bytes moved per second (GB/s) in that time
  bool stop_requested = false;  ///< some rank got SIGTERM/SIGUSR1 (not in the JSON)

  /// The JSONL record; eval_loss and eval_tokens only after an evaluation.
  nlohmann::json to_json() const {
    nlohmann::json j = {{"step", step}, {"loss", loss}, {"grad_norm", grad_norm}, {"lr", lr}, {"tokens_per_s", tokens_per_s},
            {"mfu", mfu < 0 ? nlohmann::json(nullptr) : nlohmann::json(mfu)}, {"step_s", step_s}, {"data_s", data_s},
            {"forward_s", forward_s}, {"backward_s", backward_s}, {"optimizer_s", optimizer_s},
            {"mem_alloc_gb", mem_alloc_gb}, {"mem_reserved_gb", mem_reserved_gb}, {"tokens", tokens},
            {"save_s", save_s}, {"skipped", skipped}, {"loss_tokens", loss_tokens}, {"host_step_redone", host_step_redone}};
    if (eval_loss >= 0) j["eval_loss"] = eval_loss, j["eval_tokens"] = eval_tokens;
    if (aux_loss >= 0) j["aux_loss"] = aux_loss;
    if (host_step_s >= 0) j["host_step_s"] = host_step_s, j["host_step_gbs"] = host_step_gbs;
    return j;
  }

  std::string line(int64_t total_steps) const {
    char buf[320];
    const auto ms = [](double s) { return static_cast<int>(s * 1e3 + 0.5); };
    std::snprintf(buf, sizeof buf,
                  "step %lld/%lld | loss %.4f%s | grad_norm %.3f | lr %.2e | %.0f tok/s | mfu %s | data/fwd/bwd/opt "
                  "%d/%d/%d/%d ms | mem %.2f/%.2f GB%s%s",
                  static_cast<long long>(step), static_cast<long long>(total_steps), loss,
                  aux_loss >= 0 ? detail::cat(" (aux ", aux_loss, ")").c_str() : "", grad_norm, lr, tokens_per_s,
                  mfu < 0 ? "n/a" : detail::cat(static_cast<int>(mfu * 1000) / 10.0, "%").c_str(), ms(data_s),
                  ms(forward_s), ms(backward_s), ms(optimizer_s), mem_alloc_gb, mem_reserved_gb,
                  save_s > 0 ? detail::cat(" | save stall ", ms(save_s), " ms").c_str() : "",
                  skipped ? " | SKIPPED (non-finite grad)" : "");
    return buf;
  }
};

/// Memory in GB: on CUDA the caching allocator's peak allocated and peak reserved bytes since the last
/// reset_cuda_peak (the trainer resets each step); on the CPU the process's resident set and its peak.
inline std::pair<double, double> memory_gb(const c10::Device& device) {
  constexpr double gb = 1024.0 * 1024.0 * 1024.0;
  if (device.is_cuda()) {
    const auto m = compat::cuda_memory(device.has_index() ? device.index() : 0);
    return {m.peak_allocated / gb, m.peak_reserved / gb};
  }
  std::ifstream status("/proc/self/status");
  std::string key;
  double rss_kb = 0, hwm_kb = 0;
  while (status >> key) {
    if (key == "VmRSS:") status >> rss_kb;
    else if (key == "VmHWM:") status >> hwm_kb;
  }
  return {rss_kb * 1024 / gb, hwm_kb * 1024 / gb};
}

/// Writes one JSON object per step to a file it truncates on open (flushed per line, so a killed run keeps
/// its record).
class MetricsWriter {
 public:
  /// Opens `path` (nothing when empty); `append` keeps the rows of an earlier run (a resumed one).
  explicit MetricsWriter(const std::string& path, bool append = false) {
    if (path.empty()) return;
    out_.open(path, std::ios::out | (append ? std::ios::app : std::ios::trunc));
    if (!out_) fail<IoError>("--metrics ", path, ": cannot open for writing");
  }
  void write(const StepMetrics& m) {
    if (out_.is_open()) out_ << m.to_json().dump() << '\n' << std::flush;
  }

 private:
  std::ofstream out_;
};

}  // namespace shardlm::train
