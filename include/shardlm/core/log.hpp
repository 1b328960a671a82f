#pragma once
// Plain line logging to stderr. One mutex so that lines from threads do not interleave.
#include <iostream>
#include <mutex>

#include "shardlm/core/errors.hpp"

namespace shardlm::log {

namespace detail {
inline std::mutex& mutex() {
  static std::mutex m;
  return m;
}
}  // namespace detail

template <class... Args>
void info(Args&&... args) {
  const auto line = shardlm::detail::cat(std::forward<Args>(args)...);
  std::lock_guard<std::mutex> lock(detail::mutex());
  std::cerr << line << '\n' << std::flush;
}

template <class... Args>
void warn(Args&&... args) {
  info("warning: ", std::forward<Args>(args)...);
}

}  // namespace shardlm::log
