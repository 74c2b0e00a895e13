// Process hygiene: no zombies, no leaked descriptors, no doubled stdio or atexit.
#include <gtest/gtest.h>
#include <procpool/procpool.hpp>

#include <sys/mman.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <sstream>
#include <string>
#include <vector>

#include "helpers.hpp"

namespace {

TEST(Hygiene, NoChildProcessAfterAnyKindOfCall) {
  std::vector<int> inputs{1, 2, 3, 4, 5};
  procpool::map([](int x) { return x; }, inputs, {.processes = 2});
  for (auto v : procpool::imap([](int x) { return x; }, inputs, {.processes = 2}))
    (void)v;
  for (auto v : procpool::imap_unordered([](int x) { return x; }, inputs, {.processes = 2}))
    (void)v;
  {
    procpool::Pool pool({.processes = 2});
    pool.map([](int x) { return x; }, inputs);
  }
  EXPECT_TRUE(test_helpers::children().empty());
}

// Bytes in memory of the shared regions this process keeps for later workers
// (shared anonymous mappings of 128 MiB and more), whether or not this process
// has them mapped: mincore() sees the pages of the shared object itself.
std::size_t resident_region_bytes() {
  std::ifstream maps("/proc/self/maps");
  std::size_t resident = 0;
  for (std::string line; std::getline(maps, line);) {
    std::istringstream fields(line);
    std::string range, perms;
    fields >> range >> perms;
    const auto dash = range.find('-');
    const auto begin = std::stoull(range.substr(0, dash), nullptr, 16);
    const auto end = std::stoull(range.substr(dash + 1), nullptr, 16);
    if (perms != "rw-s" || line.find("/dev/zero") == std::string::npos ||
        end - begin < (std::size_t{128} << 20)) {
      continue;
    }
    std::vector<unsigned char> pages((end - begin) / 4096);
    if (::mincore(reinterpret_cast<void*>(begin), end - begin, pages.data()) != 0) continue;
    for (unsigned char p : pages)
      resident += (p & 1u) * 4096;
  }
  return resident;
}

TEST(Hygiene, SharedRegionsKeepAtMostTheirFirstMiBBetweenCalls) {
  // Each worker's first reply (24 MiB) fills one region; the next, written
  // straight into another region, is mapped for 24 MiB but fills 100 KiB.
  // Once the workers are gone, the cached regions keep their first MiB only.
  std::vector<int> inputs{0, 1, 2, 3, 4, 5, 6, 7};
  const auto replies = procpool::map(
      [](int i) { return std::vector<char>(i < 2 ? std::size_t{24} << 20 : 100 << 10, 'x'); },
      inputs, {.processes = 2, .chunksize = 1});
  ASSERT_EQ(replies.size(), 8u);
  EXPECT_EQ(replies[1].size(), std::size_t{24} << 20);
  EXPECT_EQ(replies[7].size(), std::size_t{100} << 10);
  constexpr std::size_t cached_arenas = 8, regions = 4;
  EXPECT_LE(resident_region_bytes(), cached_arenas * regions * (std::size_t{1} << 20) + (1 << 20));
}

TEST(Hygiene, RepeatedCallsLeakNoDescriptors) {
  std::vector<int> inputs{1, 2, 3};
  procpool::map([](int x) { return x; }, inputs, {.processes = 2});  // warm up lazy statics
  const int before = test_helpers::open_fd_count();
  for (int i = 0; i < 100; ++i)
    procpool::map([](int x) { return x; }, inputs, {.processes = 2});
  for (int i = 0; i < 20; ++i) {
    procpool::Pool pool({.processes = 2});
    pool.map([](int x) { return x; }, inputs);
  }
  EXPECT_EQ(test_helpers::open_fd_count(), before);
  EXPECT_TRUE(test_helpers::children().empty());
}

std::size_t count(const std::string& haystack, const std::string& needle) {
  std::size_t n = 0;
  for (auto at = haystack.find(needle); at != std::string::npos; at = haystack.find(needle, at + 1))
    ++n;
  return n;
}

TEST(Hygiene, BufferedOutputBeforeACallIsPrintedOnce) {
  std::string out = test_helpers::output_of(
      STDOUT_FILENO,
      [] {
        std::printf("buffered-marker ");  // stdout is a pipe: fully buffered, not yet written
        procpool::map([](int x) { return x; }, std::vector{1, 2, 3, 4}, {.processes = 2});
        procpool::Pool pool({.processes = 2});
        pool.map([](int x) { return x; }, std::vector{1, 2});
      },
      true);
  EXPECT_EQ(count(out, "buffered-marker"), 1u) << out;
}

TEST(Hygiene, WorkersNeverRunTheParentsAtexitHandlers) {
  std::string out = test_helpers::output_of(
      STDOUT_FILENO,
      [] {
        std::atexit([] { std::printf("atexit-marker\n"); });
        procpool::map([](int x) { return x; }, std::vector{1, 2, 3, 4}, {.processes = 2});
        procpool::Pool pool({.processes = 2});
        pool.map([](int x) { return x; }, std::vector{1, 2});
      },
      true);
  EXPECT_EQ(count(out, "atexit-marker"), 1u) << out;
}

TEST(Hygiene, WhatATaskPrintsIsNotLost) {
  std::string out = test_helpers::output_of(
      STDOUT_FILENO,
      [] {
        procpool::map(
            [](int x) {
              std::printf("task-output-%d\n", x);
              return x;
            },
            std::vector{1, 2}, {.processes = 2});
      },
      true);
  EXPECT_EQ(count(out, "task-output-1"), 1u) << out;
  EXPECT_EQ(count(out, "task-output-2"), 1u) << out;
}

}  // namespace
