// How the ranks of an MPI job share their nodes: which ranks are on the same
// node, and how many workers each of them forks, so that several ranks on one
// node never run more workers together than the node has usable CPUs (or
// than Options::processes asks of the node). Pure functions: tested without MPI.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

namespace procpool::mpi::detail {

/// Where one rank runs, as it reports itself at start.
struct RankPlace {
  std::string host;
  std::string node;  // SLURMD_NODENAME where Slurm launched it, else the host name
  unsigned usable_cpus = 1;
  std::vector<std::uint64_t> affinity;  // bit i of word i/64: CPU i; empty: unknown
  /// What usable_cpus would be without the affinity (cgroups, Slurm, the
  /// CPUs online); 0: unknown.
  unsigned cpus_unbound = 0;
  bool bound_by_mpirun = false;  // mpirun bound it at launch (its default binding)
};

/// One rank's part of its node.
struct RankShare {
  unsigned automatic = 1;  // workers when Options::processes is 0
  unsigned position = 0;   // its place among its node's ranks when a count is shared out
  unsigned node_ranks = 1;
};

/// Ranks on one node whose CPU sets overlap share those CPUs (mpirun
/// --bind-to none: every rank sees them all); ranks bound to disjoint CPUs
/// (the default binding, or srun's) each keep their own. A remainder goes to
/// the ranks other than the root first: the root also schedules the job.
std::vector<RankShare> share_nodes(const std::vector<RankPlace>& ranks);

/// A rank's part of `per_node` workers shared out among its node's ranks.
unsigned split_workers(unsigned per_node, const RankShare& share);

/// One line per node where mpirun's binding leaves CPUs unused: its ranks
/// together may run on fewer CPUs than the node gives them (Open MPI binds
/// each rank to a core by default for two ranks or fewer, else to a socket),
/// so the pool forks fewer workers there than it could. Says what to do.
std::vector<std::string> narrow_binding_warnings(const std::vector<RankPlace>& ranks);

/// How many distinct nodes the ranks are on.
std::size_t count_nodes(const std::vector<RankPlace>& ranks);

/// This process's affinity mask in RankPlace's form (empty when unknown).
std::vector<std::uint64_t> this_affinity();

/// SLURMD_NODENAME where Slurm launched this process, else the host name.
std::string this_node_name();

/// The host name (what errors and insights call the node).
std::string this_host_name();

}  // namespace procpool::mpi::detail
