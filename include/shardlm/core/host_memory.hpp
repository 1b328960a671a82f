#pragma once
// The host memory a run may still take, and the check that refuses a run that cannot fit in it, torch-free. A run
// that outgrows the host is killed by the kernel's OOM killer with SIGKILL: its launcher can only say "killed by
// signal 9". The memory planner (train/memory_plan.hpp) knows the bytes beforehand, so the trainer asks first.
#include <cstdint>
#include <cstdio>
#include <fstream>
#include <optional>
#include <string>

#include "shardlm/core/errors.hpp"

namespace shardlm {

/// MemAvailable of /proc/meminfo in bytes: what the kernel estimates can be allocated without swapping (page cache
/// it can drop included). nullopt where there is no such file (not Linux).
inline std::optional<uint64_t> available_host_bytes(const std::string& meminfo = "/proc/meminfo") {
  std::ifstream in(meminfo);
  std::string key;
  uint64_t kb = 0;
  while (in >> key) {
    if (key == "MemAvailable:" && in >> kb) return kb * 1024;
    in.ignore(4096, '\n');
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
