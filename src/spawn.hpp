// Start::spawn: workers that are fresh runs of this program's executable.
//
// A forked worker copies every lock of the parent in the state it had at the
// fork; one held by another thread at that instant stays locked forever in
// the worker. A spawned worker is a new process image (posix_spawn of
// /proc/self/exe): no inherited locks, threads or half-initialised runtimes.
// It becomes a worker before main() runs (see serve_if_spawned_worker) and
// never returns into the program.
#pragma once

#include <sys/types.h>

#include <functional>
#include <memory>

#include "procpool/detail/buffer.hpp"
#include "procpool/detail/protocol.hpp"

namespace procpool::detail {

/// What the parent tells a spawned worker at birth.
struct SpawnRequest {
  pid_t parent = 0;
  /// Goes into the inner thread-count variables (0: leave them alone); set in
  /// the new process's environment, where runtimes read it before main.
  unsigned inner_threads = 0;
  bool task_timeout = false;
  /// Opaque to the engine: read in the worker by the SpawnedLogicFactory.
  const Buffer* logic_setup = nullptr;
  /// Start the process from the long-lived helper thread (see start_child_process).
  bool from_helper_thread = false;
};

/// Starts a spawned worker serving `child_end` (one end of a socket pair,
/// closed here in any case); `parent_end` is the other end, where the worker's
/// start-up message is written before it runs. Returns its pid and its
/// status page (shared through a memfd). Throws on failure.
struct SpawnedWorker {
  pid_t pid = -1;
  WorkerSlot* slot = nullptr;
};
SpawnedWorker spawn_worker_process(int parent_end, int child_end, const SpawnRequest& request);

/// A worker's status page in a memory file, mapped here, for a worker that
/// does not inherit this process's mappings (spawned, or forked by a fork
/// server): it maps `fd`. The caller closes `fd`.
struct SlotFile {
  int fd = -1;
  WorkerSlot* slot = nullptr;
};
SlotFile create_slot_file();

/// Runs `start`, which creates a child process, on a thread that lasts as
/// long as the process when `from_helper_thread` and the caller is not the
/// main thread: a child's PR_SET_PDEATHSIG fires when the thread that created
/// it ends. Defined in engine.cpp (its ForkerThread).
pid_t start_child_process(bool from_helper_thread, const std::function<pid_t()>& start);

/// Builds a spawned worker's logic from SpawnRequest::logic_setup.
using SpawnedLogicFactory = std::unique_ptr<WorkerLogic> (*)(Reader& setup);

/// Called before main() (from a constructor in pool.cpp): in a process that
/// procpool spawned as a worker, serves as that worker and exits without
/// returning; anywhere else returns at once.
void serve_if_spawned_worker(SpawnedLogicFactory make_logic);

}  // namespace procpool::detail
