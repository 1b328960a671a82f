#include <shardlm/shardlm.hpp>

int second_unit_vocab() { return static_cast<int>(shardlm::model::preset("llama3-debug").vocab_size); }
