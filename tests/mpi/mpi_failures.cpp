// What must never happen, each case a mode of this program:
//   errors       a task throws / crashes / times out on some node: that task's
//                error (global index, node named), or its retry; the rest goes on
//   kill_rank    rank 1 is SIGKILLed mid-call: the job must end, non-zero, naming it
//   stop_rank    rank 1 stops (SIGSTOP) mid-call: its inputs fail within seconds,
//                naming it, the rest is right, and the job ends non-zero
//   stop_rank_abort_hangs  the same, and MPI_Abort never returns (see below):
//                the job must end all the same
//   stop_rank_idle  rank 1 stops between calls: insights() gives up on it, and the
//                job ends non-zero, naming it
//   stop_rank_retries  as stop_rank, with retries: its inputs run on another node
//   stop_rank_a_while  with no limit (0): rank 1 stops for ~4 s, the root waits for it
//   stop_rank_lending  rank 1 stops while large inputs are sent to it from the
//                caller's memory: the job ends at once, non-zero, naming it
//   stop_rank_copied  the same with inputs copied into their messages (not
//                lent): they fail naming it, the rest goes on, the job ends at the end
//   long_tasks   tasks longer than the silence limit give up on no node
//   root_pauses  the root stops for longer than the limit, then goes on: no node given up on
//   root_stops   the root stops for good (PROCPOOL_MPI_ROOT_TIMEOUT=2): its
//                nodes give up on it and end the job, non-zero, saying why
//   slow_inputs  large inputs crossing for longer than the limit: no node given up on
//   root_throws  the root throws out of main: every rank must end
//   root_throws_caught  ... and the exception is caught past the Session: status 0
//   long         runs until interrupted (Ctrl-C / scancel tests)
//   identity     the same-binary check refuses a wrong executable identity
//   broken_node  a node that cannot run a pool's tasks (its workers die as
//                they start, its initializer throws) sends them back and the
//                other nodes run them; with no node left, each input fails
//   cannot_fork  rank 1 cannot start processes (ulimit -u, made with seccomp):
//                it sends its inputs back, the other nodes run them
#include <procpool/mpi.hpp>

#include <dlfcn.h>
#include <linux/audit.h>
#include <linux/filter.h>
#include <linux/seccomp.h>
#include <mpi.h>
#include <sched.h>
#include <signal.h>
#include <sys/prctl.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <chrono>
#include <cstddef>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <mutex>
#include <set>
#include <stdexcept>
#include <string>
#include <thread>
#include <utility>
#include <vector>

#include "../helpers.hpp"
#include "mpi_check.hpp"

namespace {
bool abort_hangs = false;  // mode stop_rank_abort_hangs
}  // namespace

// MPI's profiling interface: this program's MPI_Abort is the one procpool
// calls. In mode stop_rank_abort_hangs it never returns, as Open MPI's has
// been seen not to with a rank stopped: the job must end all the same.
extern "C" int MPI_Abort(MPI_Comm comm, int code) {
  if (abort_hangs) {
    std::fprintf(stderr, "mpi_failures: MPI_Abort hangs (stop_rank_abort_hangs)\n");
    for (;;)
      ::pause();
  }
  return PMPI_Abort(comm, code);
}

