#pragma once
// Weight initialization as transformers does it: normal(0, initializer_range) for matrices and embeddings,
// ones for norm scales, zeros for biases. Drawn on the CPU from one seeded generator, in registration
// order, so the same seed gives the same model on any device.
#include <ATen/CPUGeneratorImpl.h>
#include <torch/nn/module.h>

#include <algorithm>
#include <cmath>
#include <string>
#include <utility>
#include <vector>

#include "shardlm/core/errors.hpp"
#include "shardlm/core/parallel.hpp"

namespace shardlm::model {

/// Tensors above this many elements are drawn in chunks of this size, in parallel (core/parallel.hpp), each
/// chunk from its own generator seeded by one draw of the unit's generator plus the chunk's index: still one
/// model per seed on any device and thread count, and a 405B layer initializes in seconds rather than minutes.
inline constexpr int64_t init_chunk = int64_t{1} << 24;

namespace detail {
enum class Fill { zeros, ones, normal, chunked };

/// How init_parameters fills a parameter: zeros (biases), ones (norm scales), one draw from the unit's generator, or
/// chunks of init_chunk values each drawn from a generator of its own.
inline Fill fill_of(const std::string& name, int64_t numel) {
  if (name.size() >= 4 && name.compare(name.size() - 4, 4, "bias") == 0) return Fill::zeros;
  if (name.find("norm.weight") != std::string::npos) return Fill::ones;
  return numel <= init_chunk ? Fill::normal : Fill::chunked;
}

/// Chunk c of a chunked parameter of n values whose chunk generators start at `base`.
inline at::Tensor normal_chunk(uint64_t base, int64_t c, int64_t n, double std) {
  const int64_t len = std::min(init_chunk, n - c * init_chunk);
  auto g = at::make_generator<at::CPUGeneratorImpl>(base + static_cast<uint64_t>(c));
  return at::normal(0.0, std, {len}, g, at::TensorOptions().dtype(at::kFloat));
}
}  // namespace detail

/// Initializes named parameters in order from one CPU generator seeded with `seed`.
template <class NamedParams>
void init_parameters(NamedParams&& params, double std, uint64_t seed) {
  auto gen = at::make_generator<at::CPUGeneratorImpl>(seed);
  at::NoGradGuard no_grad;
  const auto f32 = at::TensorOptions().dtype(at::kFloat);
  for (auto&& [name, p] : params) {
    switch (detail::fill_of(name, p.numel())) {
      case detail::Fill::zeros: p.zero_(); break;
      case detail::Fill::ones: p.fill_(1.0); break;
      case detail::Fill::normal: p.copy_(at::normal(0.0, std, p.sizes(), gen, f32)); break;
      case detail::Fill::chunked: {
        const uint64_t base = gen.template get<at::CPUGeneratorImpl>()->random64();
        const int64_t n = p.numel(), chunks = (n + init_chunk - 1) / init_chunk;
        auto flat = p.view({-1});
        parallel_ranges(chunks, 1, [&](int64_t begin, int64_t end) {
          for (int64_t c = begin; c < end; ++c)
            flat.narrow(0, c * init_chunk, std::min(init_chunk, n - c * init_chunk)).copy_(detail::normal_chunk(base, c, n, std));
        });
      }
    }
  }
}

/// Rows [row0, row0 + rows) of params[param], seen as rows of its last dimension.
struct RowSpan {
  size_t param = 0;
  int64_t row0 = 0, rows = 0;
};

/// The values init_parameters(params, std, seed) gives the rows of each span (float32 [rows, cols], on the CPU),
/// drawing of a chunked parameter only the chunks that overlap them: a rank of a sharded frozen base initializes
/// its shard's rows without materializing the unit. Reads only the names and shapes of `params`.
template <class NamedParams>
std::vector<at::Tensor> init_parameter_rows(const NamedParams& params, double std, uint64_t seed,
                                            const std::vector<RowSpan>& spans) {
  auto gen = at::make_generator<at::CPUGeneratorImpl>(seed);
  at::NoGradGuard no_grad;
  const auto f32 = at::TensorOptions().dtype(at::kFloat);
  std::vector<at::Tensor> out(spans.size());
  struct Job {  // chunk c of a chunked parameter that overlaps span s
    size_t s;
    uint64_t base;
    int64_t c, n;
  };
  std::vector<Job> jobs;
  size_t index = 0;
  for (auto&& [name, p] : params) {
    const int64_t n = p.numel(), cols = p.dim() == 0 ? 1 : p.size(-1);
    const auto fill = detail::fill_of(name, n);
    at::Tensor whole;
    uint64_t base = 0;
    if (fill == detail::Fill::normal) whole = at::normal(0.0, std, p.sizes(), gen, f32).reshape({-1, cols});
    if (fill == detail::Fill::chunked) base = gen.template get<at::CPUGeneratorImpl>()->random64();
    for (size_t s = 0; s < spans.size(); ++s) {
      const auto& span = spans[s];
      if (span.param != index) continue;
      SHARDLM_ASSERT(span.row0 >= 0 && span.rows >= 0 && span.row0 + span.rows <= (cols ? n / cols : 0),
                     "rows ", span.row0, "+", span.rows, " of ", name);
      switch (fill) {
        case detail::Fill::zeros: out[s] = at::zeros({span.rows, cols}, f32); break;
        case detail::Fill::ones: out[s] = at::ones({span.rows, cols}, f32); break;
        case detail::Fill::normal: out[s] = whole.narrow(0, span.row0, span.rows).clone(); break;
        case detail::Fill::chunked:
          out[s] = at::empty({span.rows, cols}, f32);
          if (span.rows == 0) break;
          for (int64_t c = span.row0 * cols / init_chunk; c <= ((span.row0 + span.rows) * cols - 1) / init_chunk; ++c)
            jobs.push_back({s, base, c, n});
      }
    }
    ++index;
  }
  parallel_ranges(static_cast<int64_t>(jobs.size()), 1, [&](int64_t begin, int64_t end) {
    for (int64_t j = begin; j < end; ++j) {
      const auto& [s, base, c, n] = jobs[static_cast<size_t>(j)];
      const int64_t cols = out[s].size(1), lo = spans[s].row0 * cols, hi = lo + spans[s].rows * cols;
      const auto chunk = detail::normal_chunk(base, c, n, std);
      const int64_t a = std::max(lo, c * init_chunk), b = std::min(hi, c * init_chunk + chunk.numel());
      out[s].view({-1}).narrow(0, a - lo, b - a).copy_(chunk.narrow(0, a - c * init_chunk, b - a));
    }
  });
  return out;
}

/// Initializes adapter parameters as PEFT does: A kaiming-uniform (a = sqrt(5): U(-1/sqrt(in), 1/sqrt(in))), B zeros
/// (the adapted model starts as the base), a DoRA magnitude ones (the trainer then sets it to the base's row norms).
template <class NamedParams>
void init_adapter_parameters(NamedParams&& params, uint64_t seed) {
  auto gen = at::make_generator<at::CPUGeneratorImpl>(seed);
  at::NoGradGuard no_grad;
  for (auto&& [name, p] : params) {
    if (name.find(".lora_A.") != std::string::npos) {
      const double bound = 1.0 / std::sqrt(static_cast<double>(p.size(-1)));  // in: the last dimension (experts: [E, r, in])
      p.copy_(at::empty(p.sizes(), at::kFloat).uniform_(-bound, bound, gen));
    } else if (name.find(".lora_B.") != std::string::npos) {
      p.zero_();
    } else {
      p.fill_(1.0);
    }
  }
}

inline void init_weights(torch::nn::Module& model, double std, uint64_t seed) {
  std::vector<std::pair<std::string, at::Tensor>> params;
  for (auto& item : model.named_parameters()) params.emplace_back(item.key(), item.value());
  init_parameters(params, std, seed);
}

}  // namespace shardlm::model
