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
/// Whether prepare_worker_process ran in this process (or in the worker it
/// was forked from).
bool in_worker_process() noexcept;

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

/// A task (or an initializer) that calls exit() ends its worker with that
/// status, as a worker ends (what it printed on stdout and stderr flushed),
/// without the exit handlers the parent had registered before its first
/// fork: its atexit handlers and static destructors, the libraries' (MPI's,
/// a sanitizer's). They would act for the parent a second time, and lock and
/// allocate in a child of a threaded parent. Handlers run last registered
/// first: the one this registers (once per process, before its first fork)
/// ends a worker before any registered earlier; one the parent registers
/// later still runs. Called in the parent before it forks a worker.
void skip_parent_exit_handlers_in_workers();

/// Serves messages from `fd` until the parent closes it, then exits with _exit
/// (never exit(): the parent's atexit handlers must not run in a worker).
[[noreturn]] void run_worker(int fd, WorkerLogic& logic, const WorkerContext& context);

/// Ends a worker: flushes what its tasks printed (not what the parent had
/// buffered before the fork) and exits without running atexit handlers.
[[noreturn]] void exit_worker(int status);
/// The status of a worker that ended because a task closed or replaced the
/// descriptor of its link to the parent (LinkWatch); its slot says which.
inline constexpr int link_closed_status = 71;

}  // namespace procpool::detail
