#include "procpool/errors.hpp"

#include <csignal>

#include <cstring>
#include <string>

namespace procpool {
namespace detail {

std::string describe_death(int signal, int exit_status) {
  if (signal != 0) {
    return "was killed by signal " + std::to_string(signal) + " (" + ::strsignal(signal) + ")";
  }
  return "exited with status " + std::to_string(exit_status);
}

}  // namespace detail

namespace {

using detail::describe_death;

std::string describe_task_error(std::size_t index, const std::string& type_name,
                                const std::string& what, TaskError::Stage stage) {
  const std::string n = std::to_string(index);
  const std::string error = type_name + ": " + what;
  switch (stage) {
    case TaskError::Stage::serialize_input:
      return "procpool: serialising input " + n + " in the caller failed: " + error +
             "; the task did not run. Check the input type's save()";
    case TaskError::Stage::deserialize_input:
      return "procpool: decoding input " + n + " in the worker failed: " + error +
             "; the task did not run. Check that the input type's load() reads what its save() "
             "writes";
    case TaskError::Stage::serialize_result:
      return "procpool: task " + n +
             " returned, but serialising its result in the worker failed: " + error +
             ". Check the result type's save()";
    case TaskError::Stage::deserialize_result:
      return "procpool: task " + n +
             " returned, but decoding its result in the caller failed: " + error +
             ". Check that the result type's load() reads what its save() writes";
    case TaskError::Stage::task:
      break;
  }
  return "procpool: task " + n + " threw " + error;
}

}  // namespace

TaskError::TaskError(std::size_t index, std::string type_name, std::string remote_what)
    : TaskError(index, std::move(type_name), std::move(remote_what), Stage::task) {}

TaskError::TaskError(std::size_t index, std::string type_name, std::string remote_what, Stage stage)
    : Error(describe_task_error(index, type_name, remote_what, stage)),
      index_(index),
      type_name_(std::move(type_name)),
      remote_what_(std::move(remote_what)),
      stage_(stage) {}

WorkerCrashed::WorkerCrashed(std::size_t index, pid_t pid, int signal, int exit_status)
    : Error("procpool: worker " + std::to_string(pid) + " running task " + std::to_string(index) +
            " " + describe_death(signal, exit_status) +
            "; the other tasks are unaffected. Reproduce it with "
            "Options{.start = procpool::Start::in_process} under a debugger"),
      index_(index),
      pid_(pid),
      signal_(signal),
      exit_status_(exit_status) {}

WorkerCrashed::WorkerCrashed(std::size_t index, pid_t pid, int signal, int exit_status,
                             const std::string& circumstances)
    : Error("procpool: task " + std::to_string(index) + " failed: " + circumstances +
            " (the last, worker " + std::to_string(pid) + ", " +
            describe_death(signal, exit_status) +
            "); something kills the workers from outside, or they die sending results"),
      index_(index),
      pid_(pid),
      signal_(signal),
      exit_status_(exit_status),
      observed_(circumstances) {}

WorkerCrashed::WorkerCrashed(Message message, std::size_t index, pid_t pid, int signal,
                             int exit_status)
    : Error(message.text), index_(index), pid_(pid), signal_(signal), exit_status_(exit_status) {}

WorkerCrashed WorkerCrashed::out_of_memory(std::size_t index, pid_t pid, const std::string& seen) {
  WorkerCrashed crashed(Message{"procpool: worker " + std::to_string(pid) + " running task " +
                                std::to_string(index) + " " + describe_death(SIGKILL, 0) + ": " +
                                seen + ". Use fewer processes, or tasks that need less memory"},
                        index, pid, SIGKILL, 0);
  crashed.out_of_memory_ = true;
  crashed.observed_ = seen;
  return crashed;
}

WorkerCrashed WorkerCrashed::in_setup(std::size_t index, pid_t pid, int signal, int exit_status,
                                      unsigned deaths) {
  const std::string seen = std::to_string(deaths) + (deaths == 1 ? " worker" : " workers") +
                           " died decoding the call's extra arguments";
  WorkerCrashed crashed(
      Message{"procpool: task " + std::to_string(index) + " never ran: " + seen +
              " (the last, worker " + std::to_string(pid) + ", " +
              describe_death(signal, exit_status) +
              "), so every task of the call not yet run fails. Check the load() of the "
              "call's extra arguments; reproduce it with Options{.start = "
              "procpool::Start::in_process} under a debugger"},
      index, pid, signal, exit_status);
  crashed.observed_ = seen;
  return crashed;
}

WorkerCrashed WorkerCrashed::closed_link(std::size_t index, pid_t pid, int exit_status, int fd) {
  const std::string seen = "task " + std::to_string(index) + " closed or replaced descriptor " +
                           std::to_string(fd) + " of its worker, the worker's link to the pool";
  WorkerCrashed crashed(
      Message{"procpool: " + seen + " (worker " + std::to_string(pid) +
              "), so its result could not be sent back; the other tasks are unaffected. A "
              "task may close only the descriptors it opened: closefrom(), close_range(), "
              "daemon() or a loop of close() or dup2() over every descriptor takes the "
              "pool's too"},
      index, pid, 0, exit_status);
  crashed.closed_link_ = true;
  crashed.observed_ = seen;
  return crashed;
}

TaskTimeout::TaskTimeout(Message message, std::size_t index, std::chrono::milliseconds limit)
    : Error(message.text), index_(index), limit_(limit) {}

TaskTimeout TaskTimeout::in_setup(std::size_t index, std::chrono::milliseconds limit) {
  return TaskTimeout(
      Message{"procpool: task " + std::to_string(index) +
              " never ran: a worker decoding the call's extra arguments ran longer than the "
              "task limit of " +
              std::to_string(limit.count()) +
              " ms (which bounds that too) and was stopped, so every task of the call not yet "
              "run fails. Check the load() of the call's extra arguments, or raise task_timeout"},
      index, limit);
}

TaskTimeout::TaskTimeout(std::size_t index, std::chrono::milliseconds limit)
    : Error("procpool: task " + std::to_string(index) + " ran longer than its limit of " +
            std::to_string(limit.count()) + " ms and its worker was stopped"),
      index_(index),
      limit_(limit) {}

}  // namespace procpool
