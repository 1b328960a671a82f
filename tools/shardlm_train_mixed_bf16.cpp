// shardlm_train's recipes of --precision mixed-bf16 (see shardlm_train_recipes.hpp).
#include "shardlm_train_recipes.hpp"

template int shardlm::tools::train_recipes_of<shardlm::precision::MixedBF16>(const shardlm::TrainOptions&);
