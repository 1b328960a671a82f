// shardlm_train: the policy-matrix program. Picks a compiled policy combination from flags (--sharding,
// --precision, --checkpointing, --offload) and trains with the common trainer flags (--help lists them all; --adapter
// lora|dora is a run-time choice of every recipe: docs/adapters.md), on one process or as one rank of a job started
// by shardlm_launch, torchrun or srun. The model is Llama 3 or Mixtral, by the preset or config.json's model_type
// (adapters: Llama only); both are compiled for every recipe the engine supports. Each precision's recipes are
// compiled in a unit of their own (shardlm_train_recipes.hpp) so that a parallel build spreads them.
#include "shardlm_train_recipes.hpp"

using namespace shardlm;

int main(int argc, char** argv) {
  return guarded_main("shardlm_train", [&] {
    const auto o = cli::parse(argc, argv, TrainOptions{}, /*policy_flags=*/true);
    return dispatch_precision(o.precision, [&]<class P>(P) { return tools::train_recipes_of<P>(o); });
  });
}
