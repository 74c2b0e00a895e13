// The scheduling policy, decided in one place: how many tasks go in a chunk,
// how many tasks a call keeps in flight, and how many chunks a worker may
// have queued. Pure arithmetic on measured task times, so that it can be
// tested without a single process (tests/scheduler_test.cpp).
#pragma once

#include <cstddef>
#include <cstdint>
#include <optional>

namespace procpool::detail {

/// A call's compute time per task, from the chunks its workers timed.
///
/// The estimate is the average over all tasks timed so far, but never below
/// the latest chunk's: a slow first task (cold caches, page faults) is
/// forgotten as soon as more tasks are timed, and a slowdown shows at once.
class TaskTimeEstimate {
 public:
  void add(std::uint64_t tasks, double nanos) noexcept;
  /// 0 until a task has been timed.
  [[nodiscard]] double nanos_per_task() const noexcept { return nanos_per_task_; }

 private:
  double nanos_per_task_ = 0;
  double timed_nanos_ = 0;
  double timed_tasks_ = 0;
};

/// The time per task of recent one-task calls (Pool::submit), which are never
/// timed before they run: recent ones weigh most, a slow one shows at once.
class RecentTaskTime {
 public:
  void add(std::uint64_t tasks, double nanos) noexcept;
  [[nodiscard]] double nanos_per_task() const noexcept { return nanos_per_task_; }

 private:
  double nanos_per_task_ = 0;
};

/// The size of the next chunk, and whether it is one of the call's last.
struct ChunkPlan {
  std::size_t tasks = 1;
  /// Cut smaller so that the workers finish together: such a chunk goes only
  /// to a worker with nothing queued (see SchedulePolicy::queue_limit).
  bool tail = false;
};

class SchedulePolicy {
 public:
  /// A worker keeps at least this many chunks queued while there is work.
  static constexpr std::size_t min_pipeline = 2;

  /// `chunksize` and `max_inflight` as in Options (0: automatic).
  SchedulePolicy(unsigned processes, std::size_t chunksize, std::size_t max_inflight) noexcept;

  /// The next chunk of a call whose tasks take `nanos_per_task` (0: not yet
  /// measured) with `remaining` inputs left to send, when known.
  [[nodiscard]] ChunkPlan next_chunk(double nanos_per_task,
                                     std::optional<std::size_t> remaining) const noexcept;

  /// How many of a call's tasks may be taken from its input and not yet
  /// handed back, for chunks of `typical_chunk` tasks.
  [[nodiscard]] std::size_t inflight_limit(double nanos_per_task,
                                           std::size_t typical_chunk) const noexcept;

  /// How many chunks of `tasks` tasks a worker should have queued so that it
  /// never waits for the next message (about 0.5 ms of work).
  [[nodiscard]] static std::size_t pipeline_depth(double nanos_per_task,
                                                  std::uint64_t tasks) noexcept;

  /// The most chunks a worker may already have queued to be given `chunk`.
  /// `one_chunk_call`: its call is a single submitted task (Pool::submit).
  [[nodiscard]] static std::size_t queue_limit(std::uint64_t tasks, bool tail, bool one_chunk_call,
                                               double nanos_per_task) noexcept;

  [[nodiscard]] unsigned processes() const noexcept { return processes_; }

 private:
  unsigned processes_;
  std::size_t chunksize_;
  std::size_t max_inflight_;
};

}  // namespace procpool::detail
