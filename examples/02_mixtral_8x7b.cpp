// 02: Mixtral 8x7B (46.7B parameters, 12.9B active per token) trained with FullShard (ZeRO-3), every block
// recomputed in the backward, mixed bf16 and CPU offload of the master weights and AdamW state: the recipe for a
// node of GPUs that cannot hold the sharded state on the devices. One rank per GPU:
//   shardlm_launch --nproc-per-node 8 -- 02_mixtral_8x7b --data tokens.bin --model-dir /models/Mixtral-8x7B-v0.1
// Without --model-dir it starts from random weights of the mixtral-8x7b preset (--layers 4 for a quick look; the
// embedded corpus when no --data). The loss logged is the cross-entropy plus router_aux_loss_coef x the
// load-balancing loss (shown beside it as "aux"), as transformers reports it with output_router_logits; the
// Hugging Face checkpoint may hold the per-expert layout of the Mixtral releases or transformers' fused one.
// Any recipe compiles here (shardlm_train compiles the 63 its flags name; here also e.g. EveryNth<4>): change the
// line below.
#include <shardlm/shardlm.hpp>

#include "embedded_corpus.hpp"

using namespace shardlm;
using Recipe = Policies<sharding::FullShard, checkpointing::EveryBlock, precision::MixedBF16, offload::Cpu>;

int main(int argc, char** argv) {
  return guarded_main("02_mixtral_8x7b", [&] {
    const auto defaults = TrainOptions()
                              .seq_len(4096)
                              .micro_batch(1)
                              .steps(100)
                              .model(ModelOptions().preset("mixtral-8x7b"))
                              .optim(optim::AdamWOptions().lr(1e-5))
                              .schedule(ScheduleOptions().warmup_steps(10))
                              .dist(DistOptions().device("cuda"))
                              .log(LogOptions().every(1))
                              .data(DataOptions()
                                        .builtin_text(examples::embedded_corpus())
                                        .builtin_name("embedded corpus (examples/data/corpus.txt)"));
    return run_trainer<model::Mixtral, Recipe>(cli::parse(argc, argv, defaults));
  });
}
