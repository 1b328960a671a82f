// Two translation units include every header: a non-inline function or variable in a header would be
// defined twice and fail to link.
#include <shardlm/shardlm.hpp>

int second_unit_vocab();

int main() { return shardlm::model::preset("llama3-debug").vocab_size == second_unit_vocab() ? 0 : 1; }
