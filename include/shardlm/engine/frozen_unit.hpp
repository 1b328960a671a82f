#pragma once
// One unit's frozen parameter group: the base weights under LoRA or DoRA. No gradient, no optimizer state, no
// reduction. The group is one byte buffer of row-interleaved rows: each parameter, seen as rows of its last
// dimension, is stored row after row, each row in `codec.row_bytes(cols)` bytes (a quantized row: its codes and
// scales together). The buffer, padded to a multiple of 16 G bytes, is flat-sharded over the shard group of G
// ranks like a FlatUnit; gathering all-gathers the bytes and decodes each parameter into one buffer of the compute
// dtype, whose views are the module's parameters (released and refilled in place, as FlatUnit's).
//
// The plain codec stores the values themselves in the compute dtype (decoding is a copy); a quantized codec
// (int4, fp8: train/frozen_base.hpp) plugs in through FrozenCodec without touching the layout, the sharding or the
// engine: the shards hold quantized bytes, gathering moves quantized bytes and decodes them into the values.
#include <ATen/ATen.h>
#include <range/v3/view/zip.hpp>

#include <algorithm>
#include <functional>
#include <string>
#include <utility>
#include <vector>

#include "shardlm/core/errors.hpp"
#include "shardlm/dist/communicator.hpp"
#include "shardlm/engine/flat_unit.hpp"

namespace shardlm::engine {

/// How a frozen parameter's rows are stored: `row_bytes(cols)` bytes per row of `cols` values; `encode` turns
/// rows [n, cols] (a floating dtype) into bytes [n, row_bytes(cols)], `decode` bytes back into values `out`
/// [n, cols] of the compute dtype.
struct FrozenCodec {
  std::string name = "none";
  std::function<int64_t(int64_t cols)> row_bytes;
  std::function<at::Tensor(const at::Tensor& rows)> encode;
  std::function<void(const at::Tensor& bytes, int64_t cols, const at::Tensor& out)> decode;
  bool encode_on_device = false;  ///< rows are moved to the rank's GPU to be encoded (quantized there)
};

/// The values themselves, in `dtype` (no quantization).
inline FrozenCodec plain_codec(at::ScalarType dtype) {
  const int64_t element = static_cast<int64_t>(c10::elementSize(dtype));
  return {"none", [element](int64_t cols) { return cols * element; },
          [dtype](const at::Tensor& rows) { return rows.to(dtype).contiguous().view(at::kByte); },
          [dtype](const at::Tensor& bytes, int64_t, const at::Tensor& out) { out.copy_(bytes.view(dtype)); }};
}

struct FrozenSlot {
  std::string name;
  at::Tensor param;             ///< the module's parameter (its data: a view of the values buffer)
  int64_t rows = 0, cols = 0;   ///< the parameter as rows of its last dimension
  int64_t byte_offset = 0;      ///< first byte in the unit's buffer (16-byte aligned)
  int64_t row_bytes = 0;
  int64_t value_offset = 0;     ///< first element in the values buffer
  FrozenCodec codec{};
  int64_t bytes() const { return rows * row_bytes; }
};

/// Rows [row0, row0 + rows) of a slot: the ones that overlap this rank's shard.
struct FrozenPart {
  const FrozenSlot* slot;
  int64_t row0 = 0, rows = 0;
};

class FrozenUnit {
 public:
  static constexpr int64_t align = 16;

  /// Lays out `params` for a shard group of `group_size` ranks, this rank being `group_rank`, each stored with the
  /// codec `codec(name, param)` gives.
  FrozenUnit(std::string name, const NamedTensors& params, int group_size, int group_rank,
             const std::function<FrozenCodec(const std::string&, const at::Tensor&)>& codec)
      : name_(std::move(name)), group_rank_(group_rank) {
    int64_t bytes = 0, values = 0;
    for (const auto& [n, p] : params) {
      FrozenSlot s{n, p};
      s.cols = p.dim() == 0 ? 1 : p.size(-1);
      s.rows = s.cols == 0 ? 0 : p.numel() / s.cols;
      s.codec = codec(n, p);
      s.row_bytes = s.codec.row_bytes(s.cols);
      s.byte_offset = bytes, s.value_offset = values;
      bytes += (s.bytes() + align - 1) / align * align;
      values += p.numel();
      slots_.push_back(std::move(s));
    }
    const int64_t quantum = align * group_size;
    padded_ = (bytes + quantum - 1) / quantum * quantum;
    shard_ = padded_ / group_size;
    numel_ = values;
  }

  const std::string& name() const { return name_; }
  const std::vector<FrozenSlot>& slots() const { return slots_; }
  bool empty() const { return slots_.empty(); }
  int64_t padded_bytes() const { return padded_; }
  int64_t shard_bytes() const { return shard_; }

  /// The rows of each slot that overlap this rank's byte range, in order.
  std::vector<FrozenPart> shard_parts() const {
    std::vector<FrozenPart> out;
    const int64_t lo = shard_ * group_rank_, hi = lo + shard_;
    for (const auto& s : slots_) {
      if (s.rows == 0 || s.byte_offset >= hi || s.byte_offset + s.bytes() <= lo) continue;
      const int64_t first = std::max<int64_t>(0, (lo - s.byte_offset) / s.row_bytes);
      const int64_t last = std::min(s.rows, (hi - s.byte_offset + s.row_bytes - 1) / s.row_bytes);
      out.push_back({&s, first, last - first});
    }
    return out;
  }

