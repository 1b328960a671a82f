// 04: QDoRA fine-tuning of Llama 3.1 405B on one node: DoRA adapters on an Int4 base (groups of 64 values with a
// fitted grid each, HQQ-style, 4.5 bits per value: ~228 GB for 405B, ~57 GB per GPU of 4). The base is quantized
// while it streams from the checkpoint (each rank its own rows, on its GPU), sharded and all-gathered as 4-bit
// bytes, dequantized to bf16 one block at a time by a CUDA kernel; DoRA's magnitudes start at the row norms of the
// dequantized weights; rank-64 adapters on every projection, blocks recomputed in backward.
//   shardlm_launch --nproc-per-node 4 -- 04_llama405b_qdora --model-dir /models/Llama-3.1-405B --data tokens.bin
//       --export-adapter out/adapter                          (one command line)
//   shardlm_merge --base /models/Llama-3.1-405B --adapter out/adapter --out out/merged
// Without --model-dir it starts from a random llama3-405b; on a CPU, a smoke run of the same code:
//   04_llama405b_qdora --preset llama3-debug --device cpu --seq-len 32 --micro-batch 2 --steps 3
#include "llama405b_adapter.hpp"

using namespace shardlm;
using Recipe = Policies<sharding::FullShard, checkpointing::EveryBlock, precision::MixedBF16, adapter::DoRA, quant::Int4>;

int main(int argc, char** argv) {
  return guarded_main("04_llama405b_qdora", [&] {
    return run_trainer<model::Llama3, Recipe>(cli::parse(argc, argv, examples::llama405b_adapter_defaults()));
  });
}