namespace {

int throws_on_7(int x) {
  if (x % 500 == 7) throw std::invalid_argument("bad input " + std::to_string(x));
  return x;
}
int crashes_on_1234(int x) {
  if (x == 1234) ::raise(SIGSEGV);
  return x;
}
int hangs_on_77(int x) {
  if (x == 77) ::sleep(30);
  return x;
}
/// The job's marker files of crashes_once start with this (one name for
/// every rank of the job: the root removes them all at the end).
std::string retry_marker_prefix() {
  const char* job = std::getenv("PMIX_NAMESPACE");
  return "procpool-mpi-retry-" + std::string(job != nullptr ? job : "solo") + "-";
}
/// Crashes the first time it runs an input on a node (marker file per node
/// process tree), succeeds when retried there (with 2 retries over 2 nodes:
/// the third run is back on the first node).
int crashes_once(int x) {
  if (x % 100 == 3) {
    const std::string marker =
        "/tmp/" + retry_marker_prefix() + std::to_string(::getppid()) + "-" + std::to_string(x);
    if (std::ifstream(marker).good()) return x;
    std::ofstream(marker) << "ran";
    ::raise(SIGKILL);
  }
  return x;
}
/// An input whose load() crashes when told to (a decoder that segfaults on
/// bad data, say). It is decoded in a worker, never in a rank.
struct CrashesWhenLoaded {
  int value = 0;
  std::string name;
  bool crash = false;
  template <class Archive>
  void save(Archive& ar) const {
    ar(value, name, crash);
  }
  template <class Archive>
  void load(Archive& ar) {
    ar(value, name, crash);
    if (crash) std::abort();
  }
};
int value_of(const CrashesWhenLoaded& in) {
  return in.value;
}

/// This process's MPI rank as its launcher set it (mpirun, srun --mpi=pmix),
/// for a worker as for its rank; null without a launcher.
const char* launcher_rank() {
  const char* rank = std::getenv("OMPI_COMM_WORLD_RANK");
  return rank != nullptr ? rank : std::getenv("PMIX_RANK");
}
bool on_rank_1() {
  const char* rank = launcher_rank();
  return rank != nullptr && std::strcmp(rank, "1") == 0;
}
/// Its worker dies whenever it runs on rank 1's node; anywhere else it works.
int dies_on_rank_1(int x) {
  if (on_rank_1()) ::raise(SIGKILL);
  return x;
}
int kills_rank_1(int x) {
  if (x >= 300 && on_rank_1()) ::kill(::getppid(), SIGKILL);
  ::usleep(2000);
  return x;
}

struct Model {
  int scale = 3;
};
/// A node without what the initializer needs, two ways: its workers exit as
/// they start (a missing library), or its initializer throws (a missing file).
Model init_exits_on_rank_1() {
  if (on_rank_1()) ::_exit(3);
  return {};
}
Model init_throws_on_rank_1() {
  if (on_rank_1()) throw std::runtime_error("no model file on this node");
  return {};
}
Model init_exits_everywhere() {
  ::_exit(3);
}
int use_model(Model& m, int x) {
  return m.scale * x;
}
int use_model_slowly(Model& m, int x) {
  ::usleep(20000);
  return m.scale * x;
}

std::vector<int> range(int n) {
  std::vector<int> v(static_cast<std::size_t>(n));
  for (int i = 0; i < n; ++i)
    v[static_cast<std::size_t>(i)] = i;
  return v;
}

template <class E>
const procpool::mpi::ErrorLocation& location(const E& e) {
  auto* at = dynamic_cast<const procpool::mpi::ErrorLocation*>(&e);
  MPI_CHECK_MSG(at != nullptr, std::string("no node on: ") + e.what());
  return *at;
}

/// Where always_crashes notes each run of input x: a file per input, a line
/// per run with the rank it ran on (one name for every rank of the job).
std::string runs_file(int x) {
  const char* job = std::getenv("PMIX_NAMESPACE");
  return "/tmp/procpool-mpi-runs-" + std::string(job != nullptr ? job : "solo") + "-" +
         std::to_string(x);
}
int always_crashes(int x) {
  const char* rank = std::getenv("OMPI_COMM_WORLD_RANK");
  std::ofstream(runs_file(x), std::ios::app) << (rank != nullptr ? rank : "0") << "\n";
  ::raise(SIGKILL);
  return x;
}
std::vector<int> ranks_it_ran_on(int x) {
  std::vector<int> ranks;
  std::ifstream in(runs_file(x));
  for (int r = 0; in >> r;)
    ranks.push_back(r);
  return ranks;
}

/// retries = 2 across nodes: a task that always crashes runs 3 times, never
/// twice in a row on one node, and fails with the last run's WorkerCrashed.
void retries_run_out() {
  procpool::mpi::Pool pool({.processes = 2, .retries = 2});
  const int n = 6;
  for (int x = 0; x < n; ++x)
    std::remove(runs_file(x).c_str());
  const auto outcomes = pool.map_outcomes(&always_crashes, range(n));
  for (const auto& o : outcomes) {
    MPI_CHECK(!o.ok());
    const std::vector<int> ranks = ranks_it_ran_on(static_cast<int>(o.index));
    MPI_CHECK_MSG(ranks.size() == 3, std::to_string(ranks.size()) + " runs");
    MPI_CHECK(ranks[0] != ranks[1] && ranks[1] != ranks[2]);
    try {
      std::rethrow_exception(o.error);
    } catch (const procpool::WorkerCrashed& e) {
      MPI_CHECK(e.index() == o.index);
      MPI_CHECK_MSG(location(e).rank() == ranks[2], e.what());
    }
    std::remove(runs_file(static_cast<int>(o.index)).c_str());
  }
}

/// Whether rank 1 and another node have workers in `layout` (under mpirun):
/// what the cases that single out rank 1's node need.
bool rank_1_and_another_have_workers(const procpool::mpi::Insights& layout) {
  unsigned with_workers = 0;
  for (const auto& n : layout.per_node)
    with_workers += n.processes != 0 ? 1 : 0;
  return with_workers >= 2 && layout.per_node.size() >= 2 && layout.per_node[1].processes != 0 &&
         launcher_rank() != nullptr;
}

/// A node whose workers die on every task (its memory, a library, a disk):
/// with retries, its tasks run again on another node and the call succeeds;
/// without, each fails naming rank 1.
void retries_move_to_another_node() {
  procpool::mpi::Pool moving({.processes = 2, .retries = 1});
  if (!rank_1_and_another_have_workers(moving.insights())) {
    std::fprintf(stderr,
                 "mpi_failures: retries across nodes need rank 1 and another with "
                 "workers; skipped in this layout\n");
    return;
  }
  const auto start = std::chrono::steady_clock::now();
  MPI_CHECK(moving.map(&dies_on_rank_1, range(40)) == range(40));
  // Submitted tasks too, and a dropped Future's task still runs (join waits for it).
  std::vector<procpool::mpi::Future<int>> futures;
  for (int i = 0; i < 6; ++i)
    futures.push_back(moving.submit(&dies_on_rank_1, i));
  (void)moving.submit(&dies_on_rank_1, 99);
  for (int i = 0; i < 6; ++i)
    MPI_CHECK(futures[static_cast<std::size_t>(i)].get() == i);
  moving.close();
  moving.join();  // the dropped Future's task too
  const auto after = moving.insights();
  MPI_CHECK_MSG(after.per_node[1].moved_away > 0, after.to_string());
  MPI_CHECK_MSG(after.unobserved_errors == 0, after.to_string());
  for (std::size_t n = 0; n < after.per_node.size(); ++n)
    MPI_CHECK_MSG(n == 1 || after.per_node[n].moved_away == 0, after.to_string());
  MPI_CHECK_MSG(after.to_string().find("ran again on another node") != std::string::npos,
                after.to_string());
  retries_run_out();
  std::fprintf(stderr, "retried elsewhere: %llu task(s) from rank 1, in %.2f s\n",
               static_cast<unsigned long long>(after.per_node[1].moved_away),
               std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count());
  // Without retries, the tasks that ran on rank 1 fail, each naming it.
  procpool::mpi::Pool plain({.processes = 2});
  std::size_t failed = 0;
  for (const auto& o : plain.map_outcomes(&dies_on_rank_1, range(40))) {
    if (o.ok()) {
      MPI_CHECK(*o.value == static_cast<int>(o.index));
      continue;
    }
    try {
      std::rethrow_exception(o.error);
    } catch (const procpool::WorkerCrashed& e) {
      MPI_CHECK(location(e).rank() == 1);
      ++failed;
    }
  }
  MPI_CHECK(failed > 0);
}

int throws_always(int x) {
  throw std::runtime_error("dropped task " + std::to_string(x));
}

/// The errors of dropped Futures' tasks, as procpool::Pool says them: each to
/// the pool's handler (the pool's end waits for it), or else the first ten
/// on stderr and a line that says the rest are counted; insights() counts
/// them all and keeps the first ten messages. A handler may use the pools:
/// ask for insights (which wait for every node's reply), run and end a pool.
void dropped_future_errors() {
  constexpr int dropped = 24;
  constexpr int waited_then_dropped = 4;
  std::mutex seen_mutex;
  std::vector<std::string> seen;
  procpool::mpi::Insights after;
  {
    procpool::mpi::Pool pool({.processes = 2});
    bool first = true;
    pool.set_error_handler([&](std::exception_ptr e) {
      if (std::exchange(first, false)) {
        MPI_CHECK(pool.insights().unobserved_errors >= 1);
        procpool::mpi::Pool inner({.processes = 1});
        MPI_CHECK(inner.map(&throws_on_7, range(5)) == range(5));
      }
      // Slow, so that the pool's end has to wait for it.
      std::this_thread::sleep_for(std::chrono::milliseconds(5));
      try {
        std::rethrow_exception(e);
      } catch (const procpool::TaskError& error) {
        MPI_CHECK_MSG(std::string(error.what()).find("(on node ") != std::string::npos,
                      error.what());
        std::lock_guard lock(seen_mutex);
        seen.push_back(error.remote_what());
      }
    });
    for (int i = 0; i < dropped; ++i)
      (void)pool.submit(&throws_always, i);
    // Their replies in, never read: said as they are dropped.
    std::vector<procpool::mpi::Future<int>> waited;
    for (int i = dropped; i < dropped + waited_then_dropped; ++i)
      waited.push_back(pool.submit(&throws_always, i));
    for (auto& f : waited)
      f.wait();
    waited.clear();
    pool.close();
    pool.join();
    after = pool.insights();
  }
  MPI_CHECK_MSG(seen.size() == dropped + waited_then_dropped,
                std::to_string(seen.size()) + " errors seen");
  for (int i = 0; i < dropped + waited_then_dropped; ++i) {
    const std::string what = "dropped task " + std::to_string(i);
    MPI_CHECK_MSG(std::ranges::count(seen, what) == 1, what);
  }
  MPI_CHECK_MSG(after.unobserved_errors == dropped + waited_then_dropped, after.to_string());
  MPI_CHECK_MSG(after.unobserved_error_messages.size() == 10, after.to_string());
  MPI_CHECK_MSG(after.to_string().find("(first: ") != std::string::npos, after.to_string());

  // Without a handler: the first ten on stderr, then one line (stderr goes
  // to a file while the pool lives; the destructor has said them all).
  char path[] = "/tmp/procpool_dropped_XXXXXX";
  const int file = ::mkstemp(path);
  MPI_CHECK(file >= 0);
  std::fflush(stderr);
  const int saved = ::dup(2);
  ::dup2(file, 2);
  {
    procpool::mpi::Pool pool({.processes = 2});
    for (int i = 0; i < dropped; ++i)
      (void)pool.submit(&throws_always, i);
  }
  std::fflush(stderr);
  ::dup2(saved, 2);
  ::close(saved);
  ::close(file);
  std::ifstream said(path);
  std::size_t lines = 0;
  std::size_t counted_line = 0;
  for (std::string line; std::getline(said, line);) {
    lines += line.find("a task whose Future was dropped failed: ") != std::string::npos;
    counted_line +=
        line.find("more errors of dropped futures are only counted") != std::string::npos;
  }
  ::unlink(path);
  MPI_CHECK_MSG(lines == 10 && counted_line == 1, std::to_string(lines) + " lines of errors, " +
                                                      std::to_string(counted_line) +
                                                      " saying the rest are counted");
}

void errors(int nodes) {
  procpool::mpi::Pool pool({.processes = 2});
  const std::vector<int> inputs = range(3000);

  // map throws the first failing input's TaskError, in input order, naming its node.
  try {
    pool.map(&throws_on_7, inputs);
    MPI_CHECK(false);
  } catch (const procpool::TaskError& e) {
    MPI_CHECK(e.index() == 7);
    MPI_CHECK(e.type_name() == "std::invalid_argument");
    MPI_CHECK(e.remote_what() == "bad input 7");
    MPI_CHECK_MSG(std::string(e.what()).find("(on node ") != std::string::npos, e.what());
    location(e);
  }

  // map_outcomes: every failing input alone, with its global index; some on other nodes.
  auto outcomes = pool.map_outcomes(&throws_on_7, inputs);
  std::vector<bool> failed_on_rank(static_cast<std::size_t>(nodes), false);
  for (const auto& o : outcomes) {
    if (o.index % 500 == 7) {
      MPI_CHECK(!o.ok());
      try {
        std::rethrow_exception(o.error);
      } catch (const procpool::TaskError& e) {
        MPI_CHECK(e.index() == o.index);
        MPI_CHECK(e.remote_what() == "bad input " + std::to_string(o.index));
        failed_on_rank[static_cast<std::size_t>(location(e).rank())] = true;
      }
    } else {
      MPI_CHECK(o.ok() && *o.value == static_cast<int>(o.index));
    }
  }
  if (nodes > 1) {
    bool remote = false;
    for (std::size_t r = 1; r < failed_on_rank.size(); ++r)
      remote = remote || failed_on_rank[r];
    MPI_CHECK_MSG(remote, "no failing task ran on another rank");
  }

  // A crash costs its task only.
  auto crashed = pool.map_outcomes(&crashes_on_1234, inputs);
  for (const auto& o : crashed) {
    if (o.index == 1234) {
      try {
        std::rethrow_exception(o.error);
      } catch (const procpool::WorkerCrashed& e) {
        MPI_CHECK(e.index() == 1234);
#if defined(__SANITIZE_ADDRESS__) || defined(__SANITIZE_THREAD__)
        // The sanitizer runtime catches the segfault and exits with a status itself.
        MPI_CHECK(e.signal() == SIGSEGV || e.exit_status() != 0);
#else
        MPI_CHECK(e.signal() == SIGSEGV);
#endif
        std::fprintf(stderr, "as expected: %s\n", e.what());
      }
    } else {
      MPI_CHECK(o.ok());
    }
  }
  // The pool goes on after it.
  MPI_CHECK(pool.map(&throws_on_7, std::vector<int>{1, 2, 3}) == (std::vector<int>{1, 2, 3}));

  // An input whose load() crashes costs that input only: nodes pass inputs
  // on to their workers undecoded, so it crashes a worker, not a rank (which
  // would abort the MPI job).
  {
    std::vector<CrashesWhenLoaded> loaded(40);
    for (std::size_t i = 0; i < loaded.size(); ++i) {
      loaded[i].value = static_cast<int>(i);
      loaded[i].name = "input " + std::to_string(i);
    }
    loaded[23].crash = true;
    const auto decoded = pool.map_outcomes(&value_of, loaded);
    MPI_CHECK(decoded.size() == loaded.size());
    for (const auto& o : decoded) {
      if (o.index != 23) {
        MPI_CHECK(o.ok() && *o.value == static_cast<int>(o.index));
        continue;
      }
      MPI_CHECK(!o.ok());  // (rethrowing a null error is undefined)
      try {
        std::rethrow_exception(o.error);
      } catch (const procpool::WorkerCrashed& e) {
        MPI_CHECK(e.index() == 23);
        // A sanitizer's runtime may end the worker with a status itself.
        MPI_CHECK_MSG(
            e.signal() == SIGABRT || (test_helpers::under_sanitizer && e.exit_status() != 0),
            e.what());
        location(e);
        std::fprintf(stderr, "as expected: %s\n", e.what());
      }
    }
  }

  // A timeout costs its task only, promptly.
  {
    procpool::mpi::Pool timed({.processes = 2, .task_timeout = std::chrono::milliseconds(500)});
    const auto start = std::chrono::steady_clock::now();
    auto timed_out = timed.map_outcomes(&hangs_on_77, range(300));
    MPI_CHECK(std::chrono::steady_clock::now() - start < std::chrono::seconds(15));
    for (const auto& o : timed_out) {
      if (o.index == 77) {
        try {
          std::rethrow_exception(o.error);
        } catch (const procpool::TaskTimeout& e) {
          MPI_CHECK(e.index() == 77);
          std::fprintf(stderr, "as expected: %s\n", e.what());
        }
      } else {
        MPI_CHECK(o.ok());
      }
    }
  }

  // Retries: a task whose worker died runs again and succeeds. Each death
  // forks a new worker from a rank whose other threads (ours, Open MPI's)
  // allocate all the while; under GCC 12's sanitizers such a child can wait
  // forever for the allocator's lock, in its first operator new (seen here
  // under ASan in 2 runs of 3; the same as peers.recycling, whose comment in
  // tests/CMakeLists.txt says more). glibc's malloc is locked around fork(),
  // so the debug and release builds run these.
  if (!test_helpers::under_sanitizer) {
    procpool::mpi::Pool retrying({.processes = 2, .retries = 2});
    auto got = retrying.map(&crashes_once, range(1000));
    for (const auto& entry : std::filesystem::directory_iterator("/tmp"))
      if (entry.path().filename().string().starts_with(retry_marker_prefix()))
        std::filesystem::remove(entry.path());
    MPI_CHECK(got == range(1000));
    retries_move_to_another_node();
  }
  dropped_future_errors();
  std::fprintf(stderr, "mpi_failures errors: OK on %d node(s)\n", nodes);
}

std::vector<int> scaled(int n) {
  std::vector<int> v = range(n);
  for (int& x : v)
    x *= 3;
  return v;
}

/// Rank 1 cannot run the pool's tasks (`init`): every input runs on the
/// other nodes, rank 1 is out of rotation for the pool's later calls, and
/// the insights say why.
template <class Init>
void one_node_broken(Init init, const char* why) {
  const auto start = std::chrono::steady_clock::now();
  // Several workers on rank 1: some die (or fail) after its pool broke,
  // and their tasks must go back all the same.
  procpool::mpi::Pool pool({.processes = 6}, init);
  MPI_CHECK(pool.map(&use_model, range(3000)) == scaled(3000));
  MPI_CHECK(pool.map(&use_model_slowly, range(40)) == scaled(40));
  auto futures = std::vector<procpool::mpi::Future<int>>{};
  for (int i = 0; i < 4; ++i)
    futures.push_back(pool.submit(&use_model, i));
  for (int i = 0; i < 4; ++i)
    MPI_CHECK(futures[static_cast<std::size_t>(i)].get() == 3 * i);
  const auto first = pool.insights();
  const auto& rank_1 = first.per_node[1];
  MPI_CHECK_MSG(rank_1.out_of_rotation.find(why) != std::string::npos, first.to_string());
  MPI_CHECK_MSG(rank_1.processes == 0 && rank_1.sent_back > 0, first.to_string());
  MPI_CHECK_MSG(first.diagnosis.find("could not run this pool's tasks") != std::string::npos,
                first.to_string());
  MPI_CHECK_MSG(first.to_string().find("out of rotation") != std::string::npos, first.to_string());
  // Later calls of the pool leave rank 1 alone.
  auto outcomes = pool.map_outcomes(&use_model, range(500));
  for (const auto& o : outcomes)
    MPI_CHECK(o.ok() && *o.value == 3 * static_cast<int>(o.index));
  const auto second = pool.insights();
  MPI_CHECK_MSG(second.per_node[1].chunks == rank_1.chunks, second.to_string());
  const double took =
      std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  MPI_CHECK_MSG(took < 30, std::to_string(took) + " s");
  std::fprintf(stderr, "rank 1 out of rotation (%s): %llu input(s) sent back, %.2f s\n%s", why,
               static_cast<unsigned long long>(rank_1.sent_back), took, first.to_string().c_str());
}

/// No node can run the pool's tasks: each input fails with why, naming its
/// node, in bounded time; nothing hangs.
void every_node_broken() {
  const auto start = std::chrono::steady_clock::now();
  procpool::mpi::Pool pool({.processes = 2}, &init_exits_everywhere);
  try {
    pool.map(&use_model, range(1000));
    MPI_CHECK(false);
  } catch (const procpool::Error& e) {
    MPI_CHECK_MSG(std::string(e.what()).find("died while starting") != std::string::npos, e.what());
    location(e);
  }
  std::size_t failed = 0;
  for (const auto& o : pool.map_outcomes(&use_model, range(200))) {
    MPI_CHECK(!o.ok());
    try {
      std::rethrow_exception(o.error);
    } catch (const procpool::Error& e) {
      location(e);
      ++failed;
    }
  }
  MPI_CHECK(failed == 200);
  const double took =
      std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  MPI_CHECK_MSG(took < 30, std::to_string(took) + " s");
  std::fprintf(stderr, "every node broken: every input failed in %.2f s\n%s", took,
               pool.insights().to_string().c_str());
}

void broken_node() {
  every_node_broken();
  if (!rank_1_and_another_have_workers(procpool::mpi::Pool({.processes = 2}).insights())) {
    std::fprintf(stderr, "mpi_failures broken_node: one node: out of rotation skipped\n");
    return;
  }
  one_node_broken(&init_exits_on_rank_1, "died while starting");
  one_node_broken(&init_throws_on_rank_1, "no model file on this node");
  std::fprintf(stderr, "mpi_failures broken_node: OK\n");
}

/// Makes this process unable to start processes, as `ulimit -u` does to a
/// user at their limit (which does not bind root, as CI runs): fork, vfork
/// and clone without CLONE_THREAD fail with EAGAIN; threads still start
/// (clone3 says ENOSYS, so glibc makes them with clone). A seccomp filter,
/// installed before MPI_Init on the one rank that is to be such a node.
void cannot_start_processes() {
#if defined(__x86_64__)
  constexpr auto errno_is = [](int e) {
    return static_cast<std::uint32_t>(SECCOMP_RET_ERRNO) | static_cast<std::uint32_t>(e);
  };
  const auto arch_at = static_cast<std::uint32_t>(offsetof(seccomp_data, arch));
  const auto nr_at = static_cast<std::uint32_t>(offsetof(seccomp_data, nr));
  const auto flags_at =
      static_cast<std::uint32_t>(offsetof(seccomp_data, args));  // args[0], low half
  sock_filter filter[] = {
      BPF_STMT(BPF_LD | BPF_W | BPF_ABS, arch_at),
      BPF_JUMP(BPF_JMP | BPF_JEQ | BPF_K, AUDIT_ARCH_X86_64, 1, 0),
      BPF_STMT(BPF_RET | BPF_K, SECCOMP_RET_ALLOW),
      BPF_STMT(BPF_LD | BPF_W | BPF_ABS, nr_at),
      BPF_JUMP(BPF_JMP | BPF_JEQ | BPF_K, SYS_fork, 0, 1),
      BPF_STMT(BPF_RET | BPF_K, errno_is(EAGAIN)),
      BPF_JUMP(BPF_JMP | BPF_JEQ | BPF_K, SYS_vfork, 0, 1),
      BPF_STMT(BPF_RET | BPF_K, errno_is(EAGAIN)),
      BPF_JUMP(BPF_JMP | BPF_JEQ | BPF_K, SYS_clone3, 0, 1),
      BPF_STMT(BPF_RET | BPF_K, errno_is(ENOSYS)),
      BPF_JUMP(BPF_JMP | BPF_JEQ | BPF_K, SYS_clone, 1, 0),
      BPF_STMT(BPF_RET | BPF_K, SECCOMP_RET_ALLOW),
      BPF_STMT(BPF_LD | BPF_W | BPF_ABS, flags_at),
      BPF_JUMP(BPF_JMP | BPF_JSET | BPF_K, CLONE_THREAD, 0, 1),
      BPF_STMT(BPF_RET | BPF_K, SECCOMP_RET_ALLOW),
      BPF_STMT(BPF_RET | BPF_K, errno_is(EAGAIN)),
  };
  sock_fprog program{static_cast<unsigned short>(std::size(filter)), filter};
  MPI_CHECK(::prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) == 0);
  MPI_CHECK(::prctl(PR_SET_SECCOMP, SECCOMP_MODE_FILTER, &program) == 0);
#endif
}

