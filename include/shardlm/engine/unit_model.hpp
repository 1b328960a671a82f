#pragma once
// What the engine sees of a model: its units in order, each unit's own parameters, the units a unit also reads, and
// one unit's forward. An interface, so that the engine is compiled once per program whatever the model flavor;
// UnitModelOf adapts any module with these members (model::DecoderImpl) without the model knowing the engine.
#include <ATen/ATen.h>

#include <concepts>
#include <string>
#include <utility>
#include <vector>

#include "shardlm/core/errors.hpp"
#include "shardlm/policy/policies.hpp"

namespace shardlm::engine {

using NamedTensors = std::vector<std::pair<std::string, at::Tensor>>;

class UnitModel {
 public:
  virtual ~UnitModel() = default;
  virtual size_t num_units() const = 0;
  /// Unit u's own parameters with their model names.
  virtual NamedTensors unit_parameters(size_t u) = 0;
  /// The other units whose parameters unit u reads (a tied head reads the embedding's).
  virtual std::vector<size_t> unit_reads(size_t u) const = 0;
  virtual at::Tensor forward_unit(size_t u, const at::Tensor& x) = 0;
  virtual bool is_block(size_t u) const = 0;
  /// A small tensor unit u's last forward left besides its output (a MoE block's router statistics), whose loss
  /// depends on every unit's; undefined when it left none.
  virtual at::Tensor take_side(size_t u) { (void)u; return {}; }
  /// What the blocks keep for backward when their graph is kept (checkpointing::Rules::selective); the engine hands
  /// its recipe's rules in. A model without the choice keeps what autograd keeps.
  virtual void set_checkpointing(const checkpointing::Rules& rules) { (void)rules; }
  /// How the blocks' linear layers multiply (precision::Rules::linears); the engine hands its recipe's rules in. A
  /// model without the choice computes them in the compute dtype: float8 is refused.
  virtual void set_precision(const precision::Rules& rules) {
    if (rules.fp8_linears())
      fail<ConfigError>("--precision ", rules.name, ": this model has no set_precision (model::DecoderImpl has)");
  }
};

/// A module with the members of UnitModel (take_side optional).
template <class M>
concept UnitModule = requires(M& m, size_t u, const at::Tensor& x) {
  { m.num_units() } -> std::convertible_to<size_t>;
  { m.unit_parameters(u) } -> std::convertible_to<NamedTensors>;
  { m.unit_reads(u) } -> std::same_as<std::vector<size_t>>;
  { m.forward_unit(u, x) } -> std::same_as<at::Tensor>;
  { m.is_block(u) } -> std::convertible_to<bool>;
};

/// UnitModel over a module `m` (held by reference: the module outlives it).
template <UnitModule M>
class UnitModelOf : public UnitModel {
 public:
  explicit UnitModelOf(M& m) : m_(m) {}
  size_t num_units() const override { return m_.num_units(); }
  NamedTensors unit_parameters(size_t u) override { return m_.unit_parameters(u); }
  std::vector<size_t> unit_reads(size_t u) const override { return m_.unit_reads(u); }
  at::Tensor forward_unit(size_t u, const at::Tensor& x) override { return m_.forward_unit(u, x); }
  bool is_block(size_t u) const override { return m_.is_block(u); }
  at::Tensor take_side(size_t u) override {
    if constexpr (requires { { m_.take_side(u) } -> std::same_as<at::Tensor>; }) return m_.take_side(u);
    else return UnitModel::take_side(u);
  }
  void set_checkpointing(const checkpointing::Rules& rules) override {
    if constexpr (requires { m_.set_checkpointing(rules); }) m_.set_checkpointing(rules);
    else if (rules.selective())
      fail<ConfigError>("--checkpointing ", rules.name(), ": this model has no set_checkpointing (model::DecoderImpl has)");
  }
  void set_precision(const precision::Rules& rules) override {
    if constexpr (requires { m_.set_precision(rules); }) m_.set_precision(rules);
    else UnitModel::set_precision(rules);
  }

 private:
  M& m_;
};

}  // namespace shardlm::engine
