#pragma once
// An option field the LibTorch way (torch/arg.h's TORCH_ARG, without LibTorch): `SHARDLM_ARG(int64_t, seq_len) = 256;`
// declares the member `seq_len_`, the fluent setter `seq_len(v)` (returns the options, so setters chain) and the
// getters `seq_len()` (a mutable reference on non-const options: what a command-line parser binds to).
#include <utility>

#define SHARDLM_ARG(T, name)                                          \
 public:                                                              \
  inline auto name(const T& new_##name)->decltype(*this) {            \
    this->name##_ = new_##name;                                       \
    return *this;                                                     \
  }                                                                   \
  inline auto name(T&& new_##name)->decltype(*this) {                 \
    this->name##_ = std::move(new_##name);                            \
    return *this;                                                     \
  }                                                                   \
  inline const T& name() const noexcept { return this->name##_; }     \
  inline T& name() noexcept { return this->name##_; }                 \
                                                                      \
 private:                                                             \
  T name##_