/// Rank 1 cannot start a process (cannot_start_processes): its pool cannot
/// be made at all, so it sends every input back and the others run them.
void cannot_fork() {
#if !defined(__x86_64__)
  std::fprintf(stderr, "mpi_failures cannot_fork: the seccomp filter is for x86-64; skipped\n");
  return;
#endif
  const auto start = std::chrono::steady_clock::now();
  procpool::mpi::Pool pool({.processes = 2});
  MPI_CHECK(pool.map(&throws_on_7, std::vector<int>{1, 2, 3, 4}) == (std::vector<int>{1, 2, 3, 4}));
  MPI_CHECK(pool.map(&dies_on_rank_1, range(2000)) == range(2000));
  MPI_CHECK(pool.submit(&dies_on_rank_1, 5).get() == 5);
  const auto seen = pool.insights();
  const auto& rank_1 = seen.per_node[1];
  MPI_CHECK_MSG(rank_1.out_of_rotation.find("no worker could start") != std::string::npos,
                seen.to_string());
  MPI_CHECK_MSG(rank_1.processes == 0 && rank_1.sent_back > 0 && rank_1.tasks == 0,
                seen.to_string());
  const double took =
      std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  MPI_CHECK_MSG(took < 30, std::to_string(took) + " s");
  std::fprintf(stderr, "mpi_failures cannot_fork: OK in %.2f s\n%s", took,
               seen.to_string().c_str());
}

