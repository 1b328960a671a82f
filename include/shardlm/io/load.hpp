#pragma once
// Building a model from a Hugging Face directory on one device.
#include <filesystem>

#include "shardlm/core/host_memory.hpp"
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
  // The whole model in one process: refused up front when it cannot fit the host (the allocator would fail half-way,
  // or the OOM killer end the process).
  const double bytes = static_cast<double>(config.num_params()) * static_cast<double>(at::elementSize(dtype));
  if (device.is_cpu())
    if (const auto available = host_memory_available(); available && bytes > static_cast<double>(*available))
      fail<ConfigError>(dir.string(), ": the model's ", config.num_params(), " parameters take ", gib_text(bytes), " in ",
                        c10::toString(dtype), ", but ", gib_text(static_cast<double>(*available)),
                        " of host memory are available (MemAvailable in /proc/meminfo)");
  Model m(config, at::TensorOptions().device(device).dtype(dtype));
  load_weights(*m, ckpt);
  return m;
}

}  // namespace shardlm::io
