#pragma once
// CRC32C (Castagnoli, reflected polynomial 0x82F63B78: iSCSI, ext4, TFRecord), torch-free. Checkpoint shards are
// checksummed with it (train/checkpoint_format.hpp), TensorBoard records framed with it (train/tensorboard.hpp).
//   crc32c(data)                  the standard CRC (initial value and final xor 0xFFFFFFFF)
//   crc32c_extend(crc, data)      the CRC of the earlier bytes followed by `data`
//   crc32c_combine(a, b, len_b)   the CRC of A || B from crc(A), crc(B) and |B|
// The x86-64 SSE4.2 crc32 instruction is used where the CPU has it (detected at run time: the binary still runs on
// a CPU without it), three streams interleaved to hide the instruction's latency; elsewhere slice-by-8 tables.
// CRC32C is linear over GF(2), which is what lets pieces read by different ranks be checked against one recorded
// value (crc32c_shift, PieceCrc in train/checkpoint_format.hpp).
#include <array>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <string_view>

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#include <nmmintrin.h>
#define SHARDLM_CRC32C_X86 1
#else
#define SHARDLM_CRC32C_X86 0
#endif

namespace shardlm {

namespace detail {
inline constexpr uint32_t crc32c_poly = 0x82F63B78u;

/// Slice-by-8 tables: table[0] is the byte-at-a-time table, table[k][b] the CRC of byte b followed by k zeros.
inline constexpr auto crc32c_tables = [] {
  std::array<std::array<uint32_t, 256>, 8> t{};
  for (uint32_t i = 0; i < 256; ++i) {
    uint32_t c = i;
    for (int k = 0; k < 8; ++k) c = (c & 1) ? (c >> 1) ^ crc32c_poly : c >> 1;
    t[0][i] = c;
  }
  for (size_t k = 1; k < 8; ++k)
    for (size_t i = 0; i < 256; ++i) t[k][i] = (t[k - 1][i] >> 8) ^ t[0][t[k - 1][i] & 0xFF];
  return t;
}();

inline uint32_t load_le32(const unsigned char* p) {
  return uint32_t{p[0]} | uint32_t{p[1]} << 8 | uint32_t{p[2]} << 16 | uint32_t{p[3]} << 24;
}

/// The CRC register after `n` bytes from register `c` (no inversion): the portable path.
inline uint32_t crc32c_raw_table(uint32_t c, const unsigned char* p, size_t n) {
  const auto& t = crc32c_tables;
  for (; n >= 8; p += 8, n -= 8) {
    c ^= load_le32(p);
    const uint32_t hi = load_le32(p + 4);
    c = t[7][c & 0xFF] ^ t[6][(c >> 8) & 0xFF] ^ t[5][(c >> 16) & 0xFF] ^ t[4][c >> 24] ^ t[3][hi & 0xFF] ^
        t[2][(hi >> 8) & 0xFF] ^ t[1][(hi >> 16) & 0xFF] ^ t[0][hi >> 24];
  }
  for (; n > 0; ++p, --n) c = t[0][(c ^ *p) & 0xFF] ^ (c >> 8);
  return c;
}

/// a(x) b(x) mod P(x), both reflected (zlib's multmodp).
inline uint32_t crc32c_multiply(uint32_t a, uint32_t b) {
  uint32_t product = 0;
  for (uint32_t m = 1u << 31; m != 0; m >>= 1) {
    if (a & m) product ^= b;
    b = (b & 1) ? (b >> 1) ^ crc32c_poly : b >> 1;
  }
  return product;
}

/// x^(2^k) mod P for k = 0..63 (reflected): x^(8 n) is a product of these along the bits of n.
inline const std::array<uint32_t, 64>& crc32c_powers() {
  static const auto powers = [] {
    std::array<uint32_t, 64> p{};
    p[0] = 1u << 30;  // x^1
    for (size_t k = 1; k < p.size(); ++k) p[k] = crc32c_multiply(p[k - 1], p[k - 1]);
    return p;
  }();
  return powers;
}

#if SHARDLM_CRC32C_X86
// Three streams of `block` bytes each: the crc32 instruction has a latency of 3 cycles and a throughput of 1.
inline constexpr size_t crc32c_block = 4096;

__attribute__((target("sse4.2"))) inline uint32_t crc32c_raw_sse42(uint32_t c, const unsigned char* p, size_t n);
#endif
}  // namespace detail

/// The register `crc` moved past `bytes` zero bytes (no inversion): a CRC of A shifted so that it combines, by xor,
/// with the CRC of `bytes` bytes that follow A.
inline uint32_t crc32c_shift(uint32_t crc, uint64_t bytes) {
  const auto& powers = detail::crc32c_powers();
  uint32_t x = 1u << 31;  // x^0
  for (size_t k = 3; bytes != 0; bytes >>= 1, ++k)  // x^(8 bytes) = product of x^(2^k) over the bits of 8 bytes
    if (bytes & 1) x = detail::crc32c_multiply(powers[k], x);
  return detail::crc32c_multiply(x, crc);
}

/// Whether this CPU has the SSE4.2 crc32 instruction (checked once).
inline bool crc32c_hardware() {
#if SHARDLM_CRC32C_X86
  static const bool has = __builtin_cpu_supports("sse4.2");
  return has;
#else
  return false;
#endif
}

/// The register after `n` bytes from register `c`, with no initial or final inversion: the linear part of the CRC.
inline uint32_t crc32c_raw(uint32_t c, const void* data, size_t n) {
  const auto* p = static_cast<const unsigned char*>(data);
#if SHARDLM_CRC32C_X86
  if (crc32c_hardware()) return detail::crc32c_raw_sse42(c, p, n);
#endif
  return detail::crc32c_raw_table(c, p, n);
}

/// The CRC32C of bytes whose CRC so far is `crc` (0 for none) followed by `data`.
inline uint32_t crc32c_extend(uint32_t crc, const void* data, size_t n) { return ~crc32c_raw(~crc, data, n); }
inline uint32_t crc32c(const void* data, size_t n) { return crc32c_extend(0, data, n); }
inline uint32_t crc32c(std::string_view data) { return crc32c(data.data(), data.size()); }

/// The CRC32C of A || B from a = crc(A), b = crc(B) and |B|.
inline uint32_t crc32c_combine(uint32_t a, uint32_t b, uint64_t len_b) { return crc32c_shift(a, len_b) ^ b; }

#if SHARDLM_CRC32C_X86
namespace detail {
__attribute__((target("sse4.2"))) inline uint32_t crc32c_raw_sse42(uint32_t c, const unsigned char* p, size_t n) {
  auto word = [](const unsigned char* q) {
    uint64_t w;
    std::memcpy(&w, q, 8);
    return w;
  };
  // Three independent streams over consecutive blocks, then combined: raw(A B C) = shift(raw(A), 2L) ^ shift(raw(B), L)
  // ^ raw(C) with B and C started from 0 (linearity).
  while (n >= 3 * crc32c_block) {
    uint64_t a = c, b = 0, d = 0;
    const unsigned char* q = p;
    for (size_t i = 0; i < crc32c_block; i += 8, q += 8) {
      a = _mm_crc32_u64(a, word(q));
      b = _mm_crc32_u64(b, word(q + crc32c_block));
      d = _mm_crc32_u64(d, word(q + 2 * crc32c_block));
    }
    c = crc32c_shift(static_cast<uint32_t>(a), 2 * crc32c_block) ^ crc32c_shift(static_cast<uint32_t>(b), crc32c_block) ^
        static_cast<uint32_t>(d);
    p += 3 * crc32c_block, n -= 3 * crc32c_block;
  }
  uint64_t r = c;
  for (; n >= 8; p += 8, n -= 8) r = _mm_crc32_u64(r, word(p));
  c = static_cast<uint32_t>(r);
  for (; n > 0; ++p, --n) c = _mm_crc32_u8(c, *p);
  return c;
}
}  // namespace detail
#endif

}  // namespace shardlm
