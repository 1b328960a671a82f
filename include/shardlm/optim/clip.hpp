#pragma once
// Global-norm gradient clipping over a list of gradients (one reduction, one scale).
#include <ATen/ATen.h>

#include <cmath>
#include <vector>

namespace shardlm::optim {

/// The global L2 norm of `grads` (accumulated in fp32).
inline at::Tensor global_norm(const std::vector<at::Tensor>& grads) {
  if (grads.empty()) return at::zeros({});
  const auto norms = at::_foreach_norm(grads, 2, at::kFloat);
  return at::stack(norms).norm();
}

/// Scales `grads` in place so that their global norm is at most max_norm (no-op when max_norm <= 0 or the
/// norm is not finite); returns the norm before clipping.
inline double clip_grad_norm(const std::vector<at::Tensor>& grads, double max_norm) {
  const double norm = global_norm(grads).item<double>();
  if (max_norm > 0 && std::isfinite(norm) && norm > max_norm) at::_foreach_mul_(grads, max_norm / (norm + 1e-6));
  return norm;
}

}  // namespace shardlm::optim
