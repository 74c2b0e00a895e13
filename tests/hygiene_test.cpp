// Process hygiene: no zombies, no leaked descriptors, no doubled stdio or atexit.
#include <gtest/gtest.h>
#include <procpool/procpool.hpp>

#include <sys/wait.h>
#include <unistd.h>

#include <cstdio>
#include <cstdlib>
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
