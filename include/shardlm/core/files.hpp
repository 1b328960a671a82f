#pragma once
// Files read and written by offset, torch-free: whole reads and writes that retry on EINTR and short transfers, the
// check that a path is a regular file, and WatchedFile, a file a job reads for as long as it runs (token files and
// their masks), which stops with an error naming it when it changes underneath instead of a memory mapping's SIGBUS.
#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstdint>
#include <cstring>
#include <filesystem>
#include <memory>
#include <string>
#include <string_view>
#include <utility>

#include "shardlm/core/errors.hpp"

namespace shardlm {

namespace detail {
/// Reads exactly n bytes at offset, retrying on EINTR and short reads; the end of the file before that is an IoError.
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
/// Writes exactly n bytes at offset (pwrite), retrying on EINTR and short writes.
inline void pwrite_all(int fd, const void* src, uint64_t n, uint64_t offset, const std::string& path) {
  const auto* p = static_cast<const char*>(src);
  while (n > 0) {
    const ssize_t put = ::pwrite(fd, p, std::min<uint64_t>(n, 1ull << 30), static_cast<off_t>(offset));
    if (put < 0 && errno == EINTR) continue;
    if (put < 0) fail<IoError>(path, ": write failed at byte ", offset, ": ", std::strerror(errno));
    p += put, n -= static_cast<uint64_t>(put), offset += static_cast<uint64_t>(put);
  }
}
/// An owned file descriptor.
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

/// The size of the regular file at `path` (`what` says what it should be, for the errors): a missing path, a
/// directory or a device is an IoError naming it.
inline uint64_t regular_file_size(const std::filesystem::path& path, std::string_view what) {
  struct stat st {};
  if (::stat(path.c_str(), &st) != 0) fail<IoError>(path.string(), ": cannot open: ", std::strerror(errno));
  if (S_ISDIR(st.st_mode)) fail<IoError>(path.string(), ": is a directory, expected ", what);
  if (!S_ISREG(st.st_mode)) fail<IoError>(path.string(), ": not a regular file, expected ", what);
  return static_cast<uint64_t>(st.st_size);
}

/// A regular file read by offset (pread) for as long as a job runs. Each read first checks that the file still has
/// the size and modification time it had when it was opened: a file rewritten, truncated or appended to under a
/// running job is an IoError naming it (a memory mapping of a file that shrinks ends the process with SIGBUS, and
/// one rewritten in place silently changes the data mid-run). Copies share the descriptor; reads are thread-safe.
class WatchedFile {
 public:
  /// Opens `path`; `what` says what it should be ("a token file"), for the errors.
  WatchedFile(const std::filesystem::path& path, std::string_view what) : state_(std::make_shared<State>()) {
    state_->name = path.string();
    regular_file_size(path, what);
    state_->fd = detail::Fd(::open(path.c_str(), O_RDONLY | O_CLOEXEC));
    if (state_->fd.get() < 0) fail<IoError>(state_->name, ": cannot open: ", std::strerror(errno));
    struct stat st {};
    if (::fstat(state_->fd.get(), &st) != 0) fail<IoError>(state_->name, ": cannot stat: ", std::strerror(errno));
    state_->opened = st;
  }

  const std::string& name() const { return state_->name; }
  uint64_t size() const { return static_cast<uint64_t>(state_->opened.st_size); }

  /// `n` bytes at `offset` (inside the size the file had when opened) into `dst`.
  void read(uint64_t offset, uint64_t n, void* dst) const {
    SHARDLM_ASSERT(offset <= size() && n <= size() - offset, "read past the end of ", name());
    check_unchanged();
    try {
      detail::pread_all(state_->fd.get(), dst, n, offset, state_->name);
    } catch (const IoError&) {
      check_unchanged();  // it shrank between the check and the read
      throw;
    }
  }

 private:
  struct State {
    std::string name;
    detail::Fd fd;
    struct stat opened {};
  };

  void check_unchanged() const {
    struct stat now {};
    if (::fstat(state_->fd.get(), &now) != 0) fail<IoError>(state_->name, ": cannot stat: ", std::strerror(errno));
    const auto& was = state_->opened;
    if (now.st_size != was.st_size)
      fail<IoError>(state_->name, ": changed size while the job was reading it (", was.st_size, " bytes when it was ",
                    "opened, ", now.st_size, " now): a file a job reads must not be rewritten until it ends");
    if (now.st_mtim.tv_sec != was.st_mtim.tv_sec || now.st_mtim.tv_nsec != was.st_mtim.tv_nsec)
      fail<IoError>(state_->name, ": was modified while the job was reading it (same size, ", now.st_size, " bytes): ",
                    "a file a job reads must not be rewritten until it ends");
  }

  std::shared_ptr<State> state_;
};

}  // namespace shardlm
