#pragma once
// Helpers shared by the test programs.
#include <ATen/ATen.h>

#include <cstdlib>
#include <filesystem>
#include <random>
#include <string>

namespace shardlm::test {

/// max|a - b| / max|b|, computed in fp64 (the relative error used by every parity test).
inline double rel_err(const at::Tensor& a, const at::Tensor& b) {
  const auto x = a.detach().to(at::kCPU, at::kDouble), y = b.detach().to(at::kCPU, at::kDouble);
  const double scale = y.abs().max().item<double>();
  return (x - y).abs().max().item<double>() / (scale > 0 ? scale : 1.0);
}

/// A fresh, empty directory under the system temp dir.
inline std::filesystem::path temp_dir(const std::string& tag) {
  static std::mt19937_64 rng(std::random_device{}());
  auto dir = std::filesystem::temp_directory_path() / ("shardlm-test-" + tag + "-" + std::to_string(rng()));
  std::filesystem::create_directories(dir);
  return dir;
}

}  // namespace shardlm::test
