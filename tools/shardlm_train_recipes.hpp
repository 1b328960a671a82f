#pragma once
// shardlm_train's recipes of one precision: the 21 recipes x 2 models of each precision are instantiated in a
// translation unit of their own (shardlm_train_<precision>.cpp), so that a parallel build spreads the policy matrix
// and no unit holds all of it; the extern declarations keep them out of main's unit.
#include <shardlm/shardlm.hpp>

namespace shardlm::tools {

/// Trains the model of the options (Llama 3 or Mixtral) with the recipe of precision P that the other policy flags
/// name.
template <class P>
int train_recipes_of(const TrainOptions& o) {
  return dispatch_recipe_of<P>(o.sharding, o.checkpointing, o.offload, [&]<class Recipe>(Recipe) {
    return with_model(train::resolve_config(o), [&]<class Model>(Model) { return run_trainer<Model, Recipe>(o); });
  });
}

extern template int train_recipes_of<precision::FP32>(const TrainOptions&);
extern template int train_recipes_of<precision::MixedBF16>(const TrainOptions&);
extern template int train_recipes_of<precision::PureBF16>(const TrainOptions&);

}  // namespace shardlm::tools
