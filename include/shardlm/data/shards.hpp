#pragma once
// Token shards on disk, as shardlm_tokenize writes them and TokenDataset reads them:
//   NAME.bin   the tokens, raw little-endian uint32 (what TokenDataset reads);
//   NAME.mask  the loss mask, one uint8 per token of NAME.bin: 1 = the token counts in the loss as a target,
//              0 = it does not (a prompt, a BOS). Optional for readers: no mask means every token counts.
// Torch-free, like the tokenizer.
#include <algorithm>
#include <cerrno>
#include <cstring>
#include <memory>
#include <bit>
#include <cstdint>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <span>
#include <string>
#include <vector>

#include "shardlm/core/errors.hpp"
#include "shardlm/core/files.hpp"

namespace shardlm::data {

/// The mask file that goes with a token file: NAME.bin -> NAME.mask.
inline std::filesystem::path mask_path(std::filesystem::path bin) { return bin.replace_extension(".mask"); }

/// Writes tokens and their mask to PREFIX.bin / PREFIX.mask, or, with a shard size, to numbered shards of that
/// many tokens: PREFIX-00000.bin / PREFIX-00000.mask, PREFIX-00001.bin, ...
class ShardWriter {
 public:
  /// shard_tokens 0: one file pair.
  ShardWriter(std::filesystem::path prefix, int64_t shard_tokens) : prefix_(std::move(prefix)), shard_tokens_(shard_tokens) {
    if (shard_tokens < 0) fail<ConfigError>("--shard-tokens must be >= 0, got ", shard_tokens);
    if (const auto dir = prefix_.parent_path(); !dir.empty()) std::filesystem::create_directories(dir);
  }

  void write(std::span<const uint32_t> tokens, std::span<const uint8_t> mask) {
    SHARDLM_ASSERT(tokens.size() == mask.size(), "a mask entry for every token");
    while (!tokens.empty()) {
      if (!bin_.is_open() || (shard_tokens_ > 0 && in_shard_ == shard_tokens_)) open_next();
      auto n = tokens.size();
      if (shard_tokens_ > 0) n = std::min<size_t>(n, static_cast<size_t>(shard_tokens_ - in_shard_));
      write_tokens(tokens.first(n));
      mask_.write(reinterpret_cast<const char*>(mask.data()), static_cast<std::streamsize>(n));
      if (!bin_ || !mask_) fail<IoError>(files_.back(), ": write failed");
      tokens = tokens.subspan(n);
      mask = mask.subspan(n);
      in_shard_ += static_cast<int64_t>(n);
    }
  }

  /// Closes the last shard; returns the token files written (an empty PREFIX.bin if nothing was).
  std::vector<std::filesystem::path> finish() {
    if (!bin_.is_open() && files_.empty()) open_next();
    bin_.close();
    mask_.close();
    if (!bin_ || !mask_) fail<IoError>(files_.back(), ": write failed");
    return files_;
  }

 private:
  void open_next() {
    bin_.close();
    mask_.close();
    auto path = prefix_;
    if (shard_tokens_ > 0) {
      char number[16];
      std::snprintf(number, sizeof number, "-%05zu", files_.size());
      path += number;
    }
    path += ".bin";
    bin_.open(path, std::ios::binary | std::ios::trunc);
    if (!bin_) fail<IoError>(path.string(), ": cannot create");
    mask_.open(mask_path(path), std::ios::binary | std::ios::trunc);
    if (!mask_) fail<IoError>(mask_path(path).string(), ": cannot create");
    files_.push_back(path);
    in_shard_ = 0;
  }

  void write_tokens(std::span<const uint32_t> tokens) {
    if constexpr (std::endian::native == std::endian::little) {
      bin_.write(reinterpret_cast<const char*>(tokens.data()), static_cast<std::streamsize>(tokens.size() * 4));
    } else {
      for (const auto t : tokens) {
        const char le[4] = {char(t), char(t >> 8), char(t >> 16), char(t >> 24)};
        bin_.write(le, 4);
      }
    }
  }

  std::filesystem::path prefix_;
  int64_t shard_tokens_;
  int64_t in_shard_ = 0;
  std::ofstream bin_, mask_;
  std::vector<std::filesystem::path> files_;
};

/// The loss mask of a token file (NAME.mask next to NAME.bin), read by offset (core/files.hpp: a mask rewritten under a
/// running job is an error naming it) and checked against the token count. Copies and ranges share the file.
class LossMask {
 public:
  /// Opens the mask of `bin` (a .bin token file); an IoError if it is missing or of the wrong length, or, with
  /// `check_values`, if an entry is not 0/1 (that reads the whole file; readers that skip it check what they read).
  static LossMask open(const std::filesystem::path& bin, bool check_values = true) {
    const auto path = mask_path(bin);
    const auto bin_bytes = regular_file_size(bin, "a token file");
    if (!std::filesystem::exists(path))
      fail<IoError>(path.string(), ": cannot open (the loss mask of ", bin.string(), "): ", std::strerror(ENOENT));
    LossMask m(WatchedFile(path, shardlm::detail::cat("the loss mask of ", bin.string())));
    m.size_ = static_cast<int64_t>(m.file_.size());
    if (bin_bytes != 4 * m.file_.size())
      fail<IoError>(m.name(), ": ", m.size_, " mask entries for ", bin_bytes / 4, " tokens in ", bin.string());
    if (check_values)
      for (int64_t at = 0; at < m.size_; at += int64_t{1} << 24) m.check(at, std::min(m.size_ - at, int64_t{1} << 24));
    return m;
  }

  int64_t size() const { return size_; }
  const std::string& name() const { return file_.name(); }
  /// Whether token i counts in the loss.
  bool operator[](int64_t i) const { return read(i, 1)[0] != 0; }
  /// Entries [begin, begin + len).
  std::vector<uint8_t> read(int64_t begin, int64_t len) const {
    SHARDLM_ASSERT(begin >= 0 && len >= 0 && begin + len <= size_, "entries outside ", name());
    std::vector<uint8_t> out(static_cast<size_t>(len));
    file_.read(static_cast<uint64_t>(offset_ + begin), static_cast<uint64_t>(len), out.data());
    return out;
  }
  /// Entries [begin, begin + len) as a mask of their own (sharing the file; positions in errors stay the file's).
  LossMask range(int64_t begin, int64_t len) const {
    SHARDLM_ASSERT(begin >= 0 && len >= 0 && begin + len <= size_, "range outside ", name());
    LossMask m = *this;
    m.size_ = len, m.offset_ += begin;
    return m;
  }
  /// Entries [begin, begin + len), each checked: an IoError names the first that is not 0 or 1.
  std::vector<uint8_t> checked(int64_t begin, int64_t len) const {
    auto v = read(begin, len);
    for (size_t i = 0; i < v.size(); ++i)
      if (v[i] > 1) fail<IoError>(name(), ": entry ", offset_ + begin + static_cast<int64_t>(i), " is ", int(v[i]), ", not 0 or 1");
    return v;
  }
  void check(int64_t begin, int64_t len) const { checked(begin, len); }

 private:
  explicit LossMask(WatchedFile file) : file_(std::move(file)) {}

  WatchedFile file_;
  int64_t size_ = 0, offset_ = 0;
};

}  // namespace shardlm::data
