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

#include "shardlm/core/parallel.hpp"

namespace shardlm::model {

/// Tensors above this many elements are drawn in chunks of this size, in parallel (core/parallel.hpp), each
/// chunk from its own generator seeded by one draw of the unit's generator plus the chunk's index: still one
/// model per seed on any device and thread count, and a 405B layer initializes in seconds rather than minutes.
inline constexpr int64_t init_chunk = int64_t{1} << 24;

/// Initializes named parameters in order from one CPU generator seeded with `seed`.
template <class NamedParams>
void init_parameters(NamedParams&& params, double std, uint64_t seed) {
  auto gen = at::make_generator<at::CPUGeneratorImpl>(seed);
  at::NoGradGuard no_grad;
  const auto f32 = at::TensorOptions().dtype(at::kFloat);
  for (auto&& [name, p] : params) {
    const bool is_bias = name.size() >= 4 && name.compare(name.size() - 4, 4, "bias") == 0;
    const bool is_norm = name.find("norm.weight") != std::string::npos;
    if (is_bias) {
      p.zero_();
    } else if (is_norm) {
      p.fill_(1.0);
    } else if (p.numel() <= init_chunk) {
      p.copy_(at::normal(0.0, std, p.sizes(), gen, f32));
    } else {
      const uint64_t base = gen.template get<at::CPUGeneratorImpl>()->random64();
      const int64_t n = p.numel(), chunks = (n + init_chunk - 1) / init_chunk;
      auto flat = p.view({-1});
      parallel_ranges(chunks, 1, [&](int64_t begin, int64_t end) {
        for (int64_t c = begin; c < end; ++c) {
          const int64_t len = std::min(init_chunk, n - c * init_chunk);
          auto g = at::make_generator<at::CPUGeneratorImpl>(base + static_cast<uint64_t>(c));
          flat.narrow(0, c * init_chunk, len).copy_(at::normal(0.0, std, {len}, g, f32));
        }
      });
    }
  }
}

/// Initializes adapter parameters as PEFT does: A kaiming-uniform (a = sqrt(5): U(-1/sqrt(in), 1/sqrt(in))), B zeros
/// (the adapted model starts as the base), a DoRA magnitude ones (the trainer then sets it to the base's row norms).
template <class NamedParams>
void init_adapter_parameters(NamedParams&& params, uint64_t seed) {
  auto gen = at::make_generator<at::CPUGeneratorImpl>(seed);
  at::NoGradGuard no_grad;
  for (auto&& [name, p] : params) {
    if (name.find(".lora_A.") != std::string::npos) {
      const double bound = 1.0 / std::sqrt(static_cast<double>(p.size(1)));
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