  /// Stores this rank's shard from `rows` (rows[i]: the values [rows, cols] of shard_parts()[i], any floating
  /// dtype and device), points the parameters at the values buffer (released) and freezes them. With `offload`
  /// the shard lives in host memory (pinned when the device is a GPU) and is copied to the device to gather.
  void store(const std::vector<at::Tensor>& rows, const at::Device& device, at::ScalarType compute, bool offload) {
    at::NoGradGuard no_grad;
    const auto parts = shard_parts();
    SHARDLM_ASSERT(rows.size() == parts.size(), "one tensor per part of ", name_);
    // Offloaded: exactly sized pinned memory (compat::pinned_empty), the frozen base being most of a run's host state.
    if (offload && device.is_cuda()) shard_bytes_ = compat::pinned_empty(shard_, at::kByte).zero_();
    else shard_bytes_ = at::zeros({shard_}, at::TensorOptions().device(offload ? at::Device(at::kCPU) : device).dtype(at::kByte));
    const int64_t lo = shard_ * group_rank_;
    for (const auto& [part, part_rows] : ranges::views::zip(parts, rows)) {
      const auto& [s, row0, n] = part;
      auto values = part_rows.reshape({n, s->cols});
      if (s->codec.encode_on_device && device.is_cuda()) values = values.to(device);
      const auto bytes = s->codec.encode(values).reshape({-1});  // [n * row_bytes]
      SHARDLM_ASSERT(bytes.numel() == n * s->row_bytes, "codec ", s->codec.name, " wrote ", bytes.numel(), " bytes");
      const int64_t begin = s->byte_offset + row0 * s->row_bytes;  // in the unit's buffer
      const int64_t a = std::max(begin, lo), b = std::min(begin + bytes.numel(), lo + shard_);
      shard_bytes_.narrow(0, a - lo, b - a).copy_(bytes.narrow(0, a - begin, b - a));
    }
    values_ = at::empty({numel_}, at::TensorOptions().device(device).dtype(compute));
    for (auto& s : slots_) {
      s.param.set_data(values_.narrow(0, s.value_offset, s.param.numel()).view(s.param.sizes()));
      s.param.requires_grad_(false);
    }
    release();
  }

  /// The values of this rank's parts taken from the slots' parameters (materialized): what store() needs.
  std::vector<at::Tensor> rows_from_params() const {
    std::vector<at::Tensor> out;
    for (const auto& [s, row0, n] : shard_parts())
      out.push_back(s->param.detach().reshape({s->rows, s->cols}).narrow(0, row0, n));
    return out;
  }

  bool is_gathered() const { return gathered_; }
  /// Allocates the values buffer (on the current stream): call before gather() on the compute stream.
  void allocate() {
    if (!slots_.empty()) resize_storage(values_, static_cast<size_t>(numel_) * values_.element_size());
    gathered_ = true;
  }
  void release() {
    if (!slots_.empty()) resize_storage(values_, 0);
    gathered_ = false;
  }

  /// All-gathers the bytes (a transient buffer of the current stream) and decodes every parameter into the values.
  void gather(dist::Communicator& shard_group) {
    if (slots_.empty()) return;
    at::NoGradGuard no_grad;
    const auto local = shard_bytes_.to(values_.device(), /*non_blocking=*/true);
    at::Tensor bytes = local;
    if (shard_group.size() > 1) {
      bytes = at::empty({padded_}, local.options());
      shard_group.all_gather(bytes, local, name_.c_str());
    }
    for (const auto& s : slots_)
      s.codec.decode(bytes.narrow(0, s.byte_offset, s.bytes()).view({s.rows, s.row_bytes}), s.cols,
                     values_.narrow(0, s.value_offset, s.rows * s.cols).view({s.rows, s.cols}));
  }

  /// This rank's shard of the stored bytes.
  const at::Tensor& shard() const { return shard_bytes_; }

 private:
  std::string name_;
  int group_rank_;
  std::vector<FrozenSlot> slots_;
  int64_t padded_ = 0, shard_ = 0, numel_ = 0;
  at::Tensor shard_bytes_, values_;
  bool gathered_ = false;
};

/// Which of a unit's parameters are frozen, how each is stored, and where the rows of this rank's shard come from.
struct FrozenSpec {
  std::function<bool(const std::string&)> is_frozen;  ///< null: nothing is frozen (full fine-tuning)
  std::function<FrozenCodec(const std::string&, const at::Tensor&)> codec;  ///< null: plain, compute dtype
  /// rows(u, unit): the values of unit.shard_parts() (a checkpoint read by ranges); null: the parameters,
  /// materialized and initialized with the trainable ones (UnitInit::params)
  std::function<std::vector<at::Tensor>(size_t, const FrozenUnit&)> rows;
};

}  // namespace shardlm::engine
