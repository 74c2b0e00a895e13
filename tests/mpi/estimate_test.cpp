// How a chunk's reply counts toward the root's task-time estimate
// (src/mpi/estimate.hpp): the workers' time for small automatic chunks, the
// wall time otherwise.
#include <gtest/gtest.h>

#include "../../src/mpi/estimate.hpp"

namespace {

using procpool::mpi::detail::estimate_seconds;
using procpool::mpi::detail::NodeTimes;

// A warm-up chunk as a trace had it: 11 tiny tasks, 971 us on a node of one
// worker, of which the worker ran them for 2 us.
constexpr NodeTimes small_chunk{971e-6, 2e-6, 1e-3, 200};

TEST(MpiEstimate, SmallAutomaticChunkCountsItsWorkersTime) {
  EXPECT_DOUBLE_EQ(estimate_seconds(small_chunk, 1, 11, true), 2e-6);
}

TEST(MpiEstimate, ExplicitChunksizeKeepsTheWallTime) {
  EXPECT_DOUBLE_EQ(estimate_seconds(small_chunk, 1, 11, false), 971e-6);
}

TEST(MpiEstimate, WallTimeCountsForEachWorkerTheChunkKeptBusy) {
  NodeTimes t = small_chunk;
  t.run_seconds = 0.02;  // long enough that the node's fixed cost is a small part
  EXPECT_DOUBLE_EQ(estimate_seconds(t, 4, 100, true), 0.08);
  EXPECT_DOUBLE_EQ(estimate_seconds(t, 4, 2, true), 0.04);  // two tasks keep two busy
}

TEST(MpiEstimate, LargeChunksCountTheirWallTime) {
  // Moving a MiB or more costs what the workers' time does not show.
  NodeTimes t = small_chunk;
  t.bytes = std::size_t{1} << 20;
  EXPECT_DOUBLE_EQ(estimate_seconds(t, 1, 11, true), 971e-6);
  t.bytes = (std::size_t{1} << 20) - 1;
  EXPECT_DOUBLE_EQ(estimate_seconds(t, 1, 11, true), 2e-6);
}

TEST(MpiEstimate, WorkersTimeNeverAboveTheWallTime) {
  // Other calls' chunks on the node's Pool finished meanwhile.
  NodeTimes t = small_chunk;
  t.worker_seconds = 5e-3;
  EXPECT_DOUBLE_EQ(estimate_seconds(t, 2, 11, true), 2 * 971e-6);
}

TEST(MpiEstimate, ChunkWhoseBatchPredecessorTookTheWorkersTimeCountsNone) {
  // Its tasks' time went with the reply before it; its inputs still count.
  NodeTimes t = small_chunk;
  t.run_seconds = 2e-6;
  t.worker_seconds = 0;
  EXPECT_DOUBLE_EQ(estimate_seconds(t, 1, 37, true), 0.0);
}

}  // namespace
