#pragma once
// Llama 3: the generic block with grouped-query attention, a SwiGLU MLP and RMSNorm.
#include "shardlm/model/block.hpp"
#include "shardlm/model/init.hpp"

namespace shardlm::model {

using LlamaBlock = TransformerBlock<GroupedQueryAttention, SwiGLU, RMSNorm>;
using Llama3 = Decoder<LlamaBlock>;

}  // namespace shardlm::model
