#pragma once
// Token streams and the order in which training reads them.
//   A token file is raw little-endian uint32 tokens (`.bin`), memory-mapped; a `.txt` file is read as bytes
//   (one token per byte: the byte-level vocabulary of the bundled examples).
//   Training samples are windows of T + 1 tokens at stride T; an epoch visits every window once in an order
//   fixed by the seed. Sample k of the run is window perm_{k / n}(k % n): the order depends only on the seed,
//   so any split of a global batch over ranks and micro-batches reads the same samples.
#include <ATen/ATen.h>
#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <cstdint>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <memory>
#include <string>
#include <string_view>
#include <vector>

#include "shardlm/core/errors.hpp"

namespace shardlm::data {

/// A read-only sequence of tokens, memory-mapped from a file or held in memory.
class TokenDataset {
 public:
  /// `.bin`: uint32 tokens, memory-mapped; `.txt`: bytes as tokens.
  static TokenDataset open(const std::filesystem::path& path) {
    const auto p = path.string();
    if (path.extension() == ".txt") {
      std::ifstream in(path, std::ios::binary);
      if (!in) fail<IoError>(p, ": cannot open");
      std::string bytes((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
      return from_bytes(bytes, p);
    }
    if (path.extension() != ".bin")
      fail<IoError>(p, ": unknown token file type: use .bin (uint32 tokens) or .txt (bytes as tokens)");
    const int fd = ::open(p.c_str(), O_RDONLY | O_CLOEXEC);
    if (fd < 0) fail<IoError>(p, ": cannot open: ", std::strerror(errno));
    struct stat st {};
    if (::fstat(fd, &st) != 0) {
      ::close(fd);
      fail<IoError>(p, ": cannot stat: ", std::strerror(errno));
    }
    const auto size = static_cast<size_t>(st.st_size);
    if (size % 4 != 0) {
      ::close(fd);
      fail<IoError>(p, ": ", size, " bytes is not a whole number of uint32 tokens");
    }
    void* map = size ? ::mmap(nullptr, size, PROT_READ, MAP_SHARED, fd, 0) : nullptr;
    ::close(fd);
    if (map == MAP_FAILED) fail<IoError>(p, ": mmap failed: ", std::strerror(errno));
    TokenDataset d;
    d.name_ = p;
    d.mapping_ = std::shared_ptr<void>(map, [size](void* m) { if (m) ::munmap(m, size); });
    d.tokens_ = static_cast<const uint32_t*>(map);
    d.size_ = static_cast<int64_t>(size / 4);
    return d;
  }

  /// Bytes of `text` as tokens 0..255.
  static TokenDataset from_bytes(std::string_view text, std::string name = "text") {
    auto owned = std::make_shared<std::vector<uint32_t>>(text.begin(), text.end());
    for (auto& t : *owned) t &= 0xffu;  // char may be signed
    return from_tokens(std::move(owned), std::move(name));
  }

  static TokenDataset from_tokens(std::shared_ptr<std::vector<uint32_t>> tokens, std::string name) {
    TokenDataset d;
    d.name_ = std::move(name);
    d.tokens_ = tokens->data();
    d.size_ = static_cast<int64_t>(tokens->size());
    d.mapping_ = std::move(tokens);
    return d;
  }

  int64_t size() const { return size_; }
  const std::string& name() const { return name_; }
  uint32_t operator[](int64_t i) const { return tokens_[i]; }

  /// Tokens [start, start + len) as int64, checked against the vocabulary.
  at::Tensor slice(int64_t start, int64_t len, int64_t vocab_size) const {
    SHARDLM_ASSERT(start >= 0 && len >= 0 && start + len <= size_, "slice outside ", name_);
    auto out = at::empty({len}, at::kLong);
    auto* dst = out.data_ptr<int64_t>();
    for (int64_t i = 0; i < len; ++i) {
      const auto t = tokens_[start + i];
      if (t >= static_cast<uint64_t>(vocab_size))
        fail<IoError>(name_, ": token ", t, " at position ", start + i, " is outside the model's vocabulary of ", vocab_size);
      dst[i] = t;
    }
    return out;
  }

 private:
  std::string name_;
  std::shared_ptr<void> mapping_;
  const uint32_t* tokens_ = nullptr;
  int64_t size_ = 0;
};

/// Deterministic order of training windows (see the top of this file).
class Sampler {
 public:
  Sampler(int64_t num_tokens, int64_t seq_len, uint64_t seed, const std::string& name = "dataset")
      : seq_len_(seq_len), seed_(seed) {
    if (seq_len <= 0) fail<ConfigError>("--seq-len must be positive, got ", seq_len);
    num_windows_ = num_tokens > seq_len ? (num_tokens - 1) / seq_len : 0;
    if (num_windows_ == 0)
      fail<IoError>(name, ": ", num_tokens, " tokens are too few for one sample of --seq-len ", seq_len, " (+1)");
  }
  int64_t num_windows() const { return num_windows_; }
  int64_t seq_len() const { return seq_len_; }

  /// First token of sample k of the run.
  int64_t window_start(int64_t k) {
    const int64_t epoch = k / num_windows_;
    if (epoch != epoch_) shuffle(epoch);
    return order_[k % num_windows_] * seq_len_;
  }

 private:
  static uint64_t splitmix64(uint64_t& s) {
    uint64_t z = (s += 0x9e3779b97f4a7c15ull);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
  }
  // Fisher-Yates with our own generator: the same order on every platform and standard library.
  void shuffle(int64_t epoch) {
    order_.resize(num_windows_);
    for (int64_t i = 0; i < num_windows_; ++i) order_[i] = i;
    uint64_t state = seed_ * 0x100000001b3ull + static_cast<uint64_t>(epoch);
    for (int64_t i = num_windows_ - 1; i > 0; --i) {
      const auto j = static_cast<int64_t>(splitmix64(state) % static_cast<uint64_t>(i + 1));
      std::swap(order_[i], order_[j]);
    }
    epoch_ = epoch;
  }

  int64_t seq_len_, num_windows_;
  uint64_t seed_;
  int64_t epoch_ = -1;
  std::vector<int64_t> order_;
};

}  // namespace shardlm::data
