// Start::fork_server: one process per pool that runs the pool's initializer
// once and forks every worker of the pool from itself.
//
// With Start::fork each worker runs the initializer: a 2 GB table an
// initializer loads is loaded, and held, once per worker. The server loads it
// once; each worker is a copy-on-write fork of the server, so the table's
// pages are shared by all of them (and by the replacements of workers that
// crash or are recycled, which start at fork speed with the state built).
//
// The server is single-threaded, so forking from it is safe even when the
// caller has threads by then. Its workers are made with clone(CLONE_PARENT):
// they are children of the pool's process, which waits for them, kills them
// and reads their exit status exactly as it does for forked workers.
#pragma once

#include <sys/types.h>

#include <functional>
#include <memory>

#include "procpool/detail/protocol.hpp"

namespace procpool::detail {

/// How the server is started and what its workers are given.
struct ForkServerBirth {
  pid_t parent = 0;  // the pool's process
  unsigned inner_threads = 0;
  bool task_timeout = false;
  bool from_helper_thread = false;
  /// Builds the workers' logic: run once, in the server (the engine's, which
  /// outlives the server).
  const std::function<std::unique_ptr<WorkerLogic>()>* make_logic = nullptr;
};

/// Whether this process is a pool's fork server (its initializer runs there:
/// an error from it names the server, not a worker).
bool in_fork_server() noexcept;

/// Not thread-safe: its engine uses it under the engine's lock.
class ForkServer {
 public:
  explicit ForkServer(ForkServerBirth birth) : birth_(birth) {}
  /// Ends the server (its workers live on: they are not its children) and reaps it.
  ~ForkServer();
  ForkServer(const ForkServer&) = delete;
  ForkServer& operator=(const ForkServer&) = delete;

  /// Starts the server if it is not running (the first time, or it died),
  /// and waits until its initializer has run. Call it before making the new
  /// worker's descriptors: the server must not inherit them (a worker whose
  /// socket the server also held would never see the pool close it). Throws
  /// std::system_error if it cannot fork, procpool::Error if the server died
  /// in the initializer or the initializer left threads running there.
  /// False when a server started again (after one that had been ready) was
  /// killed by SIGKILL while it ran the initializer: from outside (a kill
  /// storm, the OOM killer), as the initializer ran before: call it again,
  /// counting the tries.
  [[nodiscard]] bool ensure_running();

  /// Has the server fork a worker that serves `socket` (closed here: its
  /// last copy is the worker's) and shares the status page in memory file
  /// `slot_file` (left open); returns its pid, or 0 when the server was found
  /// gone (call ensure_running() and make the descriptors again; a worker it
  /// cloned before it died is named by the page's `cloned_pid`). Throws
  /// std::system_error when the fork fails (a resource limit).
  pid_t start_worker(int socket, int slot_file);

 private:
  bool start_server();
  bool wait_until_ready();
  /// Closes the control socket and reaps the server; returns how it ended.
  int end_server() noexcept;
  /// Sends one request; the pid, -errno, or 0 when the server is gone.
  pid_t ask(int socket, int slot_file) noexcept;

  ForkServerBirth birth_;
  pid_t pid_ = -1;
  int control_ = -1;        // our end of the server's socket
  bool was_ready_ = false;  // a server of this pool has run the initializer
};

}  // namespace procpool::detail
