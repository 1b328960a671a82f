// 05: full fine-tuning of Llama 3.1 405B, the seed recipe: FullShard (ZeRO-3) over every GPU of the job, every block
// recomputed in backward, the sharded state and the optimizer step on the hosts (CPU offload: the host step runs
// beside the GPU's work, engine/offload.hpp), pure bf16 (8 bytes of training state per parameter: what fits 405B in
// the host memory of 8 nodes); sequences of 4096 tokens, micro-batch 1 per GPU. It starts from a Hugging Face
// checkpoint directory read by byte ranges (--model-dir: each rank reads only its shards) and writes one at the end
// (--export-dir: each rank writes its shards' bytes). The 8-node x 8-GPU launch, with a hostfile or Slurm, and the
// plan of its memory are in docs/llama405b_full.md:
//   shardlm_launch --hostfile hosts --nproc-per-node 8 -- 05_llama405b_full --model-dir /data/Llama-3.1-405B
//     --data tokens.bin --checkpoint-dir /shared/ckpt --save-every 100 --export-dir /shared/out     (one command line)
#include <shardlm/shardlm.hpp>

#include "embedded_corpus.hpp"

using namespace shardlm;
using Recipe = Policies<sharding::FullShard, checkpointing::EveryBlock, offload::Cpu, precision::PureBF16>;

int main(int argc, char** argv) {
  return guarded_main("05_llama405b_full", [&] {
    const auto defaults = TrainOptions()
                              .seq_len(4096)
                              .micro_batch(1)
                              .steps(1000)
                              .model(ModelOptions().preset("llama3-405b"))
                              .optim(optim::AdamWOptions().lr(1e-5).weight_decay(0.1))
                              .schedule(ScheduleOptions().warmup_steps(50))
                              .dist(DistOptions().device("cuda").timeout(1800))  // saves and loads of 405B take minutes
                              .log(LogOptions().every(1))
                              .data(DataOptions()  // the smoke run's data; a real run passes --data
                                        .builtin_text(examples::embedded_corpus())
                                        .builtin_name("embedded corpus (examples/data/corpus.txt)"));
    return run_trainer<model::Llama3, Recipe>(cli::parse(argc, argv, defaults));
  });
}
