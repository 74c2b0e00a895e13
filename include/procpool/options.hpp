// procpool/options.hpp - the one options struct shared by every way of running.
#pragma once

#include <chrono>
#include <cstddef>
#include <initializer_list>

#include "procpool/insights.hpp"
#include "procpool/progress.hpp"

namespace procpool {

/// How a call's workers run.
///
/// `fork` (the default) runs tasks in forked worker processes. `in_process`
/// runs the very same call, with the same serialisation round trip for every
/// input and result, in the calling process: a debugger and sanitizers then
/// see the task code.
///
/// `spawn` (procpool::Pool only) starts each worker as a fresh run of the same
/// executable, which becomes a worker before `main` runs. Use it in a program
/// whose other threads may hold locks (a logger's mutex, an OpenMP or BLAS
/// runtime) while workers start: a forked worker inherits such a lock in the
/// locked state and can hang on it forever. A spawned worker inherits no
/// locks, threads or memory: the pool's initializer (a function pointer or a
/// capture-less lambda) builds its state. It runs the program's static
/// initialisers (procpool linked statically, the default) but never `main`.
/// Starting costs an exec and the program's start-up (a few milliseconds).
/// The fork-per-call functions (`procpool::map`...) reject it: their function
/// may capture the caller's memory.
///
/// `fork_server` (made for procpool::Pool and procpool::mpi::Pool; the
/// fork-per-call functions accept it, with a server per call) forks one server
/// process when the pool starts; it runs the pool's initializer once, and
/// every worker (and every replacement of one that crashed or was recycled)
/// is forked from it. The state the initializer built is then held once,
/// shared copy-on-write by all the workers, instead of once per worker: a
/// 2 GB model loaded by the initializer costs 2 GB, not 2 GB per worker, and
/// a new worker starts with it ready. A worker's writes to the state stay its
/// own, as with `fork`; but whatever the initializer opened (a file, a
/// socket) is one open file shared by every worker. The pool's constructor
/// returns once the initializer has run. The server is single-threaded, so
/// workers started later are safe to fork even if the caller has started
/// threads by then. Large payloads travel as memory files or on the socket
/// (these workers share no arena with the caller).
///
///     auto squares = procpool::map(f, xs, {.start = procpool::Start::in_process});
///     procpool::Pool pool({.processes = 4, .start = procpool::Start::spawn}, &load_model);
///     procpool::Pool shared({.start = procpool::Start::fork_server}, &load_model);
enum class Start { fork, in_process, spawn, fork_server };

/// Options for `procpool::map` and friends and for `procpool::Pool`.
/// An aggregate: set only what you need with designated initialisers.
///
///     procpool::Options opts{.processes = 4, .chunksize = 64};
struct Options {
  /// Worker processes; 0 means `usable_cpu_count()`.
  unsigned processes = 0;
  /// Inputs per message sent to a worker; 0 sizes chunks automatically from
  /// the measured task time (about 5 ms of work per chunk, smaller near the end).
  std::size_t chunksize = 0;
  /// Upper bound on inputs taken from the input range but not yet handed back
  /// to the caller; 0 means automatic (a few chunks per worker). Bounds memory
  /// for endless inputs and for ordered results that wait for a slow task.
  std::size_t max_inflight = 0;
  /// Where tasks run; see `Start`.
  Start start = Start::fork;
  /// How many times a task whose worker died (crash, signal, exit, timeout)
  /// is run again on a fresh worker before it fails. Tasks that throw are not retried.
  unsigned retries = 0;
  /// Longest a single task may run; its worker is then killed and the task
  /// fails with TaskTimeout (or is retried). It bounds a worker's decoding of
  /// a Pool call's extra arguments too (TaskTimeout::in_setup for each task
  /// of the call: keep it above what a big argument takes). Zero: no limit.
  std::chrono::milliseconds task_timeout{0};
  /// Replace a worker after it has run this many tasks (for code that leaks);
  /// zero: never.
  std::size_t max_tasks_per_child = 0;
  /// Print one warning per process (to stderr) when `processes` exceeds the
  /// usable CPUs, naming what limits them.
  bool warn_oversubscription = true;
  /// Start workers with OMP_NUM_THREADS, OPENBLAS_NUM_THREADS, MKL_NUM_THREADS,
  /// BLIS_NUM_THREADS, VECLIB_MAXIMUM_THREADS and NUMEXPR_NUM_THREADS set to
  /// max(1, usable CPUs / processes), except those the caller already set, so
  /// inner thread pools do not oversubscribe the machine. A runtime already
  /// initialised in the parent before the fork keeps its own setting.
  bool limit_inner_threads = true;
  /// Progress display for this call: Progress::off (default), on, automatic, or a callback.
  Progress progress = Progress::off;
  /// When set, a fork-per-call function fills it as the call ends (a Pool: Pool::insights()).
  Insights* insights = nullptr;
};

namespace detail {

/// What `Pool pool({})` binds to: an empty list converts to a list of these
/// exactly, which beats both readings that would otherwise tie (Options{},
/// and a Pool to copy), so `{}` means the default Options.
struct DefaultOptions {};

}  // namespace detail
}  // namespace procpool
