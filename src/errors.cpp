#include "procpool/errors.hpp"

#include <cstring>
#include <string>

namespace procpool {
namespace {

std::string describe_death(int signal, int exit_status) {
  if (signal != 0) {
    return "was killed by signal " + std::to_string(signal) + " (" + ::strsignal(signal) + ")";
  }
  return "exited with status " + std::to_string(exit_status);
}

}  // namespace

TaskError::TaskError(std::size_t index, std::string type_name, std::string remote_what)
    : Error("procpool: task " + std::to_string(index) + " threw " + type_name + ": " + remote_what),
      index_(index),
      type_name_(std::move(type_name)),
      remote_what_(std::move(remote_what)) {}

WorkerCrashed::WorkerCrashed(std::size_t index, pid_t pid, int signal, int exit_status)
    : Error("procpool: worker " + std::to_string(pid) + " running task " + std::to_string(index) +
            " " + describe_death(signal, exit_status) +
            "; the other tasks are unaffected. Reproduce it with "
            "Options{.start = procpool::Start::in_process} under a debugger"),
      index_(index),
      pid_(pid),
      signal_(signal),
      exit_status_(exit_status) {}

TaskTimeout::TaskTimeout(std::size_t index, std::chrono::milliseconds limit)
    : Error("procpool: task " + std::to_string(index) + " ran longer than its limit of " +
            std::to_string(limit.count()) + " ms and its worker was stopped"),
      index_(index),
      limit_(limit) {}

}  // namespace procpool
