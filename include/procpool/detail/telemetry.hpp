// What the workers did, from their counters to Insights: one record per
// worker position, folded once from each process that held it.
#pragma once

#include <sys/types.h>

#include <algorithm>
#include <cstdint>
#include <string>
#include <utility>
#include <vector>

#include "procpool/insights.hpp"

namespace procpool::detail {

/// What a worker counts about itself (in its status page, for a local one).
struct WorkerCounters {
  std::uint64_t serialize_ns = 0;  // writing results (sampled)
  std::uint64_t wait_ns = 0;       // blocked, waiting for work
  std::uint64_t bytes_in = 0;      // to the worker
  std::uint64_t bytes_out = 0;     // from the worker
  std::uint64_t peak_rss_kb = 0;

  WorkerCounters& operator+=(const WorkerCounters& other) noexcept {
    serialize_ns += other.serialize_ns;
    wait_ns += other.wait_ns;
    bytes_in += other.bytes_in;
    bytes_out += other.bytes_out;
    peak_rss_kb = std::max(peak_rss_kb, other.peak_rss_kb);
    return *this;
  }
};

/// What one worker position did, summed over the processes that held it.
struct WorkerRecord {
  pid_t pid = 0;  // the current (or last) process
  std::uint64_t tasks = 0;
  std::uint64_t compute_ns = 0;  // from the replies: whole chunks, serialisation included
  WorkerCounters counted;        // from the processes that are gone
  unsigned crashes = 0;
  unsigned timeouts = 0;
  unsigned recycles = 0;
};

/// Why a worker left its position, for the record.
enum class Departure { crashed, timed_out, corrupt, recycled, stopped };

/// The engine's books on its workers, and the caller's own costs.
class Telemetry {
 public:
  explicit Telemetry(std::size_t positions) : records_(positions) {}

  void worker_started(unsigned position, pid_t pid) { records_[position].pid = pid; }
  /// Fewer positions than planned (workers that could not start).
  void keep_positions(std::size_t positions) { records_.resize(positions); }
  /// Something the user should know about how this run works (a limit that
  /// changed the plan), shown with the insights.
  void add_note(std::string note) { notes_.push_back(std::move(note)); }
  /// A worker was killed for memory: the diagnosis leads with it.
  void note_out_of_memory(std::string what) {
    notes_.push_back(what);
    out_of_memory_ = std::move(what);
  }
  void chunk_done(unsigned position, std::uint64_t tasks, std::uint64_t compute_ns,
                  std::uint64_t slowest_index, std::uint64_t slowest_ns);
  /// A process left `position`; its counters are kept.
  void worker_left(unsigned position, Departure why, const WorkerCounters& counted);
  void add_parent_time(std::uint64_t input_ns, std::uint64_t decode_ns) noexcept {
    parent_input_ns_ += input_ns;
    parent_decode_ns_ += decode_ns;
  }
  void add_starting_time(std::uint64_t ns) noexcept { starting_ns_ += ns; }

  /// Insights for a run of `wall_seconds`; `live` adds the counters of the
  /// workers still running, by position.
  [[nodiscard]] Insights insights(
      double wall_seconds, unsigned processes,
      const std::vector<std::pair<unsigned, WorkerCounters>>& live) const;

 private:
  struct SlowTask {
    std::uint64_t index = 0;
    std::uint64_t nanos = 0;
  };
  static constexpr std::size_t slow_tasks_kept = 5;

  std::vector<WorkerRecord> records_;
  std::vector<std::string> notes_;
  std::string out_of_memory_;      // the last OOM kill, for the diagnosis
  std::vector<SlowTask> slowest_;  // slowest first
  std::uint64_t parent_input_ns_ = 0;
  std::uint64_t parent_decode_ns_ = 0;
  std::uint64_t starting_ns_ = 0;  // the caller's time starting workers (forks, restarts)
};

}  // namespace procpool::detail