void kill_rank() {
  procpool::mpi::Pool pool({.processes = 2});
  pool.map(&kills_rank_1, range(4000));
  std::fprintf(stderr, "mpi_failures kill_rank: the call returned although rank 1 died\n");
}

/// Rank 1's pid, from one of its workers; 0 if no task ran there.
pid_t rank_1_pid(procpool::mpi::Pool& pool) {
  const auto parents =
      pool.map([](int) { return on_rank_1() ? static_cast<long>(::getppid()) : 0L; }, range(200));
  for (long pid : parents)
    if (pid != 0) return static_cast<pid_t>(pid);
  return 0;
}

/// Has a shell continue `pid` (SIGCONT) `seconds` from now, once the tests
/// have stopped it.
void continue_in(int seconds, pid_t pid) {
  const std::string later = "(sleep " + std::to_string(seconds) + "; kill -CONT " +
                            std::to_string(pid) + ") >/dev/null 2>&1 </dev/null &";
  MPI_CHECK(std::system(later.c_str()) == 0);
}

/// The same 10 s from now. The root gives up on it long before; but Open
/// MPI's own end of the job may wait for a stopped rank (SIGTERM does not
/// end a stopped process), which on a real frozen machine is the batch
/// system's to end (scancel, the time limit).
void continue_in_10_seconds(pid_t pid) {
  continue_in(10, pid);
}

