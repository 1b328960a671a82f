#pragma once
// AdamW with decoupled weight decay (Loshchilov & Hutter), the update of torch.optim.AdamW, through
// LibTorch's fused kernel. Weight decay applies to matrices and embeddings, not to norm scales and biases.
#include <ATen/ATen.h>

#include <cmath>
#include <vector>

#include "shardlm/optim/options.hpp"
#include "shardlm/core/compat.hpp"
#include "shardlm/core/errors.hpp"

namespace shardlm::optim {


class AdamW {
 public:
  /// `params` are the tensors updated in place (master weights); state is allocated like them.
  AdamW(std::vector<at::Tensor> params, AdamWOptions options) : options_(options) {
    for (auto& p : params) {
      decays_.push_back(p.dim() >= 2);
      auto& g = decays_.back() ? decayed_ : plain_;
      g.params.push_back(p);
      g.exp_avg.push_back(at::zeros_like(p));
      g.exp_avg_sq.push_back(at::zeros_like(p));
      g.steps.push_back(at::zeros({}, p.options().dtype(at::kFloat)));
    }
  }

  /// One update with gradients `grads` (same order and shapes as the params) at learning rate `lr`.
  void step(const std::vector<at::Tensor>& grads, double lr) {
    SHARDLM_ASSERT(grads.size() == decays_.size(), "one gradient per parameter");
    std::vector<at::Tensor> gd, gp;
    for (size_t i = 0; i < grads.size(); ++i) (decays_[i] ? gd : gp).push_back(grads[i]);
    at::NoGradGuard no_grad;
    if (!gd.empty())
      compat::fused_adamw(decayed_.params, gd, decayed_.exp_avg, decayed_.exp_avg_sq, decayed_.steps, lr,
                          options_.beta1(), options_.beta2(), options_.weight_decay(), options_.eps());
    if (!gp.empty())
      compat::fused_adamw(plain_.params, gp, plain_.exp_avg, plain_.exp_avg_sq, plain_.steps, lr, options_.beta1(),
                          options_.beta2(), 0.0, options_.eps());
    ++num_steps_;
  }

  int64_t num_steps() const { return num_steps_; }
  const AdamWOptions& options() const { return options_; }

 private:
  struct Group {
    std::vector<at::Tensor> params, exp_avg, exp_avg_sq, steps;
  };
  AdamWOptions options_;
  std::vector<bool> decays_;  // per parameter, in construction order
  Group decayed_, plain_;
  int64_t num_steps_ = 0;
};

}  // namespace shardlm::optim
