#pragma once
// The host's memory as the kernel reports it (/proc/meminfo): what a run may still allocate. Torch-free.
#include <cstdint>
#include <fstream>
#include <optional>
#include <string>

namespace shardlm {

/// MemAvailable in bytes (the kernel's estimate of what can be allocated without swapping), or nothing where
/// /proc/meminfo does not say.
inline std::optional<int64_t> host_memory_available() {
  std::ifstream in("/proc/meminfo");
  std::string key, unit;
  int64_t kb = 0;
  while (in >> key >> kb) {
    std::getline(in, unit);
    if (key == "MemAvailable:") return kb * 1024;
  }
  return std::nullopt;
}

}  // namespace shardlm
