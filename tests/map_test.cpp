// Fork-per-call free functions: map, imap, imap_unordered, starmap.
#include <gtest/gtest.h>
#include <procpool/procpool.hpp>

#include <algorithm>
#include <atomic>
#include <csignal>
#include <list>
#include <numeric>
#include <random>
#include <ranges>
#include <set>
#include <string>
#include <thread>
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

TEST(Map, CaptureByReferenceSeesCallersMemoryWithoutCopyingIt) {
  // 1 GiB, every page written so it really exists in the parent.
  const std::size_t size = std::size_t{1} << 30;
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
    // A copy would make the worker's private memory grow by ~1 GiB; sharing keeps it small.
    EXPECT_LT(seen[i].private_kib, 128 * 1024) << "worker holds a private copy of the table";
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
  auto results =
      procpool::imap([](int x) { return x + 1; }, std::views::iota(0, 1000000), {.processes = 2});
  auto it = results.begin();
  EXPECT_EQ(*it, 1);
  ++it;
  EXPECT_EQ(*it, 2);
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
  auto in_process = procpool::map(
      [&](const std::string& w) {
        seen_pid = ::getpid();  // written in this process only if the task runs here
        return length(w);
      },
      words, {.start = procpool::Start::in_process});
  EXPECT_EQ(forked, in_process);
  EXPECT_EQ(seen_pid, ::getpid());
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

namespace {

std::vector<unsigned char> pattern(int seed, std::size_t size) {
  std::vector<unsigned char> v(size);
  for (std::size_t i = 0; i < size; ++i)
    v[i] = static_cast<unsigned char>(seed * 31 + i * 7);
  return v;
}

TEST(LargeResults, TravelThroughTheArenaOrTheSocketIntact) {
  // 1 MiB replies go through each worker's shared arena when it is free, and
  // through the socket when the parent still holds the previous one.
  std::vector<int> seeds(40);
  std::iota(seeds.begin(), seeds.end(), 0);
  procpool::Insights insights;
  auto out = procpool::map([](int s) { return pattern(s, 1 << 20); }, seeds,
                           {.processes = 2, .insights = &insights});
  for (int s = 0; s < 40; ++s)
    ASSERT_EQ(out[static_cast<std::size_t>(s)], pattern(s, 1 << 20)) << s;
  std::uint64_t on_socket = 0;
  for (const auto& w : insights.workers)
    on_socket += w.bytes_sent;
  EXPECT_LT(on_socket, 20u << 20) << "most of the 40 MiB should bypass the socket";
}

TEST(LargeResults, ASlowConsumerHoldingResultsDoesNotCorruptLaterOnes) {
  std::vector<std::vector<unsigned char>> kept;
  for (auto& v : procpool::imap([](int s) { return pattern(s, 300 << 10); },
                                std::views::iota(0, 30), {.processes = 2})) {
    std::this_thread::sleep_for(std::chrono::milliseconds(2));
    kept.push_back(std::move(v));
  }
  for (int s = 0; s < 30; ++s)
    ASSERT_EQ(kept[static_cast<std::size_t>(s)], pattern(s, 300 << 10)) << s;
}

TEST(LargeResults, ACallNobodyConsumesDoesNotStallAnotherCallOnThePool) {
  // The first call's replies keep every arena region taken while nobody reads
  // them; a worker waits a little for a free region, then uses the socket.
  procpool::Pool pool({.processes = 2});
  auto held = pool.imap([](int s) { return pattern(s, 1 << 20); }, std::views::iota(0, 16));
  auto it = held.begin();
  ASSERT_EQ(*it, pattern(0, 1 << 20));
  const auto started = std::chrono::steady_clock::now();
  auto other = pool.map([](int s) { return pattern(s + 100, 1 << 20); }, std::views::iota(0, 8));
  EXPECT_LT(std::chrono::steady_clock::now() - started, std::chrono::seconds(5));
  for (int s = 0; s < 8; ++s)
    ASSERT_EQ(other[static_cast<std::size_t>(s)], pattern(s + 100, 1 << 20)) << s;
  for (int s = 1; s < 16; ++s)
    ASSERT_EQ(*++it, pattern(s, 1 << 20)) << s;
}

TEST(LargeResults, RecycledArenasAreNeverSharedWithAWorkersOwnCalls) {
  // Arenas of finished workers are kept for the next ones. A worker inherits
  // the parent's cache and must not use it: a call made inside a task (its
  // own engine) would write into arenas the parent hands to its new workers.
  const auto check = [](int s) {
    auto inner = procpool::map([](int t) { return pattern(t, 256 << 10); },
                               std::views::iota(s * 10, s * 10 + 6), {.processes = 2});
    for (int t = 0; t < 6; ++t) {
      if (inner[static_cast<std::size_t>(t)] != pattern(s * 10 + t, 256 << 10)) return false;
    }
    return true;
  };
  // Leaves eight arenas in the cache, so that four are there when the workers below are forked.
  procpool::map([](int t) { return pattern(t, 256 << 10); }, std::views::iota(0, 8),
                {.processes = 4, .warn_oversubscription = false});
  const auto ok =
      procpool::map(check, std::views::iota(0, 12), {.processes = 2, .max_tasks_per_child = 1});
  for (std::size_t i = 0; i < ok.size(); ++i)
    EXPECT_TRUE(ok[i]) << "inner call " << i << " got corrupt results";
}

TEST(LargeResults, SizesThatChangeFromReplyToReplyArriveIntact) {
  // After a large reply a worker writes the next one straight into a shared
  // region; one that outgrows the region (32 MiB) moves out and takes the
  // socket, a small one stays in the region.
  const std::vector<std::size_t> sizes{1 << 20, 40 << 20, 3 << 20, 100, 2 << 20, 0, 1 << 20};
  auto out = procpool::map(
      [&sizes](int s) { return pattern(s, sizes[static_cast<std::size_t>(s)]); },
      std::views::iota(0, static_cast<int>(sizes.size())), {.processes = 1, .chunksize = 1});
  ASSERT_EQ(out.size(), sizes.size());
  for (std::size_t s = 0; s < sizes.size(); ++s)
    ASSERT_EQ(out[s], pattern(static_cast<int>(s), sizes[s])) << s;
}

TEST(LargeResults, WorkersDyingAroundArenaRepliesLoseNothing) {
  auto out = procpool::map(
      [](int s) {
        thread_local std::mt19937 rng(std::random_device{}());
        if (std::uniform_int_distribution<int>(0, 19)(rng) == 0) ::raise(SIGKILL);
        return pattern(s, 512 << 10);
      },
      std::views::iota(0, 60), {.processes = 2, .retries = 10});
  for (int s = 0; s < 60; ++s)
    ASSERT_EQ(out[static_cast<std::size_t>(s)], pattern(s, 512 << 10)) << s;
}

}  // namespace

namespace {

std::uint64_t checksum(const std::vector<unsigned char>& v) {
  std::uint64_t h = 1469598103934665603ull;
  for (unsigned char c : v)
    h = (h ^ c) * 1099511628211ull;
  return h;
}

TEST(LargeInputs, TravelThroughTheInputArenaIntactEvenWhenWorkersDie) {
  std::list<std::vector<unsigned char>> inputs;  // not random access: the inputs must travel
  for (int s = 0; s < 40; ++s)
    inputs.push_back(pattern(s, 1 << 20));
  procpool::Insights insights;
  auto sums = procpool::map(
      [](const std::vector<unsigned char>& v) {
        thread_local std::mt19937 rng(std::random_device{}());
        if (std::uniform_int_distribution<int>(0, 9)(rng) == 0) ::raise(SIGKILL);
        return checksum(v);
      },
      inputs, {.processes = 2, .retries = 20, .insights = &insights});
  int s = 0;
  for (const auto& v : inputs)
    ASSERT_EQ(sums[static_cast<std::size_t>(s++)], checksum(v)) << s;
  std::uint64_t on_socket = 0;
  for (const auto& w : insights.workers)
    on_socket += w.bytes_received;
  EXPECT_LT(on_socket, 20u << 20) << "most of the 40 MiB should bypass the socket";
}

}  // namespace
