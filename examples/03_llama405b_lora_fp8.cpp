// 03: LoRA fine-tuning of Llama 3.1 405B on one node, on an FP8 base: the frozen weights are quantized to e4m3 with
// row scales while they stream from the checkpoint (each rank its own rows, on its GPU), sharded over the node's
// GPUs as FP8 bytes (405 GB: ~51 GB per GPU of 8) and dequantized to bf16 one block at a time; rank-64 adapters
// on every projection trained with AdamW in fp32, blocks recomputed in backward.
//   shardlm_launch --nproc-per-node 8 -- 03_llama405b_lora_fp8 --model-dir /models/Llama-3.1-405B --data tokens.bin
//       --export-adapter out/adapter                          (one command line)
//   shardlm_merge --base /models/Llama-3.1-405B --adapter out/adapter --out out/merged     (a merged HF checkpoint)
// Without --model-dir it starts from a random llama3-405b; on a CPU, a smoke run of the same code:
//   03_llama405b_lora_fp8 --preset llama3-debug --device cpu --seq-len 32 --micro-batch 2 --steps 3
// Every trainer flag works (--help): --lora-rank, --lora-alpha, --lora-targets q,v, --use-rslora, --lora-dropout,
// --load-adapter DIR (start from a PEFT adapter), --checkpoint-dir (saves the adapter and its AdamW state only).
// On 80 GB GPUs the FP8 base, the adapters' state and the activations of 4096 tokens do not fit together: add
// offload::Cpu to the recipe (the base and the adapters' state then live in pinned host memory).
#include "llama405b_adapter.hpp"

using namespace shardlm;
using Recipe = Policies<sharding::FullShard, checkpointing::EveryBlock, precision::MixedBF16, adapter::LoRA, quant::FP8>;

int main(int argc, char** argv) {
  return guarded_main("03_llama405b_lora_fp8", [&] {
    return run_trainer<model::Llama3, Recipe>(cli::parse(argc, argv, examples::llama405b_adapter_defaults()));
  });
}
