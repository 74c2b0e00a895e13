// procpool::mpi's side of bench/compare.py's MPI section, the same work as
// ../shared/baselines/bench_mpi4py.py (mpi4py.futures): run under mpirun,
// prints one JSON line on the root.
//   mpirun -n 3 --oversubscribe --bind-to none mpi_bench [--tiny N] [--cpu N]
//          [--task-ms MS] [--mib M --big N]
//   ... --profile-auto N | --profile-cs1 N | --profile-big N | --profile-inputs N
//          [--retries R]:
//          one warm map of that kind, N times, with its times
//   ... --local 1: the big, inputs and long profiles with procpool::Pool (no mpirun)
//   ... --profile-long N [--sleep 1] [--mixed 1]: N maps of --cpu tasks of --task-ms on a
//          fresh pool, each with its efficiency and how the tasks spread over
//          the workers (--sleep 1: tasks sleep instead of spinning, so that
//          only the dispatch is measured, also on an oversubscribed machine;
//          --mixed 1: lengths of 0.2 to 1.8 times --task-ms, mixed, and the
//          efficiency against the best schedule's time too)
#include <sys/resource.h>
#include <unistd.h>
#include <procpool/mpi.hpp>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <ctime>
#include <map>
#include <numeric>
#include <string>
#include <thread>
#include <vector>

