// What a caller sees when a task throws or its worker dies.
#include <gtest/gtest.h>
#include <procpool/procpool.hpp>

#include <csignal>
#include <cstdlib>
#include <numeric>
#include <stdexcept>
#include <string>
#include <type_traits>
#include <vector>

#include "helpers.hpp"

namespace {

std::vector<int> iota(int n) {
  std::vector<int> v(static_cast<std::size_t>(n));
  std::iota(v.begin(), v.end(), 0);
  return v;
}

TEST(TaskError, CarriesIndexTypeAndMessageAndLeavesNoWorkerBehind) {
  try {
    procpool::map(
        [](int x) {
          if (x == 137) throw std::invalid_argument("cannot parse record " + std::to_string(x));
          return x;
        },
        iota(1000), {.processes = 2});
    FAIL() << "no exception";
  } catch (const procpool::TaskError& e) {
    EXPECT_EQ(e.index(), 137u);
    EXPECT_EQ(e.type_name(), "std::invalid_argument");
    EXPECT_EQ(e.remote_what(), "cannot parse record 137");
    EXPECT_STREQ(e.what(),
                 "procpool: task 137 threw std::invalid_argument: cannot parse record 137");
  }
  EXPECT_TRUE(test_helpers::children().empty()) << "workers survived the failed call";
}

TEST(TaskError, AFailureInsideALargeChunkStopsMapAtThatInput) {
  // map takes successes in bulk; the bulk must stop exactly at the failure,
  // for a Pool (results decoded from replies) as for fork per call.
  const auto fails_at = [](long x) {
    if (x == 54321) throw std::out_of_range("too far");
    return x * 2;
  };
  std::vector<long> inputs(100000);
  std::iota(inputs.begin(), inputs.end(), 0L);
  try {
    procpool::map(fails_at, inputs, {.processes = 2});
    FAIL() << "no exception";
  } catch (const procpool::TaskError& e) {
    EXPECT_EQ(e.index(), 54321u);
  }
  procpool::Pool pool({.processes = 2});
  try {
    pool.map(fails_at, inputs);
    FAIL() << "no exception";
  } catch (const procpool::TaskError& e) {
    EXPECT_EQ(e.index(), 54321u);
  }
  const auto after = pool.map([](long x) { return x + 1; }, inputs);
  ASSERT_EQ(after.size(), inputs.size());
  EXPECT_EQ(after.front(), 1);
  EXPECT_EQ(after.back(), 100000);
}

struct CustomFailure {};  // not derived from std::exception

TEST(TaskError, NonStandardExceptionKeepsItsTypeName) {
  try {
    procpool::map(
        [](int x) -> int {
          throw CustomFailure{};
          return x;
        },
        iota(3), {.processes = 1});
    FAIL() << "no exception";
  } catch (const procpool::TaskError& e) {
    EXPECT_NE(e.type_name().find("CustomFailure"), std::string::npos) << e.type_name();
    EXPECT_EQ(e.index(), 0u);
  }
}

TEST(TaskError, ThrownFromImapWhenTheFailingResultIsReached) {
  auto results = procpool::imap(
      [](int x) {
        if (x == 5) throw std::runtime_error("five");
        return x;
      },
      iota(10), {.processes = 2, .chunksize = 1});
  std::vector<int> before;
  try {
    for (int v : results)
      before.push_back(v);
    FAIL() << "no exception";
  } catch (const procpool::TaskError& e) {
    EXPECT_EQ(e.index(), 5u);
  }
  EXPECT_EQ(before, (std::vector<int>{0, 1, 2, 3, 4}));
}

TEST(TaskError, IsCaughtAsAnErrorAndAsARuntimeErrorWithItsMessage) {
  const std::string expected = "procpool: task 3 threw T: w";
  try {
    throw procpool::TaskError(3, "T", "w");
  } catch (const procpool::Error& e) {
    EXPECT_EQ(e.what(), expected);
  }
  try {
    throw procpool::TaskError(3, "T", "w");
  } catch (const std::runtime_error& e) {
    EXPECT_EQ(e.what(), expected);
  }
}

TEST(WorkerCrashed, KilledWorkerReportsSignalPidAndIndex) {
  try {
    procpool::map(
        [](int x) {
          if (x == 42) ::raise(SIGKILL);
          return x;
        },
        iota(100), {.processes = 2});
    FAIL() << "no exception";
  } catch (const procpool::WorkerCrashed& e) {
    EXPECT_EQ(e.index(), 42u);
    EXPECT_EQ(e.signal(), SIGKILL);
    EXPECT_GT(e.pid(), 0);
    EXPECT_NE(e.pid(), ::getpid());
    EXPECT_NE(std::string(e.what()).find("running task 42 was killed by signal 9"),
              std::string::npos)
        << e.what();
  }
  EXPECT_TRUE(test_helpers::children().empty());
}

TEST(WorkerCrashed, AbortAndExitAreReported) {
  try {
    procpool::map(
        [](int x) {
          if (x == 3) std::abort();
          return x;
        },
        iota(10), {.processes = 2});
    FAIL() << "no exception";
  } catch (const procpool::WorkerCrashed& e) {
    EXPECT_EQ(e.index(), 3u);
    EXPECT_EQ(e.signal(), SIGABRT);
  }
  try {
    procpool::map(
        [](int x) {
          if (x == 7) ::_exit(3);
          return x;
        },
        iota(10), {.processes = 2});
    FAIL() << "no exception";
  } catch (const procpool::WorkerCrashed& e) {
    EXPECT_EQ(e.index(), 7u);
    EXPECT_EQ(e.signal(), 0);
    EXPECT_EQ(e.exit_status(), 3);
  }
}

TEST(WorkerCrashed, CrashInsideABigChunkIsPinnedOnTheRightInput) {
  // Chunks of 50: the crash must still be reported for input 77, not its chunk's first.
  try {
    procpool::map(
        [](int x) {
          if (x == 77) ::raise(SIGKILL);
          return x;
        },
        iota(200), {.processes = 2, .chunksize = 50});
    FAIL() << "no exception";
  } catch (const procpool::WorkerCrashed& e) {
    EXPECT_EQ(e.index(), 77u);
  }
}

TEST(WorkerCrashed, PoolReplacesTheWorkerAndGoesOn) {
  procpool::Pool pool({.processes = 2});
  EXPECT_THROW(pool.map(
                   [](int x) {
                     if (x == 1) ::raise(SIGKILL);
                     return x;
                   },
                   iota(4)),
               procpool::WorkerCrashed);
  EXPECT_EQ(pool.map([](int x) { return x * 2; }, iota(4)), (std::vector<int>{0, 2, 4, 6}));
  EXPECT_EQ(pool.worker_pids().size(), 2u);
}

// The hierarchy roots at Error, itself a std::runtime_error: a compile-time fact.
static_assert(std::is_base_of_v<procpool::Error, procpool::TaskError>);
static_assert(std::is_base_of_v<procpool::Error, procpool::WorkerCrashed>);
static_assert(std::is_base_of_v<procpool::Error, procpool::TaskTimeout>);
static_assert(std::is_base_of_v<procpool::Error, procpool::ProtocolError>);
static_assert(std::is_base_of_v<procpool::Error, procpool::PoolClosed>);
static_assert(std::is_base_of_v<std::runtime_error, procpool::Error>);

}  // namespace
