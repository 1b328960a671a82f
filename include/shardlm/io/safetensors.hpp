#pragma once
// safetensors files as LibTorch tensors: the validating reader of io/safetensors_format.hpp plus reads into
// tensors, and an atomic writer.
#include <ATen/ATen.h>

#include <filesystem>
#include <map>
#include <iterator>
#include <string>
#include <string_view>
#include <vector>

#include "shardlm/core/crc32c.hpp"
#include "shardlm/core/errors.hpp"
#include "shardlm/io/safetensors_format.hpp"

namespace shardlm::io {

/// The LibTorch dtype of each safetensors dtype.
inline constexpr std::pair<const char*, at::ScalarType> safetensors_scalar_types[] = {
    {"F64", at::kDouble}, {"F32", at::kFloat},  {"F16", at::kHalf},   {"BF16", at::kBFloat16},
    {"I64", at::kLong},   {"I32", at::kInt},    {"I16", at::kShort},  {"I8", at::kChar},
    {"U8", at::kByte},    {"BOOL", at::kBool},  {"F8_E4M3", at::kFloat8_e4m3fn}, {"F8_E5M2", at::kFloat8_e5m2},
    {"U16", at::kUInt16}, {"U32", at::kUInt32}, {"U64", at::kUInt64},
};
static_assert(
    [] {
      if (std::size(safetensors_scalar_types) != std::size(safetensors_dtype_sizes)) return false;
      for (size_t i = 0; i < std::size(safetensors_scalar_types); ++i)
        if (std::string_view(safetensors_scalar_types[i].first) != safetensors_dtype_sizes[i].name) return false;
      return true;
    }(),
    "safetensors_scalar_types must list the dtypes of safetensors_dtype_sizes (io/safetensors_format.hpp), in order");
/// The LibTorch dtype of a validated tensor entry.
inline at::ScalarType scalar_type_of(const TensorInfo& t) {
  for (const auto& [name, type] : safetensors_scalar_types)
    if (t.dtype == name) return type;
  fail<InternalError>("no LibTorch dtype for safetensors dtype ", t.dtype);
}
/// The safetensors name of a LibTorch dtype.
inline const char* safetensors_dtype_name(at::ScalarType type) {
  for (const auto& [name, t] : safetensors_scalar_types)
    if (t == type) return name;
  fail<IoError>("dtype ", c10::toString(type), " cannot be stored in safetensors");
}

/// A validated safetensors file whose tensors are read into CPU tensors on demand.
class SafetensorsFile : public SafetensorsReader {
 public:
  using SafetensorsReader::SafetensorsReader;

  /// The whole tensor as a CPU tensor of its stored dtype.
  at::Tensor read(const std::string& name) const {
    const auto& t = info(name);
    auto out = at::empty(t.shape, at::TensorOptions().dtype(scalar_type_of(t)));
    read_bytes(t, 0, t.nbytes(), out.data_ptr());
    return out;
  }
};

/// Writes tensors (moved to CPU, made contiguous) with {"format": "pt"} metadata plus `metadata`, through a
/// temporary file renamed into place, so a reader never sees a half-written file. `checksummed`, when given, holds a
/// byte count per tensor: the CRC32C of that many leading bytes of each tensor is computed while it is written (in
/// chunks of 256 KiB, each checksummed just before it is written, while it is in the cache: no second pass over the
/// bytes; measured in docs/checkpoints.md) and returned, one per tensor.
inline std::vector<uint32_t> save_safetensors(const std::filesystem::path& path,
                                              const std::vector<std::pair<std::string, at::Tensor>>& tensors,
                                              std::map<std::string, std::string> metadata = {},
                                              const std::vector<uint64_t>& checksummed = {}) {
  SHARDLM_ASSERT(checksummed.empty() || checksummed.size() == tensors.size(), "a checksum length per tensor");
  std::vector<TensorInfo> entries;
  std::vector<at::Tensor> data;
  for (const auto& [name, tensor] : tensors) {
    auto t = tensor.detach().to(at::kCPU).contiguous();
    entries.push_back({name, safetensors_dtype_name(t.scalar_type()), t.sizes().vec()});
    data.push_back(std::move(t));
  }
  const std::string text = safetensors_header_text(entries, std::move(metadata), path.string());
  const auto tmp = path.string() + ".tmp";
  std::vector<uint32_t> crcs;
  {
    detail::Fd fd(::open(tmp.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644));
    if (fd.get() < 0) fail<IoError>(tmp, ": cannot create: ", std::strerror(errno));
    const std::string head = detail::header_length_bytes(text.size()) + text;
    detail::pwrite_all(fd.get(), head.data(), head.size(), 0, tmp);
    uint64_t at = head.size();
    constexpr uint64_t chunk = uint64_t{256} << 10;
    for (size_t i = 0; i < data.size(); ++i) {
      const auto* bytes = static_cast<const unsigned char*>(data[i].data_ptr());
      const uint64_t n = data[i].nbytes(), checked = checksummed.empty() ? 0 : std::min(checksummed[i], n);
      uint32_t crc = 0;
      for (uint64_t done = 0; done < n; done += chunk) {
        const uint64_t len = std::min(chunk, n - done);
        if (done < checked) crc = crc32c_extend(crc, bytes + done, std::min(len, checked - done));
        detail::pwrite_all(fd.get(), bytes + done, len, at + done, tmp);
      }
      if (!checksummed.empty()) crcs.push_back(crc);
      at += n;
    }
    if (::fsync(fd.get()) != 0) fail<IoError>(tmp, ": fsync failed: ", std::strerror(errno));
  }
  std::error_code ec;
  std::filesystem::rename(tmp, path, ec);
  if (ec) fail<IoError>(path.string(), ": cannot rename from ", tmp, ": ", ec.message());
  return crcs;
}

}  // namespace shardlm::io
