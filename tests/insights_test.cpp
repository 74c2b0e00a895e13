// Insights: each diagnosis rule provoked for real, and the numbers behind it.
#include <gtest/gtest.h>
#include <procpool/procpool.hpp>

#include <sys/mman.h>

#include <chrono>
#include <cstdlib>
#include <cstring>
#include <numeric>
#include <ranges>
#include <thread>
#include <vector>

namespace {

using std::chrono::milliseconds;

std::vector<int> iota(int n) {
  std::vector<int> v(static_cast<std::size_t>(n));
  std::iota(v.begin(), v.end(), 0);
  return v;
}

void spin(std::chrono::microseconds d) {
  const auto until = std::chrono::steady_clock::now() + d;
  while (std::chrono::steady_clock::now() < until) {
  }
}

bool contains(const std::string& text, const std::string& part) {
  return text.find(part) != std::string::npos;
}

TEST(Insights, CountsEveryTaskPerWorkerAndExplainsAHealthyRun) {
  procpool::Insights in;
  procpool::map(
      [](int x) {
        spin(std::chrono::microseconds(2000));
        return x;
      },
      iota(200), {.processes = 2, .insights = &in});
  EXPECT_EQ(in.tasks, 200u);
  ASSERT_EQ(in.workers.size(), 2u);
  EXPECT_EQ(in.workers[0].tasks + in.workers[1].tasks, 200u);
  for (const auto& w : in.workers) {
    EXPECT_GT(w.compute_seconds, 0.05);
    EXPECT_GT(w.bytes_sent, 0u);
    EXPECT_GT(w.peak_rss_kb, 0u);
    EXPECT_NE(w.pid, ::getpid());
  }
  EXPECT_GT(in.efficiency, 0.5);
  ASSERT_FALSE(in.slowest_tasks.empty());
  EXPECT_GT(in.slowest_tasks.front().seconds, 0.0015);
  std::printf("%s", in.to_string().c_str());
  EXPECT_TRUE(contains(in.to_string(), "diagnosis: "));
}

TEST(Insights, FewerUsableCpusThanProcesses) {
  ::setenv("PROCPOOL_CPUS", "1", 1);
  procpool::Insights in;
  procpool::map([](int x) { return x; }, iota(100),
                {.processes = 2, .warn_oversubscription = false, .insights = &in});
  ::unsetenv("PROCPOOL_CPUS");
  std::printf("diagnosis: %s\n", in.diagnosis.c_str());
  EXPECT_TRUE(contains(in.diagnosis, "fewer usable CPUs (1) than processes (2)")) << in.diagnosis;
  EXPECT_TRUE(contains(in.diagnosis, "PROCPOOL_CPUS")) << in.diagnosis;
}

TEST(Insights, TasksTooSmallForThePerMessageOverhead) {
  procpool::Insights in;
  procpool::map([](int x) { return x + 1; }, iota(20000),
                {.processes = 2, .chunksize = 1, .insights = &in});
  std::printf("diagnosis: %s\n", in.diagnosis.c_str());
  EXPECT_TRUE(contains(in.diagnosis, "tasks are too small")) << in.to_string();
  EXPECT_TRUE(contains(in.diagnosis, "chunksize")) << in.diagnosis;
}

TEST(Insights, SerialisationAndTransportDominate) {
  // Each task returns a reference to 4 MiB the worker inherited: computing
  // it costs nothing, serialising and moving it is all the work. So the
  // diagnosis does not hang on how the CPUs were shared while it ran (a task
  // that built its 4 MiB itself looked like compute on a contended machine).
  const std::vector<char> inherited(4 << 20, 'x');
  procpool::Insights in;
  const auto results =
      procpool::map([&inherited](int) -> const std::vector<char>& { return inherited; }, iota(24),
                    {.processes = 2, .insights = &in});
  ASSERT_EQ(results.size(), 24u);
  EXPECT_EQ(results[23], inherited);
  std::printf("diagnosis: %s\n", in.diagnosis.c_str());
  EXPECT_TRUE(contains(in.diagnosis, "serialisation and transport dominate")) << in.to_string();
}

TEST(Insights, WorkersWaitingForASlowInputProducer) {
  procpool::Insights in;
  auto slow_input = std::views::iota(0, 150) | std::views::filter([](int) {
                      std::this_thread::sleep_for(milliseconds(2));  // producing is the slow part
                      return true;
                    });
  procpool::map(
      [](int x) {
        spin(std::chrono::microseconds(200));
        return x;
      },
      slow_input, {.processes = 2, .insights = &in});
  std::printf("diagnosis: %s\n", in.diagnosis.c_str());
  EXPECT_TRUE(contains(in.diagnosis, "waited")) << in.to_string();
  EXPECT_TRUE(contains(in.diagnosis, "input range")) << in.diagnosis;
}

TEST(Insights, LoadImbalanceNamesTheSlowestTask) {
  procpool::Insights in;
  procpool::map(
      [](int x) {
        spin(x == 30 ? std::chrono::microseconds(600000) : std::chrono::microseconds(2000));
        return x;
      },
      iota(40), {.processes = 2, .chunksize = 1, .insights = &in});
  std::printf("diagnosis: %s\n", in.diagnosis.c_str());
  EXPECT_TRUE(contains(in.diagnosis, "load imbalance")) << in.to_string();
  EXPECT_TRUE(contains(in.diagnosis, "slowest task #30")) << in.diagnosis;
}

TEST(Insights, SlowStartOfABigProcessPointsToHugePages) {
  // 256 MiB in use on 4 KiB pages: each fork copies ~65k page-table entries.
  constexpr std::size_t size = std::size_t{256} << 20;
  void* big = ::mmap(nullptr, size, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  ASSERT_NE(big, MAP_FAILED);
  ::madvise(big, size, MADV_NOHUGEPAGE);
  std::memset(big, 1, size);
  procpool::Insights in;
  procpool::map([](int x) { return x; }, iota(100), {.processes = 2, .insights = &in});
  ::munmap(big, size);
  std::printf("%s", in.to_string().c_str());
  EXPECT_GE(in.caller_anonymous_kb, 256u * 1024);
  EXPECT_GT(in.starting_seconds, 0.0);
  EXPECT_LT(in.starting_seconds, in.wall_seconds);
  EXPECT_TRUE(contains(in.diagnosis, "starting the workers took")) << in.to_string();
  EXPECT_TRUE(contains(in.diagnosis, "share_with_huge_pages")) << in.diagnosis;
}

TEST(Insights, PoolAccumulatesAcrossCallsAndCountsRestarts) {
  procpool::Pool pool({.processes = 2, .max_tasks_per_child = 50});
  pool.map([](int x) { return x; }, iota(300));
  const auto outcomes = pool.map_outcomes(
      [](int x) {
        if (x == 3) std::abort();
        return x;
      },
      iota(10));
  EXPECT_EQ(outcomes.size(), 10u);
  procpool::Insights in = pool.insights();
  EXPECT_EQ(in.tasks, 309u) << "the crashed task produced no result";
  unsigned crashes = 0, recycles = 0;
  for (const auto& w : in.workers) {
    crashes += w.crashes;
    recycles += w.recycles;
  }
  EXPECT_EQ(crashes, 1u);
  EXPECT_GE(recycles, 4u);
}

}  // namespace
