// "Test against the peers": the hard cases of mpi4py's own futures test suite
// (mpi4py demo/futures/test_futures.py: MPIPoolExecutor, MPICommExecutor) and
// of the pool hangs reported against mpi4py and schwimmbad (a pool that hangs
// at shutdown, or after a task raised), translated to procpool::mpi.
//
// The cases live in tests/mpi/peers/ (calls.cpp, lifecycle.cpp and three
// differential_N.cpp, so that they compile in parallel; peers.hpp holds the
// harness and the tasks); this file picks a mode and runs its cases.
//
// Each mode (argv[1]) runs its cases in one Session and prints one line per
// case; every failed case is listed at the end and the program exits 1. A case
// that hangs is caught by run_mpi.sh's time bound; the last "case NAME ..."
// line names it. Modes:
//   calls      submit/map/starmap/imap_unordered, chunksize and max_inflight
//              variants, empty inputs, many tasks, nested types, MiB payloads,
//              several calls of one pool at once
//   errors     exceptions in tasks (the pool goes on), serialisation failures
//              (mpi4py's BadPickle/BadUnpickle), task_timeout, Future waits
//   lifecycle  close/join/terminate with work outstanding, dropped Futures and
//              Results, pools created and destroyed many times, pools at once,
//              root threads sharing a pool or each with its own
//   init_throws  an initializer that throws: every task says so, no hang,
//              and the Session ends cleanly
//   fixed_bugs the cases that failed before, each named by the bug it found
//              (A-F, see peers/lifecycle.cpp), all fixed; kept as regressions
//   differential  each scenario on a procpool::Pool and on an mpi::Pool,
//              both checked and compared (see peers/differential.hpp)
//
// What mpi4py tests and these do not, and why:
//  - Future.cancel()/cancelled(), shutdown(cancel_futures=True),
//    test_submit_cancel, test_submit_shutdown_cancel(_wait): mpi::Future has
//    no cancel; terminate() is the nearest (translated: outstanding Futures
//    end, with PoolClosed or their value, in bounded time).
//  - futures.wait(FIRST_COMPLETED / FIRST_EXCEPTION / ALL_COMPLETED) and
//    as_completed over mixed futures, incl. pre-built CANCELLED/EXCEPTION
//    futures and duplicates: no wait-for-any over Futures; translated with
//    per-Future wait_for/get, and as_completed with imap_unordered.
//  - map(..., timeout=): our calls have no caller-side deadline; translated
//    with Future::wait_for (a deadline on the wait) and Options::task_timeout
//    (a deadline on the task, which kills it: a different semantic, said so).
//  - chunksize=-1 / buffersize=-1 / buffersize="1" (ValueError/TypeError):
//    size_t options cannot be negative or of another type; max_workers<=0:
//    processes=0 means "every CPU".
//  - submit with keyword arguments, globals=, main=, path=, wdir=, env=,
//    python_exe/python_args/sys flags, use_pkl5, run_name, backoff,
//    mpi_info, MPI4PY_FUTURES_* environment: Python-only.
//  - bootup()/bootup(wait=False), num_workers after shutdown, the internal
//    _pool thread/queue/event checks: pools start in their constructor and
//    have no such internals; repeated shutdown calls are translated.
//  - get_comm_workers, MPICommExecutor(comm, root), intercommunicators,
//    MPI_THREAD_SERIALIZED lock: there is no communicator in our API (the
//    Session owns MPI_COMM_WORLD, root is rank 0).
//  - ThenableFuture (aplus then/catch): no continuation API.
//  - A callable that is not callable (initializer=123 -> TypeError): a
//    compile error for us (tests/compile_fail covers it).
#include "peers/peers.hpp"

namespace peers {

/// Runs every case, or with PEERS_CASE set only those whose name contains it
/// (to repeat one case while chasing a rare failure).
int run_cases(const char* mode, const std::vector<Case>& cases) {
  const char* only = std::getenv("PEERS_CASE");
  std::vector<std::string> failed;
  std::size_t ran = 0;
  for (const Case& c : cases) {
    if (only && std::string_view(c.name).find(only) == std::string_view::npos) continue;
    ++ran;
    std::fprintf(stderr, "peers %s: case %s (%s) ...\n", mode, c.name, c.from);
    std::fflush(stderr);
    const auto start = Clock::now();
    std::string why;
    try {
      c.run();
    } catch (const CaseFailed& e) {
      why = e.what();
    } catch (const std::exception& e) {
      why = std::string("unexpected exception: ") + e.what();
    }
    const double s = std::chrono::duration<double>(Clock::now() - start).count();
    if (why.empty()) {
      std::fprintf(stderr, "peers %s: case %s ok (%.2f s)\n", mode, c.name, s);
    } else {
      std::fprintf(stderr, "peers %s: case %s FAILED (%.2f s): %s\n", mode, c.name, s, why.c_str());
      failed.push_back(c.name);
    }
    std::fflush(stderr);
  }
  if (ran == 0) {
    std::fprintf(stderr, "peers %s: no case ran (PEERS_CASE=%s)\n", mode, only ? only : "");
    return 1;
  }
  if (failed.empty()) {
    std::fprintf(stderr, "peers %s: all %zu cases OK\n", mode, ran);
    return 0;
  }
  std::string list;
  for (const std::string& f : failed)
    list += " " + f;
  std::fprintf(stderr, "peers %s: FAILED %zu of %zu:%s\n", mode, failed.size(), ran, list.c_str());
  return 1;
}

/// The differential scenarios, in three files.
std::vector<Case> differential_cases() {
  std::vector<Case> cases = differential_cases_1();
  for (auto part : {differential_cases_2, differential_cases_3})
    for (Case& c : part())
      cases.push_back(std::move(c));
  return cases;
}

}  // namespace peers

using namespace peers;

int main(int argc, char** argv) {
  const std::string mode = argc > 1 ? argv[1] : "calls";
  procpool::mpi::Session session(argc, argv);
  const int nodes = session.nodes();
  std::fprintf(stderr, "peers %s: %d rank(s), %d node(s)\n", mode.c_str(), session.size(), nodes);
  if (mode == "calls") return run_cases("calls", calls_cases(nodes));
  if (mode == "errors") return run_cases("errors", errors_cases());
  if (mode == "lifecycle") return run_cases("lifecycle", lifecycle_cases(nodes));
  if (mode == "init_throws") return run_cases("init_throws", init_throws_cases());
  if (mode == "fixed_bugs") return run_cases("fixed_bugs", fixed_bugs_cases());
  if (mode == "recycling") return run_cases("recycling", recycling_cases());
  if (mode == "differential") return run_cases("differential", differential_cases());
  std::fprintf(stderr, "mpi_peers: unknown mode %s\n", mode.c_str());
  return 2;
}
