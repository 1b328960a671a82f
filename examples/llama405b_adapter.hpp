#pragma once
// The shared defaults of the two 405B adapter examples (03 LoRA on an FP8 base, 04 QDoRA on an Int4 base): one
// node, Llama 3.1 405B, sequences of 4096, rank-64 adapters on every projection, AdamW at 1e-4 without weight
// decay; the adapter is written in PEFT's format at the end when --export-adapter names a directory.
#include <shardlm/shardlm.hpp>

#include "embedded_corpus.hpp"

namespace shardlm::examples {

inline shardlm::TrainOptions llama405b_adapter_defaults() {
  shardlm::TrainOptions o;
  o.preset = "llama3-405b";
  o.device = "cuda";
  o.seq_len = 4096;
  o.micro_batch = 1;
  o.steps = 1000;
  o.lr = 1e-4;
  o.warmup_steps = 50;
  o.weight_decay = 0.0;
  o.lora_rank = 64;
  o.lora_alpha = 16;
  o.lora_targets = "q,k,v,o,gate,up,down";
  o.builtin_text = embedded_corpus();  // the smoke run's data; a real run passes --data
  o.builtin_name = "embedded corpus (examples/data/corpus.txt)";
  return o;
}

}  // namespace shardlm::examples
