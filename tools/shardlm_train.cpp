// shardlm_train: the policy-matrix program. Picks a compiled policy combination from flags (--sharding,
// --precision, --checkpointing, --offload) and trains with the common trainer flags (--help lists them all; --adapter
// lora|dora is a run-time choice of every recipe: docs/adapters.md),
// on one process or as one rank of a job started by shardlm_launch, torchrun or srun.
#include <shardlm/shardlm.hpp>

using namespace shardlm;

int main(int argc, char** argv) {
  return guarded_main("shardlm_train", [&] {
    const auto o = cli::parse(argc, argv, TrainOptions{}, /*policy_flags=*/true);
    return dispatch_recipe(o.sharding, o.precision, o.checkpointing, o.offload,
                           [&]<class Recipe>(Recipe) { return run_trainer<model::Llama3, Recipe>(o); });
  });
}
