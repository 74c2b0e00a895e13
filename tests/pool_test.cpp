// The persistent Pool: worker state, extra arguments, futures, lifecycle.
#include <gtest/gtest.h>
#include <sys/resource.h>
#include <procpool/procpool.hpp>

#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <csignal>
#include <cstdio>
#include <fstream>
#include <future>
#include <iterator>
#include <map>
#include <mutex>
#include <numeric>
#include <ranges>
#include <set>
#include <sstream>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

#include "helpers.hpp"

namespace {

int inits_in_this_process = 0;

struct WorkerState {
  pid_t built_in = ::getpid();
  int builds_seen = ++inits_in_this_process;  // 1 if this worker ran the initializer once
  int calls = 0;
};

TEST(Pool, BuildsStateExactlyOncePerWorkerAndKeepsItAcrossCalls) {
  procpool::Pool pool({.processes = 2}, [] { return WorkerState{}; });
  std::vector<int> inputs(200);
  std::map<pid_t, int> max_calls;
  for (int round = 0; round < 3; ++round) {
    auto seen = pool.map(
        [](WorkerState& s, int) {
          ++s.calls;
          return std::tuple<pid_t, pid_t, int, int>{::getpid(), s.built_in, s.builds_seen, s.calls};
        },
        inputs);
    for (auto [pid, built_in, builds, calls] : seen) {
      EXPECT_EQ(pid, built_in) << "state was built in another process";
      EXPECT_EQ(builds, 1) << "initializer ran more than once in worker " << pid;
      max_calls[pid] = std::max(max_calls[pid], calls);
    }
  }
  EXPECT_EQ(inits_in_this_process, 0) << "the initializer ran in the parent";
  EXPECT_LE(max_calls.size(), 2u);
  int total = 0;
  for (auto& [pid, calls] : max_calls)
    total += calls;
  EXPECT_EQ(total, 600) << "state did not persist across calls";
}

int add(int x, int y) {
  return x + y;
}

TEST(Pool, FunctionPointersLambdasAndExtraArguments) {
  procpool::Pool pool({.processes = 2});
  std::vector<int> xs{1, 2, 3};
  EXPECT_EQ(pool.map(add, xs, 10), (std::vector<int>{11, 12, 13}));
  EXPECT_EQ(pool.map([](int x, const std::string& s) { return s + std::to_string(x); }, xs,
                     std::string("n")),
            (std::vector<std::string>{"n1", "n2", "n3"}));
  std::vector<std::pair<int, int>> pairs{{1, 1}, {2, 2}};
  EXPECT_EQ(pool.starmap(add, pairs), (std::vector<int>{2, 4}));
}

TEST(Pool, ExtraArgumentsAreSentOncePerWorkerNotPerTask) {
  procpool::Pool pool({.processes = 2});
  std::vector<int> inputs(1000);
  const std::vector<double> big(100000, 1.0);
  auto sizes =
      pool.map([](int, const std::vector<double>& extra) { return extra.size(); }, inputs, big);
  EXPECT_EQ(sizes, std::vector<std::size_t>(inputs.size(), big.size()));
  // The workers count every byte they receive: a copy per worker is two
  // copies in all, a copy per task would be a thousand.
  std::uint64_t received = 0;
  for (const procpool::WorkerInsights& w : pool.insights().workers)
    received += w.bytes_received;
  const std::uint64_t one_copy = big.size() * sizeof(double);
  EXPECT_GE(received, one_copy);
  EXPECT_LE(received, 4 * one_copy) << "the extra argument was sent more than once per worker";
}

TEST(Pool, ImapAndImapUnorderedOverALazyRange) {
  procpool::Pool pool({.processes = 2});
  std::vector<int> got;
  for (int v :
       pool.imap([](int x) { return x * 2; }, std::views::iota(0) | std::views::take(100))) {
    got.push_back(v);
  }
  ASSERT_EQ(got.size(), 100u);
  for (int i = 0; i < 100; ++i)
    EXPECT_EQ(got[static_cast<std::size_t>(i)], 2 * i);
  std::set<std::size_t> indices;
  for (auto [index, value] :
       pool.imap_unordered([](int x) { return x + 1; }, std::vector{5, 6, 7})) {
    EXPECT_EQ(value, static_cast<int>(index) + 6);
    indices.insert(index);
  }
  EXPECT_EQ(indices, (std::set<std::size_t>{0, 1, 2}));
}

TEST(Pool, EndlessImapStoppedEarlyLeavesThePoolUsable) {
  procpool::Pool pool({.processes = 2});
  int n = 0;
  for (long v : pool.imap([](long x) { return x; }, std::views::iota(0L))) {
    if (++n == 500) {
      EXPECT_EQ(v, 499);
      break;
    }
  }
  EXPECT_EQ(pool.map([](int x) { return -x; }, std::vector{1, 2}), (std::vector{-1, -2}));
}

TEST(Future, GetWaitAndWaitFor) {
  procpool::Pool pool({.processes = 2});
  auto quick = pool.submit(add, 2, 3);
  auto slow = pool.submit(
      [](int ms) {
        std::this_thread::sleep_for(std::chrono::milliseconds(ms));
        return ms;
      },
      300);
  EXPECT_EQ(slow.wait_for(std::chrono::milliseconds(20)), std::future_status::timeout);
  quick.wait();
  EXPECT_EQ(quick.get(), 5);
  EXPECT_EQ(slow.wait_for(std::chrono::seconds(10)), std::future_status::ready);
  EXPECT_EQ(slow.get(), 300);
  EXPECT_FALSE(slow.valid());
  EXPECT_THROW(slow.get(), procpool::Error);
}

TEST(Future, SubmittedTasksRunWithoutAnyoneWaiting) {
  procpool::Pool pool({.processes = 2});
  std::vector<procpool::Future<long long>> futures;
  for (int i = 0; i < 2; ++i) {
    // Each says when it ended (steady_clock is the machine's monotonic clock,
    // the same in every process).
    futures.push_back(pool.submit(
        [](int) {
          std::this_thread::sleep_for(std::chrono::milliseconds(200));
          return static_cast<long long>(
              std::chrono::steady_clock::now().time_since_epoch().count());
        },
        i));
  }
  // The caller is busy elsewhere, for far longer than the pool needs to
  // start and run both (slow sanitizer builds included).
  std::this_thread::sleep_for(std::chrono::milliseconds(1500));
  const auto asked = std::chrono::steady_clock::now().time_since_epoch().count();
  for (auto& future : futures)
    EXPECT_LT(future.get(), asked) << "a submitted task ran only once its Future was asked";
}

TEST(Future, VoidTasksAndTaskErrors) {
  procpool::Pool pool({.processes = 1});
  auto done = pool.submit([](int) {}, 1);
  done.get();
  auto failing =
      pool.submit([](int x) -> int { throw std::invalid_argument("bad " + std::to_string(x)); }, 7);
  try {
    failing.get();
    FAIL() << "no exception";
  } catch (const procpool::TaskError& e) {
    EXPECT_EQ(e.type_name(), "std::invalid_argument");
    EXPECT_EQ(e.remote_what(), "bad 7");
  }
}

TEST(Pool, StatefulSubmit) {
  procpool::Pool pool({.processes = 1}, [] { return std::string("state"); });
  auto f = pool.submit([](std::string& s, int n) { return s + std::to_string(n); }, 4);
  EXPECT_EQ(f.get(), "state4");
}

TEST(Pool, CloseJoinAndPoolClosed) {
  procpool::Pool pool({.processes = 2});
  auto pending = pool.submit(add, 1, 1);
  EXPECT_THROW(pool.join(), procpool::Error) << "join before close must be refused";
  pool.close();
  EXPECT_THROW(pool.map(add, std::vector{1}, 1), procpool::PoolClosed);
  pool.join();
  EXPECT_EQ(pending.get(), 2) << "accepted work must finish before join returns";
  EXPECT_TRUE(test_helpers::children().empty());
}

// CPython's test_imap after close(), with a single-pass range: an imap still
// running at join() hands over the results of the inputs it had taken, then
// ends with PoolClosed, and reads no input it can no longer run (it used to
// read max_inflight more and fail them, so a stream lost them).
TEST(Pool, ImapConsumedAfterJoinLeavesTheInputsItCannotRunUnread) {
  std::istringstream numbers;
  {
    std::string text;
    for (int i = 0; i < 60; ++i)
      text += std::to_string(i) + " ";
    numbers.str(text);
  }
  int taken = 0;
  auto counted = std::views::istream<int>(numbers) | std::views::transform([&taken](int x) {
                   ++taken;
                   return x;
                 });
  procpool::Pool pool({.processes = 2, .chunksize = 1, .max_inflight = 4});
  auto results = pool.imap([](int x) { return x * x; }, counted);
  auto it = results.begin();
  for (int i = 0; i < 3; ++i, ++it)
    ASSERT_EQ(*it, i * i);
  pool.close();
  pool.join();
  const int taken_at_join = taken;
  int delivered = 3;
  std::string ended;
  try {
    for (; it != std::default_sentinel; ++it) {
      ASSERT_EQ(*it, delivered * delivered) << "input " << delivered;
      ++delivered;
    }
  } catch (const procpool::PoolClosed& e) {
    ended = e.what();
  }
  EXPECT_NE(ended.find("left unread"), std::string::npos) << ended;
  EXPECT_GT(delivered, 3) << "the inputs taken before join() give their results after it";
  EXPECT_EQ(delivered, taken_at_join) << "every input taken has its result";
  EXPECT_EQ(taken, taken_at_join) << "no input is read once the pool cannot run it";
}

// The same after terminate(), over an endless range: the outcomes of the
// inputs taken (values or PoolClosed), then the end, with PoolClosed.
TEST(Pool, EndlessImapOutcomesEndsAfterTerminate) {
  std::size_t taken = 0;
  auto endless = std::views::iota(0) | std::views::transform([&taken](int x) {
                   ++taken;
                   return x;
                 });
  procpool::Pool pool({.processes = 2, .chunksize = 1, .max_inflight = 4});
  auto outcomes = pool.imap_outcomes([](int x) { return x; }, endless);
  auto it = outcomes.begin();
  ASSERT_TRUE(it->ok());
  pool.terminate();
  const std::size_t taken_at_terminate = taken;
  std::size_t seen = 1;
  std::string ended;
  try {
    for (++it; it != std::default_sentinel && seen < 1000; ++it)
      ++seen;
  } catch (const procpool::PoolClosed& e) {
    ended = e.what();
  }
  EXPECT_NE(ended.find("left unread"), std::string::npos) << ended << " after " << seen;
  EXPECT_EQ(seen, taken_at_terminate) << "one outcome for each input taken";
  EXPECT_EQ(taken, taken_at_terminate);
}

// CPython's test_imap_handle_iterable_exception reads the iterator again
// after it raised. Walking a stopped imap again gets the error that stopped
// it (it used to wait for ever for results that would not come); the pool
// goes on.
TEST(Pool, AnImapReadAgainAfterItThrewThrowsTheSameError) {
  procpool::Pool pool({.processes = 2, .chunksize = 1});
  auto results = pool.imap(
      [](int x) {
        if (x == 5) throw std::invalid_argument("five");
        return x;
      },
      std::views::iota(0, 40));
  std::vector<int> seen;
  try {
    for (int v : results)
      seen.push_back(v);
    FAIL() << "expected a TaskError";
  } catch (const procpool::TaskError& e) {
    EXPECT_EQ(e.index(), 5u);
  }
  EXPECT_EQ(seen, (std::vector<int>{0, 1, 2, 3, 4}));
  for (int again = 0; again < 2; ++again) {
    try {
      for (int v : results)
        seen.push_back(v);
      ADD_FAILURE() << "read again, it ended without its error";
    } catch (const procpool::TaskError& e) {
      EXPECT_EQ(e.index(), 5u);
      EXPECT_EQ(e.remote_what(), "five");
    }
  }
  EXPECT_EQ(seen.size(), 5u);
  EXPECT_EQ(pool.map([](int x) { return x + 1; }, std::vector<int>{1, 2}),
            (std::vector<int>{2, 3}));
}

// The input range is the caller's code, read without the pool's lock: one
// that blocks (a stream waiting for data) held the lock, so insights(),
// terminate() and every other use of the pool from another thread waited
// for it (a range blocked 3 s: insights() took 2.9 s).
TEST(Pool, ARangeThatBlocksHoldsUpNeitherInsightsNorTerminate) {
  procpool::Pool pool({.processes = 2, .chunksize = 1});
  std::mutex m;
  std::condition_variable cv;
  bool blocking = false, released = false, timed_out = false;
  auto stream = std::views::iota(0, 50) | std::views::transform([&](int x) {
                  if (x == 5) {
                    std::unique_lock lock(m);
                    blocking = true;
                    cv.notify_all();
                    // Released by the other thread once its calls returned;
                    // the 10 s are only there so that the old code ends.
                    timed_out =
                        !cv.wait_for(lock, std::chrono::seconds(10), [&] { return released; });
                  }
                  return x;
                });
  std::thread other([&] {
    {
      std::unique_lock lock(m);
      cv.wait(lock, [&] { return blocking; });
    }
    const procpool::Insights seen = pool.insights();
    EXPECT_EQ(seen.workers.size(), 2u);
    pool.terminate();
    std::lock_guard lock(m);
    released = true;
    cv.notify_all();
  });
  std::size_t handed = 0;
  std::string ended;
  try {
    for (int v : pool.imap([](int x) { return x; }, stream)) {
      (void)v;
      ++handed;
    }
  } catch (const procpool::PoolClosed& e) {
    ended = e.what();
  }
  other.join();
  EXPECT_FALSE(timed_out) << "insights() and terminate() waited for the range";
  // Inputs 0-5 were read before terminate() took effect: each got an
  // outcome (a value, or PoolClosed, which imap throws), none went missing.
  EXPECT_FALSE(ended.empty()) << handed << " results and no PoolClosed";
  EXPECT_LE(handed, 6u);
}

// Read without the lock, a range may use the pool itself.
TEST(Pool, ARangeMayUseThePoolItReadsFor) {
  procpool::Pool pool({.processes = 2, .chunksize = 2});
  auto inputs = std::views::iota(0, 6) | std::views::transform([&pool](int x) {
                  return pool.submit([](int y) { return y * 10; }, x).get();
                });
  EXPECT_EQ(pool.map([](int x) { return x + 1; }, inputs),
            (std::vector<int>{1, 11, 21, 31, 41, 51}));
}

TEST(Pool, TerminateKillsWorkersAndFailsUnfinishedWork) {
  procpool::Pool pool({.processes = 2});
  auto stuck = pool.submit(
      [](int) {
        std::this_thread::sleep_for(std::chrono::seconds(30));
        return 0;
      },
      0);
  stuck.wait_for(std::chrono::milliseconds(50));
  const auto start = std::chrono::steady_clock::now();
  pool.terminate();
  EXPECT_LT(std::chrono::steady_clock::now() - start, std::chrono::seconds(2));
  EXPECT_THROW(stuck.get(), procpool::PoolClosed);
  EXPECT_TRUE(test_helpers::children().empty());
}

TEST(Pool, DestructorFinishesAcceptedWorkAndReapsWorkers) {
  procpool::Future<int> result;
  {
    procpool::Pool pool({.processes = 2});
    result = pool.submit(
        [](int x) {
          std::this_thread::sleep_for(std::chrono::milliseconds(100));
          return x * 2;
        },
        21);
  }
  EXPECT_TRUE(test_helpers::children().empty());
  EXPECT_EQ(result.get(), 42);
}

TEST(Pool, WrongStateTypeIsAClearError) {
  procpool::Pool pool({.processes = 1}, [] { return 1.5; });
  try {
    pool.map([](std::string& s, int) { return s.size(); }, std::vector{1});
    FAIL() << "no exception";
  } catch (const procpool::Error& e) {
    EXPECT_NE(std::string(e.what()).find("initializer builds double"), std::string::npos)
        << e.what();
  }
  procpool::Pool stateless({.processes = 1});
  EXPECT_THROW(stateless.map([](std::string& s, int) { return s.size(); }, std::vector{1}),
               procpool::Error);
}

TEST(Pool, EmptyBracesMeanTheDefaultOptions) {
  // `Pool pool({})` once failed to compile: `{}` could also be read as a Pool to copy.
  procpool::Pool pool({});
  EXPECT_EQ(pool.processes(), procpool::usable_cpu_count());
  EXPECT_EQ(pool.map([](int x) { return x * 3; }, std::vector{1, 2}), (std::vector{3, 6}));
  procpool::Pool stateful({}, [] { return 10; });
  EXPECT_EQ(stateful.map([](int& s, int x) { return s + x; }, std::vector{1}), std::vector{11});
}

TEST(Pool, InitializerThatThrowsFailsEveryTaskWithItsMessage) {
  procpool::Pool pool({.processes = 1}, []() -> int { throw std::runtime_error("no model file"); });
  try {
    pool.map([](int& s, int x) { return s + x; }, std::vector{1});
    FAIL() << "no exception";
  } catch (const procpool::TaskError& e) {
    EXPECT_NE(e.remote_what().find("no model file"), std::string::npos) << e.what();
    EXPECT_NE(e.remote_what().find("initializer"), std::string::npos) << e.what();
  }
}

TEST(Pool, InProcessRunsStateAndTasksInTheCaller) {
  procpool::Pool pool({.start = procpool::Start::in_process}, [] { return ::getpid(); });
  auto pids = pool.map(
      [](pid_t& built, int) {
        return std::pair{built, ::getpid()};
      },
      std::vector{1, 2});
  for (auto [built, ran] : pids) {
    EXPECT_EQ(built, ::getpid());
    EXPECT_EQ(ran, ::getpid());
  }
}

TEST(Pool, SurvivesAWorkerKilledFromOutside) {
  procpool::Pool pool({.processes = 2});
  auto before = pool.worker_pids();
  ::kill(before[0], SIGKILL);
  std::vector<int> inputs(100);
  std::iota(inputs.begin(), inputs.end(), 0);
  EXPECT_EQ(pool.map([](int x) { return x; }, inputs), inputs);
  EXPECT_EQ(pool.worker_pids().size(), 2u);
}

// Tasks that leave a trace outside the pool: one byte appended to a file per
// task, so a test can see what ran without calling into the pool (which
// would drive it).
char trace_path[64] = "";

void trace(char mark) {
  FILE* file = std::fopen(trace_path, "ae");
  if (!file) return;
  std::fputc(mark, file);
  std::fclose(file);
}

class TraceFile {
 public:
  TraceFile() {
    std::snprintf(trace_path, sizeof trace_path, "/tmp/procpool-trace-XXXXXX");
    const int fd = ::mkstemp(trace_path);
    if (fd >= 0) ::close(fd);
  }
  ~TraceFile() { std::remove(trace_path); }
  std::size_t marks() const {
    std::ifstream in(trace_path, std::ios::binary);
    return static_cast<std::size_t>(std::distance(std::istreambuf_iterator<char>(in), {}));
  }
  /// Waits (without touching any pool) until `n` marks are there, at most `limit`.
  bool wait_for_marks(std::size_t n, std::chrono::seconds limit) const {
    const auto deadline = std::chrono::steady_clock::now() + limit;
    while (marks() < n) {
      if (std::chrono::steady_clock::now() > deadline) return false;
      std::this_thread::sleep_for(std::chrono::milliseconds(10));
    }
    return true;
  }
};

int traced_sleep(int ms) {
  std::this_thread::sleep_for(std::chrono::milliseconds(ms));
  trace('t');
  return ms;
}

TEST(Future, ManySubmittedTasksAllRunWhileTheCallerDoesOtherWork) {
  // The reproduction: far more tasks than the workers' pipelines
  // hold, and a caller that does not look at the pool for a while.
  TraceFile traces;
  procpool::Pool pool({.processes = 2});
  std::vector<procpool::Future<int>> futures;
  for (int i = 0; i < 100; ++i)
    futures.push_back(pool.submit(&traced_sleep, 5));
  ASSERT_TRUE(traces.wait_for_marks(100, std::chrono::seconds(30)))
      << "only " << traces.marks() << " of 100 submitted tasks ran while nobody waited";
  // Each ran (its mark is written); its reply may still be on its way when
  // the last mark lands (seen under load), so a short wait, not none.
  for (auto& f : futures) {
    ASSERT_EQ(f.wait_for(std::chrono::seconds(10)), std::future_status::ready);
    EXPECT_EQ(f.get(), 5);
  }
}

TEST(Future, DroppedFuturesTasksStillRun) {
  TraceFile traces;
  procpool::Pool pool({.processes = 1});
  auto busy = pool.submit(&traced_sleep, 100);  // the one worker is busy first
  for (int i = 0; i < 5; ++i)
    pool.submit(&traced_sleep, 1);  // fire and forget
  ASSERT_TRUE(traces.wait_for_marks(6, std::chrono::seconds(30)))
      << "only " << traces.marks() << " of 6 tasks ran, dropped futures' tasks were lost";
  EXPECT_EQ(busy.get(), 100);
}

TEST(Future, DroppedFuturesTasksFinishBeforeThePoolIsDestroyed) {
  TraceFile traces;
  {
    procpool::Pool pool({.processes = 2});
    for (int i = 0; i < 20; ++i)
      pool.submit(&traced_sleep, 2);
  }
  EXPECT_EQ(traces.marks(), 20u);
  EXPECT_TRUE(test_helpers::children().empty());
}

int fail_with(int x) {
  throw std::runtime_error("dropped task " + std::to_string(x) + " failed");
}

TEST(Future, DroppedFuturesErrorsGoToTheHandlerAndInsights) {
  procpool::Pool pool({.processes = 2});
  std::mutex mutex;
  std::condition_variable seen_all;
  std::vector<std::string> seen;
  pool.set_error_handler([&](std::exception_ptr error) {
    std::lock_guard lock(mutex);
    try {
      std::rethrow_exception(error);
    } catch (const procpool::TaskError& e) {
      seen.push_back(e.remote_what());
    }
    seen_all.notify_all();
  });
  for (int i = 0; i < 3; ++i)
    pool.submit(&fail_with, i);
  {
    std::unique_lock lock(mutex);
    ASSERT_TRUE(seen_all.wait_for(lock, std::chrono::seconds(30), [&] { return seen.size() == 3; }))
        << seen.size() << " of 3 errors reached the handler";
  }
  std::sort(seen.begin(), seen.end());
  EXPECT_EQ(seen, (std::vector<std::string>{"dropped task 0 failed", "dropped task 1 failed",
                                            "dropped task 2 failed"}));
  const procpool::Insights in = pool.insights();
  EXPECT_EQ(in.unobserved_errors, 3u);
  ASSERT_EQ(in.unobserved_error_messages.size(), 3u);
  EXPECT_NE(in.to_string().find("dropped futures whose tasks failed: 3"), std::string::npos)
      << in.to_string();
}

TEST(Future, DroppedFuturesErrorIsOneLineOnStderrWithoutAHandler) {
  testing::internal::CaptureStderr();
  {
    procpool::Pool pool({.processes = 1});
    pool.submit(&fail_with, 7);
  }  // the pool finishes accepted work, the dropped task's error included
  const std::string err = testing::internal::GetCapturedStderr();
  EXPECT_NE(err.find("procpool: a task whose Future was dropped failed: task 0 threw "
                     "std::runtime_error: dropped task 7 failed"),
            std::string::npos)
      << err;
}

TEST(Future, OneSubmittedTaskReachesOneWorkerOnly) {
  // A submit costs a message to the worker that runs it, not a setup and an
  // end frame to every worker.
  procpool::Pool pool({.processes = 4});
  EXPECT_EQ(pool.submit(add, 2, 1).get(), 3);
  // Room for stray frames to arrive (there must be none).
  std::this_thread::sleep_for(std::chrono::milliseconds(50));
  std::size_t reached = 0;
  for (const auto& w : pool.insights().workers)
    reached += w.bytes_received != 0 ? 1 : 0;
  EXPECT_EQ(reached, 1u) << "a submit reached " << reached << " of 4 workers";
}

TEST(Future, ASubmitDoesNotWaitForThePoolsLock) {
  // Submitting takes no lock that a round or another call holds: a task is
  // posted, and whoever drives the pool next sends it. (Waiting for that lock
  // cost each of 100k submits a few thread switches: 20k submits/s on 2 cores.)
  // Another thread holds the pool's lock meanwhile.
  procpool::Pool pool({.processes = 2});
  EXPECT_EQ(pool.map(add, std::vector<int>{1, 2, 3}, 1), (std::vector<int>{2, 3, 4}));
  std::mutex mutex;
  std::condition_variable changed;
  bool holding = false;
  bool release = false;
  std::thread holder([&] {
    std::lock_guard pool_lock(procpool::detail::PoolAccess::mutex(pool));
    std::unique_lock lock(mutex);
    holding = true;
    changed.notify_all();
    changed.wait_for(lock, std::chrono::seconds(10), [&] { return release; });
  });
  {
    std::unique_lock lock(mutex);
    ASSERT_TRUE(changed.wait_for(lock, std::chrono::seconds(30), [&] { return holding; }));
  }
  const auto started = std::chrono::steady_clock::now();
  auto sum = pool.submit(add, 20, 22);
  auto other = pool.submit(add, 1, 1);
  const auto took = std::chrono::steady_clock::now() - started;
  {
    std::lock_guard lock(mutex);
    release = true;
    changed.notify_all();
  }
  holder.join();
  EXPECT_LT(took, std::chrono::seconds(2)) << "submit() waited for the pool's lock";
  EXPECT_EQ(sum.get(), 42);
  EXPECT_EQ(other.get(), 2);
}

TEST(Future, SubmitsFromSeveralThreadsAtOnceEachGetTheirOwnResult) {
  procpool::Pool pool({.processes = 2});
  constexpr int threads = 4;
  constexpr int per_thread = 1500;
  std::vector<int> wrong(threads, 0);
  std::vector<std::thread> submitters;
  for (int t = 0; t < threads; ++t) {
    submitters.emplace_back([&pool, &wrong, t] {
      std::vector<procpool::Future<int>> futures;
      for (int i = 0; i < per_thread; ++i)
        futures.push_back(pool.submit(add, t * per_thread, i));
      for (int i = 0; i < per_thread; ++i)
        wrong[static_cast<std::size_t>(t)] +=
            futures[static_cast<std::size_t>(i)].get() != t * per_thread + i;
    });
  }
  for (auto& s : submitters)
    s.join();
  EXPECT_EQ(wrong, std::vector<int>(threads, 0));
}

TEST(Future, ASubmitRacingCloseIsEitherRefusedOrRunBeforeJoinReturns) {
  // close() decides: a submit it comes before throws PoolClosed, one it comes
  // after runs, and join() waits for it. Never a task accepted and lost.
  for (int round = 0; round < 10; ++round) {
    procpool::Pool pool({.processes = 2});
    std::vector<std::vector<std::pair<int, procpool::Future<int>>>> accepted(2);
    std::vector<int> refused(2, 0);
    std::vector<std::thread> submitters;
    for (std::size_t t = 0; t < 2; ++t) {
      submitters.emplace_back([&, t] {
        for (int i = 0;; ++i) {
          try {
            accepted[t].emplace_back(i, pool.submit(add, i, 1));
          } catch (const procpool::PoolClosed&) {
            ++refused[t];
            return;
          }
        }
      });
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(2 + round));
    // While they submit: a task accepted and not run when join() stops the
    // workers would fail with PoolClosed ("joined before this task could run").
    pool.close();
    pool.join();
    for (auto& s : submitters)
      s.join();
    for (std::size_t t = 0; t < 2; ++t) {
      EXPECT_EQ(refused[t], 1);
      for (auto& [i, future] : accepted[t]) {
        ASSERT_EQ(future.wait_for(std::chrono::seconds(0)), std::future_status::ready)
            << "task " << i << " was accepted but had not run when join() returned";
        try {
          EXPECT_EQ(future.get(), i + 1);
        } catch (const procpool::PoolClosed& e) {
          ADD_FAILURE() << "task " << i << " was accepted, then failed: " << e.what();
        }
      }
    }
  }
}

TEST(Future, SubmitsToAnInProcessPoolRun) {
  procpool::Pool pool({.start = procpool::Start::in_process});
  auto sum = pool.submit(add, 20, 22);
  std::this_thread::sleep_for(std::chrono::milliseconds(50));  // the service thread's turn first
  ASSERT_EQ(sum.wait_for(std::chrono::seconds(10)), std::future_status::ready);
  EXPECT_EQ(sum.get(), 42);
  TraceFile traces;
  pool.submit(&traced_sleep, 1);  // dropped: the pool runs it all the same
  EXPECT_TRUE(traces.wait_for_marks(1, std::chrono::seconds(10)));
}

TEST(Future, TerminateFailsTheSubmittedTasksNotYetRun) {
  procpool::Pool pool({.processes = 1});
  std::vector<procpool::Future<int>> futures;
  for (int i = 0; i < 300; ++i)
    futures.push_back(pool.submit(&traced_sleep, 1));
  pool.terminate();
  int ran = 0;
  int closed = 0;
  for (auto& f : futures) {
    ASSERT_EQ(f.wait_for(std::chrono::seconds(10)), std::future_status::ready);
    try {
      ran += f.get() == 1 ? 1 : 0;
    } catch (const procpool::PoolClosed&) {
      ++closed;
    }
  }
  EXPECT_EQ(ran + closed, 300);
  EXPECT_GT(closed, 0);
}

TEST(Pool, ConcurrentCallsFromSeveralThreads) {
  procpool::Pool pool({.processes = 2});
  std::vector<std::thread> threads;
  std::vector<int> ok(4, 0);
  for (int t = 0; t < 4; ++t) {
    threads.emplace_back([&pool, &ok, t] {
      std::vector<int> in(500);
      std::iota(in.begin(), in.end(), t * 1000);
      auto out = pool.map([](int x) { return x + 1; }, in);
      bool good = true;
      for (std::size_t i = 0; i < in.size(); ++i)
        good = good && out[i] == in[i] + 1;
      ok[static_cast<std::size_t>(t)] = good ? 1 : 0;
    });
  }
  for (auto& th : threads)
    th.join();
  EXPECT_EQ(ok, (std::vector<int>{1, 1, 1, 1}));
}

/// Sleeps `ms`, then says when it ended (CLOCK_REALTIME: the same clock in
/// the worker as in the caller).
double sleep_then_tell_when(int ms) {
  std::this_thread::sleep_for(std::chrono::milliseconds(ms));
  return test_helpers::realtime_seconds();
}

TEST(Pool, ConcurrentCallersHearTheirResultsWithoutWaitingOutAPoll) {
  // Each caller thread waits in poll() for its workers' replies, and any of
  // them may collect a reply that another waits for. It then tells that one
  // on a descriptor of the waiter's own: the shared one lost the word to
  // whichever waiter read it first, or to one not yet in poll(), and a
  // caller whose result was in slept out its poll's 100 ms (a node of an
  // mpi::Pool runs a call per long task from a thread each: 16 tasks of
  // 100 ms on 4 workers took 500 ms in 3 runs of 5, not 400).
  constexpr int threads = 8, calls_each = 6, task_ms = 30;  // 48 calls
  procpool::Pool pool({.processes = threads, .warn_oversubscription = false});
  pool.map([](int x) { return x; }, std::vector<int>(threads, 1));  // every worker up
  std::mutex mutex;
  std::vector<double> waits;  // from a task's end to its caller's return, in ms
  std::vector<std::thread> callers;
  for (int t = 0; t < threads; ++t) {
    callers.emplace_back([&] {
      for (int c = 0; c < calls_each; ++c) {
        const double ended = pool.map(&sleep_then_tell_when, std::vector<int>{task_ms}).at(0);
        const double waited_ms = 1e3 * (test_helpers::realtime_seconds() - ended);
        std::lock_guard lock(mutex);
        waits.push_back(waited_ms);
      }
    });
  }
  for (auto& c : callers)
    c.join();
  std::sort(waits.begin(), waits.end());
  // A missed word costs the wait for the next reply of any call (about a
  // task's time here) or the poll's 100 ms: 4 to 16 of the 48 calls
  // returned 30-61 ms after their task ended, and none with the fix (2 ms at
  // most, in a debug build). Sanitizers slow every hop: there only the
  // longest misses count.
  const double late_ms = test_helpers::under_sanitizer ? 60 : 20;
  const auto late =
      std::count_if(waits.begin(), waits.end(), [late_ms](double ms) { return ms > late_ms; });
  EXPECT_LE(late, 2) << late << " of " << waits.size() << " calls returned more than " << late_ms
                     << " ms after their task ended; slowest " << waits.back() << " ms, median "
                     << waits[waits.size() / 2] << " ms";
}

/// The voluntary context switches of this process's threads so far.
long voluntary_switches() {
  rusage usage{};
  ::getrusage(RUSAGE_SELF, &usage);
  return usage.ru_nvcsw;
}

TEST(Pool, ConcurrentCallersAreWokenOnlyForTheirOwnResults) {
  // Of the threads that wait on one pool at once, one watches the workers'
  // sockets; a reply wakes it and the caller it is for, not every waiter.
  // When each polled every socket, each reply woke them all: here 22-28
  // switches per task (debug build, 3 runs), where a task needs two or three
  // (its caller's wake, the watcher's, a lock handed over): 2.2-2.5 now.
  constexpr int threads = 16, calls_each = 8, task_ms = 5;  // 128 calls
  procpool::Pool pool({.processes = 4});
  pool.map([](int x) { return x; }, std::vector<int>(4, 1));  // every worker up
  std::vector<std::thread> callers;
  const long before = voluntary_switches();
  for (int t = 0; t < threads; ++t) {
    callers.emplace_back([&] {
      for (int c = 0; c < calls_each; ++c)
        pool.map(&sleep_then_tell_when, std::vector<int>{task_ms});
    });
  }
  for (auto& c : callers)
    c.join();
  const double per_task =
      static_cast<double>(voluntary_switches() - before) / (threads * calls_each);
  std::fprintf(stderr, "%.1f voluntary context switches per task\n", per_task);
  EXPECT_LT(per_task, 8) << "the callers' threads switched " << per_task
                         << " times per task: a reply woke threads it was not for";
}

TEST(Pool, JoinOnTwoThreadsAtOnceReturnsOnBoth) {
  // helper-60's case: close(), then join() on two threads at once. Both
  // joined the pool's service thread, which a std::thread allows once: the
  // probe hung in the first or second round, and this test aborted at once.
  for (int round = 0; round < 20; ++round) {
    procpool::Pool pool({.processes = 1});
    auto answer = pool.submit([](int x) { return x + 1; }, round);
    pool.close();
    std::atomic<int> joined{0};
    std::thread first([&] {
      pool.join();
      ++joined;
    });
    std::thread second([&] {
      pool.join();
      ++joined;
    });
    const auto until = std::chrono::steady_clock::now() + std::chrono::seconds(10);
    while (joined < 2 && std::chrono::steady_clock::now() < until)
      std::this_thread::sleep_for(std::chrono::milliseconds(1));
    if (joined < 2) {
      // Nothing can end the join() that hangs: say so, and end here.
      std::fprintf(stderr, "round %d: a join() did not return within 10 s\n", round);
      std::_Exit(1);
    }
    first.join();
    second.join();
    EXPECT_EQ(answer.get(), round + 1);
  }
}

TEST(Pool, JoinReturnsOnceTheLastTaskOfADroppedCallEnds) {
  // join() waits for any call's outcomes, and a dropped call's tasks still
  // running end as outcomes of a closed call: they must still tell it, or
  // it sleeps out its 100 ms rounds (102 ms late in one run of two before).
  procpool::Pool pool({.processes = 2, .chunksize = 1});
  pool.map([](int x) { return x; }, std::vector<int>(2, 1));  // every worker up
  constexpr int task_ms = 130;
  std::chrono::steady_clock::time_point t0;
  {
    auto results = pool.imap(&sleep_then_tell_when, std::vector<int>{0, task_ms, task_ms});
    EXPECT_GT(*results.begin(), 0);  // then the call is dropped, two tasks running
    // From here (not from before the imap, which would count the first
    // task's round trip too) the last task has task_ms to go at most.
    t0 = std::chrono::steady_clock::now();
  }
  pool.close();
  pool.join();
  const double late_ms =
      std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count() -
      task_ms;
  EXPECT_LT(late_ms, test_helpers::under_sanitizer ? 60 : 35)
      << "join() returned " << late_ms << " ms after the last task ended";
}

/// Pools made at once on several threads, then ended one by one on another:
/// a worker of one pool must not hold another pool's socket (forked while
/// that pool's socket pair existed and was not yet listed as the parent's),
/// or ending that pool waits for the worker's EOF until the first pool ends
/// too: with both ended on one thread, in that order, for ever (an MPI
/// node's rank makes its pools on threads of their own and ends them in
/// order: mpi.peers.lifecycle hung there).
TEST(Pool, PoolsMadeAtOnceOnSeveralThreadsEndInAnyOrder) {
  if (test_helpers::under_sanitizer) {
    // Under ASan too: the pool makers' threads end while other pools fork,
    // and a thread that ends returns its allocator cache under the lock that
    // tests/support/asan_fork_gate.cpp cannot close (its comment says so). A
    // worker hung there (gdb: SizeClassAllocator64::GetFromAllocator in the
    // child) in 3 runs of 10 on 2026-12-05, and failed a clean-clone CI.
    GTEST_SKIP() << "four threads ending while others fork: a worker hung in the sanitizer's "
                    "allocator lock (TSan 1 run of 15-30, ASan 3 of 10; tests/helpers.hpp)";
  }
  for (int round = 0; round < 8; ++round) {
    std::vector<std::unique_ptr<procpool::Pool>> pools(4);
    std::vector<std::thread> makers;
    for (std::size_t t = 0; t < pools.size(); ++t) {
      makers.emplace_back([&pools, t] {
        pools[t] = std::make_unique<procpool::Pool>(procpool::Options{.processes = 2});
      });
    }
    for (auto& m : makers)
      m.join();
    test_helpers::within(std::chrono::seconds(30), "ending the pools one by one", [&] {
      for (auto& pool : pools) {
        EXPECT_EQ(pool->map([](int x) { return x + 1; }, std::vector<int>{1, 2, 3}),
                  (std::vector<int>{2, 3, 4}));
        pool.reset();
      }
    });
  }
}

}  // namespace
