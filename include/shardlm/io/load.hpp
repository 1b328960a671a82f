#pragma once
// Building a model from a Hugging Face directory on one device.
#include <filesystem>

#include "shardlm/io/hf.hpp"
#include "shardlm/model/config.hpp"

namespace shardlm::io {

/// Builds `Model` (a Decoder) from dir/config.json and fills it from dir's safetensors, directly in `dtype`
/// on `device`: no random initialization and no second copy of the weights. `experts`: how a MoE model's experts
/// compute (a run-time choice, not the checkpoint's).
template <class Model>
Model load_hf_model(const std::filesystem::path& dir, const at::Device& device, at::ScalarType dtype = at::kFloat,
                    model::ExpertKernel experts = model::ExpertKernel::automatic) {
  auto config = model::load_config(dir);
  config.expert_kernel = experts;
  HfCheckpoint ckpt(dir);
  Model m(config, at::TensorOptions().device(device).dtype(dtype));
  load_weights(*m, ckpt);
  return m;
}

}  // namespace shardlm::io
