// Work lands on every node: each task reports the node it ran on (Slurm's
// name for it where Slurm launched the rank, else the host name), and the
// root checks that every rank's node ran tasks, from the results and from
// the insights. Used by the fake two-node Slurm cluster test.
#include <procpool/mpi.hpp>

#include <unistd.h>

#include <cstdlib>
#include <map>
#include <string>
#include <vector>

#include "mpi_check.hpp"

namespace {

std::string node_of(int) {
  ::usleep(500);
  if (const char* slurm = std::getenv("SLURMD_NODENAME")) return slurm;
  char host[256] = {};
  ::gethostname(host, sizeof host - 1);
  return host;
}

}  // namespace

int main(int argc, char** argv) {
  procpool::mpi::Session session(argc, argv);
  procpool::mpi::Pool pool({.processes = 1});
  std::vector<int> inputs(4000, 0);
  std::map<std::string, int> tasks_per_node;
  for (const std::string& node : pool.map(&node_of, inputs))
    ++tasks_per_node[node];
  for (const auto& [node, n] : tasks_per_node)
    std::fprintf(stderr, "mpi_nodes: %d tasks ran on node %s\n", n, node.c_str());
  const procpool::mpi::Insights in = pool.insights();
  std::fprintf(stderr, "%s", in.to_string().c_str());
  for (const auto& n : in.per_node)
    MPI_CHECK_MSG(n.tasks > 0, "rank " + std::to_string(n.rank) + " ran no task");
  const std::size_t want = static_cast<std::size_t>(
      std::getenv("MPI_NODES_EXPECTED") ? std::atoi(std::getenv("MPI_NODES_EXPECTED")) : 1);
  MPI_CHECK_MSG(tasks_per_node.size() >= want, "tasks ran on " +
                                                   std::to_string(tasks_per_node.size()) +
                                                   " node(s), expected " + std::to_string(want));
  std::fprintf(stderr, "mpi_nodes: OK, %zu node(s)\n", tasks_per_node.size());
  return 0;
}
