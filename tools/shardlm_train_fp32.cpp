// shardlm_train's recipes of --precision fp32 (see shardlm_train_recipes.hpp).
#include "shardlm_train_recipes.hpp"

template int shardlm::tools::train_recipes_of<shardlm::precision::FP32>(const shardlm::TrainOptions&);
