#pragma once
// The single-process trainer: one optimizer step is
//   for each micro-batch: logits = model(x); (loss_sum / global tokens).backward()    // grads accumulate
//   norm = clip(grads); lr = schedule(step); adamw(master, grads, lr); copy master -> compute weights
// Precision policies decide the dtypes: master weights and optimizer state in Precision::master, the model's
// weights (and so activations and gradients) in Precision::compute, gradients accumulated in Precision::reduce.
#include <torch/cuda.h>

#include <chrono>
#include <cmath>
#include <memory>
#include <optional>

#include "shardlm/core/device.hpp"
#include "shardlm/core/log.hpp"
#include "shardlm/data/token_dataset.hpp"
#include "shardlm/io/hf.hpp"
#include "shardlm/model/init.hpp"
#include "shardlm/model/ops.hpp"
#include "shardlm/optim/adamw.hpp"
#include "shardlm/optim/clip.hpp"
#include "shardlm/optim/schedule.hpp"
#include "shardlm/policy/policies.hpp"
#include "shardlm/train/metrics.hpp"
#include "shardlm/train/options.hpp"

namespace shardlm::train {

/// The model config a run uses: --model-dir's config.json, or the preset (with --layers).
inline model::ModelConfig resolve_config(const TrainOptions& o) {
  if (!o.model_dir.empty()) {
    auto c = model::load_config(o.model_dir);
    if (o.layers > 0) fail<ConfigError>("--layers cannot change a checkpoint's depth (", c.num_layers, " in ", o.model_dir, ")");
    return c;
  }
  return model::preset(o.preset, o.layers);
}

template <class Model, class Recipe>
class Trainer {
  using Precision = typename Recipe::Precision;
  static_assert(std::is_same_v<typename Recipe::Sharding, sharding::NoShard>,
                "The single-process Trainer replicates nothing and shards nothing: use sharding::NoShard");
  static_assert(std::is_same_v<typename Recipe::Checkpointing, checkpointing::None>,
                "The single-process Trainer keeps all activations: use checkpointing::None");
  static_assert(std::is_same_v<typename Recipe::Offload, offload::None>,
                "The single-process Trainer keeps all state on the device: use offload::None");

 public:
  Trainer(const TrainOptions& o, data::TokenDataset dataset)
      : options_(o),
        device_(parse_device(o.device)),
        config_(resolve_config(o)),
        model_(config_, at::TensorOptions().device(device_).dtype(Precision::master)),
        dataset_(std::move(dataset)),
        sampler_(dataset_.size(), o.seq_len, o.seed, dataset_.name()),
        schedule_{o.lr, o.warmup_steps, o.steps, o.min_lr_ratio} {
    o.validate();
    if (o.model_dir.empty()) {
      model::init_weights(*model_, config_.initializer_range, o.seed);
    } else {
      io::HfCheckpoint ckpt(o.model_dir);
      io::load_weights(*model_, ckpt);
    }
    for (auto& p : model_->parameters()) {
      if constexpr (Precision::compute != Precision::master) {
        master_.push_back(p.detach().clone());
        p.set_data(p.detach().to(Precision::compute));
        grads_.push_back(at::zeros_like(master_.back(), at::TensorOptions().dtype(Precision::reduce)));
      } else {
        master_.push_back(p);
      }
      params_.push_back(p);
    }
    optimizer_ = std::make_unique<optim::AdamW>(
        master_, optim::AdamWOptions().beta1(o.beta1).beta2(o.beta2).weight_decay(o.weight_decay));
    peak_flops_ = o.peak_tflops > 0 ? o.peak_tflops * 1e12 : (device_.is_cuda() ? 989e12 : -1);
  }

  /// One optimizer step over grad_accum micro-batches of micro_batch samples.
  StepMetrics step() {
    using clock = std::chrono::steady_clock;
    const auto secs = [](auto a, auto b) { return std::chrono::duration<double>(b - a).count(); };
    auto sync = [&] { if (device_.is_cuda()) torch::cuda::synchronize(device_.has_index() ? device_.index() : -1); };
    if (device_.is_cuda()) compat::reset_cuda_peak(device_.has_index() ? device_.index() : 0);
    zero_grad();
    StepMetrics m;
    m.step = step_ + 1;
    const int64_t B = options_.micro_batch, T = options_.seq_len, global = B * options_.grad_accum;
    const double global_tokens = static_cast<double>(global * T);
    const auto t_start = clock::now();
    at::Tensor loss_sum = at::zeros({}, at::TensorOptions().device(device_).dtype(at::kFloat));
    for (int64_t micro = 0; micro < options_.grad_accum; ++micro) {
      auto t0 = clock::now();
      auto [ids, targets] = batch(step_ * global + micro * B);  // [B, T] each
      sync();
      auto t1 = clock::now();
      const auto logits = model_->forward(ids);                                              // [B, T, V]
      const auto sum = model::ops::next_token_loss_sum(logits, targets);
      sync();
      auto t2 = clock::now();
      (sum / global_tokens).backward();
      accumulate_grads(micro == 0);
      loss_sum += sum.detach();
      sync();
      auto t3 = clock::now();
      m.data_s += secs(t0, t1), m.forward_s += secs(t1, t2), m.backward_s += secs(t2, t3);
    }
    const auto t_opt = clock::now();
    const auto grads = gradients();
    m.grad_norm = optim::clip_grad_norm(grads, options_.grad_clip);
    m.lr = schedule_.at(step_);
    if (std::isfinite(m.grad_norm)) {
      optimizer_->step(grads, m.lr);
      if constexpr (Precision::compute != Precision::master) {
        at::NoGradGuard no_grad;
        at::_foreach_copy_(params_, master_);
      }
    } else {
      m.skipped = true;
      log::warn("step ", m.step, ": gradient norm is not finite; the update is skipped");
    }
    m.loss = loss_sum.item<double>() / global_tokens;
    sync();
    const auto t_end = clock::now();
    m.optimizer_s = secs(t_opt, t_end);
    m.step_s = secs(t_start, t_end);
    m.tokens = global * T;
    m.tokens_per_s = static_cast<double>(m.tokens) / m.step_s;
    if (peak_flops_ > 0) m.mfu = m.tokens_per_s * config_.flops_per_token(T) / peak_flops_;
    std::tie(m.mem_alloc_gb, m.mem_reserved_gb) = memory_gb(device_);
    ++step_;
    return m;
  }

