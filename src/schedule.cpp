#include "procpool/detail/schedule.hpp"

#include <algorithm>

namespace procpool::detail {
namespace {

constexpr double chunk_target_nanos = 5e6;    // per chunk: overhead stays ~1% of the work
constexpr double smallest_chunk_nanos = 1e5;  // a tail chunk smaller balances nothing
constexpr double max_chunk_tasks = 16384;
constexpr double pipeline_target_nanos = 5e5;  // keep ~0.5 ms of work queued per worker
constexpr std::size_t max_pipeline = 64;
constexpr double short_submit_nanos = 1e6;  // a submitted task this short may queue

/// Tasks in a chunk of about `nanos` of work; 1 until a task has been timed,
/// so that a long task is never batched blindly.
std::size_t tasks_for(double nanos, double nanos_per_task) noexcept {
  if (nanos_per_task <= 0) return 1;
  return static_cast<std::size_t>(std::clamp(nanos / nanos_per_task, 1.0, max_chunk_tasks));
}

}  // namespace

void TaskTimeEstimate::add(std::uint64_t tasks, double nanos) noexcept {
  if (tasks == 0) return;
  timed_nanos_ += nanos;
  timed_tasks_ += static_cast<double>(tasks);
  nanos_per_task_ = std::max(timed_nanos_ / timed_tasks_, nanos / static_cast<double>(tasks));
}

void RecentTaskTime::add(std::uint64_t tasks, double nanos) noexcept {
  if (tasks == 0) return;
  const double per_task = nanos / static_cast<double>(tasks);
  nanos_per_task_ =
      nanos_per_task_ <= 0 ? per_task : std::max(per_task, 0.9 * nanos_per_task_ + 0.1 * per_task);
}

SchedulePolicy::SchedulePolicy(unsigned processes, std::size_t chunksize,
                               std::size_t max_inflight) noexcept
    : processes_(std::max(1u, processes)), chunksize_(chunksize), max_inflight_(max_inflight) {}

ChunkPlan SchedulePolicy::next_chunk(double nanos_per_task,
                                     std::optional<std::size_t> remaining) const noexcept {
  if (chunksize_ != 0) return {chunksize_, false};
  ChunkPlan plan{tasks_for(chunk_target_nanos, nanos_per_task), false};
  if (!remaining) return plan;
  // Near the end, smaller chunks keep every worker busy until the last task;
  // but not below ~0.1 ms of work, which costs a round trip per chunk.
  const std::size_t share = *remaining / (2 * std::size_t{processes_});
  plan.tail = share < plan.tasks;
  plan.tasks =
      std::min(plan.tasks, std::max(tasks_for(smallest_chunk_nanos, nanos_per_task), share));
  return plan;
}

std::size_t SchedulePolicy::inflight_limit(double nanos_per_task,
                                           std::size_t typical_chunk) const noexcept {
  if (max_inflight_ != 0) return max_inflight_;
  // A few chunks per worker beyond what keeps its pipeline full.
  return typical_chunk * processes_ * (pipeline_depth(nanos_per_task, typical_chunk) + 2);
}

std::size_t SchedulePolicy::pipeline_depth(double nanos_per_task, std::uint64_t tasks) noexcept {
  if (nanos_per_task <= 0) return min_pipeline;
  const double chunk_nanos = nanos_per_task * static_cast<double>(tasks);
  const double depth = pipeline_target_nanos / std::max(chunk_nanos, 1.0);
  return std::clamp(static_cast<std::size_t>(depth), min_pipeline, max_pipeline);
}

std::size_t SchedulePolicy::queue_limit(std::uint64_t tasks, bool tail, bool one_chunk_call,
                                        double nanos_per_task) noexcept {
  bool only_to_idle = tail;
  if (one_chunk_call) {
    // Each submitted task is a call's only chunk, so every one would count as
    // a tail. Queue tasks known to be short behind others, or a stream of them
    // ping-pongs one task at a time; long or unknown ones wait for an idle
    // worker, so that none waits behind a long task while a worker is free.
    only_to_idle =
        nanos_per_task <= 0 || nanos_per_task * static_cast<double>(tasks) >= short_submit_nanos;
  }
  return only_to_idle ? 1 : pipeline_depth(nanos_per_task, tasks);
}

}  // namespace procpool::detail
