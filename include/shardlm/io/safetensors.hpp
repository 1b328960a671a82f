#pragma once
// The safetensors format: an 8-byte little-endian header length N, N bytes of JSON header, then the data.
// The header maps tensor names to {dtype, shape, data_offsets: [begin, end)} (offsets relative to the data
// start) plus an optional "__metadata__" map of strings. Every number in it is untrusted: the reader
// validates the whole header before it allocates anything sized by it.
#include <ATen/ATen.h>
#include <fcntl.h>
#include <nlohmann/json.hpp>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstdint>
#include <cstring>
#include <filesystem>
#include <map>
#include <set>
#include <string>
#include <vector>

#include "shardlm/core/errors.hpp"

namespace shardlm::io {

/// Headers above this size are refused (real ones are kilobytes to a few megabytes).
inline constexpr uint64_t max_safetensors_header_bytes = 100ull << 20;

struct SafetensorsDtype {
  const char* name;
  at::ScalarType type;
  uint64_t size;
};
inline constexpr SafetensorsDtype safetensors_dtypes[] = {
    {"F64", at::kDouble, 8},  {"F32", at::kFloat, 4},          {"F16", at::kHalf, 2},
    {"BF16", at::kBFloat16, 2}, {"I64", at::kLong, 8},         {"I32", at::kInt, 4},
    {"I16", at::kShort, 2},   {"I8", at::kChar, 1},            {"U8", at::kByte, 1},
    {"BOOL", at::kBool, 1},   {"F8_E4M3", at::kFloat8_e4m3fn, 1}, {"F8_E5M2", at::kFloat8_e5m2, 1},
    {"U16", at::kUInt16, 2},  {"U32", at::kUInt32, 4},         {"U64", at::kUInt64, 8},
};

inline const SafetensorsDtype* find_safetensors_dtype(const std::string& name) {
  for (const auto& d : safetensors_dtypes)
    if (name == d.name) return &d;
  return nullptr;
}
inline const SafetensorsDtype& safetensors_dtype_of(at::ScalarType t) {
  for (const auto& d : safetensors_dtypes)
    if (d.type == t) return d;
  fail<IoError>("dtype ", c10::toString(t), " cannot be stored in safetensors");
}

/// One tensor entry of a validated header.
struct TensorInfo {
  std::string name;
  std::string dtype;        ///< as written: "BF16", "F32", ...
  at::ScalarType scalar_type;
  std::vector<int64_t> shape;
  uint64_t begin = 0, end = 0;  ///< byte range relative to the data start
  uint64_t nbytes() const { return end - begin; }
};

namespace detail {
/// Reads exactly n bytes at offset, retrying on EINTR and short reads.
inline void pread_all(int fd, void* dst, uint64_t n, uint64_t offset, const std::string& path) {
  auto* p = static_cast<char*>(dst);
  while (n > 0) {
    const ssize_t got = ::pread(fd, p, std::min<uint64_t>(n, 1ull << 30), static_cast<off_t>(offset));
    if (got < 0 && errno == EINTR) continue;
    if (got < 0) fail<IoError>(path, ": read failed at byte ", offset, ": ", std::strerror(errno));
    if (got == 0) fail<IoError>(path, ": truncated: ", n, " bytes missing at byte ", offset);
    p += got, n -= static_cast<uint64_t>(got), offset += static_cast<uint64_t>(got);
  }
}
inline void write_all(int fd, const void* src, uint64_t n, const std::string& path) {
  const auto* p = static_cast<const char*>(src);
  while (n > 0) {
    const ssize_t put = ::write(fd, p, std::min<uint64_t>(n, 1ull << 30));
    if (put < 0 && errno == EINTR) continue;
    if (put < 0) fail<IoError>(path, ": write failed: ", std::strerror(errno));
    p += put, n -= static_cast<uint64_t>(put);
  }
}
class Fd {
 public:
  Fd(int fd = -1) : fd_(fd) {}
  Fd(Fd&& o) noexcept : fd_(std::exchange(o.fd_, -1)) {}
  Fd& operator=(Fd&& o) noexcept { std::swap(fd_, o.fd_); return *this; }
  ~Fd() { if (fd_ >= 0) ::close(fd_); }
  int get() const { return fd_; }