/// Rank 1's pid, for a case that stops rank 1 (`mode`) and needs another
/// node with workers to go on; it is continued 10 s from now (30 s in mode
/// stop_rank_abort_hangs).
pid_t rank_1_to_stop(procpool::mpi::Pool& pool, const char* mode) {
  if (!rank_1_and_another_have_workers(pool.insights())) {
    std::fprintf(stderr, "mpi_failures %s: needs rank 1 and another with workers\n", mode);
    std::exit(1);
  }
  const pid_t stopped = rank_1_pid(pool);
  MPI_CHECK_MSG(stopped != 0, "no task ran on rank 1");
  // With an MPI_Abort that hangs, the root ends the job some other way after
  // 10 s: rank 1 must still be stopped then.
  if (abort_hangs) {
    continue_in(30, stopped);
  } else {
    continue_in_10_seconds(stopped);
  }
  return stopped;
}

/// Checks the outcomes of a call in which rank 1 stopped: each value is
/// `expected(index)`, each failure names rank 1 and says that its node has
/// not answered. Returns how many failed.
template <class Outcomes, class Expected>
std::size_t failed_with_rank_1(const Outcomes& outcomes, Expected expected) {
  std::size_t failed = 0;
  for (const auto& o : outcomes) {
    if (o.ok()) {
      MPI_CHECK(*o.value == expected(o.index));
      continue;
    }
    ++failed;
    try {
      std::rethrow_exception(o.error);
    } catch (const procpool::Error& e) {
      MPI_CHECK_MSG(location(e).rank() == 1, e.what());
      MPI_CHECK_MSG(std::string(e.what()).find("input " + std::to_string(o.index) +
                                               " did not finish: its node has not answered") !=
                        std::string::npos,
                    e.what());
    }
  }
  return failed;
}

