#pragma once
// The safetensors format, without LibTorch: an 8-byte little-endian header length N, N bytes of JSON header,
// then the data. The header maps tensor names to {dtype, shape, data_offsets: [begin, end)} (offsets relative
// to the data start) plus an optional "__metadata__" map of strings. Every number in it is untrusted: the
// whole header is validated before anything sized by it is allocated. This file is all the parser there is;
// it is fuzzed on its own (tests/fuzz) and io/safetensors.hpp adds LibTorch tensors on top.
#include <fcntl.h>
#include <nlohmann/json.hpp>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstdint>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <map>
#include <set>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "shardlm/core/errors.hpp"
#include "shardlm/core/files.hpp"
#include "shardlm/core/json.hpp"

namespace shardlm::io {

/// Headers above this size are refused (real ones are kilobytes to a few megabytes).
inline constexpr uint64_t max_safetensors_header_bytes = 100ull << 20;

/// The dtypes of the format and their element sizes in bytes.
struct SafetensorsDtypeSize {
  const char* name;
  uint64_t size;
};
inline constexpr SafetensorsDtypeSize safetensors_dtype_sizes[] = {
    {"F64", 8}, {"F32", 4}, {"F16", 2}, {"BF16", 2}, {"I64", 8}, {"I32", 4},     {"I16", 2},     {"I8", 1},
    {"U8", 1},  {"BOOL", 1}, {"F8_E4M3", 1}, {"F8_E5M2", 1}, {"U16", 2}, {"U32", 4}, {"U64", 8},
};
/// The element size of a dtype name, 0 when the format has no such dtype.
inline uint64_t safetensors_dtype_size(std::string_view name) {
  for (const auto& d : safetensors_dtype_sizes)
    if (name == d.name) return d.size;
  return 0;
}

/// One tensor entry of a validated header.
struct TensorInfo {
  std::string name;
  std::string dtype;            ///< as written: "BF16", "F32", ...
  std::vector<int64_t> shape;
  uint64_t begin = 0, end = 0;  ///< byte range relative to the data start
  uint64_t nbytes() const { return end - begin; }
  uint64_t element_size() const { return safetensors_dtype_size(dtype); }
  int64_t numel() const {
    uint64_t n = 1;  // partial products were checked to fit 64 unsigned bits; the product is <= the byte size
    for (auto d : shape) n *= static_cast<uint64_t>(d);
    return static_cast<int64_t>(n);
  }
};

/// A validated header: tensors in header order, metadata, where the data starts.
struct SafetensorsHeader {
  std::vector<TensorInfo> tensors;
  std::map<std::string, std::string> metadata;
  uint64_t header_bytes = 0;  ///< N, the JSON text's length
  uint64_t data_start() const { return 8 + header_bytes; }
};

/// The header length N from the first 8 bytes of a file of `file_size` bytes; `path` names the file in errors.
inline uint64_t safetensors_header_length(const unsigned char (&len_bytes)[8], uint64_t file_size, const std::string& path) {
  uint64_t n = 0;
  for (int i = 7; i >= 0; --i) n = (n << 8) | len_bytes[i];
  if (n > file_size - 8)
    fail<IoError>(path, ": header length ", n, " runs past the end of the file (", file_size, " bytes)");
  if (n > max_safetensors_header_bytes)
    fail<IoError>(path, ": header length ", n, " is over the limit of ", max_safetensors_header_bytes, " bytes");
  return n;
}

/// Validates the JSON header text of a file whose data part holds `data_size` bytes: JSON object, no duplicate
/// names, known dtypes, shapes whose byte size fits in 64 bits and matches the offsets, offsets inside the data,
/// and tensors that cover the data exactly (no overlap, no hole, nothing trailing).
inline SafetensorsHeader parse_safetensors_header(std::string_view text, uint64_t data_size, const std::string& p) {
  SafetensorsHeader h;
  h.header_bytes = text.size();
  std::set<std::string> seen;
  std::string duplicate;
  nlohmann::json j;
  try {
    j = nlohmann::json::parse(text, [&](int depth, nlohmann::json::parse_event_t ev, nlohmann::json& parsed) {
      if (depth == 1 && ev == nlohmann::json::parse_event_t::key && !seen.insert(parsed.get<std::string>()).second &&
          duplicate.empty())
        duplicate = parsed.get<std::string>();
      return true;
    });
  } catch (const nlohmann::json::exception& e) {
    fail<IoError>(p, ": header is not valid JSON (", e.what(), ")");
  }
  if (!j.is_object()) fail<IoError>(p, ": header must be a JSON object, got ", j.type_name());
  if (!duplicate.empty()) fail<IoError>(p, ": tensor name '", duplicate, "' appears twice in the header");
  for (const auto& item : j.items()) {
    const std::string name = item.key();  // not a structured binding: clang 14 cannot capture one in a lambda
    const auto& v = item.value();
    if (name == "__metadata__") {
      if (!v.is_object()) fail<IoError>(p, ": __metadata__ must be an object of strings");
      for (const auto& [k, s] : v.items()) {
        if (!s.is_string()) fail<IoError>(p, ": __metadata__ value of '", k, "' is not a string");
        h.metadata[k] = s.get<std::string>();
      }
      continue;
    }
    auto where = [&](const char* what) { return shardlm::detail::cat(p, ": tensor '", name, "': ", what); };
    if (!v.is_object()) fail<IoError>(where("entry is not an object"));
    if (!v.contains("dtype") || !v["dtype"].is_string()) fail<IoError>(where("missing string field 'dtype'"));
    TensorInfo t;
    t.name = name;
    t.dtype = v["dtype"].get<std::string>();
    const uint64_t element = safetensors_dtype_size(t.dtype);
    if (element == 0) fail<IoError>(where("unknown dtype '"), t.dtype, "'");
    if (!v.contains("shape") || !v["shape"].is_array()) fail<IoError>(where("missing array field 'shape'"));
    uint64_t numel = 1;
    for (const auto& d : v["shape"]) {
      if (!d.is_number_unsigned()) fail<IoError>(where("shape entries must be non-negative integers"));
      const auto dim = d.get<uint64_t>();
      if (dim > static_cast<uint64_t>(INT64_MAX) || __builtin_mul_overflow(numel, dim, &numel))
        fail<IoError>(where("shape product overflows"));
      t.shape.push_back(static_cast<int64_t>(dim));
    }
    uint64_t nbytes = 0;
    if (__builtin_mul_overflow(numel, element, &nbytes)) fail<IoError>(where("byte size overflows"));
    const auto& off = v.contains("data_offsets") ? v["data_offsets"] : nlohmann::json();
    if (!off.is_array() || off.size() != 2 || !off[0].is_number_unsigned() || !off[1].is_number_unsigned())
      fail<IoError>(where("data_offsets must be two non-negative integers [begin, end]"));
    t.begin = off[0].get<uint64_t>(), t.end = off[1].get<uint64_t>();
    if (t.begin > t.end) fail<IoError>(where("data_offsets are reversed: begin "), t.begin, " > end ", t.end);
    if (t.end > data_size)
      fail<IoError>(where("data_offsets end "), t.end, " is past the data (", data_size, " bytes): file truncated?");
    if (t.end - t.begin != nbytes)
      fail<IoError>(where("holds "), t.end - t.begin, " bytes but shape x dtype needs ", nbytes);
    h.tensors.push_back(std::move(t));
  }
  // The data must be exactly covered: no overlaps, no holes, nothing trailing.
  std::vector<const TensorInfo*> by_offset;
  for (const auto& t : h.tensors) by_offset.push_back(&t);
  std::sort(by_offset.begin(), by_offset.end(), [](auto* a, auto* b) {
    return a->begin != b->begin ? a->begin < b->begin : a->end < b->end;
  });
  uint64_t pos = 0;
  const TensorInfo* prev = nullptr;
  for (const auto* t : by_offset) {
    if (t->begin < pos)
      fail<IoError>(p, ": tensor '", t->name, "' overlaps tensor '", prev->name, "' (bytes ", t->begin, "..", pos, ")");
    if (t->begin > pos) fail<IoError>(p, ": a hole of ", t->begin - pos, " bytes lies before tensor '", t->name, "'");
    pos = t->end, prev = t;
  }
  if (pos != data_size) fail<IoError>(p, ": ", data_size - pos, " bytes after the last tensor are not described by the header");
  return h;
}

/// Validates a whole file held in memory (`n` bytes at `bytes`): what the fuzzer drives.
inline SafetensorsHeader parse_safetensors(const void* bytes, uint64_t n, const std::string& path) {
  if (n < 8) fail<IoError>(path, ": ", n, " bytes is too small for a safetensors header length");
  const auto* b = static_cast<const unsigned char*>(bytes);
  unsigned char len_bytes[8];
  std::memcpy(len_bytes, b, 8);
  const uint64_t len = safetensors_header_length(len_bytes, n, path);
  return parse_safetensors_header(std::string_view(reinterpret_cast<const char*>(b + 8), len), n - 8 - len, path);
}

/// The header text of a file holding `tensors` (name, dtype, shape; laid out back to back in this order) with
/// {"format": "pt"} plus `metadata`, padded with spaces so the data starts 8-byte aligned. Returns the text and
/// fills each tensor's offsets.
inline std::string safetensors_header_text(std::vector<TensorInfo>& tensors, std::map<std::string, std::string> metadata,
                                           const std::string& path) {
  metadata.emplace("format", "pt");
  nlohmann::ordered_json header;
  header["__metadata__"] = metadata;
  uint64_t offset = 0;
  for (auto& t : tensors) {
    if (t.name == "__metadata__") fail<IoError>(path, ": '__metadata__' is not a valid tensor name");
    if (header.contains(t.name)) fail<IoError>(path, ": tensor name '", t.name, "' given twice");
    const uint64_t element = safetensors_dtype_size(t.dtype);
    if (element == 0) fail<IoError>(path, ": tensor '", t.name, "': unknown dtype '", t.dtype, "'");
    t.begin = offset, t.end = offset + static_cast<uint64_t>(t.numel()) * element;
    header[t.name] = {{"dtype", t.dtype}, {"shape", t.shape}, {"data_offsets", {t.begin, t.end}}};
    offset = t.end;
  }
  std::string text = header.dump();
  text.append((8 - text.size() % 8) % 8, ' ');
  return text;
}

namespace detail {
using shardlm::detail::Fd;
using shardlm::detail::pread_all;
using shardlm::detail::pwrite_all;
/// The 8 little-endian bytes of a header length.
inline std::string header_length_bytes(uint64_t n) {
  std::string out(8, '\0');
  for (int i = 0; i < 8; ++i) out[i] = static_cast<char>((n >> (8 * i)) & 0xff);
  return out;
}
}  // namespace detail

/// A safetensors file opened for reading: the header is validated on construction; tensor bytes are read with
/// pread on demand (whole or by byte range, from any thread), so the file is never loaded whole.
class SafetensorsReader {
 public:
  explicit SafetensorsReader(std::filesystem::path path) : path_(std::move(path)) {
    const auto p = path_.string();
    regular_file_size(path_, "a safetensors file");  // a directory opens, and reads then fail without saying why
    fd_ = detail::Fd(::open(p.c_str(), O_RDONLY | O_CLOEXEC));
    if (fd_.get() < 0) fail<IoError>(p, ": cannot open: ", std::strerror(errno));
    struct stat st {};
    if (::fstat(fd_.get(), &st) != 0) fail<IoError>(p, ": cannot stat: ", std::strerror(errno));
    if (!S_ISREG(st.st_mode)) fail<IoError>(p, ": not a regular file");
    file_size_ = static_cast<uint64_t>(st.st_size);
    if (file_size_ < 8) fail<IoError>(p, ": ", file_size_, " bytes is too small for a safetensors header length");
    unsigned char len_bytes[8];
    detail::pread_all(fd_.get(), len_bytes, 8, 0, p);
    const uint64_t len = safetensors_header_length(len_bytes, file_size_, p);
    std::string text(len, '\0');
    detail::pread_all(fd_.get(), text.data(), len, 8, p);
    header_ = parse_safetensors_header(text, file_size_ - 8 - len, p);
    for (size_t i = 0; i < header_.tensors.size(); ++i) index_[header_.tensors[i].name] = i;
  }

