#pragma once
// Mixtral: the generic block with grouped-query attention, a sparse mixture of SwiGLU experts and RMSNorm.
#include "shardlm/model/block.hpp"
#include "shardlm/model/init.hpp"
#include "shardlm/model/moe.hpp"

namespace shardlm::model {

using MixtralBlock = TransformerBlock<GroupedQueryAttention, SparseMoe, RMSNorm>;
using Mixtral = Decoder<MixtralBlock>;

}  // namespace shardlm::model
