#pragma once
// The optimizer's options (torch-free: the command line and the planner read them without LibTorch).
#include <cmath>

#include "shardlm/core/arg.hpp"
#include "shardlm/core/errors.hpp"

namespace shardlm::optim {

/// AdamW's hyperparameters (torch.optim.AdamW's), with --grad-clip's global-norm clipping.
struct AdamWOptions {
  /// Peak learning rate (the schedule scales it).
  SHARDLM_ARG(double, lr) = 1e-3;
  /// Exponential decay of the first moment.
  SHARDLM_ARG(double, beta1) = 0.9;
  /// Exponential decay of the second moment.
  SHARDLM_ARG(double, beta2) = 0.95;
  /// Added to the denominator for stability.
  SHARDLM_ARG(double, eps) = 1e-8;
  /// Decoupled weight decay (multiplied by the learning rate), on matrices and embeddings.
  SHARDLM_ARG(double, weight_decay) = 0.1;
  /// Max global gradient norm (0: no clipping).
  SHARDLM_ARG(double, grad_clip) = 1.0;

 public:
  /// Refuses what torch.optim.AdamW refuses (and a negative clipping norm), naming the flag.
  void validate() const {
    if (!(lr_ > 0) || !std::isfinite(lr_)) fail<ConfigError>("--lr must be positive and finite, got ", lr_);
    if (!(beta1_ >= 0 && beta1_ < 1)) fail<ConfigError>("--beta1 must lie in [0, 1), got ", beta1_);
    if (!(beta2_ >= 0 && beta2_ < 1)) fail<ConfigError>("--beta2 must lie in [0, 1), got ", beta2_);
    if (!(eps_ >= 0) || !std::isfinite(eps_)) fail<ConfigError>("AdamW eps must be >= 0 and finite, got ", eps_);
    if (!(weight_decay_ >= 0) || !std::isfinite(weight_decay_))
      fail<ConfigError>("--weight-decay must be >= 0 and finite, got ", weight_decay_);
    if (!(grad_clip_ >= 0) || !std::isfinite(grad_clip_))
      fail<ConfigError>("--grad-clip must be >= 0 and finite (0: off), got ", grad_clip_);
  }
};

}  // namespace shardlm::optim