/// Rank 1 stops (SIGSTOP: as a frozen machine or a cut network looks to the
/// root) in the middle of a call, with PROCPOOL_MPI_NODE_TIMEOUT=2: within a
/// few seconds its inputs fail naming it, every other input is right, the
/// pool goes on without it, and the job ends non-zero at the Session's end.
void stop_rank() {
  procpool::mpi::Pool pool({.processes = 2, .chunksize = 1});
  const pid_t stopped = rank_1_to_stop(pool, "stop_rank");
  const auto start = std::chrono::steady_clock::now();
  const auto outcomes = pool.map_outcomes(
      [](int x, long rank_1) {
        if (x >= 300 && on_rank_1()) ::kill(static_cast<pid_t>(rank_1), SIGSTOP);
        ::usleep(1000);
        return x * 3;
      },
      range(1500), static_cast<long>(stopped));
  const double took =
      std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  const std::size_t failed =
      failed_with_rank_1(outcomes, [](std::size_t i) { return 3 * static_cast<int>(i); });
  MPI_CHECK_MSG(failed > 0, "no input failed");
  MPI_CHECK_MSG(took < 10, std::to_string(took) + " s");  // before it goes on (above)
  // The pool goes on without it.
  MPI_CHECK(pool.map([](int x) { return x + 1; }, range(500)) == [] {
    auto v = range(500);
    for (int& x : v)
      ++x;
    return v;
  }());
  const auto after = pool.insights();
  MPI_CHECK_MSG(after.per_node[1].out_of_rotation.find("has not answered") != std::string::npos,
                after.to_string());
  MPI_CHECK_MSG(after.per_node[1].processes == 0, after.to_string());
  std::fprintf(stderr, "mpi_failures stop_rank: %zu inputs failed with rank 1, after %.2f s\n",
               failed, took);
  // A pool whose only workers would be rank 1's: each input fails, saying why.
  procpool::mpi::Pool solo({.processes = 1});
  bool others = false;
  const auto layout = solo.insights();
  for (std::size_t n = 0; n < layout.per_node.size(); ++n)
    others = others || (n != 1 && layout.per_node[n].processes != 0);
  const auto solo_outcomes = solo.map_outcomes([](int x) { return x; }, range(20));
  MPI_CHECK(solo_outcomes.size() == 20);
  for (const auto& o : solo_outcomes) {
    if (others) {
      MPI_CHECK(o.ok() && *o.value == static_cast<int>(o.index));
      continue;
    }
    MPI_CHECK(!o.ok());
    try {
      std::rethrow_exception(o.error);
    } catch (const procpool::Error& e) {
      MPI_CHECK_MSG(std::string(e.what()).find("no node with workers is left") != std::string::npos,
                    e.what());
    }
  }
  std::fprintf(stderr, "mpi_failures stop_rank: a pool of %s: %s\n",
               others ? "other nodes" : "rank 1 only", others ? "ran" : "each input failed");
}

/// The same with retries: the inputs rank 1 held run again on another node
/// (read again from the range), and every result is right.
void stop_rank_retries() {
  procpool::mpi::Pool pool({.processes = 2, .chunksize = 1, .retries = 1});
  const pid_t stopped = rank_1_to_stop(pool, "stop_rank_retries");
  const auto start = std::chrono::steady_clock::now();
  const std::vector<int> inputs = range(1500);
  const auto out = pool.map(
      [](int x, long rank_1) {
        // The task that stops rank 1 never gets its reply home: it runs again elsewhere.
        if (x >= 300 && on_rank_1()) ::kill(static_cast<pid_t>(rank_1), SIGSTOP);
        ::usleep(1000);
        return x * 3;
      },
      inputs, static_cast<long>(stopped));
  const double took =
      std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  MPI_CHECK(out.size() == inputs.size());
  for (std::size_t i = 0; i < out.size(); ++i)
    MPI_CHECK(out[i] == 3 * static_cast<int>(i));
  MPI_CHECK_MSG(took < 10, std::to_string(took) + " s");  // before it goes on (above)
  const auto after = pool.insights();
  MPI_CHECK_MSG(after.per_node[1].out_of_rotation.find("has not answered") != std::string::npos,
                after.to_string());
  std::fprintf(stderr, "mpi_failures stop_rank_retries: every result right after %.2f s\n", took);
}

/// PROCPOOL_MPI_NODE_TIMEOUT=0: rank 1 stops mid-call for ~4 s, and the root
/// waits for it instead of giving up: every result is right, the job ends 0.
void stop_rank_a_while() {
  procpool::mpi::Pool pool({.processes = 2, .chunksize = 1});
  if (!rank_1_and_another_have_workers(pool.insights())) {
    std::fprintf(stderr, "mpi_failures stop_rank_a_while: needs rank 1 and another with workers\n");
    std::exit(1);
  }
  const pid_t stopped = rank_1_pid(pool);
  MPI_CHECK_MSG(stopped != 0, "no task ran on rank 1");
  continue_in(4, stopped);
  const auto start = std::chrono::steady_clock::now();
  const auto out = pool.map(
      [](int x, long rank_1) {
        static bool stopped_once = false;  // in this worker
        if (x >= 100 && on_rank_1() && !stopped_once) {
          stopped_once = true;
          ::kill(static_cast<pid_t>(rank_1), SIGSTOP);
        }
        ::usleep(1000);
        return x * 3;
      },
      range(1500), static_cast<long>(stopped));
  const double took =
      std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  for (std::size_t i = 0; i < out.size(); ++i)
    MPI_CHECK(out[i] == 3 * static_cast<int>(i));
  MPI_CHECK_MSG(took >= 3, std::to_string(took) + " s: rank 1 did not stop");
  for (const auto& node : pool.insights().per_node)
    MPI_CHECK_MSG(node.out_of_rotation.empty(), node.out_of_rotation);
  std::fprintf(stderr, "mpi_failures stop_rank_a_while: waited for rank 1, %.2f s\n", took);
}

/// Rank 1 stops while idle, between calls: insights() asks it for its row
/// and gives up on it after PROCPOOL_MPI_NODE_TIMEOUT (its row says why, its
/// workers no longer count), and the Session's end ends the job non-zero,
/// naming it.
void stop_rank_idle() {
  procpool::mpi::Pool pool({.processes = 1, .chunksize = 1});
  const pid_t stopped = rank_1_pid(pool);
  MPI_CHECK_MSG(stopped != 0, "no task ran on rank 1");
  const auto before = pool.insights();
  MPI_CHECK(before.per_node.size() >= 2 && before.per_node[1].processes == 1);
  continue_in_10_seconds(stopped);
  ::kill(stopped, SIGSTOP);
  std::fprintf(stderr, "mpi_failures stop_rank_idle: rank 1 (pid %d) stopped\n",
               static_cast<int>(stopped));
  const auto start = std::chrono::steady_clock::now();
  const auto after = pool.insights();
  const double took =
      std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  MPI_CHECK_MSG(took < 10, std::to_string(took) + " s");  // before it goes on (above)
  MPI_CHECK_MSG(after.per_node[1].out_of_rotation.find("has not answered") != std::string::npos,
                after.to_string());
  MPI_CHECK_MSG(after.per_node[1].processes == 0 && after.per_node[1].pool.workers.empty(),
                after.to_string());
  MPI_CHECK_MSG(after.processes == before.processes - 1 && pool.processes() == after.processes,
                after.to_string());
  std::fprintf(stderr, "mpi_failures stop_rank_idle: insights gave up on rank 1 after %.2f s\n",
               took);
}

/// Rank 1 stops, and then a call sends it large inputs from the caller's
/// memory (lent, not copied: see Writer::lend_blocks). MPI cannot take such
/// a send back, and the node might read the caller's memory after the call
/// returned, should it come back: giving up on it ends the job at once,
/// non-zero, naming it, instead of failing its inputs. (Its first piece
/// waits for the stopped rank's go-ahead, so the send is still on its way
/// when the root gives up.)
void stop_rank_lending() {
  procpool::mpi::Pool pool({.processes = 1, .chunksize = 1});
  const pid_t stopped = rank_1_pid(pool);
  MPI_CHECK_MSG(stopped != 0, "no task ran on rank 1");
  continue_in_10_seconds(stopped);
  ::kill(stopped, SIGSTOP);
  std::vector<std::vector<char>> inputs;
  for (int i = 0; i < 4; ++i)
    inputs.emplace_back(std::size_t{8} << 20, static_cast<char>('a' + i));
  std::fprintf(stderr, "mpi_failures stop_rank_lending: rank 1 (pid %d) stopped\n",
               static_cast<int>(stopped));
  pool.map([](const std::vector<char>& v) { return v.size(); }, inputs);
  MPI_CHECK_MSG(false, "the map returned: the job should have ended while it sent rank 1 inputs");
}

