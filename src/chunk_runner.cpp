#include "chunk_runner.hpp"

namespace procpool::detail {
namespace {

/// Below this average, a clock read per task would cost more than the task.
constexpr double min_nanos_per_timed_task = 2000;

}  // namespace

ChunkReport ChunkRunner::run(std::uint64_t call, std::uint64_t first, std::uint64_t count,
                             Reader& in, Writer& out) {
  if (slot_) {
    slot_->call.store(call, std::memory_order_relaxed);
    slot_->chunk_slowest_ns.store(0, std::memory_order_relaxed);
  }
  ChunkRun chunk;
  chunk.call = call;
  chunk.first = first;
  chunk.count = count;
  chunk.slot = slot_;
  chunk.link = link_;
  if (link_) link_->chunk_starts();
  chunk.time_each_task = task_timeout_ || last_chunk_nanos_per_task_ >= min_nanos_per_timed_task;
  const std::int64_t start = steady_now_ns();
  chunk.task_start_ns = start;
  logic_.run(chunk, in, out);
  ChunkReport report;
  report.nanos = static_cast<std::uint64_t>(steady_now_ns() - start);
  report.dense = chunk.dense;
  if (link_) link_->chunk_ended(static_cast<std::int64_t>(report.nanos));
  if (count != 0) {
    last_chunk_nanos_per_task_ = static_cast<double>(report.nanos) / static_cast<double>(count);
  }
  if (slot_) {
    report.slowest_index = slot_->chunk_slowest_index.load(std::memory_order_relaxed);
    report.slowest_nanos = slot_->chunk_slowest_ns.load(std::memory_order_relaxed);
  }
  return report;
}

}  // namespace procpool::detail
