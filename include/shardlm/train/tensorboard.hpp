#pragma once
// TensorBoard event files (scalars), written without TensorFlow or protobuf. Torch-free.
//   A file `events.out.tfevents.<seconds>.<host>` is a sequence of records (TFRecord framing):
//     uint64 length (little-endian) | uint32 masked CRC32C of those 8 bytes | length bytes of data |
//     uint32 masked CRC32C of the data,   masked(c) = ((c >> 15) | (c << 17)) + 0xa282ead8.
//   Each record's data is one serialized tensorflow.Event message, encoded here by hand:
//     Event   { double wall_time = 1; int64 step = 2; string file_version = 3; Summary summary = 5; }
//     Summary { repeated Value value = 1; }   Value { string tag = 1; float simple_value = 2; }
//   The first record holds file_version "brain.Event:2"; then one Event per step with its scalars.
#include <unistd.h>

#include <array>
#include <bit>
#include <chrono>
#include <cstdint>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "shardlm/core/crc32c.hpp"
#include "shardlm/core/errors.hpp"

namespace shardlm::train::tensorboard {

using shardlm::crc32c;  // core/crc32c.hpp
inline uint32_t masked_crc(std::string_view data) {
  const uint32_t c = crc32c(data);
  return ((c >> 15) | (c << 17)) + 0xa282ead8u;
}

/// Protocol-buffer wire format, the few pieces an Event needs.
namespace wire {
inline void varint(std::string& out, uint64_t v) {
  while (v >= 0x80) out += static_cast<char>((v & 0x7F) | 0x80), v >>= 7;
  out += static_cast<char>(v);
}
inline void fixed(std::string& out, uint64_t bits, int bytes) {
  for (int i = 0; i < bytes; ++i) out += static_cast<char>((bits >> (8 * i)) & 0xFF);
}
inline void key(std::string& out, int field, int wire_type) { varint(out, static_cast<uint64_t>(field << 3 | wire_type)); }
inline void bytes(std::string& out, int field, std::string_view v) {
  key(out, field, 2);
  varint(out, v.size());
  out += v;
}
}  // namespace wire

/// A serialized Event: wall time, step, and either a file version or scalar values (tag, value).
inline std::string event(double wall_time, int64_t step, std::string_view file_version,
                         const std::vector<std::pair<std::string, float>>& scalars) {
  std::string e;
  wire::key(e, 1, 1);
  wire::fixed(e, std::bit_cast<uint64_t>(wall_time), 8);
  wire::key(e, 2, 0);
  wire::varint(e, static_cast<uint64_t>(step));
  if (!file_version.empty()) wire::bytes(e, 3, file_version);
  if (!scalars.empty()) {
    std::string summary;
    for (const auto& [tag, value] : scalars) {
      std::string v;
      wire::bytes(v, 1, tag);
      wire::key(v, 2, 5);
      wire::fixed(v, std::bit_cast<uint32_t>(value), 4);
      wire::bytes(summary, 1, v);
    }
    wire::bytes(e, 5, summary);
  }
  return e;
}

/// One record of an event file: length, its masked CRC, the data, the data's masked CRC.
inline std::string record(std::string_view data) {
  std::string r, length;
  wire::fixed(length, data.size(), 8);
  r += length;
  wire::fixed(r, masked_crc(length), 4);
  r += data;
  wire::fixed(r, masked_crc(data), 4);
  return r;
}

/// Appends scalar events to a new event file in a directory (nothing when the directory is empty), flushed per
/// step so that TensorBoard shows a run while it trains.
class Writer {
 public:
  explicit Writer(const std::filesystem::path& dir) {
    if (dir.empty()) return;
    std::error_code ec;
    std::filesystem::create_directories(dir, ec);
    if (ec) fail<IoError>("--tensorboard ", dir.string(), ": cannot create: ", ec.message());
    char host[256] = "localhost";
    ::gethostname(host, sizeof host - 1);
    const double now = wall_time();
    path_ = dir / ("events.out.tfevents." + std::to_string(static_cast<int64_t>(now)) + "." + host);
    out_.open(path_, std::ios::binary | std::ios::trunc);
    if (!out_) fail<IoError>(path_.string(), ": cannot open for writing");
    put(event(now, 0, "brain.Event:2", {}));
  }
  bool enabled() const { return out_.is_open(); }
  const std::filesystem::path& path() const { return path_; }

  /// The scalars of one step (tags like "train/loss").
  void scalars(int64_t step, const std::vector<std::pair<std::string, float>>& values) {
    if (enabled() && !values.empty()) put(event(wall_time(), step, {}, values));
  }

 private:
  static double wall_time() {
    return std::chrono::duration<double>(std::chrono::system_clock::now().time_since_epoch()).count();
  }
  void put(const std::string& data) {
    out_ << record(data) << std::flush;
    if (!out_) fail<IoError>(path_.string(), ": write failed");
  }
  std::filesystem::path path_;
  std::ofstream out_;
};

}  // namespace shardlm::train::tensorboard
