#pragma once
// The policy tags (CUTLASS-style small structs of constants) and their composition. A recipe is a
// `Policies<...>` of one tag from each family, in any order; families left out take their default.
#include <c10/core/ScalarType.h>

#include <array>
#include <cstdint>
#include <string_view>
#include <tuple>
#include <type_traits>

namespace shardlm {

template <class...>
inline constexpr bool dependent_false = false;

namespace sharding {
/// Replicated parameters, all-reduced gradients (DDP).
struct NoShard { static constexpr std::string_view name = "none"; static constexpr bool shards_params = false, shards_grads = false; };
/// ZeRO-2: gradients and optimizer state sharded; gathered parameters kept from forward to backward.
struct ShardGradOp { static constexpr std::string_view name = "grad-op"; static constexpr bool shards_params = false, shards_grads = true; };
/// ZeRO-3: parameters, gradients and optimizer state sharded; parameters gathered per unit.
struct FullShard { static constexpr std::string_view name = "full"; static constexpr bool shards_params = true, shards_grads = true; };
/// FullShard inside a group of ranks (a node by default), replicated across groups.
struct HybridShard { static constexpr std::string_view name = "hybrid"; static constexpr bool shards_params = true, shards_grads = true; };
}  // namespace sharding

namespace detail {
/// "every-K" for EveryNth<K>, as a constant.
template <int K>
struct every_name {
  static constexpr auto make() {
    std::array<char, 16> s{'e', 'v', 'e', 'r', 'y', '-'};
    char digits[10] = {};
    int n = 0;
    for (int v = K; v > 0; v /= 10) digits[n++] = static_cast<char>('0' + v % 10);
    for (int i = 0; i < n; ++i) s[6 + i] = digits[n - 1 - i];
    return s;
  }
  static constexpr std::array<char, 16> text = make();
};
}  // namespace detail

namespace checkpointing {
/// Keep every activation for backward.
struct None { static constexpr std::string_view name = "none"; static constexpr int every = 0; };
/// Recompute each block in backward.
struct EveryBlock { static constexpr std::string_view name = "every-block"; static constexpr int every = 1; };
/// Recompute every k-th block (selective checkpointing).
template <int K>
struct EveryNth {
  static_assert(K >= 1, "EveryNth<k> needs k >= 1: EveryNth<1> is EveryBlock");
  static constexpr std::string_view name{detail::every_name<K>::text.data()};
  static constexpr int every = K;
};
}  // namespace checkpointing

namespace offload {
struct None { static constexpr std::string_view name = "none"; static constexpr bool to_host = false; };
/// Sharded master params, grads and optimizer state in pinned host memory; the optimizer step on the host.
struct Cpu { static constexpr std::string_view name = "cpu"; static constexpr bool to_host = true; };
}  // namespace offload

namespace precision {
/// fp32 everywhere.
struct FP32 {
  static constexpr std::string_view name = "fp32";
  static constexpr auto master = c10::ScalarType::Float, compute = c10::ScalarType::Float, reduce = c10::ScalarType::Float;
};
/// fp32 master weights and optimizer state, bf16 gather and compute, fp32 gradient reduction.
struct MixedBF16 {
  static constexpr std::string_view name = "mixed-bf16";
  static constexpr auto master = c10::ScalarType::Float, compute = c10::ScalarType::BFloat16, reduce = c10::ScalarType::Float;
};
/// bf16 parameters and optimizer state (8 bytes per parameter of training state).
struct PureBF16 {
  static constexpr std::string_view name = "pure-bf16";
  static constexpr auto master = c10::ScalarType::BFloat16, compute = c10::ScalarType::BFloat16, reduce = c10::ScalarType::BFloat16;
};
}  // namespace precision

namespace adapter {
/// Full fine-tuning: every parameter trained.
struct None { static constexpr std::string_view name = "none"; };
/// LoRA on a frozen base (rank, alpha, dropout, rsLoRA and targets are run-time options).
struct LoRA { static constexpr std::string_view name = "lora"; };
/// DoRA: LoRA plus a trained magnitude per output row.
struct DoRA { static constexpr std::string_view name = "dora"; };
}  // namespace adapter

// The quantization policies of the frozen base (shardlm/quant/policies.hpp defines them: byte layouts, kernels).
// Declared here so that a recipe can name one without the quantization code: quant::NoQuant (the base in the
// compute dtype), quant::Int4 (4.5 bits per value), quant::FP8 (8.25 bits per value, e4m3 with row scales).
namespace quant {
struct NoQuant;
struct Int4;
struct FP8;
}  // namespace quant

namespace detail {
template <class T, template <class> class IsFamily, class Default, class... Ps>
struct pick;
template <class T, template <class> class IsFamily, class Default>
struct pick<T, IsFamily, Default> { using type = Default; };
template <class T, template <class> class IsFamily, class Default, class P, class... Ps>
struct pick<T, IsFamily, Default, P, Ps...> {
  using type = std::conditional_t<IsFamily<P>::value, P, typename pick<T, IsFamily, Default, Ps...>::type>;
};
template <class P> struct is_sharding : std::bool_constant<std::is_same_v<P, sharding::NoShard> || std::is_same_v<P, sharding::ShardGradOp> || std::is_same_v<P, sharding::FullShard> || std::is_same_v<P, sharding::HybridShard>> {};
template <class P> struct is_checkpointing : std::false_type {};
template <> struct is_checkpointing<checkpointing::None> : std::true_type {};
template <> struct is_checkpointing<checkpointing::EveryBlock> : std::true_type {};
template <int K> struct is_checkpointing<checkpointing::EveryNth<K>> : std::true_type {};
template <class P> struct is_offload : std::bool_constant<std::is_same_v<P, offload::None> || std::is_same_v<P, offload::Cpu>> {};
template <class P> struct is_precision : std::bool_constant<std::is_same_v<P, precision::FP32> || std::is_same_v<P, precision::MixedBF16> || std::is_same_v<P, precision::PureBF16>> {};
template <class P> struct is_adapter : std::bool_constant<std::is_same_v<P, adapter::None> || std::is_same_v<P, adapter::LoRA> || std::is_same_v<P, adapter::DoRA>> {};
template <class P> struct is_quant : std::bool_constant<std::is_same_v<P, quant::NoQuant> || std::is_same_v<P, quant::Int4> || std::is_same_v<P, quant::FP8>> {};
template <class P> struct is_policy : std::bool_constant<is_sharding<P>::value || is_checkpointing<P>::value || is_offload<P>::value || is_precision<P>::value || is_adapter<P>::value || is_quant<P>::value> {};
template <template <class> class IsFamily, class... Ps>
inline constexpr int count_of = (0 + ... + int(IsFamily<Ps>::value));
}  // namespace detail

/// A recipe: one tag per family, in any order; missing families default to
/// NoShard, checkpointing::None, offload::None, FP32, adapter::None, quant::NoQuant.
/// The adapter changes which parameters train and the quantization how the frozen ones are stored, not the engine's
/// code: a recipe with them runs the engine of the same recipe without them (`Recipe::WithoutAdapter`), so adapters
/// and quantization add no instantiations.
template <class... Ps>
struct Policies {
  static_assert((detail::is_policy<Ps>::value && ...),
                "Policies<...> takes only policy tags: sharding::*, checkpointing::*, offload::*, precision::*, adapter::*, quant::*");
  static_assert(detail::count_of<detail::is_sharding, Ps...> <= 1, "Policies<...> names two sharding policies: keep one");
  static_assert(detail::count_of<detail::is_checkpointing, Ps...> <= 1, "Policies<...> names two checkpointing policies: keep one");
  static_assert(detail::count_of<detail::is_offload, Ps...> <= 1, "Policies<...> names two offload policies: keep one");
  static_assert(detail::count_of<detail::is_precision, Ps...> <= 1, "Policies<...> names two precision policies: keep one");
  static_assert(detail::count_of<detail::is_adapter, Ps...> <= 1, "Policies<...> names two adapter policies: keep one");
  static_assert(detail::count_of<detail::is_quant, Ps...> <= 1, "Policies<...> names two quantization policies: keep one");
  using Sharding = typename detail::pick<void, detail::is_sharding, sharding::NoShard, Ps...>::type;
  using Checkpointing = typename detail::pick<void, detail::is_checkpointing, checkpointing::None, Ps...>::type;
  using Offload = typename detail::pick<void, detail::is_offload, offload::None, Ps...>::type;
  using Precision = typename detail::pick<void, detail::is_precision, precision::FP32, Ps...>::type;
  using Adapter = typename detail::pick<void, detail::is_adapter, adapter::None, Ps...>::type;
  using Quant = typename detail::pick<void, detail::is_quant, quant::NoQuant, Ps...>::type;
  static_assert(std::is_same_v<Quant, quant::NoQuant> || !std::is_same_v<Adapter, adapter::None>,
                "quant::Int4 and quant::FP8 store the frozen base quantized: name adapter::LoRA or adapter::DoRA too "
                "(full fine-tuning trains every weight, so nothing is frozen)");
  /// The recipe the trainer and engine are instantiated with: this one without its adapter and quantization.
  using WithoutAdapter = Policies<Sharding, Checkpointing, Offload, Precision>;
  // Completes the chosen tags, so that their own checks (EveryNth<k>'s k >= 1) fire with the recipe.
  static_assert(sizeof(Sharding) + sizeof(Checkpointing) + sizeof(Offload) + sizeof(Precision) > 0);
};

/// A recipe's quantization policy (quant::NoQuant for a recipe type that names none).
template <class Recipe>
struct quant_of { using type = quant::NoQuant; };
template <class Recipe>
  requires requires { typename Recipe::Quant; }
struct quant_of<Recipe> { using type = typename Recipe::Quant; };
template <class Recipe>
using quant_of_t = typename quant_of<Recipe>::type;

/// A recipe's adapter policy (adapter::None for a recipe type that names none).
template <class Recipe>
struct adapter_of { using type = adapter::None; };
template <class Recipe>
  requires requires { typename Recipe::Adapter; }
struct adapter_of<Recipe> { using type = typename Recipe::Adapter; };
template <class Recipe>
using adapter_of_t = typename adapter_of<Recipe>::type;

/// What the engine refuses, with the message that its static_assert and shardlm_train's run-time dispatch give.
#define SHARDLM_OFFLOAD_NEEDS_SHARDING                                                                   \
  "offload::Cpu moves sharded state to the host: use sharding::FullShard, ShardGradOp or HybridShard (NoShard " \
  "would keep a full replica of the optimizer state in every rank's host memory)"
template <class Recipe>
inline constexpr bool engine_supports =
    !(Recipe::Offload::to_host && std::is_same_v<typename Recipe::Sharding, sharding::NoShard>);

}  // namespace shardlm
