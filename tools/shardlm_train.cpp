// shardlm_train: the policy-matrix program. Picks a compiled policy combination from flags and trains with
// the common trainer flags (--help lists them all). Single process for now: --precision selects the policy.
#include <shardlm/shardlm.hpp>

using namespace shardlm;

namespace {
template <class Precision>
int train_with(const TrainOptions& o) {
  return run_trainer<model::Llama3, Policies<sharding::NoShard, Precision>>(o);
}
}  // namespace

int main(int argc, char** argv) {
  return guarded_main("shardlm_train", [&] {
    const auto o = cli::parse(argc, argv, TrainOptions{}, /*policy_flags=*/true);
    if (o.precision == "fp32") return train_with<precision::FP32>(o);
    if (o.precision == "mixed-bf16") return train_with<precision::MixedBF16>(o);
    if (o.precision == "pure-bf16") return train_with<precision::PureBF16>(o);
    fail<ConfigError>("--precision '", o.precision, "' is not a precision policy: use fp32, mixed-bf16 or pure-bf16");
  });
}