namespace {

using Clock = std::chrono::steady_clock;

double since(Clock::time_point t) {
  return std::chrono::duration<double>(Clock::now() - t).count();
}

double process_cpu_seconds() {
  rusage u{};
  ::getrusage(RUSAGE_SELF, &u);
  return static_cast<double>(u.ru_utime.tv_sec + u.ru_stime.tv_sec) +
         static_cast<double>(u.ru_utime.tv_usec + u.ru_stime.tv_usec) / 1e6;
}

int inc(int x) {
  return x + 1;
}

long spin(double ms) {
  const auto end = Clock::now() + std::chrono::duration<double, std::milli>(ms);
  long n = 0;
  while (Clock::now() < end)
    ++n;
  return n;
}

/// When and where one long task ran (CLOCK_REALTIME: the ranks of one host
/// read the same clock).
struct TaskTrace {
  double start_s;
  double end_s;
  int pid;
  int rank;  // of the node that forked the worker (-1: not known)
};

double realtime_s() {
  timespec t{};
  ::clock_gettime(CLOCK_REALTIME, &t);
  return static_cast<double>(t.tv_sec) + static_cast<double>(t.tv_nsec) / 1e9;
}

/// ms > 0: spins that long; ms < 0: sleeps -ms.
TaskTrace traced_task(double ms) {
  const double start = realtime_s();
  if (ms < 0)
    std::this_thread::sleep_for(std::chrono::duration<double, std::milli>(-ms));
  else
    spin(ms);
  // Open MPI's environment, inherited by the node's workers.
  const char* rank = std::getenv("OMPI_COMM_WORLD_RANK");
  return {start, realtime_s(), static_cast<int>(::getpid()), rank ? std::atoi(rank) : -1};
}

/// PROCPOOL_BENCH_STARTS=1: when each worker started its tasks, by rank, in
/// ms since `t0`.
void print_starts(const std::vector<TaskTrace>& traces, double t0) {
  std::map<std::pair<int, int>, std::vector<double>> starts;
  for (const TaskTrace& t : traces)
    starts[{t.rank, t.pid}].push_back(1e3 * (t.start_s - t0));
  for (auto& [where, list] : starts) {
    std::sort(list.begin(), list.end());
    std::fprintf(stderr, "  rank %d worker %d started tasks at", where.first, where.second);
    for (double v : list)
      std::fprintf(stderr, " %.0f", v);
    std::fputs(" ms\n", stderr);
  }
}

/// --profile-long: each map's efficiency, the most and fewest tasks a worker
/// ran, and how long the last task to start waited past the first.
/// --mixed 1: task lengths spread evenly over 0.2 to 1.8 times --task-ms
/// (mean --task-ms), in an order that mixes them (golden-ratio steps): the
/// last rounds then hold short and long tasks side by side.
std::vector<double> task_lengths(std::size_t count, double task_ms, bool mixed) {
  std::vector<double> ms(count, task_ms);
  if (!mixed) return ms;
  for (std::size_t i = 0; i < count; ++i) {
    const double step = static_cast<double>(i) * 0.6180339887498949;
    ms[i] = task_ms * (0.2 + 1.6 * (step - std::floor(step)));
  }
  return ms;
}

template <class AnyPool>
int profile_long_maps(std::size_t rounds, std::size_t count, double task_ms, bool sleeping,
                      bool mixed, unsigned processes) {
  AnyPool pool({.processes = processes, .warn_oversubscription = false});
  const unsigned workers = pool.processes();
  // Workers started and warm, as in the main run's CPU row: the first map
  // below is then the first of its code, measured with no estimate.
  pool.map(&inc, std::vector<int>(200, 1));
  std::vector<double> lengths = task_lengths(count, task_ms, mixed);
  const double work_s = std::accumulate(lengths.begin(), lengths.end(), 0.0) / 1e3;
  // No schedule ends before its longest task does.
  const double least_s =
      std::max(work_s / workers, *std::max_element(lengths.begin(), lengths.end()) / 1e3);
  if (sleeping) {
    for (double& ms : lengths)
      ms = -ms;
  }
  for (std::size_t r = 0; r < rounds; ++r) {
    const double cpu_before = process_cpu_seconds();
    const double t0 = realtime_s();
    const std::vector<TaskTrace> traces = pool.map(&traced_task, lengths);
    const double wall = realtime_s() - t0;
    // The root's own threads (its node's included), not its workers: what
    // dealing the tasks costs it.
    const double root_cpu_s = process_cpu_seconds() - cpu_before;
    std::map<int, int> per_worker;
    double last_start = 0, first_end = 1e300;
    for (const TaskTrace& t : traces) {
      ++per_worker[t.pid];
      last_start = std::max(last_start, t.start_s - t0);
      first_end = std::min(first_end, t.end_s - t0);
    }
    if (std::getenv("PROCPOOL_BENCH_STARTS") != nullptr) print_starts(traces, t0);
    int most = 0, fewest = 1 << 30;
    for (const auto& [pid, n] : per_worker) {
      most = std::max(most, n);
      fewest = std::min(fewest, n);
    }
    std::printf(
        "map %zu: %zu x %s%.0f ms on %u workers: %.1f ms, efficiency %.3f (of the best "
        "schedule's %.1f ms: %.3f); %zu workers ran tasks, %d to %d each; first task ended at "
        "%.1f ms, last started at %.1f ms; root CPU %.1f ms\n",
        r, count, mixed ? "mean " : "", task_ms, workers, 1e3 * wall, work_s / (wall * workers),
        1e3 * least_s, least_s / wall, per_worker.size(), fewest, most, 1e3 * first_end,
        1e3 * last_start, 1e3 * root_cpu_s);
  }
  return 0;
}

std::vector<char> big(int mib) {
  return std::vector<char>(static_cast<std::size_t>(mib) << 20, 'x');
}

std::size_t size_of(const std::vector<char>& input) {
  return input.size();
}

double peak_rss_mb() {
  rusage u{};
  ::getrusage(RUSAGE_SELF, &u);
  return static_cast<double>(u.ru_maxrss) / 1024.0;
}

/// --profile-inputs: `rounds` warm maps over `count` inputs of `mib` MiB.
template <class AnyPool>
int profile_input_maps(std::size_t rounds, std::size_t count, int mib, unsigned processes,
                       unsigned retries) {
  AnyPool pool({.processes = processes, .retries = retries});
  const std::vector<std::vector<char>> inputs(count, big(mib));
  const double rss_before = peak_rss_mb();
  for (std::size_t r = 0; r < rounds; ++r) {
    const double cpu_before = process_cpu_seconds();
    const auto t0 = Clock::now();
    const auto sizes = pool.map(&size_of, inputs);
    const double s = since(t0);
    std::printf("warm map over %zu x %d MiB inputs: %.1f ms, %.3f GB/s, root CPU %.1f ms\n", count,
                mib, 1e3 * s,
                static_cast<double>(count) * static_cast<double>(std::size_t(mib) << 20) / s / 1e9,
                1e3 * (process_cpu_seconds() - cpu_before));
    if (sizes.size() != count || sizes.front() != std::size_t(mib) << 20) return 1;
  }
  std::printf("root peak RSS: %.1f MB with the inputs, %.1f MB more over the maps\n", rss_before,
              peak_rss_mb() - rss_before);
  return 0;
}

/// --profile-big: `rounds` warm maps of `count` results of `mib` MiB.
template <class AnyPool>
int profile_result_maps(std::size_t rounds, std::size_t count, int mib, unsigned processes,
                        unsigned retries) {
  AnyPool pool({.processes = processes, .retries = retries});
  pool.map(&big, std::vector<int>(2, 1));
  const double rss_before = peak_rss_mb();
  for (std::size_t r = 0; r < rounds; ++r) {
    const double cpu_before = process_cpu_seconds();
    const auto t0 = Clock::now();
    const auto results = pool.map(&big, std::vector<int>(count, mib));
    const double s = since(t0);
    std::printf("warm map of %zu x %d MiB: %.1f ms, %.3f GB/s, root CPU %.1f ms\n", count, mib,
                1e3 * s,
                static_cast<double>(count) * static_cast<double>(std::size_t(mib) << 20) / s / 1e9,
                1e3 * (process_cpu_seconds() - cpu_before));
  }
  std::printf("root peak RSS: %.1f MB before, %.1f MB more over the maps (results held: %.1f MB)\n",
              rss_before, peak_rss_mb() - rss_before,
              static_cast<double>(count) * static_cast<double>(mib) * 1.048576);
  if constexpr (requires { pool.insights().per_node; }) {
    if (std::getenv("PROCPOOL_BENCH_INSIGHTS") != nullptr)
      std::fputs(pool.insights().to_string().c_str(), stderr);
  }
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  std::size_t tiny = 20000, cpu = 64, nbig = 64;
  double task_ms = 50;
  int mib = 16;
  unsigned processes = 0;  // workers per rank; 0: its usable CPUs
  // --profile-auto N: only the warm automatic tiny map, N times (to profile
  // it, e.g. under perf); prints each time.
  std::size_t profile_auto = 0;
  // --profile-cs1 N: only the warm tiny map with chunksize 1, N times.
  std::size_t profile_cs1 = 0;
  // --profile-big N: only the warm map of --big results of --mib MiB, N times.
  std::size_t profile_big = 0;
  // --profile-inputs N: only the warm map over --big inputs of --mib MiB, N
  // times; prints the root's peak RSS too.
  std::size_t profile_inputs = 0;
  bool local = false;    // --local: see the profiles below
  unsigned retries = 0;  // --retries R: Options::retries of the profiled pools
  std::size_t profile_long = 0;
  bool sleeping = false;  // --sleep 1: --profile-long's tasks sleep
  bool mixed = false;     // --mixed 1: --profile-long's tasks of mixed lengths
  for (int i = 1; i + 1 < argc; i += 2) {
    const std::string k = argv[i];
    const char* v = argv[i + 1];
    if (k == "--tiny") tiny = std::strtoull(v, nullptr, 10);
    if (k == "--cpu") cpu = std::strtoull(v, nullptr, 10);
    if (k == "--task-ms") task_ms = std::strtod(v, nullptr);
    if (k == "--mib") mib = std::atoi(v);
    if (k == "--big") nbig = std::strtoull(v, nullptr, 10);
    if (k == "--processes") processes = static_cast<unsigned>(std::strtoul(v, nullptr, 10));
    if (k == "--profile-auto") profile_auto = std::strtoull(v, nullptr, 10);
    if (k == "--profile-cs1") profile_cs1 = std::strtoull(v, nullptr, 10);
    if (k == "--profile-big") profile_big = std::strtoull(v, nullptr, 10);
    if (k == "--profile-inputs") profile_inputs = std::strtoull(v, nullptr, 10);
    if (k == "--local") local = std::atoi(v) != 0;
    if (k == "--retries") retries = static_cast<unsigned>(std::strtoul(v, nullptr, 10));
    if (k == "--profile-long") profile_long = std::strtoull(v, nullptr, 10);
    if (k == "--sleep") sleeping = std::atoi(v) != 0;
    if (k == "--mixed") mixed = std::atoi(v) != 0;
  }
  procpool::mpi::Session session(argc, argv);
  std::vector<int> xs(tiny);
  for (std::size_t i = 0; i < tiny; ++i)
    xs[i] = static_cast<int>(i);

  if (profile_long != 0) {
    if (local)
      return profile_long_maps<procpool::Pool>(profile_long, cpu, task_ms, sleeping, mixed,
                                               processes);
    return profile_long_maps<procpool::mpi::Pool>(profile_long, cpu, task_ms, sleeping, mixed,
                                                  processes);
  }

  if (profile_auto != 0 || profile_cs1 != 0) {
    const std::size_t chunksize = profile_cs1 != 0 ? 1 : 0;
    procpool::mpi::Pool pool({.processes = processes, .chunksize = chunksize, .retries = retries});
    pool.map(&inc, std::vector<int>(200, 1));
    for (std::size_t r = 0; r < profile_auto + profile_cs1; ++r) {
      const double cpu_before = process_cpu_seconds();
      const auto t0 = Clock::now();
      pool.map(&inc, xs);
      const double s = since(t0);
      std::printf("warm %s map of %zu: %.3f ms, %.0f tasks/s, root CPU %.1f ns/task\n",
                  chunksize == 1 ? "chunksize-1" : "automatic", tiny, 1e3 * s,
                  static_cast<double>(tiny) / s,
                  1e9 * (process_cpu_seconds() - cpu_before) / static_cast<double>(tiny));
    }
    if (std::getenv("PROCPOOL_BENCH_INSIGHTS") != nullptr)
      std::fputs(pool.insights().to_string().c_str(), stderr);
    return 0;
  }

  // --local 1: the same profiles with procpool::Pool, what a one-rank job is
  // held against (run it without mpirun).
  if (profile_inputs != 0) {
    if (local)
      return profile_input_maps<procpool::Pool>(profile_inputs, nbig, mib, processes, retries);
    return profile_input_maps<procpool::mpi::Pool>(profile_inputs, nbig, mib, processes, retries);
  }

  if (profile_big != 0) {
    if (local)
      return profile_result_maps<procpool::Pool>(profile_big, nbig, mib, processes, retries);
    return profile_result_maps<procpool::mpi::Pool>(profile_big, nbig, mib, processes, retries);
  }

  // Tiny tasks, end to end with automatic chunking: pool start + map + stop.
  auto t = Clock::now();
  unsigned workers = 0;
  {
    procpool::mpi::Pool pool({.processes = processes});
    workers = pool.processes();
    pool.map(&inc, xs);
  }
  const double auto_s = since(t);

  procpool::mpi::Pool pool({.processes = processes});
  pool.map(&inc, std::vector<int>(200, 1));  // warm up
  // The same with the pool already started: what mpi4py.futures' chunked
  // row measures.
  const double auto_cpu_before = process_cpu_seconds();
  t = Clock::now();
  pool.map(&inc, xs);
  const double warm_auto_s = since(t);
  const double auto_root_cpu_s = process_cpu_seconds() - auto_cpu_before;
  // Again: mpi4py's executor has run a map of the same inputs before its
  // chunked one (its chunksize-1 row); this pool now has too (an automatic
  // one: its chunksize is the pool's).
  t = Clock::now();
  pool.map(&inc, xs);
  const double second_auto_s = since(t);
  double cs1_s = 0;
  double root_cpu_s = 0;
  std::uint64_t root_chunks = 0;
  {
    procpool::mpi::Pool cs1({.processes = processes, .chunksize = 1});
    cs1.map(&inc, std::vector<int>(200, 1));
    const procpool::mpi::Insights before = cs1.insights();
    const double cpu_before = process_cpu_seconds();
    t = Clock::now();
    cs1.map(&inc, xs);
    cs1_s = since(t);
    // The root's own CPU per chunk it dispatched and took back (its node's
    // workers, if any, are other processes): what bounds how many chunks a
    // second one root can serve.
    root_cpu_s = process_cpu_seconds() - cpu_before;
    const procpool::mpi::Insights after = cs1.insights();
    for (std::size_t n = 0; n < after.per_node.size(); ++n)
      root_chunks += after.per_node[n].chunks - before.per_node[n].chunks;
  }
  t = Clock::now();
  pool.map(&spin, std::vector<double>(cpu, task_ms));
  const double cpu_s = since(t);
  t = Clock::now();
  pool.map(&big, std::vector<int>(nbig, mib));
  const double big_s = since(t);
  // PROCPOOL_BENCH_INSIGHTS=1: where the warm pool's time went (the automatic
  // tiny map, the CPU tasks, the big results), per node, on stderr.
  if (std::getenv("PROCPOOL_BENCH_INSIGHTS") != nullptr)
    std::fputs(pool.insights().to_string().c_str(), stderr);

  std::printf(
      "{\"impl\": \"procpool::mpi\", \"ranks\": %d, \"workers\": %u, \"tiny_cs1_tasks_per_s\": "
      "%.1f, "
      "\"tiny_auto_end_to_end_tasks_per_s\": %.1f, \"tiny_auto_tasks_per_s\": %.1f, "
      "\"tiny_auto_second_tasks_per_s\": %.1f, "
      "\"cpu_efficiency\": %.4f, "
      "\"big_results_gbps\": %.4f, \"root_chunks\": %llu, \"root_cpu_us_per_chunk\": %.2f, "
      "\"root_cpu_ns_per_task_auto\": %.1f}\n",
      session.size(), workers, static_cast<double>(tiny) / cs1_s,
      static_cast<double>(tiny) / auto_s, static_cast<double>(tiny) / warm_auto_s,
      static_cast<double>(tiny) / second_auto_s,
      static_cast<double>(cpu) * task_ms / 1000.0 / (cpu_s * workers),
      static_cast<double>(nbig) * static_cast<double>(std::size_t(mib) << 20) / big_s / 1e9,
      static_cast<unsigned long long>(root_chunks),
      root_chunks != 0 ? 1e6 * root_cpu_s / static_cast<double>(root_chunks) : 0.0,
      1e9 * auto_root_cpu_s / static_cast<double>(tiny));
  return 0;
}
