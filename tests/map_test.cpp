// Fork-per-call free functions: map, imap, imap_unordered, starmap.
#include <gtest/gtest.h>
#include <procpool/procpool.hpp>

#include <algorithm>
#include <chrono>
#include <list>
#include <numeric>
#include <ranges>
#include <set>
#include <string>
#include <vector>

#include "helpers.hpp"

namespace {

void spin_for(std::chrono::microseconds d) {
  const auto until = std::chrono::steady_clock::now() + d;
  while (std::chrono::steady_clock::now() < until) {
  }
}

TEST(Map, KeepsInputOrderOver100kTasksOfUnevenLength) {
  std::vector<long> inputs(100000);
  std::iota(inputs.begin(), inputs.end(), 0L);
  auto results = procpool::map(
      [](long x) {
        // Every 1000th task is slow, so later tasks overtake it in other workers.
        if (x % 1000 == 0) spin_for(std::chrono::microseconds(300));
        return x * 3 + 1;
      },
      inputs, {.processes = 2});
  ASSERT_EQ(results.size(), inputs.size());
  for (std::size_t i = 0; i < inputs.size(); ++i)
    ASSERT_EQ(results[i], inputs[i] * 3 + 1) << i;
}

TEST(Map, OrderKeptWithFixedSmallChunksAndLazyInput) {
  std::list<int> inputs;  // not random access: inputs travel to the workers
  for (int i = 0; i < 20000; ++i)
    inputs.push_back(i);
  auto results = procpool::map(
      [](int x) {
        if (x % 7 == 0) spin_for(std::chrono::microseconds(50));
        return std::to_string(x);
      },
      inputs, {.processes = 2, .chunksize = 3});
  ASSERT_EQ(results.size(), 20000u);
  for (int i = 0; i < 20000; ++i)
    ASSERT_EQ(results[static_cast<std::size_t>(i)], std::to_string(i));
}

TEST(Map, EmptyInputGivesEmptyResult) {
  std::vector<int> none;
  EXPECT_TRUE(procpool::map([](int x) { return x; }, none).empty());
  EXPECT_TRUE(test_helpers::children().empty());
}

constexpr bool reads_cost_private_shadow = test_helpers::under_tsan;

TEST(Map, CaptureByReferenceSeesCallersMemoryWithoutCopyingIt) {
  // 1 GiB, every page written so it really exists in the parent. Under TSan,
  // whose shadow makes the size check below meaningless, 64 MiB: the 1 GiB
  // took 40 s of its CI run (and 7 s under ASan).
  const std::size_t size = std::size_t{reads_cost_private_shadow ? 64 : 1024} << 20;
  std::vector<char> table(size);
  for (std::size_t i = 0; i < size; i += 4096)
    table[i] = static_cast<char>(i / 4096 % 127);
  std::vector<std::size_t> probes{0, 4096 * 1000, size - 4096};
  struct Seen {
    char value;
    long private_kib;
  };
  auto seen = procpool::map(
      [&table](std::size_t at) {
        // Read the whole table, then report what this worker holds privately.
        long sum = 0;
        for (std::size_t i = 0; i < table.size(); i += 4096)
          sum += table[i];
        return Seen{static_cast<char>(table[at] + (sum < 0 ? 1 : 0)), test_helpers::private_kib()};
      },
      probes, {.processes = 2});
  for (std::size_t i = 0; i < probes.size(); ++i) {
    EXPECT_EQ(seen[i].value, table[probes[i]]);
    // A copy would make the worker's private memory grow by ~1 GiB; sharing
    // keeps it small. (Not under TSan: its shadow of each byte read is the
    // reading process's own memory, 1 GiB of it here.)
    if (!reads_cost_private_shadow) {
      EXPECT_LT(seen[i].private_kib, 128 * 1024) << "worker holds a private copy of the table";
    }
  }
}

TEST(Imap, EndlessGeneratorStoppedAfterNResultsIsConsumedLazily) {
  std::size_t pulled = 0;
  auto endless = std::views::iota(0L) | std::views::transform([&pulled](long i) {
                   ++pulled;
                   return i;
                 });
  std::vector<long> got;
  {
    auto results =
        procpool::imap([](long x) { return x * x; }, endless, {.processes = 2, .max_inflight = 64});
    for (long sq : results) {
      got.push_back(sq);
      if (got.size() == 1000) break;
    }
  }
  ASSERT_EQ(got.size(), 1000u);
  for (long i = 0; i < 1000; ++i)
    EXPECT_EQ(got[static_cast<std::size_t>(i)], i * i);
  EXPECT_LE(pulled, 1000u + 64u) << "imap read further ahead than max_inflight";
  EXPECT_TRUE(test_helpers::children().empty()) << "stopping imap left workers behind";
}

TEST(Imap, ResultsArriveBeforeTheInputEnds) {
  // A filter view is neither sized nor random access: the caller pulls each
  // input and counts it here, so the test sees how far it read.
  constexpr int input_count = 1000000;
  int pulled = 0;
  auto counted = std::views::iota(0, input_count) | std::views::filter([&pulled](int) {
                   ++pulled;
                   return true;
                 });
  auto results = procpool::imap([](int x) { return x + 1; }, counted, {.processes = 2});
  auto it = results.begin();
  EXPECT_EQ(*it, 1);
  ++it;
  EXPECT_EQ(*it, 2);
  EXPECT_LT(pulled, input_count) << "the first results waited for the whole input";
}

TEST(ImapUnordered, YieldsEveryIndexOnceWithItsValue) {
  std::vector<int> inputs(5000);
  std::iota(inputs.begin(), inputs.end(), 0);
  std::set<std::size_t> indices;
  for (auto [index, value] : procpool::imap_unordered(
           [](int x) {
             if (x % 10 == 0) spin_for(std::chrono::microseconds(100));
             return x * 2;
           },
           inputs, {.processes = 2})) {
    EXPECT_EQ(value, inputs[index] * 2);
    EXPECT_TRUE(indices.insert(index).second) << "index " << index << " seen twice";
  }
  EXPECT_EQ(indices.size(), inputs.size());
}

TEST(Starmap, UnpacksTuplesAndPairs) {
  std::vector<std::tuple<int, std::string, double>> args{{1, "a", 0.5}, {2, "bb", 1.5}};
  auto out = procpool::starmap([](int n, const std::string& s,
                                  double d) { return std::to_string(n) + s + std::to_string(d); },
                               args, {.processes = 2});
  EXPECT_EQ(out, (std::vector<std::string>{"1a0.500000", "2bb1.500000"}));
  std::vector<std::pair<int, int>> pairs{{1, 2}, {3, 4}, {5, 6}};
  EXPECT_EQ(procpool::starmap([](int a, int b) { return a + b; }, pairs),
            (std::vector<int>{3, 7, 11}));
}

struct Record {
  std::string name;
  std::vector<int> values;
  template <class Archive>
  void serialize(Archive& ar) {
    ar(name, values);
  }
  bool operator==(const Record&) const = default;
};

TEST(Map, UserTypesWithCerealSerializeRoundTrip) {
  std::list<Record> inputs{{"a", {1}}, {"b", {2, 3}}, {"", {}}};
  auto out = procpool::map(
      [](const Record& r) {
        Record copy = r;
        copy.name += "!";
        copy.values.push_back(static_cast<int>(r.values.size()));
        return copy;
      },
      inputs, {.processes = 2});
  EXPECT_EQ(out, (std::vector<Record>{{"a!", {1, 1}}, {"b!", {2, 3, 2}}, {"!", {0}}}));
}

TEST(InProcess, GivesTheSameResultsAsForkAndStartsNoProcess) {
  std::vector<std::string> words{"alpha", "beta", "gamma", "delta"};
  auto length = [](const std::string& w) {
    return std::pair<std::string, std::size_t>{w, w.size()};
  };
  auto forked = procpool::map(length, words, {.processes = 2});
  pid_t seen_pid = 0;
  bool saw_children = false;
  auto in_process = procpool::map(
      [&](const std::string& w) {
        seen_pid = ::getpid();  // written in this process only if the task runs here
        saw_children = saw_children || !test_helpers::children().empty();
        return length(w);
      },
      words, {.start = procpool::Start::in_process});
  EXPECT_EQ(forked, in_process);
  EXPECT_EQ(seen_pid, ::getpid());
  EXPECT_FALSE(saw_children) << "a process was started while the tasks ran";
}

TEST(InProcess, ReportsTaskErrorsTheSameWay) {
  std::vector<int> inputs{1, 2, 3};
  try {
    procpool::map(
        [](int x) {
          if (x == 2) throw std::out_of_range("two");
          return x;
        },
        inputs, {.start = procpool::Start::in_process});
    FAIL() << "no exception";
  } catch (const procpool::TaskError& e) {
    EXPECT_EQ(e.index(), 1u);
    EXPECT_EQ(e.type_name(), "std::out_of_range");
  }
}

TEST(Map, RunsInSeveralWorkerProcesses) {
  std::vector<int> inputs(64);
  auto pids = procpool::map(
      [](int) {
        spin_for(std::chrono::milliseconds(5));
        return ::getpid();
      },
      inputs, {.processes = 2});
  std::set<pid_t> distinct(pids.begin(), pids.end());
  EXPECT_EQ(distinct.size(), 2u);
  EXPECT_EQ(distinct.count(::getpid()), 0u);
}

}  // namespace
