#pragma once
// The shared defaults of the two 405B adapter examples (03 LoRA on an FP8 base, 04 QDoRA on an Int4 base): one
// node, Llama 3.1 405B, sequences of 4096, rank-64 adapters on every projection, AdamW at 1e-4 without weight
// decay; the adapter is written in PEFT's format at the end when --export-adapter names a directory.
#include <shardlm/shardlm.hpp>

#include "embedded_corpus.hpp"

namespace shardlm::examples {

inline shardlm::TrainOptions llama405b_adapter_defaults() {
  return shardlm::TrainOptions()
      .seq_len(4096)
      .micro_batch(1)
      .steps(1000)
      .model(ModelOptions().preset("llama3-405b"))
      .optim(optim::AdamWOptions().lr(1e-4).weight_decay(0.0))
      .schedule(ScheduleOptions().warmup_steps(50))
      .adapter(AdapterOptions().rank(64).alpha(16).targets("q,k,v,o,gate,up,down"))
      .dist(DistOptions().device("cuda"))
      .data(DataOptions()  // the smoke run's data; a real run passes --data
                .builtin_text(embedded_corpus())
                .builtin_name("embedded corpus (examples/data/corpus.txt)"));
}

}  // namespace shardlm::examples
