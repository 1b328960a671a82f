#pragma once
// Weight initialization as transformers does it: normal(0, initializer_range) for matrices and embeddings,
// ones for norm scales, zeros for biases. Drawn on the CPU from one seeded generator, in registration
// order, so the same seed gives the same model on any device.
#include <ATen/CPUGeneratorImpl.h>
#include <torch/nn/module.h>

#include <string>
#include <utility>
#include <vector>

namespace shardlm::model {

/// Initializes named parameters in order from one CPU generator seeded with `seed`.
template <class NamedParams>
void init_parameters(NamedParams&& params, double std, uint64_t seed) {
  auto gen = at::make_generator<at::CPUGeneratorImpl>(seed);
  at::NoGradGuard no_grad;
  for (auto&& [name, p] : params) {
    const bool is_bias = name.size() >= 4 && name.compare(name.size() - 4, 4, "bias") == 0;
    const bool is_norm = name.find("norm.weight") != std::string::npos;
    if (is_bias) {
      p.zero_();
    } else if (is_norm) {
      p.fill_(1.0);
    } else {
      p.copy_(at::normal(0.0, std, p.sizes(), gen, at::TensorOptions().dtype(at::kFloat)));
    }
  }
}

inline void init_weights(torch::nn::Module& model, double std, uint64_t seed) {
  std::vector<std::pair<std::string, at::Tensor>> params;
  for (auto& item : model.named_parameters()) params.emplace_back(item.key(), item.value());
  init_parameters(params, std, seed);
}

}  // namespace shardlm::model
