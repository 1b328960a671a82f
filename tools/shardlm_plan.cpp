// shardlm_plan [trainer flags] [--world-size N] [--gpus-per-node G] [--gpu-memory-gib M]
// Predicted memory per GPU and per host of one training step: the trainer's model, policy and batch flags
// (as shardlm_train takes them) plus the world. The engine's schedule replayed on byte counts
// (train/memory_plan.hpp); the trainer prints the same plan when it starts.
#include <shardlm/core/main.hpp>
#include <shardlm/train/memory_plan.hpp>
#include <shardlm/train/options.hpp>

#include <iostream>

int main(int argc, char** argv) {
  return shardlm::guarded_main("shardlm_plan", [&] {
    int64_t world = 1, gpus_per_node = 8;
    double gpu_gib = 79.6;
    const shardlm::cli::ExtraFlags extra = [&](cxxopts::Options& o) {
      o.add_options()("world-size", "ranks (GPUs) in the job", cxxopts::value(world)->default_value("1"))(
          "gpus-per-node", "GPUs per host (the hybrid shard group, and whose offloaded state a host holds)",
          cxxopts::value(gpus_per_node)->default_value("8"))(
          "gpu-memory-gib", "memory of one GPU in GiB, for the verdict (an 80 GB H100: 79.6)",
          cxxopts::value(gpu_gib)->default_value("79.6"));
    };
    auto defaults = shardlm::TrainOptions().data(shardlm::DataOptions().required(false));
    const auto o = shardlm::cli::parse(argc, argv, defaults, /*policy_flags=*/true, extra);
    const auto& m = o.model();
    const auto& a = o.adapter();
    shardlm::plan::PlanInput in;
    in.model = shardlm::train::resolve_config(m);
    in.recipe = o.recipe();
    in.recipe.precision = shardlm::with_reduce_dtype(in.recipe.precision, shardlm::reduce_dtype_named(o.dist().reduce_dtype()));
    in.world_size = world, in.gpus_per_node = gpus_per_node, in.shard_group_size = o.dist().shard_group_size();
    in.expert_parallel = o.dist().expert_parallel();
    in.micro_batch = o.micro_batch(), in.seq_len = o.seq_len(), in.grad_accum = o.grad_accum(), in.loss_chunk = m.loss_chunk();
    in.lora_rank = a.rank(), in.lora_targets = shardlm::model::split_targets(a.targets());
    in.host_step = shardlm::engine::host_step_named(o.offload().step());
    const auto plan = shardlm::plan::plan_memory(in);
    const auto& r = in.recipe;
    std::cout << (m.model_dir().empty() ? m.preset() : m.model_dir()) << ", " << in.model.num_layers << " layers, "
              << static_cast<double>(plan.params) / 1e9 << "B parameters; sharding " << r.sharding.name << " (groups of "
              << plan.shard_group << "), precision " << r.precision.name
              << (r.precision.reduce_overridden() ? std::string(" (reduce ") + shardlm::reduce_dtype_name(r.precision.reduce) + ")" : "")
              << ", checkpointing " << r.checkpointing.name()
              << ", offload " << r.offload.name
              << (in.expert_parallel > 1 ? ", expert parallel " + std::to_string(in.expert_parallel) : std::string())
              << (!r.adapter.active() ? std::string()
                                      : ", adapter " + std::string(r.adapter.name) + " rank " + std::to_string(a.rank()) +
                                            " on a " + (r.quant.quantized ? std::string(r.quant.name) : std::string("plain")) +
                                            " base")
              << "; " << world << " GPUs, " << std::min(gpus_per_node, world) << " per host; micro-batch " << o.micro_batch()
              << " x seq " << o.seq_len() << "\n"
              << plan.table() << "\n"
              << (plan.gpu_peak() <= gpu_gib * plan.gib ? "fits" : "does NOT fit") << " in " << gpu_gib << " GiB per GPU\n";
    return 0;
  });
}
