// The worker process side: its start-up and its message loop.
#pragma once

#include <sys/types.h>

#include "procpool/detail/protocol.hpp"

namespace procpool::detail {

/// Run in a freshly forked worker before anything else: die with the parent,
/// leave Ctrl-C to the parent, and drop the parent's unflushed stdio buffers
/// so they are printed once, by the parent. A non-zero `inner_threads` goes
/// into the usual thread-count variables the caller has not set.
void prepare_worker_process(pid_t parent, unsigned inner_threads);

/// The thread-count variables of the usual inner thread pools (OpenMP, BLAS...).
extern const char* const inner_thread_variables[6];

/// What a worker shares with its parent, given to it at birth.
struct WorkerContext {
  WorkerSlot* slot = nullptr;  // the task it is running, and its counters
  /// Large replies go through this arena, large inputs come through the
  /// other; null for a spawned worker (everything travels on the socket).
  ReplyArena* reply_arena = nullptr;
  ReplyArena* input_arena = nullptr;
  /// The pool has a task timeout: every task's start is then recorded.
  bool task_timeout = false;
};

/// Serves messages from `fd` until the parent closes it, then exits with _exit
/// (never exit(): the parent's atexit handlers must not run in a worker).
[[noreturn]] void run_worker(int fd, WorkerLogic& logic, const WorkerContext& context);

/// Ends a worker: flushes what its tasks printed (not what the parent had
/// buffered before the fork) and exits without running atexit handlers.
[[noreturn]] void exit_worker(int status);

}  // namespace procpool::detail