  Model& model() { return model_; }
  const model::ModelConfig& config() const { return config_; }
  const c10::Device& device() const { return device_; }
  int64_t steps_done() const { return step_; }
  /// The gradients of the last step in the reduce dtype (after clipping), in parameter order.
  std::vector<at::Tensor> gradients() {
    if constexpr (Precision::compute != Precision::master) {
      return grads_;
    } else {
      std::vector<at::Tensor> g;
      for (auto& p : params_) {
        auto& grad = p.mutable_grad();
        if (!grad.defined()) grad = at::zeros_like(p);
        g.push_back(grad);
      }
      return g;
    }
  }

  /// The master weights (what the optimizer updates), in parameter order.
  const std::vector<at::Tensor>& master_weights() const { return master_; }

 private:
  /// Samples k .. k + B - 1 of the run as (inputs, next-token targets), each [B, T] on the device.
  std::pair<at::Tensor, at::Tensor> batch(int64_t first_sample) {
    const int64_t B = options_.micro_batch, T = options_.seq_len;
    auto windows = at::empty({B, T + 1}, at::kLong);
    for (int64_t b = 0; b < B; ++b)
      windows[b].copy_(dataset_.slice(sampler_.window_start(first_sample + b), T + 1, config_.vocab_size));
    windows = windows.to(device_);
    return {windows.narrow(1, 0, T), windows.narrow(1, 1, T)};
  }

  void accumulate_grads(bool first) {
    if constexpr (Precision::compute != Precision::master) {
      at::NoGradGuard no_grad;
      for (size_t i = 0; i < params_.size(); ++i) {
        auto& g = params_[i].mutable_grad();
        if (!g.defined()) continue;
        first ? grads_[i].copy_(g) : grads_[i].add_(g);
        g = at::Tensor();
      }
    }
    (void)first;
  }

  void zero_grad() {
    for (auto& p : params_) p.mutable_grad() = at::Tensor();
  }

  TrainOptions options_;
  c10::Device device_;
  model::ModelConfig config_;
  Model model_;
  data::TokenDataset dataset_;
  data::Sampler sampler_;
  optim::CosineSchedule schedule_;
  std::vector<at::Tensor> params_, master_, grads_;
  std::unique_ptr<optim::AdamW> optimizer_;
  double peak_flops_ = -1;
  int64_t step_ = 0;
};

/// The dataset of a run: --data, or the program's embedded text.
inline data::TokenDataset open_dataset(const TrainOptions& o) {
  return o.data.empty() ? data::TokenDataset::from_bytes(o.builtin_text, o.builtin_name) : data::TokenDataset::open(o.data);
}

}  // namespace shardlm::train

namespace shardlm {

/// Trains `Model` with `Recipe` as the options say: logs every --log-every steps, writes --metrics.
template <class Model, class Recipe>
int run_trainer(const TrainOptions& o) {
  o.validate();
  train::Trainer<Model, Recipe> trainer(o, train::open_dataset(o));
  const auto& c = trainer.config();
  log::info("shardlm: ", c.num_layers, " layers, hidden ", c.hidden_size, ", ", c.num_params() / 1e6, "M parameters | ",
            Recipe::Sharding::name, " / ", Recipe::Checkpointing::name, " / ", Recipe::Offload::name, " / ",
            Recipe::Precision::name, " | ", trainer.device().str(), " | global batch ", o.micro_batch * o.grad_accum,
            " x ", o.seq_len, " tokens");
  train::MetricsWriter metrics(o.metrics);
  double first_loss = 0, last_loss = 0;
  for (int64_t s = 0; s < o.steps; ++s) {
    const auto m = trainer.step();
    metrics.write(m);
    if (s == 0) first_loss = m.loss;
    last_loss = m.loss;
    if (m.step % o.log_every == 0 || m.step == 1 || m.step == o.steps) log::info(m.line(o.steps));
  }
  log::info("shardlm: trained ", o.steps, " steps: loss ", first_loss, " -> ", last_loss);
  return 0;
}

}  // namespace shardlm
