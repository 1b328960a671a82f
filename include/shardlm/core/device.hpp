#pragma once
// Devices as users name them: "cpu", "cuda", "cuda:N".
#include <c10/core/Device.h>
#include <torch/cuda.h>

#include <string>

#include "shardlm/core/errors.hpp"

namespace shardlm {

inline c10::Device parse_device(const std::string& name) {
  if (name != "cpu" && name.rfind("cuda", 0) != 0)
    fail<ConfigError>("--device '", name, "' is not a device: use cpu, cuda or cuda:N");
  c10::Device device(c10::kCPU);
  try {
    device = c10::Device(name);
  } catch (const c10::Error&) {
    fail<ConfigError>("--device '", name, "' is not a device: use cpu, cuda or cuda:N");
  }
  if (device.is_cuda() && !torch::cuda::is_available())
    fail<ConfigError>("--device ", name, ": this machine has no CUDA device (or LibTorch was built without CUDA)");
  return device;
}

}  // namespace shardlm
