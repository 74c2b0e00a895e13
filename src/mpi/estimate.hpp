// How one chunk's reply counts toward its call's task-time estimate on the
// root (CallState::receive): pure arithmetic, tested on its own
// (tests/mpi/estimate_test.cpp).
#pragma once

#include <algorithm>
#include <cstddef>

namespace procpool::mpi::detail {

/// What a chunk's reply says of its time (Msg::chunk_done), and its transit.
struct NodeTimes {
  double run_seconds = 0;  // on its node, beyond the chunk before it in its batch
  /// The time of the node's worker chunks that finished meanwhile (those of
  /// other calls on its Pool too), as each worker timed its own.
  double worker_seconds = 0;
  double transit_seconds = 0;  // its round trip less its time on the node
  std::size_t bytes = 0;       // its message and its reply's
};

/// A chunk that ran shorter than this on its node, and that moved less than
/// the bytes below, tells its tasks' time by its workers' time, not by its
/// wall time: that holds the node's fixed cost per chunk (its hand-over to
/// the workers and back, a millisecond or more on a busy machine), which
/// small chunks would count as the tasks' own (a warm-up of 200 tasks of 0.1
/// us, in chunks of 1 and 11, left an estimate of 3.3 us). Longer or larger,
/// the wall time counts: it includes what moving big inputs and results
/// costs, which the workers' time does not.
inline constexpr double wall_time_counts_from = 0.01;
inline constexpr std::size_t wall_time_counts_from_bytes = std::size_t{1} << 20;

/// The time on one worker that a chunk of `count` tasks adds to the
/// estimate, from a node of `workers` workers (each task as if the chunk had
/// had the node alone: other chunks running beside it make it an
/// overestimate, so smaller chunks, safe).
/// Automatic chunks of little work count the workers' time: it may hold
/// other calls' tasks too, so never above the wall time, and none at all
/// when the chunk before it in the node's batch took it. An explicit
/// chunksize (`automatic` false) keeps the wall time: how many of its chunks
/// cover a round trip is up to their whole time on the node, fixed cost
/// included.
inline double estimate_seconds(const NodeTimes& times, double workers, double count,
                               bool automatic) {
  const double wall = times.run_seconds * std::min(workers, count);
  const bool small = automatic && times.run_seconds < wall_time_counts_from &&
                     times.bytes < wall_time_counts_from_bytes;
  return small ? std::min(times.worker_seconds, wall) : wall;
}

}  // namespace procpool::mpi::detail