 private:
  int fd_;
};
}  // namespace detail

/// A safetensors file opened for reading: the header is validated on construction; tensors are read with
/// pread on demand (whole or by byte range), so the file is never loaded whole.
class SafetensorsFile {
 public:
  explicit SafetensorsFile(std::filesystem::path path) : path_(std::move(path)) {
    const auto p = path_.string();
    fd_ = detail::Fd(::open(p.c_str(), O_RDONLY | O_CLOEXEC));
    if (fd_.get() < 0) fail<IoError>(p, ": cannot open: ", std::strerror(errno));
    struct stat st {};
    if (::fstat(fd_.get(), &st) != 0) fail<IoError>(p, ": cannot stat: ", std::strerror(errno));
    if (!S_ISREG(st.st_mode)) fail<IoError>(p, ": not a regular file");
    file_size_ = static_cast<uint64_t>(st.st_size);
    if (file_size_ < 8) fail<IoError>(p, ": ", file_size_, " bytes is too small for a safetensors header length");
    unsigned char len_bytes[8];
    detail::pread_all(fd_.get(), len_bytes, 8, 0, p);
    uint64_t header_len = 0;
    for (int i = 7; i >= 0; --i) header_len = (header_len << 8) | len_bytes[i];
    if (header_len > file_size_ - 8)
      fail<IoError>(p, ": header length ", header_len, " runs past the end of the file (", file_size_, " bytes)");
    if (header_len > max_safetensors_header_bytes)
      fail<IoError>(p, ": header length ", header_len, " is over the limit of ", max_safetensors_header_bytes, " bytes");
    std::string header(header_len, '\0');
    detail::pread_all(fd_.get(), header.data(), header_len, 8, p);
    data_start_ = 8 + header_len;
    parse_header(header);
  }

  const std::filesystem::path& path() const { return path_; }
  const std::vector<TensorInfo>& tensors() const { return tensors_; }
  const std::map<std::string, std::string>& metadata() const { return metadata_; }
  uint64_t data_start() const { return data_start_; }
  uint64_t file_size() const { return file_size_; }

  const TensorInfo* find(const std::string& name) const {
    const auto it = index_.find(name);
    return it == index_.end() ? nullptr : &tensors_[it->second];
  }
  const TensorInfo& info(const std::string& name) const {
    if (const auto* t = find(name)) return *t;
    fail<IoError>(path_.string(), ": no tensor named '", name, "'");
  }

  /// The whole tensor as a CPU tensor of its stored dtype.
  at::Tensor read(const std::string& name) const {
    const auto& t = info(name);
    auto out = at::empty(t.shape, at::TensorOptions().dtype(t.scalar_type));
    read_bytes(t, 0, t.nbytes(), out.data_ptr());
    return out;
  }

  /// `n` bytes of tensor `t` starting `offset` bytes into it.
  void read_bytes(const TensorInfo& t, uint64_t offset, uint64_t n, void* dst) const {
    SHARDLM_ASSERT(offset <= t.nbytes() && n <= t.nbytes() - offset, "byte range outside tensor ", t.name);
    detail::pread_all(fd_.get(), dst, n, data_start_ + t.begin + offset, path_.string());
  }

