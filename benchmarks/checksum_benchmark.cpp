// What checkpoint checksums cost (docs/checkpoints.md, Checksums), torch-free:
//   checksum_benchmark [DIR] [GIB]   (default: /dev/shm, 1)
// CRC32C throughput (the SSE4.2 path when the CPU has it, and the slice-by-8 tables) on a buffer in the cache and on
// one larger than it; then writing GIB GiB to DIR/checksum_benchmark.tmp and reading it back, in the chunks the
// checkpoint writer and reader use (256 KiB) and larger ones, each with and without the CRC of every chunk taken
// where the checkpoint code takes it (before the write, after the read). The best of 3 runs of each; one JSON line
// per measurement.
#include <fcntl.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <string>
#include <vector>

#include "shardlm/core/crc32c.hpp"
#include "shardlm/core/files.hpp"

using namespace shardlm;

namespace {
template <class F>
double best_of_3(F&& f) {
  double best = 1e30;
  for (int r = 0; r < 3; ++r) {
    const auto t0 = std::chrono::steady_clock::now();
    f();
    best = std::min(best, std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count());
  }
  return best;
}
volatile uint32_t sink;  // keeps the CRCs computed
}  // namespace

int main(int argc, char** argv) {
  const std::string dir = argc > 1 ? argv[1] : "/dev/shm";
  const uint64_t bytes = (argc > 2 ? std::strtoull(argv[2], nullptr, 10) : 1) << 30;
  std::vector<unsigned char> data(bytes), back(bytes);
  for (uint64_t i = 0; i < bytes; ++i) data[i] = static_cast<unsigned char>(i * 2654435761u >> 13);
  std::fill(back.begin(), back.end(), 1);  // its pages touched: reads do not count page faults

  const auto crc_rate = [&](const char* path, uint64_t n, int reps, bool hardware) {
    const double s = best_of_3([&] {
      for (int i = 0; i < reps; ++i)
        sink = hardware ? crc32c(data.data(), n) : ~detail::crc32c_raw_table(~0u, data.data(), n);
    });
    std::printf("{\"measure\": \"crc32c\", \"path\": \"%s\", \"bytes\": %llu, \"GB_per_s\": %.2f}\n", path,
                static_cast<unsigned long long>(n), static_cast<double>(n) * reps / s / 1e9);
  };
  if (crc32c_hardware()) {
    crc_rate("sse4.2, in cache (256 KiB)", 256 << 10, 4000, true);
    crc_rate("sse4.2, from memory", bytes, 1, true);
  }
  crc_rate("tables, in cache (256 KiB)", 256 << 10, 1000, false);
  crc_rate("tables, from memory", bytes, 1, false);

  const auto file = dir + "/checksum_benchmark.tmp";
  for (const uint64_t chunk : {uint64_t{256} << 10, uint64_t{8} << 20, uint64_t{64} << 20}) {
    for (const bool checked : {false, true}) {
      const double w = best_of_3([&] {
        detail::Fd fd(::open(file.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644));
        if (fd.get() < 0) std::exit((std::perror(file.c_str()), 1));
        uint32_t crc = 0;
        for (uint64_t at = 0; at < bytes; at += chunk) {
          const uint64_t n = std::min(chunk, bytes - at);
          if (checked) crc = crc32c_extend(crc, data.data() + at, n);
          detail::pwrite_all(fd.get(), data.data() + at, n, at, file);
        }
        sink = crc;
      });
      const double r = best_of_3([&] {
        detail::Fd fd(::open(file.c_str(), O_RDONLY | O_CLOEXEC));
        uint32_t crc = 0;
        for (uint64_t at = 0; at < bytes; at += chunk) {
          const uint64_t n = std::min(chunk, bytes - at);
          detail::pread_all(fd.get(), back.data() + at, n, at, file);
          if (checked) crc = crc32c_extend(crc, back.data() + at, n);
        }
        sink = crc;
      });
      std::printf("{\"measure\": \"file\", \"dir\": \"%s\", \"chunk_KiB\": %llu, \"crc32c\": %s, \"write_s\": %.3f, "
                  "\"write_GB_per_s\": %.2f, \"read_s\": %.3f, \"read_GB_per_s\": %.2f}\n",
                  dir.c_str(), static_cast<unsigned long long>(chunk >> 10), checked ? "true" : "false", w, bytes / w / 1e9,
                  r, bytes / r / 1e9);
    }
  }
  ::unlink(file.c_str());
  return 0;
}
