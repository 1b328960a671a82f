#pragma once
// NUMA placement of a rank's host threads on multi-socket hosts: the host optimizer of an offloaded run streams the
// rank's state through memory, and the pinned buffers its copies use are best near the GPU's PCIe root. Torch-free,
// Linux sysfs.
#include <sched.h>

#include <filesystem>
#include <fstream>
#include <optional>
#include <sstream>
#include <string>
#include <vector>

namespace shardlm::numa {

/// The CPUs of a sysfs cpulist ("0-15,32-47").
inline std::vector<int> parse_cpulist(const std::string& list) {
  std::vector<int> out;
  std::stringstream in(list);
  for (std::string item; std::getline(in, item, ',');) {
    if (item.empty() || item == "\n") continue;
    const auto dash = item.find('-');
    try {
      const int a = std::stoi(item.substr(0, dash)), b = dash == std::string::npos ? a : std::stoi(item.substr(dash + 1));
      for (int c = a; c <= b && c < CPU_SETSIZE; ++c) out.push_back(c);
    } catch (const std::exception&) {
      return {};
    }
  }
  return out;
}

/// The NUMA nodes of this host with CPUs, each with its CPUs.
inline std::vector<std::vector<int>> nodes() {
  std::vector<std::vector<int>> out;
  for (int n = 0;; ++n) {
    std::ifstream in("/sys/devices/system/node/node" + std::to_string(n) + "/cpulist");
    if (!in) break;
    std::string list;
    std::getline(in, list);
    out.push_back(parse_cpulist(list));
  }
  return out;
}

/// The NUMA node of a PCI device ("0000:17:00.0", as cudaDeviceGetPCIBusId writes it), if the host says.
inline std::optional<int> node_of_pci(std::string bus_id) {
  for (auto& c : bus_id) c = static_cast<char>(std::tolower(static_cast<unsigned char>(c)));
  std::ifstream in("/sys/bus/pci/devices/" + bus_id + "/numa_node");
  int node = -1;
  if (!(in >> node) || node < 0) return std::nullopt;
  return node;
}

/// Binds the calling thread (and the threads it starts later) to the CPUs of NUMA node `node` that it may run on,
/// when its current affinity spans several nodes (a launcher that already bound it is left alone). Returns the CPUs
/// bound to (empty: nothing done).
inline std::vector<int> bind_to_node(int node) {
  const auto all = nodes();
  if (all.size() < 2 || node < 0 || node >= static_cast<int>(all.size())) return {};
  cpu_set_t mine;
  CPU_ZERO(&mine);
  if (sched_getaffinity(0, sizeof mine, &mine) != 0) return {};
  int spanned = 0;
  for (const auto& cpus : all) {
    bool any = false;
    for (int c : cpus) any = any || CPU_ISSET(c, &mine);
    spanned += any ? 1 : 0;
  }
  if (spanned < 2) return {};
  cpu_set_t want;
  CPU_ZERO(&want);
  std::vector<int> bound;
  for (int c : all[static_cast<size_t>(node)])
    if (CPU_ISSET(c, &mine)) CPU_SET(c, &want), bound.push_back(c);
  if (bound.empty() || sched_setaffinity(0, sizeof want, &want) != 0) return {};
  return bound;
}

}  // namespace shardlm::numa
