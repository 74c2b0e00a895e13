// Local worker processes: where they are born (fork or spawn) and where they
// are reaped. A WorkerProcess is the WorkerLink (worker_link.hpp) of one
// local process: it owns the process, its socket and its shared pages, and
// tears them down in one place, finish_end().
#pragma once

#include <sys/types.h>

#include <chrono>
#include <functional>
#include <memory>
#include <mutex>
#include <vector>

#include "procpool/detail/buffer.hpp"
#include "procpool/detail/protocol.hpp"
#include "procpool/detail/worker_link.hpp"
#include "procpool/options.hpp"

namespace procpool::detail {

class ForkServer;

/// What a new local worker is started with.
struct WorkerBirth {
  Start start = Start::fork;  // fork, spawn or fork_server
  pid_t parent = 0;
  unsigned inner_threads = 0;  // for the inner thread-count variables; 0 leaves them
  bool task_timeout = false;   // every task's start is then recorded
  /// Fork (or spawn) from a helper thread that lives as long as the process
  /// (or from the main thread), so that a worker's PR_SET_PDEATHSIG never
  /// fires because the thread that started it ended.
  bool from_helper_thread = false;
  /// Start::fork: builds what the worker does with its messages, in the child.
  const std::function<std::unique_ptr<WorkerLogic>()>* make_logic = nullptr;
  /// Start::spawn: what a spawned worker builds its logic from.
  const Buffer* spawn_logic = nullptr;
  /// Start::fork_server: the server that forks it (the engine's).
  ForkServer* fork_server = nullptr;
};

/// Starts a local worker process; throws std::system_error if it cannot.
[[nodiscard]] std::unique_ptr<WorkerLink> start_worker_process(const WorkerBirth& birth);

/// The parent-side sockets of every engine in this process: a new child
/// process closes them, so that it never keeps another engine's worker from
/// seeing EOF.
[[nodiscard]] std::vector<int> parent_sockets();
void add_parent_socket(int fd);
void remove_parent_socket(int fd);

/// Held while a child process is born: from the creation of its socket pair
/// until the parent's end is among parent_sockets() and the child's end is
/// closed here. Another engine's child forked in between (pools made at once
/// on several threads) would hold both ends, and the first engine would wait
/// for its worker's EOF until that child ended. Every child this library
/// forks is born under it; a child starts with it free.
[[nodiscard]] std::unique_lock<std::mutex> hold_child_births();

}  // namespace procpool::detail
