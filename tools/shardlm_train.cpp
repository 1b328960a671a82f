// shardlm_train: the policy-matrix program. Picks a compiled policy combination from flags (--sharding,
// --precision, --checkpointing, --offload) and trains with the common trainer flags (--help lists them all; --adapter
// lora|dora is a run-time choice of every recipe: docs/adapters.md), on one process or as one rank of a job started
// by shardlm_launch, torchrun or srun. The model is Llama 3 or Mixtral, by the preset or config.json's model_type
// (adapters: Llama only). To keep the build humane, Mixtral is compiled for a subset of the recipes
// (mixtral_compiled in train/trainer.hpp); a main of its own (examples/) instantiates any other.
#include <shardlm/shardlm.hpp>

using namespace shardlm;

int main(int argc, char** argv) {
  return guarded_main("shardlm_train", [&] {
    const auto o = cli::parse(argc, argv, TrainOptions{}, /*policy_flags=*/true);
    return dispatch_recipe(o.sharding, o.precision, o.checkpointing, o.offload,
                           [&]<class Recipe>(Recipe) {
                             return with_model<Recipe>(train::resolve_config(o), [&]<class Model>(Model) {
                               return run_trainer<Model, Recipe>(o);
                             });
                           });
  });
}
