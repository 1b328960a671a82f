#pragma once
// Where this process sits in a job: its rank, the world size, its rank on the node and where to meet the
// others. Read from the torchrun variables (set by shardlm_launch, torchrun or a user's script) or from
// Slurm's; a process started alone is rank 0 of 1.
#include <cstdlib>
#include <optional>
#include <string>
#include <string_view>

#include "shardlm/core/errors.hpp"

namespace shardlm::dist {

struct LaunchEnv {
  int rank = 0, world_size = 1;
  int local_rank = 0, local_world_size = 1;
  std::string master_addr = "127.0.0.1";
  int master_port = 29500;
  std::string source = "single process";  ///< "torchrun variables", "Slurm" or "single process"
  /// torchrun (elastic agent) already serves the TCPStore at MASTER_ADDR:MASTER_PORT: every rank is a client.
  bool agent_store = false;

  bool distributed() const { return world_size > 1; }
  int node() const { return rank / local_world_size; }
  int num_nodes() const { return world_size / local_world_size; }

  /// The environment of this process; errors name the variable that is missing or wrong.
  static LaunchEnv from_environment();
};

namespace env_detail {

inline std::optional<std::string> getenv_str(const char* name) {
  const char* v = std::getenv(name);
  if (!v || !*v) return std::nullopt;
  return std::string(v);
}

inline int env_int(const char* name, const std::string& value, int lo, int hi) {
  size_t used = 0;
  long v = 0;
  try {
    v = std::stol(value, &used);
  } catch (const std::exception&) {
    used = 0;
  }
  if (used != value.size() || used == 0) fail<ConfigError>("environment variable ", name, "='", value, "' is not an integer");
  if (v < lo || v > hi) fail<ConfigError>("environment variable ", name, "=", v, " must lie in [", lo, ", ", hi, "]");
  return static_cast<int>(v);
}

inline int require_int(const char* name, int lo, int hi, const char* why) {
  const auto v = getenv_str(name);
  if (!v) fail<ConfigError>("environment variable ", name, " is not set (", why, ")");
  return env_int(name, *v, lo, hi);
}

/// The first host of a Slurm node list: "gpu[07-09,12],cpu1" -> "gpu07".
inline std::string first_slurm_host(std::string_view list) {
  const auto comma = list.find(',');
  const auto bracket = list.find('[');
  if (bracket == std::string_view::npos || (comma != std::string_view::npos && comma < bracket))
    return std::string(list.substr(0, comma));
  const auto close = list.find(']', bracket);
  if (close == std::string_view::npos) fail<ConfigError>("SLURM_JOB_NODELIST='", list, "' has an unclosed '['");
  auto range = list.substr(bracket + 1, close - bracket - 1);
  range = range.substr(0, range.find_first_of(",-"));
  return std::string(list.substr(0, bracket)) + std::string(range);
}

}  // namespace env_detail

inline LaunchEnv LaunchEnv::from_environment() {
  using env_detail::getenv_str, env_detail::env_int, env_detail::require_int;
  LaunchEnv e;
  constexpr int kMaxRanks = 1 << 20;
  if (getenv_str("RANK") || getenv_str("WORLD_SIZE")) {
    e.source = "torchrun variables";
    e.agent_store = getenv_str("TORCHELASTIC_USE_AGENT_STORE").value_or("") == "True";
    e.world_size = require_int("WORLD_SIZE", 1, kMaxRanks, "RANK is set, so the job is distributed");
    e.rank = require_int("RANK", 0, e.world_size - 1, "WORLD_SIZE is set, so the job is distributed");
    const auto lws = getenv_str("LOCAL_WORLD_SIZE");
    e.local_world_size = lws ? env_int("LOCAL_WORLD_SIZE", *lws, 1, e.world_size) : e.world_size;
    const auto lr = getenv_str("LOCAL_RANK");
    e.local_rank = lr ? env_int("LOCAL_RANK", *lr, 0, e.local_world_size - 1) : e.rank % e.local_world_size;
  } else if (getenv_str("SLURM_PROCID")) {
    e.source = "Slurm";
    e.world_size = require_int("SLURM_NTASKS", 1, kMaxRanks, "SLURM_PROCID is set");
    e.rank = require_int("SLURM_PROCID", 0, e.world_size - 1, "SLURM_PROCID is set");
    e.local_rank = require_int("SLURM_LOCALID", 0, kMaxRanks, "SLURM_PROCID is set");
    if (const auto per_node = getenv_str("SLURM_NTASKS_PER_NODE")) {
      e.local_world_size = env_int("SLURM_NTASKS_PER_NODE", per_node->substr(0, per_node->find('(')), 1, e.world_size);
    } else {
      e.local_world_size = e.world_size;  // one node unless told otherwise
    }
    if (e.local_rank >= e.local_world_size)
      fail<ConfigError>("SLURM_LOCALID=", e.local_rank, " is not below SLURM_NTASKS_PER_NODE=", e.local_world_size);
    if (!getenv_str("MASTER_ADDR")) {
      const auto nodes = getenv_str("SLURM_JOB_NODELIST");
      if (!nodes && e.world_size > 1)
        fail<ConfigError>("neither MASTER_ADDR nor SLURM_JOB_NODELIST is set: cannot tell where rank 0 runs");
      if (nodes) e.master_addr = env_detail::first_slurm_host(*nodes);
    }
  } else {
    return e;
  }
  if (e.world_size % e.local_world_size != 0)
    fail<ConfigError>("world size ", e.world_size, " is not a multiple of the ranks per node (", e.local_world_size,
                      "): every node must run the same number of ranks");
  if (e.world_size > 1) {
    const auto addr = getenv_str("MASTER_ADDR");
    if (addr) e.master_addr = *addr;
    else if (e.source != "Slurm") fail<ConfigError>("environment variable MASTER_ADDR is not set (the host of rank 0)");
    const auto port = getenv_str("MASTER_PORT");
    if (port) e.master_port = env_int("MASTER_PORT", *port, 1, 65535);
    else if (e.source != "Slurm") fail<ConfigError>("environment variable MASTER_PORT is not set (rank 0's rendezvous port)");
  }
  return e;
}

}  // namespace shardlm::dist
