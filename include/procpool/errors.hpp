// procpool/errors.hpp - every error procpool throws derives from procpool::Error.
#pragma once

#include <sys/types.h>
#include <chrono>
#include <cstddef>
#include <stdexcept>
#include <string>

namespace procpool {

/// Root of procpool's exceptions.
///
///     try { procpool::map(f, xs); } catch (const procpool::Error& e) { log(e.what()); }
class Error : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

/// A Pool's initializer threw in a worker: every task that worker gets then
/// fails with a TaskError whose type_name() is "procpool::InitializerFailed"
/// and whose remote_what() quotes the initializer's exception. (The MPI
/// backend tells by it a node that cannot run a pool's tasks.)
class InitializerFailed final : public Error {
 public:
  using Error::Error;
};

/// A task threw an exception in its worker. Carries the exception's dynamic
/// type name and `what()` as seen in the worker, and the task's input index.
///
/// Also one input's failure on its way to the task or its result's on the way
/// back (see `stage()`): a user type's save() or load() that throws costs
/// that input alone, never its neighbours.
class TaskError : public Error {
 public:
  /// Where the exception was thrown.
  enum class Stage {
    task,                ///< the task itself threw
    serialize_input,     ///< in the caller, the input's save(); the task did not run
    deserialize_input,   ///< in the worker, the input's (or an extra argument's) load();
                         ///< the task did not run
    serialize_result,    ///< in the worker, the result's save(); the task had returned
    deserialize_result,  ///< in the caller, the result's load(); the task had returned
  };

  TaskError(std::size_t index, std::string type_name, std::string remote_what);
  TaskError(std::size_t index, std::string type_name, std::string remote_what, Stage stage);
  std::size_t index() const noexcept { return index_; }
  Stage stage() const noexcept { return stage_; }
  /// Demangled dynamic type of the thrown exception, e.g. "std::invalid_argument".
  const std::string& type_name() const noexcept { return type_name_; }
  /// The `what()` of the exception in the worker.
  const std::string& remote_what() const noexcept { return remote_what_; }

 private:
  std::size_t index_;
  std::string type_name_;
  std::string remote_what_;
  Stage stage_ = Stage::task;
};

/// The worker running a task died: killed by a signal (segfault, abort, the
/// OOM killer, a `kill -9`) or it exited (`exit()`, `_exit()`) in mid-task.
class WorkerCrashed : public Error {
 public:
  /// `signal` is the terminating signal or 0; `exit_status` is valid when `signal` is 0.
  WorkerCrashed(std::size_t index, pid_t pid, int signal, int exit_status);
  /// The same, when the task was not running as its worker died: `circumstances`
  /// says what was observed (e.g. how many times its worker died around it).
  WorkerCrashed(std::size_t index, pid_t pid, int signal, int exit_status,
                const std::string& circumstances);
  /// The worker was killed by the OOM killer; `seen` says what was observed
  /// (the memory limit, the peak use).
  static WorkerCrashed out_of_memory(std::size_t index, pid_t pid, const std::string& seen);
  /// Task `index` never ran: workers died decoding its call's setup (the
  /// call's extra arguments' load()), `deaths` of them, the last `pid`.
  static WorkerCrashed in_setup(std::size_t index, pid_t pid, int signal, int exit_status,
                                unsigned deaths);
  /// Task `index` closed or replaced descriptor `fd` of its worker, the
  /// worker's link to the pool (closefrom(), close_range(), dup2() over it),
  /// so its result could not be sent back and the worker ended.
  static WorkerCrashed closed_link(std::size_t index, pid_t pid, int exit_status, int fd);
  /// Whether the task took its worker's link to the pool (closed_link()).
  bool closed_link() const noexcept { return closed_link_; }
  /// Whether the OOM killer killed the worker (as far as procpool could tell).
  bool out_of_memory() const noexcept { return out_of_memory_; }
  /// What was observed around the death, as given to the constructor or to
  /// out_of_memory() (the memory limit and peak use, or how often the worker
  /// died around the task); empty if nothing more.
  const std::string& observed() const noexcept { return observed_; }
  std::size_t index() const noexcept { return index_; }
  pid_t pid() const noexcept { return pid_; }
  int signal() const noexcept { return signal_; }
  int exit_status() const noexcept { return exit_status_; }

 private:
  std::size_t index_;
  pid_t pid_;
  int signal_;
  int exit_status_;
  bool out_of_memory_ = false;
  bool closed_link_ = false;
  std::string observed_;

  struct Message {
    std::string text;
  };
  WorkerCrashed(Message message, std::size_t index, pid_t pid, int signal, int exit_status);
};

/// A task ran longer than its time limit and its worker was stopped.
class TaskTimeout : public Error {
 public:
  TaskTimeout(std::size_t index, std::chrono::milliseconds limit);
  /// Task `index` never ran: a worker decoding its call's extra arguments
  /// ran past the limit (which bounds that decode too) and was stopped.
  static TaskTimeout in_setup(std::size_t index, std::chrono::milliseconds limit);
  std::size_t index() const noexcept { return index_; }
  std::chrono::milliseconds limit() const noexcept { return limit_; }

 private:
  struct Message {
    std::string text;
  };
  TaskTimeout(Message message, std::size_t index, std::chrono::milliseconds limit);

  std::size_t index_;
  std::chrono::milliseconds limit_;
};

/// A message between the parent and a worker was corrupt or truncated.
class ProtocolError : public Error {
 public:
  using Error::Error;
};

/// Ctrl-C (SIGINT) arrived during a call and the program handles SIGINT
/// itself: the call's workers were stopped and reaped (a Pool's workers too).
class Interrupted : public Error {
 public:
  using Error::Error;
};

/// Work was given to a `Pool` after `close()` or `terminate()`.
class PoolClosed : public Error {
 public:
  using Error::Error;
};

namespace detail {
/// "was killed by signal 9 (Killed)" or "exited with status 3": how a process ended.
std::string describe_death(int signal, int exit_status);
}  // namespace detail

}  // namespace procpool
