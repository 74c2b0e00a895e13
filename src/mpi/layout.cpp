#include "layout.hpp"

#include <sched.h>
#include <unistd.h>

#include <algorithm>
#include <bit>
#include <cstdlib>
#include <map>
#include <numeric>
#include <string>

namespace procpool::mpi::detail {
namespace {

bool overlap(const std::vector<std::uint64_t>& a, const std::vector<std::uint64_t>& b) {
  if (a.empty() || b.empty()) return true;  // unknown: assume they see the same CPUs
  for (std::size_t i = 0; i < std::min(a.size(), b.size()); ++i) {
    if ((a[i] & b[i]) != 0) return true;
  }
  return false;
}

/// Indices of the ranks on each node, in the order a remainder is given out:
/// every rank but the root, by rank, then the root.
std::map<std::string, std::vector<std::size_t>> ranks_by_node(const std::vector<RankPlace>& ranks) {
  std::map<std::string, std::vector<std::size_t>> nodes;
  for (std::size_t r = 1; r < ranks.size(); ++r)
    nodes[ranks[r].node].push_back(r);
  if (!ranks.empty()) nodes[ranks[0].node].push_back(0);
  return nodes;
}

/// The CPUs that the ranks of one sharing group can run workers on together.
unsigned group_capacity(const std::vector<RankPlace>& ranks,
                        const std::vector<std::size_t>& group) {
  unsigned smallest = ranks[group.front()].usable_cpus;
  unsigned largest = smallest;
  unsigned sum = 0;
  bool identical = true;
  bool known = true;
  std::vector<std::uint64_t> all;
  for (std::size_t r : group) {
    const RankPlace& p = ranks[r];
    smallest = std::min(smallest, p.usable_cpus);
    largest = std::max(largest, p.usable_cpus);
    sum += p.usable_cpus;
    identical = identical && p.affinity == ranks[group.front()].affinity;
    known = known && !p.affinity.empty();
    all.resize(std::max(all.size(), p.affinity.size()), 0);
    for (std::size_t i = 0; i < p.affinity.size(); ++i)
      all[i] |= p.affinity[i];
  }
  // Same CPU set: each rank's count (its cgroup, its Slurm share) already is the node's.
  if (identical) return smallest;
  if (!known) return largest;
  unsigned in_union = 0;
  for (std::uint64_t word : all)
    in_union += static_cast<unsigned>(std::popcount(word));
  return std::max(1u, std::min(in_union, sum));
}

}  // namespace

std::vector<RankShare> share_nodes(const std::vector<RankPlace>& ranks) {
  std::vector<RankShare> shares(ranks.size());
  for (const auto& [node, members] : ranks_by_node(ranks)) {
    for (std::size_t i = 0; i < members.size(); ++i) {
      shares[members[i]].position = static_cast<unsigned>(i);
      shares[members[i]].node_ranks = static_cast<unsigned>(members.size());
    }
    // Sharing groups: ranks whose CPU sets overlap, directly or through another.
    std::vector<std::size_t> group_of(members.size());
    std::iota(group_of.begin(), group_of.end(), std::size_t{0});
    for (std::size_t i = 0; i < members.size(); ++i) {
      for (std::size_t j = i + 1; j < members.size(); ++j) {
        if (!overlap(ranks[members[i]].affinity, ranks[members[j]].affinity)) continue;
        const std::size_t from = group_of[j], to = group_of[i];
        for (std::size_t& g : group_of)
          g = g == from ? to : g;
      }
    }
    for (std::size_t g = 0; g < members.size(); ++g) {
      std::vector<std::size_t> group;  // in the node's order
      for (std::size_t i = 0; i < members.size(); ++i) {
        if (group_of[i] == g) group.push_back(members[i]);
      }
      if (group.empty()) continue;
      const unsigned capacity = group_capacity(ranks, group);
      const auto size = static_cast<unsigned>(group.size());
      for (unsigned i = 0; i < size; ++i)
        shares[group[i]].automatic = capacity / size + (i < capacity % size ? 1 : 0);
    }
  }
  return shares;
}

std::vector<std::string> narrow_binding_warnings(const std::vector<RankPlace>& ranks) {
  std::vector<std::string> lines;
  for (const auto& [node, members] : ranks_by_node(ranks)) {
    bool bound = false;
    unsigned node_cpus = 0;  // the fewest any of its ranks could use unbound
    std::vector<std::uint64_t> all;
    for (std::size_t r : members) {
      const RankPlace& p = ranks[r];
      if (p.affinity.empty() || p.cpus_unbound == 0) {
        bound = false;  // unknown: say nothing
        break;
      }
      bound = bound || p.bound_by_mpirun;
      node_cpus = node_cpus == 0 ? p.cpus_unbound : std::min(node_cpus, p.cpus_unbound);
      all.resize(std::max(all.size(), p.affinity.size()), 0);
      for (std::size_t i = 0; i < p.affinity.size(); ++i)
        all[i] |= p.affinity[i];
    }
    if (!bound) continue;
    unsigned used = 0;
    for (std::uint64_t word : all)
      used += static_cast<unsigned>(std::popcount(word));
    if (used >= node_cpus) continue;
    lines.push_back("procpool::mpi: mpirun bound the " + std::to_string(members.size()) +
                    " rank(s) on node " + node + " to " + std::to_string(used) + " of the " +
                    std::to_string(node_cpus) +
                    " CPUs they could use (mpirun binds each rank to a core by default for two "
                    "ranks or fewer, else to a socket): their workers share those " +
                    std::to_string(used) +
                    "; launch with `mpirun --bind-to "
                    "none` (one rank per node: `--map-by ppr:1:node --bind-to none`) to use all " +
                    std::to_string(node_cpus));
  }
  return lines;
}

unsigned split_workers(unsigned per_node, const RankShare& share) {
  const unsigned n = std::max(1u, share.node_ranks);
  return per_node / n + (share.position < per_node % n ? 1 : 0);
}

std::size_t count_nodes(const std::vector<RankPlace>& ranks) {
  return ranks_by_node(ranks).size();
}

std::vector<std::uint64_t> this_affinity() {
  cpu_set_t set;
  CPU_ZERO(&set);
  if (::sched_getaffinity(0, sizeof set, &set) != 0) return {};
  std::vector<std::uint64_t> words(CPU_SETSIZE / 64, 0);
  for (int cpu = 0; cpu < CPU_SETSIZE; ++cpu) {
    if (CPU_ISSET(cpu, &set))
      words[static_cast<std::size_t>(cpu) / 64] |= std::uint64_t{1} << (cpu % 64);
  }
  while (!words.empty() && words.back() == 0)
    words.pop_back();
  return words;
}

std::string this_node_name() {
  // Slurm's name for the node: the same as the host name on a real cluster,
  // and what tells apart the nodes of a cluster faked on one host.
  if (const char* slurm = std::getenv("SLURMD_NODENAME"); slurm != nullptr && *slurm != '\0') {
    return slurm;
  }
  return this_host_name();
}

std::string this_host_name() {
  char name[256] = {};
  ::gethostname(name, sizeof name - 1);
  return name;
}

}  // namespace procpool::mpi::detail
