// The main of the packaging tests' consumer projects (docs/packaging.md): a tiny Llama through the consumed
// package's headers, one forward. Few headers, so that each way of consuming shardlm costs seconds to compile.
#include <shardlm/model/init.hpp>
#include <shardlm/model/llama.hpp>

#include <iostream>

int main() {
  const auto config = shardlm::model::preset("llama3-debug", 1);
  shardlm::model::Llama3 model(config);
  shardlm::model::init_weights(*model, config.initializer_range, 0);
  const auto logits = model->forward(at::zeros({1, 4}, at::kLong));  // [B, T, V]
  std::cout << "logits " << logits.sizes() << "\n";
  return logits.size(2) == config.vocab_size && logits.isfinite().all().item<bool>() ? 0 : 1;
}