  const std::filesystem::path& path() const { return path_; }
  const std::vector<TensorInfo>& tensors() const { return header_.tensors; }
  const std::map<std::string, std::string>& metadata() const { return header_.metadata; }
  uint64_t header_bytes() const { return header_.header_bytes; }
  uint64_t data_start() const { return header_.data_start(); }
  uint64_t file_size() const { return file_size_; }

  const TensorInfo* find(const std::string& name) const {
    const auto it = index_.find(name);
    return it == index_.end() ? nullptr : &header_.tensors[it->second];
  }
  const TensorInfo& info(const std::string& name) const {
    if (const auto* t = find(name)) return *t;
    fail<IoError>(path_.string(), ": no tensor named '", name, "'");
  }

  /// `n` bytes of tensor `t` starting `offset` bytes into it.
  void read_bytes(const TensorInfo& t, uint64_t offset, uint64_t n, void* dst) const {
    SHARDLM_ASSERT(offset <= t.nbytes() && n <= t.nbytes() - offset, "byte range outside tensor ", t.name);
    detail::pread_all(fd_.get(), dst, n, data_start() + t.begin + offset, path_.string());
  }

 private:
  std::filesystem::path path_;
  detail::Fd fd_;
  uint64_t file_size_ = 0;
  SafetensorsHeader header_;
  std::map<std::string, size_t> index_;
};

/// The weight_map of a model.safetensors.index.json: checkpoint tensor name -> file name (a plain name inside
/// the index's directory).
inline std::map<std::string, std::string> read_weight_map(const std::filesystem::path& index) {
  const nlohmann::json j = read_json(index);
  if (!j.is_object() || !j.contains("weight_map") || !j["weight_map"].is_object())
    fail<IoError>(index.string(), ": missing object 'weight_map'");
  std::map<std::string, std::string> out;
  for (const auto& [name, file] : j["weight_map"].items()) {
    if (!file.is_string()) fail<IoError>(index.string(), ": weight_map entry of '", name, "' is not a file name");
    const auto f = file.get<std::string>();
    if (f.find('/') != std::string::npos || f == ".." || f == "." || f.empty())
      fail<IoError>(index.string(), ": weight_map file '", f, "' of '", name, "' must be a plain file name in the directory");
    out[name] = f;
  }
  return out;
}

}  // namespace shardlm::io