/// Rank 1 stops while inputs too small to be lent (copied into their
/// messages, which MPI may hold as long as it likes) are on their way to it:
/// those inputs fail naming it and the rest of the call goes on, as in
/// stop_rank; the job ends (non-zero) only at the Session's end.
void stop_rank_copied() {
  procpool::mpi::Pool pool({.processes = 2, .chunksize = 1});
  const pid_t stopped = rank_1_to_stop(pool, "stop_rank_copied");
  ::kill(stopped, SIGSTOP);
  std::vector<std::vector<char>> inputs;
  for (int i = 0; i < 12; ++i)
    inputs.emplace_back(std::size_t{512} << 10, static_cast<char>('a' + i));  // < 1 MiB: copied
  std::fprintf(stderr, "mpi_failures stop_rank_copied: rank 1 (pid %d) stopped\n",
               static_cast<int>(stopped));
  const auto outcomes = pool.map_outcomes(
      [](const std::vector<char>& v) { return static_cast<int>(v.at(v.size() / 2)); }, inputs);
  const std::size_t failed =
      failed_with_rank_1(outcomes, [](std::size_t i) { return 'a' + static_cast<int>(i); });
  MPI_CHECK_MSG(failed > 0, "no input failed");
  MPI_CHECK_MSG(failed < inputs.size(), "every input failed");
  std::fprintf(stderr, "mpi_failures stop_rank_copied: %zu of %zu inputs failed with rank 1\n",
               failed, inputs.size());
}

/// The root itself stops for longer than PROCPOOL_MPI_NODE_TIMEOUT (as in a
/// debugger, or a paused machine), then goes on: that is no node's silence,
/// and no node is given up on.
void root_pauses() {
  procpool::mpi::Pool pool({.processes = 2, .chunksize = 1});
  const pid_t root = ::getpid();
  const pid_t pauser = ::fork();
  if (pauser == 0) {
    ::usleep(500000);
    ::kill(root, SIGSTOP);
    ::sleep(3);
    ::kill(root, SIGCONT);
    ::_exit(0);
  }
  MPI_CHECK(pauser > 0);
  const auto out = pool.map(
      [](int x) {
        ::usleep(200000);
        return x;
      },
      range(30));
  ::waitpid(pauser, nullptr, 0);
  MPI_CHECK(out == range(30));
  for (const auto& node : pool.insights().per_node)
    MPI_CHECK_MSG(node.out_of_rotation.empty(), node.out_of_rotation);
}

/// The root stops (SIGSTOP: what a root on a frozen machine or behind a cut
/// network looks like to its nodes; neither mpirun nor srun notices) between calls, with
/// PROCPOOL_MPI_ROOT_TIMEOUT=2: its nodes give up on it and end the job, non-zero, naming it.
/// (Continued 8 s later: mpirun may wait for a stopped rank as it ends the job.)
void root_stops() {
  procpool::mpi::Pool pool({.processes = 1});
  MPI_CHECK(pool.map([](int x) { return x * 3; }, range(40)).size() == 40);
  continue_in(8, ::getpid());
  std::fprintf(stderr, "mpi_failures root_stops: the root stops\n");
  std::fflush(stderr);
  ::raise(SIGSTOP);
  std::fprintf(stderr,
               "mpi_failures root_stops: the root goes on: the nodes did not end the job\n");
  std::exit(1);
}

/// Large inputs (32 MiB each, in pieces of 1 MiB: PROCPOOL_MPI_MAX_PIECE)
/// that take about as long to cross as PROCPOOL_MPI_NODE_TIMEOUT (0.5 s in
/// the test): the nodes answer pings while they receive, and no node is given up on.
void slow_large_inputs() {
  procpool::mpi::Pool pool({.processes = 2});
  std::vector<std::vector<char>> inputs;
  for (int i = 0; i < 6; ++i)
    inputs.emplace_back(std::size_t{32} << 20, static_cast<char>('a' + i));
  const auto start = std::chrono::steady_clock::now();
  const auto sums = pool.map(
      [](const std::vector<char>& v) {
        long sum = 0;
        for (char c : v)
          sum += c;
        return sum;
      },
      inputs);
  for (std::size_t i = 0; i < inputs.size(); ++i)
    MPI_CHECK(sums[i] == static_cast<long>('a' + i) * (32L << 20));
  for (const auto& node : pool.insights().per_node)
    MPI_CHECK_MSG(node.out_of_rotation.empty(), node.out_of_rotation);
  std::fprintf(stderr, "mpi_failures slow_inputs: %.2f s\n",
               std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count());
}

/// Tasks longer than PROCPOOL_MPI_NODE_TIMEOUT: the nodes answer the root's
/// pings while their workers run, so no node is given up on.
void long_tasks_quiet_nodes() {
  procpool::mpi::Pool pool({.processes = 2, .chunksize = 1});
  const auto out = pool.map(
      [](int x) {
        ::usleep(3000000);
        return x;
      },
      range(4));
  MPI_CHECK(out == range(4));
  for (const auto& node : pool.insights().per_node)
    MPI_CHECK_MSG(node.out_of_rotation.empty(), node.out_of_rotation);
}

/// (3 workers per node: the ranks of one host share it, one each.)
/// State that takes longer to build than PROCPOOL_MPI_NODE_TIMEOUT (2 s in
/// this test) on every node but the root's: a vocabulary, a model, loaded once
/// per node by Start::fork_server's initializer.
struct LoadedSlowly {
  int loaded_by = 0;  // the rank's pid: its server's parent
};
LoadedSlowly load_slowly() {
  const char* rank = launcher_rank();
  if (rank != nullptr && std::strcmp(rank, "0") != 0) ::sleep(3);
  return {::getppid()};
}
std::pair<int, int> loader_and_rank(LoadedSlowly& state, int) {
  return {state.loaded_by, ::getppid()};
}

