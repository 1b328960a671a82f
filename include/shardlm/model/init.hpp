#pragma once
// Weight initialization as transformers does it: normal(0, initializer_range) for matrices and embeddings,
// ones for norm scales, zeros for biases. Drawn on the CPU from one seeded generator, in registration
// order, so the same seed gives the same model on any device.
#include <ATen/CPUGeneratorImpl.h>
#include <torch/nn/module.h>

#include <string>

namespace shardlm::model {

inline void init_weights(torch::nn::Module& model, double std, uint64_t seed) {
  auto gen = at::make_generator<at::CPUGeneratorImpl>(seed);
  at::NoGradGuard no_grad;
  for (auto& item : model.named_parameters()) {
    auto& p = item.value();
    const auto& name = item.key();
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

}  // namespace shardlm::model
