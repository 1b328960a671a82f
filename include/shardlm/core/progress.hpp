#pragma once
// A progress report for long reads and writes (loading and exporting checkpoints: bytes) and for training (steps):
// on a terminal a bar redrawn in place (done of total, rate, ETA); otherwise, as in a batch job's log, one line
// per 10%.
#include <unistd.h>

#include <chrono>
#include <cstdint>
#include <cstdio>
#include <iostream>
#include <mutex>
#include <string>
#include <utility>

#include "shardlm/core/log.hpp"

namespace shardlm {

class Progress {
  using clock = std::chrono::steady_clock;

 public:
  enum class Units { bytes, steps, units };
  /// Reports on `what` (e.g. "loading") out of `total` bytes (or steps) when `enabled` (rank 0); `terminal` draws
  /// a bar (default: stderr is a terminal), `out` replaces stderr (tests).
  Progress(std::string what, uint64_t total, bool enabled, int terminal = -1, std::ostream* out = nullptr,
           Units units = Units::bytes)
      : what_(std::move(what)), total_(total), enabled_(enabled),
        terminal_(terminal < 0 ? ::isatty(STDERR_FILENO) == 1 : terminal > 0), out_(out), start_(clock::now()),
        units_(units) {}
  Progress(const Progress&) = delete;
  Progress& operator=(const Progress&) = delete;

  /// Counts `bytes` more done (from any thread).
  void add(uint64_t bytes) {
    if (!enabled_) return;
    std::lock_guard<std::mutex> lock(mutex_);
    done_ += bytes;
    const auto now = clock::now();
    if (terminal_) {
      if (now - drawn_ < std::chrono::milliseconds(200) && done_ < total_) return;
      drawn_ = now;
      emit("\r" + bar(now) + "\x1b[K", false);
      shown_ = true;
    } else if (total_ > 0) {
      const int tenth = static_cast<int>(done_ * 10 / total_);
      if (tenth > tenths_ && done_ < total_) {
        tenths_ = tenth;
        emit(line(now), true);
      }
    }
  }

  /// Ends the report with its summary line (bytes, seconds, GB/s; or the count and seconds).
  void finish() {
    if (!enabled_ || finished_) return;
    std::lock_guard<std::mutex> lock(mutex_);
    finished_ = true;
    const double s = seconds(clock::now());
    if (units_ != Units::bytes) {
      char buf[160];
      std::snprintf(buf, sizeof buf, "shardlm: %s: %llu %s in %.2f s", what_.c_str(), static_cast<unsigned long long>(done_),
                    units_ == Units::steps ? "steps" : "units", s);
      emit(terminal_ ? "\r" + bar(clock::now()) + "\x1b[K\n" + buf : std::string(buf), true);
      return;
    }
    const auto [unit, name] = unit_of(total_);
    char buf[160];
    std::snprintf(buf, sizeof buf, "shardlm: %s: %.3f %s in %.2f s (%.2f GB/s)", what_.c_str(), done_ / unit, name, s,
                  s > 0 ? done_ / 1e9 / s : 0.0);
    emit(terminal_ ? "\r" + bar(clock::now()) + "\x1b[K\n" + buf : std::string(buf), true);
  }
  ~Progress() {
    if (enabled_ && terminal_ && !finished_ && shown_) emit("\n", false);  // leave the bar's line when unwinding
  }

  uint64_t done() const { return done_; }

  /// Erases the bar (on a terminal) so that a log line can take its place; the next add() draws it again.
  void clear() {
    if (!enabled_ || !terminal_ || finished_) return;
    std::lock_guard<std::mutex> lock(mutex_);
    if (shown_) emit("\r\x1b[K", false);
    shown_ = false;
    drawn_ = {};
  }

 private:
  double seconds(clock::time_point now) const { return std::chrono::duration<double>(now - start_).count(); }
  /// Sizes in GB, or MB below a gigabyte in all.
  static std::pair<double, const char*> unit_of(uint64_t total) {
    return total >= 1000000000 ? std::pair(1e9, "GB") : std::pair(1e6, "MB");
  }
  /// "12.30 of 45.60 GB, 1.23 GB/s, ETA 0:27", or "12 of 300 steps, 2.50 steps/s, ETA 1:55" (h:mm:ss past an hour)
  std::string figures(clock::time_point now) const {
    const double s = seconds(now), rate = s > 0 ? done_ / s : 0;
    const auto eta = static_cast<int64_t>(rate > 0 ? (total_ - done_) / rate : 0);
    char time[32], buf[120];
    if (eta >= 3600) std::snprintf(time, sizeof time, "%lld:%02d:%02d", static_cast<long long>(eta / 3600), int(eta / 60 % 60), int(eta % 60));
    else std::snprintf(time, sizeof time, "%d:%02d", int(eta / 60), int(eta % 60));
    if (units_ != Units::bytes) {
      const char* what = units_ == Units::steps ? "steps" : "units";
      std::snprintf(buf, sizeof buf, "%llu of %llu %s, %.2f %s/s, ETA %s", static_cast<unsigned long long>(done_),
                    static_cast<unsigned long long>(total_), what, rate, what, time);
      return buf;
    }
    const auto [unit, name] = unit_of(total_);
    std::snprintf(buf, sizeof buf, "%.2f of %.2f %s, %.2f GB/s, ETA %s", done_ / unit, total_ / unit, name, rate / 1e9, time);
    return buf;
  }
  std::string bar(clock::time_point now) const {
    constexpr int width = 30;
    const int filled = total_ ? static_cast<int>(done_ * width / total_) : width;
    return "shardlm: " + what_ + " [" + std::string(filled, '#') + std::string(width - filled, '.') + "] " + figures(now);
  }
  std::string line(clock::time_point now) const {
    return "shardlm: " + what_ + ": " + std::to_string(done_ * 100 / total_) + "% (" + figures(now) + ")";
  }
  void emit(const std::string& text, bool newline) {
    if (out_) {
      *out_ << text << (newline ? "\n" : "") << std::flush;
    } else if (newline) {
      log::info(text);
    } else {
      std::cerr << text << std::flush;
    }
  }

  std::string what_;
  uint64_t total_;
  bool enabled_, terminal_;
  std::ostream* out_;
  clock::time_point start_, drawn_{};
  std::mutex mutex_;
  Units units_;
  uint64_t done_ = 0;
  int tenths_ = 0;
  bool finished_ = false, shown_ = false;
};

}  // namespace shardlm
