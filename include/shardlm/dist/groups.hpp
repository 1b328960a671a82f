#pragma once
// The process groups of a job: rendezvous through c10d's TCPStore at MASTER_ADDR:MASTER_PORT, then three
// communicators over the same ranks:
//   world      every rank (the loss, the token count)
//   shard      the group a unit's parameters are sharded over: ranks [k*G, (k+1)*G) for a shard group size G
//   replicate  the ranks holding the same shard, {j, j+G, j+2G, ...}: gradients are all-reduced over it
// G = 1 is NoShard (DDP), G = world is FullShard / ShardGradOp, 1 < G < world is HybridShard. NCCL for CUDA
// devices, Gloo for the CPU, a group of one where a group has one rank.
// With expert parallelism of N (--expert-parallel), two more:
//   expert       N consecutive ranks [k*N, (k+1)*N): each holds E/N of every MoE layer's experts; tokens travel
//                between them (all-to-all) to their experts
//   expert_data  the ranks holding the same experts, {j, j+N, j+2N, ...} (world/N of them): the experts' parameters
//                are sharded (or replicated) over it as the dense ones are over shard and replicate
#include <torch/csrc/distributed/c10d/TCPStore.hpp>

#include <chrono>
#include <memory>
#include <tuple>
#include <utility>
#include <vector>

#include "shardlm/core/log.hpp"
#include "shardlm/dist/env.hpp"
#include "shardlm/dist/gloo.hpp"
#include "shardlm/dist/nccl.hpp"

namespace shardlm::dist {

class ProcessGroups {
 public:
  /// `shard_group_size` G and `expert_parallel` N must divide the world size; `timeout` bounds the rendezvous and each
  /// group's setup.
  ProcessGroups(const LaunchEnv& env, int shard_group_size, const at::Device& device, std::chrono::seconds timeout,
                int expert_parallel = 1)
      : env_(env), shard_size_(shard_group_size), expert_size_(expert_parallel) {
    const int W = env.world_size;
    if (expert_size_ < 1 || W % expert_size_ != 0)
      fail<ConfigError>("--expert-parallel ", expert_size_, " does not divide the world size ", W,
                        " (WORLD_SIZE): each group of ", expert_size_, " consecutive ranks holds one full set of experts");
    if (shard_size_ < 1 || W % shard_size_ != 0)
      fail<ConfigError>("the world size ", W, " (WORLD_SIZE) is not divisible by the shard group size ", shard_size_,
                        " (--shard-group-size): each group of ", shard_size_, " ranks must hold one full copy");
    if (W == 1) {
      world_ = std::make_shared<SelfCommunicator>("world");
      shard_ = world_, replicate_ = world_, expert_ = world_, expert_data_ = world_;
      return;
    }
    c10d::TCPStoreOptions so;
    so.port = static_cast<uint16_t>(env.master_port);
    so.isServer = env.rank == 0 && !env.agent_store;
    so.numWorkers = W;
    so.waitWorkers = true;
    so.timeout = timeout;
    try {
      store_ = c10::make_intrusive<c10d::TCPStore>(env.master_addr, so);
    } catch (const std::exception& e) {
      const std::string what = e.what();
      fail<Error>("rendezvous at MASTER_ADDR=", env.master_addr, " MASTER_PORT=", env.master_port, " failed for rank ",
                  env.rank, " of ", W, " within ", timeout.count(), " s (--dist-timeout): ",
                  env.rank == 0 ? "not every rank joined" : "rank 0 is not reachable", " [", what.substr(0, what.find('\n')), "]");
    }
    const auto make = [&](const std::string& name, int rank, int size) -> std::shared_ptr<Communicator> {
      if (size == 1) return std::make_shared<SelfCommunicator>(name);
      if (device.is_cuda()) {
#if SHARDLM_WITH_NCCL
        return std::make_shared<NcclCommunicator>(store_, name, rank, size, env.local_rank, timeout);
#else
        fail<ConfigError>("--device cuda with ", W, " ranks needs NCCL, and this build has none (configure with NCCL found)");
#endif
      }
      // One node: loopback. Several: the address the host name resolves to (or GLOO_SOCKET_IFNAME's).
      return std::make_shared<GlooCommunicator>(store_, name, rank, size, env.num_nodes() == 1 ? "127.0.0.1" : "", timeout);
    };
    world_ = make("world", env.rank, W);
    // The world cut into groups of G consecutive ranks (`inner`) and the groups of the ranks at the same place in
    // each (`outer`): the shard and replicate groups, and the expert and expert-data groups. Messages (hang reports)
    // name global ranks.
    const auto split = [&](int G, const char* inner, const char* outer) {
      auto in = G == W ? world_ : make(detail::cat(inner, env.rank / G), env.rank % G, G);
      auto out = G == 1 ? world_ : make(detail::cat(outer, env.rank % G), env.rank / G, W / G);
      std::vector<int> in_members, out_members;
      for (int i = 0; i < G; ++i) in_members.push_back(env.rank / G * G + i);
      for (int i = 0; i < W / G; ++i) out_members.push_back(env.rank % G + i * G);
      if (G != W) in->set_members(in_members);
      if (G != 1) out->set_members(out_members);
      return std::pair{std::move(in), std::move(out)};
    };
    std::tie(shard_, replicate_) = split(shard_size_, "shard", "replicate");
    std::tie(expert_, expert_data_) = split(expert_size_, "expert", "expert_data");
  }

  /// The groups the experts' parameters live in, as the engine's storages see groups: `world` and `expert` as here,
  /// `shard` the expert-data-parallel group when `sharded` (else a group of one) and `replicate` the rest of it.
  ProcessGroups expert_groups(bool sharded) const {
    ProcessGroups g = *this;
    auto self = std::make_shared<SelfCommunicator>("expert shard");
    g.shard_ = sharded ? expert_data_ : self;
    g.replicate_ = sharded ? self : expert_data_;
    g.shard_size_ = g.shard_->size();
    return g;
  }

  Communicator& world() { return *world_; }
  Communicator& shard() { return *shard_; }
  Communicator& replicate() { return *replicate_; }
  /// Expert parallelism: the ranks that exchange tokens (a group of one without it), and those holding the same experts.
  Communicator& expert() { return *expert_; }
  Communicator& expert_data() { return *expert_data_; }
  int expert_parallel() const { return expert_size_; }
  const LaunchEnv& env() const { return env_; }
  int rank() const { return env_.rank; }
  int shard_group_size() const { return shard_size_; }
  int size() const { return env_.world_size; }

 private:
  LaunchEnv env_;
  int shard_size_, expert_size_;
  c10::intrusive_ptr<c10d::Store> store_;
  std::shared_ptr<Communicator> world_, shard_, replicate_, expert_, expert_data_;
};

}  // namespace shardlm::dist
