// Large results and inputs through the workers' shared arenas: intact
// whatever the sizes, the consumers and the workers' deaths.
#include <gtest/gtest.h>
#include <procpool/procpool.hpp>

#include <csignal>
#include <cstdint>
#include <list>
#include <random>
#include <ranges>
#include <string>
#include <vector>

#include "helpers.hpp"

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
