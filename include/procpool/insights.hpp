// procpool/insights.hpp - what the workers did, and why a run was slow.
#pragma once

#include <sys/types.h>

#include <cstddef>
#include <cstdint>
#include <string>
#include <vector>

namespace procpool {

/// One worker position (a replaced worker's successor keeps its place).
struct WorkerInsights {
  unsigned position = 0;
  pid_t pid = 0;  // the current or last process in this place
  std::uint64_t tasks = 0;
  double compute_seconds = 0;        // inside the task function
  double waiting_seconds = 0;        // idle, waiting for work from the parent
  double serialize_seconds = 0;      // writing results in the worker
  std::uint64_t bytes_received = 0;  // inputs and setup sent to the worker
  std::uint64_t bytes_sent = 0;      // results sent back
  std::uint64_t peak_rss_kb = 0;
  unsigned crashes = 0;
  unsigned timeouts = 0;
  unsigned recycles = 0;
};

struct SlowTaskInsight {
  std::size_t index = 0;
  double seconds = 0;
};

/// What a call (or a Pool, over its life) did, with a one-line diagnosis.
///
///     procpool::Insights insights;
///     procpool::map(f, inputs, {.insights = &insights});
///     std::cerr << insights.to_string();
struct Insights {
  double wall_seconds = 0;
  unsigned processes = 0;
  unsigned usable_cpus = 0;
  std::string cpu_reason;  // cpu_report().to_string()
  std::uint64_t tasks = 0;
  double parent_input_seconds = 0;        // producing and serialising inputs in the caller
  double parent_decode_seconds = 0;       // decoding results in the caller
  double starting_seconds = 0;            // forking the worker processes, in the caller
  std::uint64_t caller_anonymous_kb = 0;  // the caller's resident anonymous memory
  double efficiency = 0;                  // total compute / (wall * processes)
  std::vector<WorkerInsights> workers;
  std::vector<SlowTaskInsight> slowest_tasks;  // slowest first
  /// A Pool's tasks that failed after their Future was dropped (fire and
  /// forget), and the first few of their messages.
  std::uint64_t unobserved_errors = 0;
  std::vector<std::string> unobserved_error_messages;
  /// Limits of the machine that changed how the run works (fewer workers
  /// than asked, no shared memory for large messages), one sentence each.
  std::vector<std::string> notes;
  std::string diagnosis;

  /// A readable table and the diagnosis.
  std::string to_string() const;
};

namespace detail {
/// Chooses the diagnosis line from the numbers (filled in by the engine).
std::string diagnose(const Insights& insights);
}  // namespace detail

}  // namespace procpool
