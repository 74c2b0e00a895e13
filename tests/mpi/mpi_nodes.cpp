// Work lands on every node: each task reports the node it ran on (Slurm's
// name for it where Slurm launched the rank, else the host name), and the
// root checks that every rank's node ran tasks, from the results and from
// the insights. Used by the fake two-node Slurm cluster test.
//
// `mpi_nodes spread` (4 ranks): long tasks, as many per worker on every
// node, each worker runs as many, on the first call of their code (no task
// time known) as on the next.
#include <procpool/mpi.hpp>

#include <unistd.h>

#include <chrono>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <map>
#include <string>
#include <thread>
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

/// A long task that needs no CPU (the test's 16 workers share 2 cores):
/// only how the tasks were dealt decides when the call ends.
int long_task_worker(int ms) {
  std::this_thread::sleep_for(std::chrono::milliseconds(ms));
  return static_cast<int>(::getpid());
}

int spread(procpool::mpi::Session& session) {
  constexpr unsigned workers_per_node = 4;
  procpool::mpi::Pool pool({.processes = workers_per_node * static_cast<unsigned>(session.size()),
                            .warn_oversubscription = false});
  const unsigned workers = pool.processes();
  MPI_CHECK_MSG(workers == workers_per_node * static_cast<unsigned>(session.size()),
                "run it with 4 ranks on one host: " + std::to_string(workers) + " workers");
  pool.map([](int x) { return x; }, std::vector<int>(200, 1));  // every worker started
  constexpr int rounds = 4;
  const auto chunks_so_far = [&pool] {
    std::uint64_t chunks = 0;
    for (const auto& node : pool.insights().per_node)
      chunks += node.chunks;
    return chunks;
  };
  for (const char* which : {"first", "second"}) {
    std::map<int, int> tasks_per_worker;
    const std::uint64_t chunks_before = chunks_so_far();
    for (int pid : pool.map(&long_task_worker, std::vector<int>(rounds * workers, 100)))
      ++tasks_per_worker[pid];
    // Long tasks go one per worker per chunk (fewer near the end): the
    // second call too, from the first one's estimate. Batched replies that
    // counted as no time once pulled it to 7-16 ms, and the second call went
    // in chunks of 8 and more.
    const std::uint64_t chunks = chunks_so_far() - chunks_before;
    MPI_CHECK_MSG(chunks >= rounds * std::uint64_t{workers} / workers_per_node,
                  std::string(which) + " call: " + std::to_string(chunks) + " node chunks for " +
                      std::to_string(rounds * workers) + " long tasks");
    std::string counts;
    for (const auto& [pid, n] : tasks_per_worker)
      counts.append(" ").append(std::to_string(n));
    std::fprintf(stderr, "mpi_nodes spread: %s call: tasks per worker:%s\n", which, counts.c_str());
    // A worker that ran one more than its share made the call a round longer
    // (25 % here): 3 to 5 each with node chunks sized by work.
    MPI_CHECK_MSG(tasks_per_worker.size() == workers,
                  std::string(which) + " call: " + std::to_string(tasks_per_worker.size()) +
                      " of " + std::to_string(workers) + " workers ran tasks");
    for (const auto& [pid, n] : tasks_per_worker)
      MPI_CHECK_MSG(n == rounds, std::string(which) + " call: worker " + std::to_string(pid) +
                                     " ran " + std::to_string(n) + " tasks, not " +
                                     std::to_string(rounds) + ":" + counts);
  }
  std::fprintf(stderr, "mpi_nodes spread: OK\n");
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  procpool::mpi::Session session(argc, argv);
  if (argc > 1 && std::strcmp(argv[1], "spread") == 0) return spread(session);
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
