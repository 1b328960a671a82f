#pragma once
// The CLI mapping: a flag's value to the rules of the tag of that name. Nothing here says what a policy does: the
// names and the rules are the tags' own (policy/policies.hpp).
#include <optional>
#include <string>
#include <string_view>

#include "shardlm/core/errors.hpp"
#include "shardlm/policy/policies.hpp"

namespace shardlm {

namespace detail {
/// The rules of the first of `Tags` named `value`.
template <class Tag, class... Tags>
auto rules_of_named(std::string_view value) -> std::optional<std::decay_t<decltype(Tag::rules)>> {
  if (value == Tag::rules.name) return Tag::rules;
  if constexpr (sizeof...(Tags) > 0) return rules_of_named<Tags...>(value);
  else return std::nullopt;
}
}  // namespace detail

/// --sharding none|grad-op|full|hybrid.
inline sharding::Rules sharding_named(std::string_view value) {
  using namespace sharding;
  if (auto r = detail::rules_of_named<NoShard, ShardGradOp, FullShard, HybridShard>(value)) return *r;
  fail<ConfigError>("--sharding '", value, "' is not a sharding policy: use none, grad-op, full or hybrid");
}

/// --precision fp32|mixed-bf16|pure-bf16|fp8.
inline precision::Rules precision_named(std::string_view value) {
  using namespace precision;
  if (auto r = detail::rules_of_named<FP32, MixedBF16, PureBF16, FP8>(value)) return *r;
  fail<ConfigError>("--precision '", value, "' is not a precision policy: use fp32, mixed-bf16, pure-bf16 or fp8");
}

/// --reduce-dtype policy|fp32|bf16: the dtype the gradient collectives run in.
enum class ReduceDtype {
  policy,  ///< the precision policy's (its master dtype)
  fp32,
  bf16,
};
inline ReduceDtype reduce_dtype_named(std::string_view value) {
  if (value == "policy") return ReduceDtype::policy;
  if (value == "fp32") return ReduceDtype::fp32;
  if (value == "bf16") return ReduceDtype::bf16;
  fail<ConfigError>("--reduce-dtype '", value, "': use policy (the precision policy's), fp32 or bf16");
}

/// The precision rules `p` with the gradient collectives in `dtype`. bf16 halves the bytes that mixed-bf16's
/// reduce-scatters and all-reduces move; its sums are widened into fp32 gradient shards (offload::Rules::grad_dtype).
/// fp32 under pure-bf16 sums the bf16 gradients in fp32 and rounds them once into the bf16 shards. bf16 under fp32 is
/// refused: that policy is the exact reference, and mixed-bf16 is the recipe whose gradients are bf16 already.
inline precision::Rules with_reduce_dtype(precision::Rules p, ReduceDtype dtype) {
  if (dtype == ReduceDtype::policy) return p;
  if (dtype == ReduceDtype::bf16 && p.compute == c10::ScalarType::Float)
    fail<ConfigError>("--reduce-dtype bf16 with precision ", p.name, ": that policy computes and reduces in fp32 (the "
                      "exact reference); use --precision mixed-bf16 (precision::MixedBF16) to reduce bf16 gradients in bf16");
  p.reduce = dtype == ReduceDtype::bf16 ? c10::ScalarType::BFloat16 : c10::ScalarType::Float;
  return p;
}

/// --offload none|cpu.
inline offload::Rules offload_named(std::string_view value) {
  if (auto r = detail::rules_of_named<offload::None, offload::Cpu>(value)) return *r;
  fail<ConfigError>("--offload '", value, "' is not an offload policy: use none or cpu");
}

/// --adapter none|lora|dora.
inline adapter::Rules adapter_named(std::string_view value) {
  if (auto r = detail::rules_of_named<adapter::None, adapter::LoRA, adapter::DoRA>(value)) return *r;
  fail<ConfigError>("--adapter '", value, "' is not an adapter: use none, lora or dora");
}

/// --checkpointing none|every-block|every-K|selective: EveryNth<K>'s rules for any K >= 1.
inline checkpointing::Rules checkpointing_named(std::string_view value) {
  for (const auto& r : {checkpointing::None::rules, checkpointing::EveryBlock::rules, checkpointing::Selective::rules})
    if (value == r.name()) return r;
  if (value.starts_with("every-")) {
    const std::string digits(value.substr(6));
    if (!digits.empty() && digits.size() <= 6 && digits.find_first_not_of("0123456789") == std::string::npos) {
      const int k = std::stoi(digits);
      if (k >= 1) return checkpointing::Rules{k};
    }
  }
  fail<ConfigError>("--checkpointing '", value, "' is not a checkpointing policy: use none, every-block, every-K (K >= 1) or selective");
}

/// The recipe the policy flags name; a combination the engine refuses is a ConfigError with the static_assert's
/// message.
inline RecipeRules recipe_named(std::string_view sharding, std::string_view precision, std::string_view checkpointing,
                                std::string_view offload, std::string_view adapter = "none", std::string_view quant = "none") {
  RecipeRules r{sharding_named(sharding),       checkpointing_named(checkpointing), offload_named(offload),
                precision_named(precision),     adapter_named(adapter),             quant::rules_named(quant)};
  if (!engine_serves(r.sharding, r.offload))
    fail<ConfigError>("--offload ", offload, " with --sharding ", sharding, ": ", SHARDLM_OFFLOAD_NEEDS_SHARDING);
  if (!model_serves(r.checkpointing, r.adapter))
    fail<ConfigError>("--checkpointing ", checkpointing, " with --adapter ", adapter, ": ", SHARDLM_SELECTIVE_NEEDS_FULL_FT);
  if (!linears_serve(r.checkpointing, r.precision))
    fail<ConfigError>("--checkpointing ", checkpointing, " with --precision ", precision, ": ",
                      SHARDLM_FP8_NEEDS_PLAIN_CHECKPOINTING);
  return r;
}

}  // namespace shardlm
