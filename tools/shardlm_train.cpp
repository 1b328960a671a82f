// shardlm_train: the policy-matrix program. Picks a compiled policy combination from flags and trains with
// the common trainer flags (--help lists them all). Single process for now: --precision selects the policy.
#include <shardlm/shardlm.hpp>

using namespace shardlm;

int main(int argc, char** argv) {
  return guarded_main("shardlm_train", [&] {
    const auto o = cli::parse(argc, argv, TrainOptions{}, /*policy_flags=*/true);
    return dispatch_precision(o.precision, [&]<class Precision>(Precision) {
      return run_trainer<model::Llama3, Policies<sharding::NoShard, Precision>>(o);
    });
  });
}
