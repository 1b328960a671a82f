#pragma once
// Token streams and the order in which training reads them.
//   A token file is raw little-endian uint32 tokens (`.bin`), read by offset as windows are needed, with its loss
//   mask (`.mask`, one byte per token, data/shards.hpp) beside it when it exists; a `.txt` file is read as bytes (one
//   token per byte: the byte-level vocabulary of the bundled examples; no mask: every token counts). Reads go
//   through core/files.hpp's WatchedFile rather than a memory mapping: a token file truncated or rewritten under a
//   running job stops it with an error naming the file, where a mapping ends the process with SIGBUS.
//   Packing: the documents of a token file follow each other, each ending with EOS (shardlm_tokenize), and
//   training samples are windows of T + 1 tokens at stride T over that stream, crossing document boundaries
//   (window w is tokens [w T, w T + T]; its inputs are the first T, its targets the last T, whose mask entries
//   [w T + 1, w T + T] say which targets count in the loss). An epoch visits every window once in an order
//   fixed by the seed. Sample k of the run is window perm_{k / n}(k % n): the order depends only on the seed
//   and k, so any split of a global batch over ranks and micro-batches reads the same samples, and a run
//   resumed at step s (k = s x global batch) reads what the uninterrupted run would have read.
#include <ATen/ATen.h>

#include <algorithm>
#include <bit>
#include <cerrno>
#include <cstdint>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <memory>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "shardlm/core/errors.hpp"
#include "shardlm/core/files.hpp"
#include "shardlm/data/shards.hpp"

namespace shardlm::data {

/// A read-only sequence of tokens, read from a file or held in memory.
class TokenDataset {
 public:
  /// `.bin`: uint32 tokens (with NAME.mask when it exists); `.txt`: bytes as tokens.
  static TokenDataset open(const std::filesystem::path& path) {
    const auto p = path.string();
    if (std::filesystem::is_directory(path))
      fail<IoError>(p, ": is a directory, expected a token file (.bin: uint32 tokens, or .txt: bytes as tokens)");
    if (path.extension() == ".txt") {
      regular_file_size(path, "a text file of bytes as tokens (.txt)");
      std::ifstream in(path, std::ios::binary);
      if (!in) fail<IoError>(p, ": cannot open");
      std::string bytes((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
      return from_bytes(bytes, p);
    }
    if (path.extension() != ".bin")
      fail<IoError>(p, ": unknown token file type: use .bin (uint32 tokens) or .txt (bytes as tokens)");
    TokenDataset d;
    d.file_ = std::make_shared<WatchedFile>(path, "a token file of uint32 tokens (.bin)");
    if (d.file_->size() % 4 != 0) fail<IoError>(p, ": ", d.file_->size(), " bytes is not a whole number of uint32 tokens");
    d.name_ = p;
    d.size_ = static_cast<int64_t>(d.file_->size() / 4);
    if (std::filesystem::exists(mask_path(path))) d.mask_ = LossMask::open(path, /*check_values=*/false);
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
    d.size_ = static_cast<int64_t>(tokens->size());
    d.memory_ = std::move(tokens);
    return d;
  }

  int64_t size() const { return size_; }
  const std::string& name() const { return name_; }
  uint32_t operator[](int64_t i) const {
    uint32_t t;
    read(i, 1, &t);
    return t;
  }
  /// The loss mask (null when every token counts).
  const LossMask* mask() const { return mask_ ? &*mask_ : nullptr; }

  /// Tokens [begin, begin + len) (and their mask) as a dataset of their own, sharing the file or memory.
  TokenDataset range(int64_t begin, int64_t len, std::string name) const {
    SHARDLM_ASSERT(begin >= 0 && len >= 0 && begin + len <= size_, "range outside ", name_);
    TokenDataset d = *this;
    d.name_ = std::move(name), d.offset_ += begin, d.size_ = len;
    if (mask_) d.mask_ = mask_->range(begin, len);
    return d;
  }

  /// Targets of the window of len + 1 tokens at `start` (tokens [start + 1, start + len]) as int64 [len], with
  /// those the mask leaves out of the loss set to `ignore_index`; `counted` gets the number of targets that count.
  /// `fix`: as for slice.
  at::Tensor targets(int64_t start, int64_t len, int64_t vocab_size, int64_t ignore_index, int64_t* counted,
                     std::string_view fix = {}) const {
    auto out = slice(start + 1, len, vocab_size, fix);
    *counted = len;
    if (!mask_) return out;
    auto* dst = out.data_ptr<int64_t>();
    const auto keep = mask_->checked(start + 1, len);
    for (int64_t i = 0; i < len; ++i)
      if (!keep[static_cast<size_t>(i)]) dst[i] = ignore_index, --*counted;
    return out;
  }
  /// How many targets of the window at `start` count in the loss (all `len` without a mask).
  int64_t counted_targets(int64_t start, int64_t len) const {
    if (!mask_) return len;
    const auto v = mask_->checked(start + 1, len);
    return std::count_if(v.begin(), v.end(), [](uint8_t b) { return b != 0; });
  }

  /// Tokens [start, start + len) as int64, checked against the vocabulary. `fix` ends the error of a token outside
  /// it: what to do about it, which the caller knows (where the vocabulary size came from).
  at::Tensor slice(int64_t start, int64_t len, int64_t vocab_size, std::string_view fix = {}) const {
    SHARDLM_ASSERT(start >= 0 && len >= 0 && start + len <= size_, "slice outside ", name_);
    std::vector<uint32_t> tokens(static_cast<size_t>(len));
    read(start, len, tokens.data());
    auto out = at::empty({len}, at::kLong);
    auto* dst = out.data_ptr<int64_t>();
    for (int64_t i = 0; i < len; ++i) {
      const auto t = tokens[static_cast<size_t>(i)];
      if (t >= static_cast<uint64_t>(vocab_size))
        fail<IoError>(name_, ": token ", t, " at position ", offset_ + start + i, " is outside the model's vocabulary of ",
                      vocab_size, fix.empty() ? "" : ": ", fix);
      dst[i] = t;
    }
    return out;
  }

 private:
  /// Tokens [start, start + len) of this dataset into `dst`, from memory or from the file (little-endian).
  void read(int64_t start, int64_t len, uint32_t* dst) const {
    SHARDLM_ASSERT(start >= 0 && len >= 0 && start + len <= size_, "read outside ", name_);
    if (memory_) {
      std::copy_n(memory_->data() + offset_ + start, len, dst);
      return;
    }
    file_->read(static_cast<uint64_t>(offset_ + start) * 4, static_cast<uint64_t>(len) * 4, dst);
    if constexpr (std::endian::native == std::endian::big)
      for (int64_t i = 0; i < len; ++i) dst[i] = __builtin_bswap32(dst[i]);
  }

  std::string name_;
  std::shared_ptr<const std::vector<uint32_t>> memory_;  // or
  std::shared_ptr<WatchedFile> file_;
  int64_t offset_ = 0, size_ = 0;
  std::optional<LossMask> mask_;
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
