// 02: LoRA fine-tuning of Llama 3.1 405B on one node: the base frozen and sharded over the node's GPUs (FullShard,
// stored in bf16: --quant is the seam for int4/fp8 storage), rank-16 adapters on every projection trained with
// AdamW in fp32, blocks recomputed in backward; the adapter is written in PEFT's format at the end.
//   shardlm_launch --nproc-per-node 8 -- 03_llama405b_lora --model-dir /models/Llama-3.1-405B --data tokens.bin \
//       --export-adapter out/adapter
//   shardlm_merge --base /models/Llama-3.1-405B --adapter out/adapter --out out/merged     (a merged HF checkpoint)
// Without --model-dir it starts from a random llama3-405b; on a CPU, a smoke run of the same code:
//   03_llama405b_lora --preset llama3-debug --device cpu --seq-len 32 --micro-batch 2 --steps 3
// Every trainer flag works (--help): --lora-rank, --lora-alpha, --lora-targets q,v, --use-rslora, --lora-dropout,
// --load-adapter DIR (start from a PEFT adapter), --checkpoint-dir (saves the adapter and its AdamW state only).
#include <shardlm/shardlm.hpp>

#include "embedded_corpus.hpp"

using namespace shardlm;
using Recipe = Policies<sharding::FullShard, checkpointing::EveryBlock, precision::MixedBF16, adapter::LoRA>;

int main(int argc, char** argv) {
  return guarded_main("03_llama405b_lora", [&] {
    TrainOptions defaults;
    defaults.preset = "llama3-405b";
    defaults.device = "cuda";
    defaults.seq_len = 4096;
    defaults.micro_batch = 1;
    defaults.steps = 1000;
    defaults.lr = 1e-4;
    defaults.warmup_steps = 50;
    defaults.weight_decay = 0.0;
    defaults.lora_rank = 16;
    defaults.lora_alpha = 32;
    defaults.lora_targets = "q,k,v,o,gate,up,down";
    defaults.builtin_text = examples::embedded_corpus();  // the smoke run's data; a real run passes --data
    defaults.builtin_name = "embedded corpus (examples/data/corpus.txt)";
    return run_trainer<model::Llama3, Recipe>(cli::parse(argc, argv, defaults));
  });
}
