#pragma once
// How the trainer stores the frozen base under an adapter (engine/frozen_unit.hpp's FrozenCodec): with --quant none
// every frozen parameter keeps the compute dtype; with --quant int4|fp8 the blocks' projection weights (q, k, v, o,
// gate, up, down, or a MoE's fused experts as rows: all but a few percent of the parameters) are quantized by the
// policy of quant/policies.hpp while they are stored, this rank's rows only, on the rank's device; the embedding, the
// norms, a MoE's router and the LM head keep the compute dtype (as in the reference QLoRA/QDoRA recipes). Gathering all-gathers the quantized bytes and dequantizes
// each weight into the unit's compute-dtype buffer (a CUDA kernel on GPUs).
#include <ATen/ATen.h>

#include <functional>
#include <string>
#include <string_view>
#include <type_traits>

#include "shardlm/engine/frozen_unit.hpp"
#include "shardlm/quant/policies.hpp"

namespace shardlm::train {

/// Whether a quantization policy stores this frozen parameter quantized: a block's projection weight [out, in], or a
/// MoE's fused experts [E, out, in] (rows of the last dimension, as every frozen parameter: E x out rows of in).
inline bool quantizes(const std::string& name, const at::Tensor& p) {
  const auto ends = [&](std::string_view suffix) {
    return name.size() > suffix.size() && name.compare(name.size() - suffix.size(), suffix.size(), suffix) == 0;
  };
  return (p.dim() == 2 && ends("_proj.weight")) || (p.dim() == 3 && (ends(".experts.gate_up_proj") || ends(".experts.down_proj")));
}

/// The codec of quantization policy Q (quant::Int4, quant::FP8) for the parameter `name`, decoding into `compute`.
template <class Q>
engine::FrozenCodec quantized_codec(const std::string& name, at::ScalarType compute) {
  engine::FrozenCodec codec;
  codec.name = std::string(Q::name);
  codec.encode_on_device = true;  // quantizing a 405B layer takes seconds on a GPU, minutes on a CPU
  codec.row_bytes = [](int64_t cols) { return Q::row_bytes(cols); };
  codec.encode = [name](const at::Tensor& rows) {
    const auto w = rows.contiguous();
    auto out = at::empty({w.size(0) * Q::row_bytes(w.size(1))}, w.options().dtype(at::kByte));
    Q::quantize_rows(w, out, name);
    return out;
  };
  codec.decode = [name, compute](const at::Tensor& bytes, int64_t cols, const at::Tensor& out) {
    if (compute == at::kBFloat16) return Q::dequantize_rows(bytes, cols, out, name);
    const auto values = at::empty(out.sizes(), out.options().dtype(at::kBFloat16));  // fp32 runs (CPU tests)
    Q::dequantize_rows(bytes, cols, values, name);
    out.copy_(values);
  };
  return codec;
}

/// The codecs of a run's frozen parameters under the quantization policy `q` (its rules: the tag's kernels are found
/// by its name, quant::dispatch).
inline std::function<engine::FrozenCodec(const std::string&, const at::Tensor&)> frozen_codecs(const quant::Rules& q,
                                                                                               at::ScalarType compute) {
  return quant::dispatch(q.name, [compute](auto tag) {
    using Q = decltype(tag);
    return std::function<engine::FrozenCodec(const std::string&, const at::Tensor&)>(
        [compute](const std::string& name, const at::Tensor& p) {
          if constexpr (Q::quantized)
            if (quantizes(name, p)) {
              if (p.size(-1) % Q::rules.group != 0)
                fail<ConfigError>("--quant ", Q::name, " quantizes groups of ", Q::rules.group, " values along a row: ", name,
                                  " has ", p.size(-1), " columns; use --quant fp8 or none for this model");
              return quantized_codec<Q>(name, compute);
            }
          return engine::plain_codec(compute);
        });
  });
}

}  // namespace shardlm::train
