#pragma once
// Token shards on disk, as shardlm_tokenize writes them and TokenDataset reads them:
//   NAME.bin   the tokens, raw little-endian uint32 (what TokenDataset memory-maps);
//   NAME.mask  the loss mask, one uint8 per token of NAME.bin: 1 = the token counts in the loss as a target,
//              0 = it does not (a prompt, a BOS). Optional for readers: no mask means every token counts.
// Torch-free, like the tokenizer.
#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

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

/// The loss mask of a token file (NAME.mask next to NAME.bin), memory-mapped and checked against the token count.
/// Copies and ranges share the mapping.
class LossMask {
 public:
  /// Maps the mask of `bin` (a .bin token file); an IoError if it is missing or of the wrong length, or, with
  /// `check_values`, if an entry is not 0/1 (that reads every page; readers that skip it check what they read).
  static LossMask open(const std::filesystem::path& bin, bool check_values = true) {
    const auto path = mask_path(bin);
    const auto p = path.string();
    std::error_code ec;
    const auto bin_bytes = std::filesystem::file_size(bin, ec);
    if (ec) fail<IoError>(bin.string(), ": cannot stat: ", ec.message());
    const int fd = ::open(p.c_str(), O_RDONLY | O_CLOEXEC);
    if (fd < 0) fail<IoError>(p, ": cannot open (the loss mask of ", bin.string(), "): ", std::strerror(errno));
    struct stat st {};
    const bool stat_ok = ::fstat(fd, &st) == 0;
    const auto size = stat_ok ? static_cast<size_t>(st.st_size) : 0;
    void* map = stat_ok && size ? ::mmap(nullptr, size, PROT_READ, MAP_SHARED, fd, 0) : nullptr;
    ::close(fd);
    if (!stat_ok) fail<IoError>(p, ": cannot stat");
    if (map == MAP_FAILED) fail<IoError>(p, ": mmap failed: ", std::strerror(errno));
    LossMask m;
    m.name_ = p;
    m.mapping_ = std::shared_ptr<void>(map, [size](void* a) { if (a) ::munmap(a, size); });
    m.data_ = static_cast<const uint8_t*>(map);
    m.size_ = static_cast<int64_t>(size);
    if (bin_bytes != 4 * size) fail<IoError>(p, ": ", size, " mask entries for ", bin_bytes / 4, " tokens in ", bin.string());
    if (check_values) m.check(0, m.size_);
    return m;
  }

  int64_t size() const { return size_; }
  const std::string& name() const { return name_; }
  /// Whether token i counts in the loss.
  bool operator[](int64_t i) const { return data_[i] != 0; }
  std::span<const uint8_t> values() const { return {data_, static_cast<size_t>(size_)}; }
  /// Entries [begin, begin + len) as a mask of their own (sharing the mapping; positions in errors stay the file's).
  LossMask range(int64_t begin, int64_t len) const {
    SHARDLM_ASSERT(begin >= 0 && len >= 0 && begin + len <= size_, "range outside ", name_);
    LossMask m = *this;
    m.data_ += begin, m.size_ = len, m.offset_ += begin;
    return m;
  }
  /// An IoError naming the first entry of [begin, begin + len) that is not 0 or 1.
  void check(int64_t begin, int64_t len) const {
    for (int64_t i = begin; i < begin + len; ++i)
      if (data_[i] > 1) fail<IoError>(name_, ": entry ", offset_ + i, " is ", int(data_[i]), ", not 0 or 1");
  }

 private:
  std::string name_;
  std::shared_ptr<void> mapping_;
  const uint8_t* data_ = nullptr;
  int64_t size_ = 0, offset_ = 0;
};

}  // namespace shardlm::data
