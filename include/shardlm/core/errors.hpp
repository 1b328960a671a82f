#pragma once
// Three tiers of errors (STYLE.md): static_asserts for policy misuse, exceptions for user/config/input
// errors whose message names the culprit, and SHARDLM_ASSERT for our own bugs.
#include <sstream>
#include <stdexcept>
#include <string>
#include <utility>

namespace shardlm {

/// A user, configuration or input error: the message names the file, tensor, flag or factor.
class Error : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};
/// A config.json, preset or flag that cannot be used.
class ConfigError : public Error {
 public:
  using Error::Error;
};
/// A file that cannot be read or does not hold what it should.
class IoError : public Error {
 public:
  using Error::Error;
};
/// A bug in shardlm itself (an internal invariant did not hold).
class InternalError : public std::logic_error {
 public:
  using std::logic_error::logic_error;
};

namespace detail {
template <class... Args>
std::string cat(Args&&... args) {
  std::ostringstream os;
  (os << ... << std::forward<Args>(args));
  return os.str();
}
}  // namespace detail

/// Throws E with the streamed arguments as its message.
template <class E = Error, class... Args>
[[noreturn]] void fail(Args&&... args) {
  throw E(detail::cat(std::forward<Args>(args)...));
}

}  // namespace shardlm

#define SHARDLM_ASSERT(cond, ...)                                                                     \
  do {                                                                                                \
    if (!(cond))                                                                                      \
      throw ::shardlm::InternalError(::shardlm::detail::cat("shardlm internal error at ", __FILE__, \
                                                            ":", __LINE__, ": ", #cond, " ",         \
                                                            ##__VA_ARGS__));                          \
  } while (0)
