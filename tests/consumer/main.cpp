// Builds a tiny Llama through the installed headers and runs one forward.
#include <shardlm/shardlm.hpp>

int main() {
  auto config = shardlm::model::preset("llama3-debug", 1);
  shardlm::model::Llama3 model(config);
  shardlm::model::init_weights(*model, config.initializer_range, 0);
  const auto logits = model->forward(at::zeros({1, 4}, at::kLong));
  return logits.size(2) == config.vocab_size ? 0 : 1;
}
