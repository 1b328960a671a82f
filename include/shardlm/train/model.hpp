#pragma once
// What the trainer needs of a model, as an interface: the engine's units (engine::UnitModel) plus adapters, the
// fused head and loss, and the module itself. The trainer is compiled once per program and holds any model through
// it; ModelOf<Holder> adapts a decoder (model::Llama3, model::Mixtral) and make_model picks one by config.
#include <torch/nn/module.h>

#include <functional>
#include <memory>
#include <utility>

#include "shardlm/core/compiled.hpp"
#include "shardlm/engine/unit_model.hpp"
#include "shardlm/model/adapter.hpp"
#include "shardlm/model/config.hpp"
#include "shardlm/model/llama.hpp"
#include "shardlm/model/mixtral.hpp"

namespace shardlm::train {

class TrainableModel : public engine::UnitModel {
 public:
  /// Adds the adapter to the target layers (nothing for adapter::None).
  virtual void add_adapters(const model::AdapterConfig& a) = 0;
  /// The next forward of the head returns the summed next-token loss with the head and the loss fused (model/loss.hpp).
  virtual void set_loss_targets(at::Tensor shifted, int64_t chunk, double grad_scale) = 0;
  /// The module (training or evaluation mode, named parameters).
  virtual torch::nn::Module& module() = 0;
  /// Expert parallelism: the MoE layers keep only this rank's experts and exchange rows (model/moe_dispatch.hpp).
  virtual void set_expert_shard(const model::ExpertShard& shard) = 0;
};

/// TrainableModel over a decoder module holder (model::Llama3, model::Mixtral).
template <class Holder>
class ModelOf final : public TrainableModel {
 public:
  explicit ModelOf(Holder m) : m_(std::move(m)) {}
  size_t num_units() const override { return m_->num_units(); }
  engine::NamedTensors unit_parameters(size_t u) override { return m_->unit_parameters(u); }
  std::vector<size_t> unit_reads(size_t u) const override { return m_->unit_reads(u); }
  at::Tensor forward_unit(size_t u, const at::Tensor& x) override { return m_->forward_unit(u, x); }
  bool is_block(size_t u) const override { return m_->is_block(u); }
  at::Tensor take_side(size_t u) override { return m_->take_side(u); }
  void set_checkpointing(const checkpointing::Rules& rules) override { m_->set_checkpointing(rules); }
  void set_precision(const precision::Rules& rules) override { m_->set_precision(rules); }
  void add_adapters(const model::AdapterConfig& a) override { m_->add_adapters(a); }
  void set_loss_targets(at::Tensor shifted, int64_t chunk, double grad_scale) override {
    m_->set_loss_targets(std::move(shifted), chunk, grad_scale);
  }
  torch::nn::Module& module() override { return *m_; }
  void set_expert_shard(const model::ExpertShard& shard) override { m_->set_expert_shard(shard); }
  Holder& holder() { return m_; }

 private:
  Holder m_;
};

/// Makes the trainer's model from a config, its parameters placeholders with `opts` (the engine fills them).
using ModelFactory = std::function<std::unique_ptr<TrainableModel>(const model::ModelConfig&, const at::TensorOptions&)>;

/// The factory of decoder `Holder`.
template <class Holder>
ModelFactory model_factory() {
  return [](const model::ModelConfig& c, const at::TensorOptions& opts) -> std::unique_ptr<TrainableModel> {
    return std::make_unique<ModelOf<Holder>>(Holder(c, opts));
  };
}

SHARDLM_EXTERN_TEMPLATE(ModelFactory model_factory<model::Llama3>())
SHARDLM_EXTERN_TEMPLATE(ModelFactory model_factory<model::Mixtral>())

/// The model a config names: Mixtral for a mixture of experts, else Llama 3 (a program that serves both compiles both
/// once; a program that names its model compiles only that one).
inline ModelFactory model_factory_for(const model::ModelConfig& c) {
  return c.is_moe() ? model_factory<model::Mixtral>() : model_factory<model::Llama3>();
}

}  // namespace shardlm::train