 private:
  void parse_header(const std::string& header) {
    const auto p = path_.string();
    std::set<std::string> seen;
    std::string duplicate;
    nlohmann::json j;
    try {
      j = nlohmann::json::parse(header, [&](int depth, nlohmann::json::parse_event_t ev, nlohmann::json& parsed) {
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
    const uint64_t data_size = file_size_ - data_start_;
    for (const auto& [name, v] : j.items()) {
      if (name == "__metadata__") {
        if (!v.is_object()) fail<IoError>(p, ": __metadata__ must be an object of strings");
        for (const auto& [k, s] : v.items()) {
          if (!s.is_string()) fail<IoError>(p, ": __metadata__ value of '", k, "' is not a string");
          metadata_[k] = s.get<std::string>();
        }
        continue;
      }
      auto where = [&](const char* what) { return shardlm::detail::cat(p, ": tensor '", name, "': ", what); };
      if (!v.is_object()) fail<IoError>(where("entry is not an object"));
      if (!v.contains("dtype") || !v["dtype"].is_string()) fail<IoError>(where("missing string field 'dtype'"));
      TensorInfo t;
      t.name = name;
      t.dtype = v["dtype"].get<std::string>();
      const auto* dt = find_safetensors_dtype(t.dtype);
      if (!dt) fail<IoError>(where("unknown dtype '"), t.dtype, "'");
      t.scalar_type = dt->type;
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
      if (__builtin_mul_overflow(numel, dt->size, &nbytes)) fail<IoError>(where("byte size overflows"));
      const auto& off = v.contains("data_offsets") ? v["data_offsets"] : nlohmann::json();
      if (!off.is_array() || off.size() != 2 || !off[0].is_number_unsigned() || !off[1].is_number_unsigned())
        fail<IoError>(where("data_offsets must be two non-negative integers [begin, end]"));
      t.begin = off[0].get<uint64_t>(), t.end = off[1].get<uint64_t>();
      if (t.begin > t.end) fail<IoError>(where("data_offsets are reversed: begin "), t.begin, " > end ", t.end);
      if (t.end > data_size)
        fail<IoError>(where("data_offsets end "), t.end, " is past the data (", data_size, " bytes): file truncated?");
      if (t.end - t.begin != nbytes)
        fail<IoError>(where("holds "), t.end - t.begin, " bytes but shape x dtype needs ", nbytes);
      tensors_.push_back(std::move(t));
    }
    // The data must be exactly covered: no overlaps, no holes, nothing trailing.
    std::vector<const TensorInfo*> by_offset;
    for (const auto& t : tensors_) by_offset.push_back(&t);
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
    for (size_t i = 0; i < tensors_.size(); ++i) index_[tensors_[i].name] = i;
  }

  std::filesystem::path path_;
  detail::Fd fd_;
  uint64_t file_size_ = 0, data_start_ = 0;
  std::vector<TensorInfo> tensors_;
  std::map<std::string, size_t> index_;
  std::map<std::string, std::string> metadata_;
};

/// Writes tensors (moved to CPU, made contiguous) with {"format": "pt"} metadata plus `metadata`, through a
/// temporary file renamed into place, so a reader never sees a half-written file.
inline void save_safetensors(const std::filesystem::path& path, const std::vector<std::pair<std::string, at::Tensor>>& tensors,
                             std::map<std::string, std::string> metadata = {}) {
  metadata.emplace("format", "pt");
  nlohmann::ordered_json header;
  header["__metadata__"] = metadata;
  std::vector<at::Tensor> data;
  uint64_t offset = 0;
  for (const auto& [name, tensor] : tensors) {
    if (name == "__metadata__") fail<IoError>(path.string(), ": '__metadata__' is not a valid tensor name");
    if (header.contains(name)) fail<IoError>(path.string(), ": tensor name '", name, "' given twice");
    auto t = tensor.detach().to(at::kCPU).contiguous();
    const uint64_t n = static_cast<uint64_t>(t.numel()) * safetensors_dtype_of(t.scalar_type()).size;
    header[name] = {{"dtype", safetensors_dtype_of(t.scalar_type()).name}, {"shape", t.sizes().vec()}, {"data_offsets", {offset, offset + n}}};
    offset += n;
    data.push_back(std::move(t));
  }
  std::string text = header.dump();
  text.append((8 - text.size() % 8) % 8, ' ');  // keep the data 8-byte aligned
  const auto tmp = path.string() + ".tmp";
  {
    detail::Fd fd(::open(tmp.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644));
    if (fd.get() < 0) fail<IoError>(tmp, ": cannot create: ", std::strerror(errno));
    unsigned char len_bytes[8];
    for (int i = 0; i < 8; ++i) len_bytes[i] = static_cast<unsigned char>((text.size() >> (8 * i)) & 0xff);
    detail::write_all(fd.get(), len_bytes, 8, tmp);
    detail::write_all(fd.get(), text.data(), text.size(), tmp);
    for (const auto& t : data) detail::write_all(fd.get(), t.data_ptr(), t.nbytes(), tmp);
    if (::fsync(fd.get()) != 0) fail<IoError>(tmp, ": fsync failed: ", std::strerror(errno));
  }
  std::error_code ec;
  std::filesystem::rename(tmp, path, ec);
  if (ec) fail<IoError>(path.string(), ": cannot rename from ", tmp, ": ", ec.message());
}

}  // namespace shardlm::io
