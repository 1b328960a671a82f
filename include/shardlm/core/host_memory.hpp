#pragma once
// The host's memory as the kernel reports it (/proc/meminfo): what a run may still allocate. Torch-free. The
// trainer's host-memory preflight (train/memory_plan.hpp check_host_memory) and --offload-step auto ask it: a run that
// outgrows the host is killed by the OOM killer with SIGKILL, and its launcher can only say "killed by signal 9".
#include <cstdint>
#include <cstdio>
#include <fstream>
#include <optional>
#include <string>

namespace shardlm {

/// MemAvailable in bytes (the kernel's estimate of what can be allocated without swapping), or nothing where
/// `meminfo` (a test's seam; /proc/meminfo) does not say.
inline std::optional<int64_t> host_memory_available(const std::string& meminfo = "/proc/meminfo") {
  std::ifstream in(meminfo);
  std::string key, unit;
  int64_t kb = 0;
  while (in >> key >> kb) {
    std::getline(in, unit);
    if (key == "MemAvailable:") return kb * 1024;
  }
  return std::nullopt;
}

/// GiB (2^30 bytes) with two decimals, for messages.
inline std::string gib_text(double bytes) {
  char s[32];
  std::snprintf(s, sizeof s, "%.2f GiB", bytes / (1024.0 * 1024.0 * 1024.0));
  return s;
}

}  // namespace shardlm
