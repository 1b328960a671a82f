// shardlm_train: the policy-matrix program. Picks a compiled policy combination from flags (--sharding,
// --precision) and trains with the common trainer flags (--help lists them all), on one process or as one
// rank of a job started by shardlm_launch, torchrun or srun.
#include <shardlm/shardlm.hpp>

using namespace shardlm;

int main(int argc, char** argv) {
  return guarded_main("shardlm_train", [&] {
    const auto o = cli::parse(argc, argv, TrainOptions{}, /*policy_flags=*/true);
    return dispatch_sharding(o.sharding, [&]<class Sharding>(Sharding) {
      return dispatch_precision(o.precision, [&]<class Precision>(Precision) {
        return run_trainer<model::Llama3, Policies<Sharding, Precision>>(o);
      });
    });
  });
}
