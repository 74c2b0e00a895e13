// The one chunk runner: forked and spawned workers, and Start::in_process in
// the caller's own process, all run a chunk of tasks through here.
#pragma once

#include <cstdint>

#include "procpool/detail/protocol.hpp"

namespace procpool::detail {

/// What running a chunk reports, for its reply.
struct ChunkReport {
  std::uint64_t nanos = 0;          // time spent running the whole chunk
  std::uint64_t slowest_index = 0;  // its slowest task, when each task was timed
  std::uint64_t slowest_nanos = 0;
  bool dense = false;  // the outcomes were written dense (see flag_dense)
};

/// Runs chunks through a worker's logic: times each chunk, and decides from
/// the one before whether each task is worth timing.
class ChunkRunner {
 public:
  /// `slot` is where the running task is noted (null: nobody watches);
  /// `task_timeout` says the pool has one, so every task's start is needed.
  /// `link`: the worker's link to its parent, checked after tasks (null: none).
  ChunkRunner(WorkerLogic& logic, WorkerSlot* slot, bool task_timeout, LinkWatch* link = nullptr)
      : logic_(logic), slot_(slot), task_timeout_(task_timeout), link_(link) {}

  /// Runs tasks `first` .. `first + count - 1` of `call`, inputs from `in`, outcomes to `out`.
  ChunkReport run(std::uint64_t call, std::uint64_t first, std::uint64_t count, Reader& in,
                  Writer& out);

 private:
  WorkerLogic& logic_;
  WorkerSlot* slot_;
  bool task_timeout_;
  LinkWatch* link_;
  /// Average task time of the previous chunk: decides whether each task is timed.
  double last_chunk_nanos_per_task_ = 1e9;
};

}  // namespace procpool::detail