/// A node whose pool's initializer takes longer than the node timeout is
/// still a node that answers: its rank goes on serving (pings included)
/// while its fork server builds the state, and its chunks wait for it.
void slow_initializer() {
  const auto started = std::chrono::steady_clock::now();
  procpool::mpi::Pool pool({.processes = 3, .chunksize = 1, .start = procpool::Start::fork_server},
                           &load_slowly);
  const auto made_in = std::chrono::steady_clock::now() - started;
  // Asked while the other nodes still run their initializers: each answers
  // once its pool is made, with its workers.
  const procpool::mpi::Insights early = pool.insights();
  for (const auto& node : early.per_node)
    MPI_CHECK(node.pool.workers.size() == 1);
  const auto out = pool.map(&loader_and_rank, std::vector<int>(12, 0));
  MPI_CHECK(out.size() == 12);
  std::set<int> ranks;
  for (const auto& [loader, rank] : out) {
    MPI_CHECK(loader == rank);  // each node's state was built by a server of that node's rank
    ranks.insert(rank);
  }
  const procpool::mpi::Insights insights = pool.insights();
  std::size_t nodes_with_workers = 0;
  for (const auto& node : insights.per_node) {
    MPI_CHECK_MSG(node.out_of_rotation.empty(), node.out_of_rotation);
    if (node.processes != 0) ++nodes_with_workers;
  }
  MPI_CHECK(ranks.size() == nodes_with_workers);  // every node ran some, the slow ones too
  std::fprintf(stderr, "mpi_failures slow_initializer: pool made in %.3f s, %zu nodes ran tasks\n",
               std::chrono::duration<double>(made_in).count(), ranks.size());
}

void root_throws() {
  procpool::mpi::Pool pool({.processes = 1});
  MPI_CHECK(pool.map(&throws_on_7, std::vector<int>{1, 2}).size() == 2);
  throw std::runtime_error("the root gives up");
}

int slow(int x) {
  ::usleep(20000);
  return x;
}

/// Runs until interrupted (Ctrl-C, scancel): the launcher's signal must end it all.
void long_run() {
  procpool::mpi::Pool pool({.processes = 2});
  std::fprintf(stderr, "mpi_failures long: running\n");
  pool.map(&slow, range(100000));
}

// A plugin rebuilt on disk while the job runs: the root loaded the first
// build; the other ranks load the plugin when a call names its function, and
// find the second build at that path. Their tasks fail, naming the library;
// none runs the second build's code at the first build's offset. The root's
// node (its workers inherit the first build) runs its share, if it has workers.
void plugin_rebuilt(int nodes) {
  std::string dir = "/tmp/procpool-mpi-plugin-XXXXXX";
  MPI_CHECK(::mkdtemp(dir.data()) != nullptr);
  const std::string path = dir + "/libplugin.so";
  std::filesystem::copy_file(PLUGIN_V1, path);
  void* handle = ::dlopen(path.c_str(), RTLD_NOW | RTLD_LOCAL);
  MPI_CHECK_MSG(handle != nullptr, ::dlerror());
  using AddVersion = int(int);
  auto* add_version = reinterpret_cast<AddVersion*>(::dlsym(handle, "plugin_add_version"));
  MPI_CHECK(add_version != nullptr);
  std::filesystem::copy_file(PLUGIN_V2, path + ".new");
  std::filesystem::rename(path + ".new", path);

  procpool::mpi::Pool pool({.processes = 1, .chunksize = 1});
  const auto outcomes = pool.map_outcomes(add_version, range(60));
  std::size_t ran = 0;
  std::vector<bool> refused_on_rank(static_cast<std::size_t>(nodes), false);
  for (const auto& o : outcomes) {
    if (o.ok()) {
      MPI_CHECK_MSG(*o.value == static_cast<int>(o.index) + 1,
                    "input " + std::to_string(o.index) + " ran the second build");
      ++ran;
      continue;
    }
    try {
      std::rethrow_exception(o.error);
    } catch (const procpool::Error& e) {
      const std::string what = e.what();
      MPI_CHECK_MSG(what.find("another build") != std::string::npos, what);
      MPI_CHECK_MSG(what.find(path) != std::string::npos, what);
      const auto& at = dynamic_cast<const procpool::mpi::ErrorLocation&>(e);
      MPI_CHECK_MSG(at.rank() != 0, what);
      refused_on_rank[static_cast<std::size_t>(at.rank())] = true;
    }
  }
  std::size_t refusing = 0;
  for (int r = 1; r < nodes; ++r)
    refusing += refused_on_rank[static_cast<std::size_t>(r)] ? 1 : 0;
  std::fprintf(stderr,
               "mpi_failures plugin_rebuilt: %zu of 60 ran on the root's node, %zu nodes refused\n",
               ran, refusing);
  // (On a 2-core machine the root's node may have no worker of its own.)
  if (nodes == 1) MPI_CHECK(ran == outcomes.size());
  if (nodes > 1) MPI_CHECK(refusing > 0);
  std::filesystem::remove_all(dir);
}

void identity() {
  using procpool::mpi::detail::identity_mismatch;
  MPI_CHECK(!identity_mismatch(1, "a", "build-id:1", "b", "build-id:1"));
  auto message = identity_mismatch(2, "node7", "build-id:abc", "node1", "build-id:def");
  MPI_CHECK(message.has_value());
  MPI_CHECK(message->find("rank 2 on node7") != std::string::npos);
  MPI_CHECK(message->find("build-id:abc") != std::string::npos);
  MPI_CHECK(message->find("rank 0 on node1") != std::string::npos);
  std::fprintf(stderr, "mpi_failures identity: OK\n");
}

}  // namespace

int main(int argc, char** argv) {
  const std::string mode = argc > 1 ? argv[1] : "errors";
  if (mode == "identity") {
    identity();
    return 0;
  }
  if (mode == "root_throws_caught") {
    // The exception unwinds through the Session: every rank ends normally.
    try {
      procpool::mpi::Session session(argc, argv);
      root_throws();
    } catch (const std::runtime_error& e) {
      std::fprintf(stderr, "mpi_failures: the root caught: %s\n", e.what());
    }
    return 0;
  }
  if (mode == "cannot_fork" && on_rank_1()) cannot_start_processes();
  procpool::mpi::Session session(argc, argv);
  if (mode == "errors") errors(session.size());
  if (mode == "plugin_rebuilt") plugin_rebuilt(session.size());
  if (mode == "cannot_fork") cannot_fork();
  if (mode == "long") long_run();
  if (mode == "broken_node") broken_node();
  if (mode == "kill_rank") kill_rank();
  abort_hangs = mode == "stop_rank_abort_hangs";
  if (mode == "stop_rank" || abort_hangs) stop_rank();
  if (mode == "stop_rank_idle") stop_rank_idle();
  if (mode == "stop_rank_retries") stop_rank_retries();
  if (mode == "stop_rank_a_while") stop_rank_a_while();
  if (mode == "stop_rank_lending") stop_rank_lending();
  if (mode == "stop_rank_copied") stop_rank_copied();
  if (mode == "long_tasks") long_tasks_quiet_nodes();
  if (mode == "root_pauses") root_pauses();
  if (mode == "root_stops") root_stops();
  if (mode == "slow_inputs") slow_large_inputs();
  if (mode == "root_throws") root_throws();
  if (mode == "slow_initializer") slow_initializer();
  return 0;
}
