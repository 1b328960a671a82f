// Recipes that must not compile: each case is built by its own CTest test, which passes only when the build
// fails with the static_assert message that names the fix (tests/CMakeLists.txt pins the messages).
#include <shardlm/policy/policies.hpp>
using namespace shardlm;
#if defined(SHARDLM_CASE_offload_noshard)
using Recipe = Policies<sharding::NoShard, offload::Cpu>;
#elif defined(SHARDLM_CASE_two_sharding)
using Recipe = Policies<sharding::FullShard, sharding::NoShard>;
#elif defined(SHARDLM_CASE_two_precision)
using Recipe = Policies<precision::FP32, sharding::FullShard, precision::MixedBF16>;
#elif defined(SHARDLM_CASE_not_a_policy)
using Recipe = Policies<sharding::FullShard, int>;
#elif defined(SHARDLM_CASE_two_adapter)
using Recipe = Policies<adapter::LoRA, sharding::FullShard, adapter::DoRA>;
#elif defined(SHARDLM_CASE_quant_without_adapter)
using Recipe = Policies<sharding::FullShard, quant::Int4>;
#elif defined(SHARDLM_CASE_two_quant)
using Recipe = Policies<adapter::LoRA, quant::Int4, quant::FP8>;
#elif defined(SHARDLM_CASE_every_zero)
using Recipe = Policies<checkpointing::EveryNth<0>>;
#elif defined(SHARDLM_CASE_selective_adapter)
using Recipe = Policies<sharding::FullShard, checkpointing::Selective, adapter::LoRA>;
#elif defined(SHARDLM_CASE_fp8_selective)
using Recipe = Policies<sharding::FullShard, checkpointing::Selective, precision::FP8>;
#else
#error "no SHARDLM_CASE_ given"
#endif
static_assert(sizeof(Recipe) > 0);
int main() { return 0; }
