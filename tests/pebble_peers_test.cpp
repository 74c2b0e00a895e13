// The hard cases of Pebble's own test suite (noxdafox/pebble: test/test_process_pool_fork.py,
// test_process_pool_spawn.py, test_process_pool_forkserver.py, test_process_pool_generic.py,
// test_concurrent_process_fork.py), translated. Each test names the case it comes from.
// Pebble's `schedule(f, timeout=t)` is a Pool with `task_timeout`, `max_tasks` is
// `max_tasks_per_child`, `stop()` is `terminate()`, `ProcessExpired` is `WorkerCrashed`,
// `TimeoutError` is `TaskTimeout`, a done-callback is the pool's error handler (for a dropped
// Future) or the progress callback, and its three start-method files are `Start::fork`,
// `Start::spawn` and `Start::fork_server`. Where procpool differs from Pebble on purpose, the
// test asserts procpool's documented behaviour and says so.
//
// Skipped, and why:
// - cancel() (test_process_pool_cancel*, test_process_pool_stop_cancel,
// test_process_pool_map_cancel,
//   test_cancel_decorated): procpool has no cancellation; breaking out of an imap early is in
//   pool_test (Pool.EndlessImapStoppedEarlyLeavesThePoolUsable).
// - join(timeout) as such (test_process_pool_join_futures_timeout): procpool's join() takes no
//   timeout; the case is translated as a join() released by terminate() from another thread.
// - `pool.active`, keyword arguments, docstrings, process names and daemon flags, decorated class
//   and static methods, callable objects, map over several iterables (test_process_pool_map_multi),
//   returning an exception object as a value (test_error_returned), asyncio's run_in_executor
//   (TestAsyncIOProcessPool, test_asynchronous_*), thread pools (test_thread_pool.py,
//   test_concurrent_thread.py): no such API, or nothing like it in C++.
// - test_process_pool_map_broken_pool (sets the pool's internal state to ERROR) and the monkey-
//   patched worker loops of the deadlock tests as such: they mock internals; the deadlock tests are
//   translated with real deaths at the same moments (before a task is read, while a result is
//   sent).
// - Already covered elsewhere: test_process_pool_single_future / multiple_futures / callback /
//   error / exception_isolated (pool_test, errors_test), test_process_pool_initializer
//   (Pool.BuildsStateExactlyOncePerWorkerAndKeepsItAcrossCalls), test_process_pool_join_running
//   (Pool.CloseJoinAndPoolClosed: join() before close() is an Error),
//   test_process_pool_close_futures and close_stopped
//   (PeersShutdown.FiftyTasksThenCloseAndJoinDeliverEveryResult), test_process_pool_stop_futures /
//   stop_stopped / join_workers (Future.TerminateFailsTheSubmittedTasksNotYetRun,
//   Pool.TerminateKillsWorkersAndFailsUnfinishedWork), test_process_pool_callback_error
//   (PeersCallback.AnErrorHandlerThatSubmitsOrThrowsLeavesThePoolWorking,
//   ProgressCallback.ThrowingInAPoolStopsThatCallAndThePoolGoesOn), test_process_pool_map_error
//   (Outcomes.*: procpool's map stops at the first error on purpose, map_outcomes goes on),
//   test_process_pool_map / map_empty / map_single / map_one_chunk (map_test, PeersEmpty),
//   test_process_pool_pickling_error_task (PeersCrashMatrix: an input whose save() throws),
//   test_frozen_error_decorated (TaskError.NonStandardExceptionKeepsItsTypeName),
//   test_pool_decorated (PeersMaxTasksPerChild.TheFourthTaskRunsInANewWorker), and a pickling
//   error that is a type procpool cannot send at all, which is a compile error
//   (tests/compile_fail).
#include <gtest/gtest.h>
#include <procpool/procpool.hpp>

#include <dirent.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <csignal>
#include <cstdlib>
#include <exception>
#include <future>
#include <map>
#include <memory>
#include <mutex>
#include <new>
#include <numeric>
#include <optional>
#include <set>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

#include "helpers.hpp"

namespace {

using namespace std::chrono_literals;
using procpool::Start;
using Stage = procpool::TaskError::Stage;

/// A nested pool starts threads in a forked child, which TSan ends (die_after_fork).
#define SKIP_NESTED_POOLS_UNDER_TSAN() \
  if (test_helpers::under_tsan)        \
  GTEST_SKIP() << "TSan ends a forked child that starts threads (die_after_fork)"

/// Runs a test's body; a hang ends the test program with a message (instead of ctest's
/// timeout), an exception that escapes fails the test with its message.
template <class Body>
void bounded(const char* what, Body body) {
  test_helpers::within(std::chrono::seconds(60), what, [&] {
    try {
      body();
    } catch (const std::exception& e) {
      ADD_FAILURE() << "unexpected exception: " << e.what();
    } catch (...) {
      ADD_FAILURE() << "unexpected exception";
    }
  });
}

using test_helpers::reset_shared;
using test_helpers::shared;
using test_helpers::wait_for_gate;
using test_helpers::wait_started;

int block_until_gate(int x) {
  ++shared().started;
  wait_for_gate();
  return x;
}

int identity(int x) {
  return x;
}

/// Pebble's long_function: sleeps (here 10 s, far past every limit used).
int long_function(int x) {
  std::this_thread::sleep_for(10s);
  return x;
}

/// Pebble's pid_function.
int pid_function(int) {
  std::this_thread::sleep_for(100ms);
  return static_cast<int>(::getpid());
}

/// Pebble's sigterm_function: ignores SIGTERM, then hangs.
int sigterm_function(int x) {
  std::signal(SIGTERM, SIG_IGN);
  std::this_thread::sleep_for(10s);
  return x;
}

int error_function(int) {
  throw std::runtime_error("BOOM!");
}

const char* start_name(Start s) {
  switch (s) {
    case Start::fork:
      return "fork";
    case Start::spawn:
      return "spawn";
    case Start::fork_server:
      return "fork_server";
    case Start::in_process:
      return "in_process";
  }
  return "?";
}

constexpr Start start_methods[] = {Start::fork, Start::spawn, Start::fork_server};

/// Collects the errors given to a pool's error handler (called on the pool's service thread).
struct HandlerLog {
  std::mutex m;
  std::condition_variable cv;
  std::vector<std::exception_ptr> errors;

  auto handler() {
    return [this](std::exception_ptr e) {
      std::lock_guard lock(m);
      errors.push_back(e);
      cv.notify_all();
    };
  }
  bool wait_for(std::size_t n, std::chrono::seconds limit = 20s) {
    std::unique_lock lock(m);
    return cv.wait_for(lock, limit, [&] { return errors.size() >= n; });
  }
};

// ---- timeouts -------------------------------------------------------------------------------

// test_process_pool_timeout and test_process_pool_timeout_callback: a task past its limit fails
// with TaskTimeout, and so does one whose Future was dropped: its error reaches the handler
// (Pebble's done-callback).
TEST(PebbleTimeout, ATimedOutTaskFailsWithTaskTimeoutAndADroppedOnesErrorReachesTheHandler) {
  bounded("PebbleTimeout", [] {
    for (Start start : start_methods) {
      SCOPED_TRACE(start_name(start));
      procpool::Pool pool({.processes = 1, .start = start, .task_timeout = 100ms});
      HandlerLog log;
      pool.set_error_handler(log.handler());
      auto future = pool.submit(long_function, 1);
      try {
        (void)future.get();
        ADD_FAILURE() << "no exception";
      } catch (const procpool::TaskTimeout& e) {
        EXPECT_EQ(e.index(), 0u) << e.what();
        EXPECT_EQ(e.limit(), 100ms) << e.what();
      }
      (void)pool.submit(long_function, 2);  // dropped: its error goes to the handler
      ASSERT_TRUE(log.wait_for(1)) << "the handler never heard of the timeout";
      {
        std::lock_guard lock(log.m);
        EXPECT_THROW(std::rethrow_exception(log.errors[0]), procpool::TaskTimeout);
      }
      EXPECT_EQ(pool.submit(identity, 42).get(), 42);
    }
  });
}

// test_process_pool_stop_timeout: on a one-worker pool, a task that times out has its worker
// stopped; the task after it runs in a new process.
TEST(PebbleTimeout, TheWorkerOfATimedOutTaskIsReplaced) {
  bounded("PebbleTimeout", [] {
    for (Start start : start_methods) {
      SCOPED_TRACE(start_name(start));
      // (pid_function sleeps 100 ms: the limit is well above it.)
      procpool::Pool pool({.processes = 1, .start = start, .task_timeout = 500ms});
      auto future1 = pool.submit(pid_function, 0);
      auto timed_out = pool.submit(long_function, 0);
      auto future2 = pool.submit(pid_function, 0);
      const int pid1 = future1.get();
      EXPECT_THROW((void)timed_out.get(), procpool::TaskTimeout);
      const int pid2 = future2.get();
      EXPECT_NE(pid1, pid2);
      EXPECT_FALSE(test_helpers::process_alive(static_cast<pid_t>(pid1)));
      EXPECT_EQ(pool.worker_pids().size(), 1u);
    }
  });
}

// test_process_pool_ignoring_sigterm and test_concurrent_process_fork.py
// test_decorated_ignoring_sigterm: a task that ignores SIGTERM is still stopped at its limit,
// in a Pool and in a fork-per-call map.
TEST(PebbleTimeout, ATaskIgnoringSigtermIsStillStoppedAtItsLimit) {
  bounded("PebbleTimeout", [] {
    const auto start = std::chrono::steady_clock::now();
    procpool::Pool pool({.processes = 1, .task_timeout = 200ms});
    EXPECT_THROW((void)pool.submit(sigterm_function, 0).get(), procpool::TaskTimeout);
    EXPECT_EQ(pool.submit(identity, 7).get(), 7);
    try {
      (void)procpool::map(sigterm_function, std::vector<int>{0, 1},
                          {.processes = 2, .task_timeout = 200ms});
      ADD_FAILURE() << "no exception";
    } catch (const procpool::TaskTimeout& e) {
      EXPECT_EQ(e.limit(), 200ms);
    }
    // Far below the tasks' 10 s: the workers were killed, not waited for.
    EXPECT_LT(std::chrono::steady_clock::now() - start, 8s);
  });
  EXPECT_TRUE(test_helpers::children().empty());
}

// test_process_pool_map_timeout: every input of a map runs past the limit. Each fails alone with
// its own index (here all three in one chunk, so each timeout costs the worker that was running
// the rest of the chunk). Pebble's map yields each TimeoutError and goes on; procpool's map and
// imap stop at the first failure on purpose, so the per-input form is map_outcomes, and imap
// throws the first timeout.
TEST(PebbleTimeout, EveryTaskOfAMapTimesOutAloneWithItsIndex) {
  bounded("PebbleTimeout", [] {
    procpool::Pool pool({.processes = 1, .chunksize = 3, .task_timeout = 100ms});
    const std::vector<int> elements{1, 2, 3};
    auto outcomes = pool.map_outcomes(long_function, elements);
    ASSERT_EQ(outcomes.size(), 3u);
    for (std::size_t i = 0; i < outcomes.size(); ++i) {
      ASSERT_FALSE(outcomes[i].ok()) << i;
      try {
        std::rethrow_exception(outcomes[i].error);
      } catch (const procpool::TaskTimeout& e) {
        EXPECT_EQ(e.index(), i) << e.what();
      } catch (const std::exception& e) {
        ADD_FAILURE() << i << ": " << e.what();
      }
    }
    try {
      for (int v : pool.imap(long_function, elements))
        ADD_FAILURE() << "a value " << v;
      ADD_FAILURE() << "no exception";
    } catch (const procpool::TaskTimeout& e) {
      EXPECT_EQ(e.index(), 0u) << e.what();
    }
    EXPECT_EQ(pool.map(identity, elements), elements);
  });
}

int sleep_100ms(int x) {
  std::this_thread::sleep_for(100ms);
  return x;
}

// test_process_pool_map_timeout_chunks: Pebble gives each chunk the timeout times its size.
// procpool's task_timeout is per task, whatever the chunk (Options: "Longest a single task may
// run"), on purpose: a chunk of six 100 ms tasks takes 600 ms, past the 400 ms limit, and every
// task still returns.
TEST(PebbleTimeout, TheLimitIsPerTaskNotPerChunk) {
  bounded("PebbleTimeout", [] {
    std::vector<int> elements(12);
    std::iota(elements.begin(), elements.end(), 0);
    procpool::Pool pool({.processes = 2, .chunksize = 6, .task_timeout = 400ms});
    EXPECT_EQ(pool.map(sleep_100ms, elements), elements);
    EXPECT_EQ(procpool::map(sleep_100ms, elements,
                            {.processes = 2, .chunksize = 6, .task_timeout = 400ms}),
              elements);
  });
}

// ---- workers that die ----------------------------------------------------------------------

// test_process_pool_expired_worker (suicide_function: os._exit(1)) and
// test_concurrent_process_fork.py test_decorated_dead_process (os._exit(123)): the task fails with
// WorkerCrashed and the exit status; the pool serves the next task.
TEST(PebbleExpired, AWorkerThatExitsFailsItsTaskWithItsStatus) {
  bounded("PebbleExpired", [] {
    for (Start start : start_methods) {
      SCOPED_TRACE(start_name(start));
      procpool::Pool pool({.processes = 1, .start = start});
      try {
        (void)pool
            .submit(
                [](int) {
                  ::_exit(1);
                  return 0;
                },
                0)
            .get();
        ADD_FAILURE() << "no exception";
      } catch (const procpool::WorkerCrashed& e) {
        EXPECT_EQ(e.signal(), 0) << e.what();
        EXPECT_EQ(e.exit_status(), 1) << e.what();
        EXPECT_EQ(e.index(), 0u) << e.what();
      }
      EXPECT_EQ(pool.submit(identity, 3).get(), 3);
    }
    try {
      (void)procpool::map(
          [](int x) {
            if (x == 2) ::_exit(123);
            return x;
          },
          std::vector<int>{0, 1, 2, 3}, {.processes = 2, .chunksize = 1});
      ADD_FAILURE() << "no exception";
    } catch (const procpool::WorkerCrashed& e) {
      EXPECT_EQ(e.signal(), 0) << e.what();
      EXPECT_EQ(e.exit_status(), 123) << e.what();
      EXPECT_EQ(e.index(), 2u) << e.what();
    }
  });
  EXPECT_TRUE(test_helpers::children().empty());
}

/// Waits until `pid` is no longer a live process (a zombie counts as gone).
bool wait_gone(pid_t pid, std::chrono::seconds limit = 20s) {
  const auto end = std::chrono::steady_clock::now() + limit;
  while (test_helpers::process_alive(pid)) {
    if (std::chrono::steady_clock::now() > end) return false;
    std::this_thread::sleep_for(1ms);
  }
  return true;
}

// test_process_pool_expired_worker with the death from outside, by SIGKILL and by SIGTERM, at the
// three moments the brief of Pebble's deadlock tests names: before a task (the worker idle), during
// one, and right after one returned. Only the death during a task costs that task (README "A
// hostile machine": a worker killed between tasks costs nothing).
TEST(PebbleExpired, AWorkerKilledBeforeDuringOrAfterATaskCostsOnlyTheTaskItWasRunning) {
  bounded("PebbleExpired", [] {
    for (int sig : {SIGKILL, SIGTERM}) {
      SCOPED_TRACE(sig == SIGKILL ? "SIGKILL" : "SIGTERM");
      reset_shared();
      procpool::Pool pool({.processes = 1});
      EXPECT_EQ(pool.submit(identity, 1).get(), 1);

      // Before: the idle worker is killed, then a task is given.
      const pid_t idle = pool.worker_pids().at(0);
      ::kill(idle, sig);
      ASSERT_TRUE(wait_gone(idle));
      EXPECT_EQ(pool.submit(identity, 2).get(), 2);

      // During.
      auto running = pool.submit(block_until_gate, 3);
      ASSERT_TRUE(wait_started(1));
      const pid_t busy = pool.worker_pids().at(0);
      ::kill(busy, sig);
      try {
        (void)running.get();
        ADD_FAILURE() << "no exception";
      } catch (const procpool::WorkerCrashed& e) {
        EXPECT_EQ(e.signal(), sig) << e.what();
        EXPECT_EQ(e.pid(), busy) << e.what();
        EXPECT_EQ(e.index(), 0u) << e.what();
      }

      // After: the task returned, then its worker is killed.
      EXPECT_EQ(pool.submit(identity, 4).get(), 4);
      const pid_t done = pool.worker_pids().at(0);
      ::kill(done, sig);
      ASSERT_TRUE(wait_gone(done));
      EXPECT_EQ(pool.submit(identity, 5).get(), 5);
      EXPECT_EQ(pool.worker_pids().size(), 1u);
      shared().gate = true;
    }
  });
}

/// A result whose save() ends its worker, as Pebble's broken_worker_process_result dies holding
/// the channel's writer lock.
struct DiesWhileSent {
  int value = 0;
  std::string unsent;  // not trivially copyable: the value goes through save() and load()
  template <class Archive>
  void save(Archive& ar) const {
    ar(value);
    ::_exit(1);
  }
  template <class Archive>
  void load(Archive& ar) {
    ar(value);
  }
};

// TestProcessPoolDeadlockOnResult test_pool_deadlock and test_pool_deadlock_stop: a worker that
// dies while delivering its result. Pebble raises ProcessExpired, and stops the pool when it keeps
// happening; procpool charges each death to its task and keeps the pool on purpose ("a crash
// costs one task, never the call or the pool"): ten in a row on one worker, then a good task.
TEST(PebbleDeadlock, WorkersDyingWhileDeliveringResultsFailEachTaskAndThePoolGoesOn) {
  bounded("PebbleDeadlock", [] {
    procpool::Pool pool({.processes = 1});
    for (int i = 0; i < 10; ++i) {
      SCOPED_TRACE(i);
      try {
        (void)pool.submit([](int v) { return DiesWhileSent{v, {}}; }, i).get();
        ADD_FAILURE() << "no exception";
      } catch (const procpool::WorkerCrashed& e) {
        EXPECT_EQ(e.signal(), 0) << e.what();
        EXPECT_EQ(e.exit_status(), 1) << e.what();
        EXPECT_EQ(e.index(), 0u) << e.what();
      }
    }
    EXPECT_EQ(pool.submit(identity, 42).get(), 42);
    EXPECT_EQ(pool.worker_pids().size(), 1u);
  });
}

std::string big_result_then_exit(int delay_ms) {
  // The worker ends `delay_ms` into building, encoding or sending a 24 MiB result (on the socket:
  // below the memory-file threshold), wherever that lands.
  std::thread([delay_ms] {
    std::this_thread::sleep_for(std::chrono::milliseconds(delay_ms));
    ::_exit(1);
  }).detach();
  return std::string(24u << 20, 'r');
}

// TestProcessPoolDeadlockOnResult test_pool_deadlock, with the death in the middle of a large
// reply: the caller gets the whole result or WorkerCrashed for that task, never a hang, a
// ProtocolError or a truncated value; the pool goes on.
TEST(PebbleDeadlock, AWorkerDyingHalfWayThroughALargeReplyCostsThatTaskAlone) {
  if (test_helpers::under_tsan) GTEST_SKIP() << "TSan ends a forked child that starts threads";
  bounded("PebbleDeadlock", [] {
    procpool::Pool pool({.processes = 1});
    int crashed = 0;
    for (int delay_ms : {1, 10, 30, 60, 100, 150, 250}) {
      SCOPED_TRACE(delay_ms);
      try {
        const std::string got = pool.submit(big_result_then_exit, delay_ms).get();
        EXPECT_EQ(got.size(), 24u << 20);
        EXPECT_EQ(got.find_first_not_of('r'), std::string::npos);
      } catch (const procpool::WorkerCrashed& e) {
        ++crashed;
        EXPECT_EQ(e.exit_status(), 1) << e.what();
        EXPECT_EQ(e.index(), 0u) << e.what();
      } catch (const std::exception& e) {
        ADD_FAILURE() << "unexpected: " << e.what();
      }
      EXPECT_EQ(pool.submit(identity, delay_ms).get(), delay_ms);
    }
    std::printf("%d of 7 large replies lost to the worker's death\n", crashed);
  });
}

int exits_while_starting() {
  ::_exit(1);
}

// TestProcessPoolDeadlockOnNewFutures test_pool_deadlock_stop: every worker dies before it can
// read a task (Pebble: holding the channel's reader lock). Pebble stops the pool (RuntimeError at
// the next schedule). procpool ends each call with an Error that says new workers keep dying
// while starting (README "Kill storms"), never a hang; with fork_server the initializer runs in
// the server as the pool is made, and the constructor throws.
TEST(PebbleDeadlock, WorkersThatDieBeforeReadingATaskEndEachCallWithAnError) {
  bounded("PebbleDeadlock", [] {
    procpool::Pool pool({.processes = 1}, &exits_while_starting);
    for (int i = 0; i < 3; ++i) {
      SCOPED_TRACE(i);
      auto future = pool.submit([](int&, int x) { return x; }, i);
      try {
        (void)future.get();
        ADD_FAILURE() << "no exception";
      } catch (const procpool::Error& e) {
        EXPECT_NE(std::string(e.what()).find("died while starting"), std::string::npos) << e.what();
      }
      std::this_thread::sleep_for(50ms);
    }
    try {
      procpool::Pool server({.processes = 1, .start = Start::fork_server}, &exits_while_starting);
      ADD_FAILURE() << "the fork_server pool was made";
    } catch (const procpool::Error& e) {
      SUCCEED() << e.what();
    }
  });
  EXPECT_TRUE(test_helpers::children().empty());
}

// ---- initializers --------------------------------------------------------------------------

// test_process_pool_broken_initializer, in the three start methods' files. Pebble raises
// RuntimeError at the next schedule; procpool keeps the pool open on purpose and fails every task
// with TaskError whose type_name() is "procpool::InitializerFailed" quoting the initializer's
// exception (errors.hpp), submit and map alike.
TEST(PebbleInitializer, ABrokenInitializerFailsEveryTaskWithInitializerFailed) {
  bounded("PebbleInitializer", [] {
    for (Start start : start_methods) {
      SCOPED_TRACE(start_name(start));
      procpool::Pool pool({.processes = 1, .start = start},
                          []() -> int { throw std::runtime_error("BOOM!"); });
      std::this_thread::sleep_for(50ms);
      for (int i = 0; i < 2; ++i) {
        try {
          (void)pool.submit([](int& s, int x) { return s + x; }, i).get();
          ADD_FAILURE() << "no exception";
        } catch (const procpool::TaskError& e) {
          EXPECT_EQ(e.type_name(), "procpool::InitializerFailed") << e.what();
          EXPECT_NE(e.remote_what().find("BOOM!"), std::string::npos) << e.what();
        }
      }
      auto outcomes = pool.map_outcomes([](int& s, int x) { return s + x; }, std::vector{1, 2, 3});
      ASSERT_EQ(outcomes.size(), 3u);
      for (const auto& o : outcomes) {
        ASSERT_FALSE(o.ok());
        EXPECT_THROW(std::rethrow_exception(o.error), procpool::TaskError);
      }
    }
  });
}

int gated_initializer() {
  wait_for_gate();
  return 5;
}

// The earlier test_process_pool_stop_large_data (with long_initializer: a 60 s sleep): a task
// with a large input given while the worker is still in its initializer, then stop() (here
// terminate()): it returns promptly, the task fails with PoolClosed, no worker is left.
TEST(PebbleInitializer, TerminateWhileTheInitializerRunsAndALargeInputWaits) {
  reset_shared();
  bounded("PebbleInitializer", [] {
    procpool::Pool pool({.processes = 1}, &gated_initializer);
    auto future = pool.submit([](int& s, const std::string& data) { return s + data.size(); },
                              std::string(4098u * 1024, 'a'));
    std::this_thread::sleep_for(50ms);
    const auto start = std::chrono::steady_clock::now();
    pool.terminate();
    pool.join();
    EXPECT_LT(std::chrono::steady_clock::now() - start, 10s);
    EXPECT_THROW((void)future.get(), procpool::PoolClosed);
    EXPECT_TRUE(test_helpers::children().empty());
  });
  shared().gate = true;
}

int slow_initializer() {
  std::this_thread::sleep_for(150ms);
  return static_cast<int>(::getpid());
}

// long_initializer with max_tasks (test_process_pool_future_limit): each replacement worker runs
// the slow initializer again before its first task; tasks wait for it and none is lost.
TEST(PebbleInitializer, ASlowInitializerRunsAgainInEachRecycledWorker) {
  bounded("PebbleInitializer", [] {
    procpool::Pool pool({.processes = 1, .max_tasks_per_child = 2}, &slow_initializer);
    std::vector<int> inputs(6);
    std::iota(inputs.begin(), inputs.end(), 0);
    auto got = pool.map(
        [](int& built_by, int x) {
          return std::pair<int, int>{x, built_by == static_cast<int>(::getpid()) ? 1 : 0};
        },
        inputs);
    ASSERT_EQ(got.size(), 6u);
    for (int i = 0; i < 6; ++i) {
      EXPECT_EQ(got[static_cast<std::size_t>(i)].first, i);
      EXPECT_EQ(got[static_cast<std::size_t>(i)].second, 1) << "state built by another process";
    }
  });
}

// ---- stopping, closing, joining ------------------------------------------------------------

// test_process_pool_join_futures_timeout: close() with two long tasks on one worker, then join()
// waits for them; procpool's join() has no timeout, so another thread's terminate() ends the wait:
// join() returns, both tasks fail with PoolClosed, no worker is left.
TEST(PebbleStop, TerminateReleasesAJoinWaitingOnLongTasks) {
  reset_shared();
  bounded("PebbleStop", [] {
    procpool::Pool pool({.processes = 1});
    auto f1 = pool.submit(block_until_gate, 1);
    auto f2 = pool.submit(block_until_gate, 2);
    pool.close();
    std::atomic<bool> joined{false};
    std::thread joiner([&] {
      pool.join();
      joined = true;
    });
    ASSERT_TRUE(wait_started(1));
    std::this_thread::sleep_for(400ms);
    EXPECT_FALSE(joined.load()) << "join() returned with work still running";
    const auto start = std::chrono::steady_clock::now();
    pool.terminate();
    joiner.join();
    EXPECT_LT(std::chrono::steady_clock::now() - start, 10s);
    EXPECT_THROW((void)f1.get(), procpool::PoolClosed);
    EXPECT_THROW((void)f2.get(), procpool::PoolClosed);
    EXPECT_TRUE(test_helpers::children().empty());
  });
  shared().gate = true;
}

// test_process_pool_stop_stopped_callback: a done-callback stops the pool; later schedules are
// refused. Here the error handler (procpool's callback for a dropped Future, on the pool's
// service thread) calls terminate(): it returns, and a later submit throws PoolClosed.
TEST(PebbleStop, TerminateFromTheErrorHandlerStopsThePool) {
  bounded("PebbleStop", [] {
    procpool::Pool pool({.processes = 1});
    std::mutex m;
    std::condition_variable cv;
    bool terminated = false;
    pool.set_error_handler([&](std::exception_ptr) {
      pool.terminate();
      std::lock_guard lock(m);
      terminated = true;
      cv.notify_all();
    });
    (void)pool.submit(error_function, 0);  // dropped: its error goes to the handler
    {
      std::unique_lock lock(m);
      ASSERT_TRUE(cv.wait_for(lock, 20s, [&] { return terminated; }))
          << "terminate() in the handler did not return";
    }
    EXPECT_THROW((void)pool.submit(long_function, 1), procpool::PoolClosed);
    pool.join();
    EXPECT_TRUE(test_helpers::children().empty());
  });
}

// The same from the progress callback of a running map: terminate() there ends the call with
// PoolClosed (README: "terminate() kills the workers at once; unfinished work fails with
// PoolClosed"), and later work is refused. The callback asks for the pool's insights and worker
// pids first, as a progress UI would. This translation found it hanging for good: the callback
// was called with the pool's lock held, which terminate(), insights() and worker_pids() take.
TEST(PebbleStop, TerminateFromTheProgressCallbackEndsTheCallWithPoolClosed) {
  bounded("PebbleStop", [] {
    procpool::Pool* self = nullptr;
    std::atomic<bool> called{false};
    procpool::Pool pool(
        {.processes = 1, .chunksize = 1, .progress = [&](const procpool::ProgressInfo&) {
           if (called.exchange(true)) return;
           EXPECT_EQ(self->worker_pids().size(), 1u);
           EXPECT_LE(self->insights().tasks, 200u);
           self->terminate();
         }});
    self = &pool;
    std::vector<int> inputs(200);
    std::iota(inputs.begin(), inputs.end(), 0);
    EXPECT_THROW((void)pool.map(sleep_100ms, inputs), procpool::PoolClosed);
    EXPECT_TRUE(called.load());
    EXPECT_THROW((void)pool.submit(identity, 1), procpool::PoolClosed);
    pool.join();
    EXPECT_TRUE(test_helpers::children().empty());
  });
}

// test_process_pool_large_data: a large input and result (Pebble: "a" * 1098 * 1024 * 50; here
// 40 of those units, 43.9 MB, still above the 32 MiB from which they travel as memory files, to
// keep the test quick) travel whole, in each start method.
TEST(PebbleLargeData, ALargeInputAndResultTravelWhole) {
  bounded("PebbleLargeData", [] {
    const std::string data(1098u * 1024 * 40, 'a');
    for (Start start : start_methods) {
      SCOPED_TRACE(start_name(start));
      procpool::Pool pool({.processes = 1, .start = start});
      const std::string got = pool.submit([](const std::string& s) { return s; }, data).get();
      EXPECT_EQ(got.size(), data.size());
      EXPECT_TRUE(got == data);
    }
  });
}

// test_process_pool_stop_large_data: stop() right after a 50 MB input was given (and, in the
// spawn file, a second later): terminate() returns, the task is done or fails with PoolClosed,
// no worker is left.
TEST(PebbleLargeData, TerminateRightAfterALargeInputWasGiven) {
  bounded("PebbleLargeData", [] {
    const std::string data(1098u * 1024 * 50, 'a');
    for (auto wait : {0ms, 100ms}) {
      procpool::Pool pool({.processes = 1});
      auto future = pool.submit([](const std::string& s) { return s.size(); }, data);
      std::this_thread::sleep_for(wait);
      pool.terminate();
      pool.join();
      try {
        EXPECT_EQ(future.get(), data.size());
      } catch (const procpool::PoolClosed&) {
      }
      EXPECT_TRUE(test_helpers::children().empty());
    }
  });
}

std::size_t sleep_then_size(const std::vector<int>& big, int ms) {
  std::this_thread::sleep_for(std::chrono::milliseconds(ms));
  return big.size();
}

// test_process_pool_generic.py test_big_values_and_cancellation: many workers, each given a big
// input (8 MB, far more than a socket buffer) and a staggered sleep; once the first is done, the
// pool is stopped. Every Future is then ready (its value, or PoolClosed) and no worker is left.
TEST(PebbleLargeData, ManyWorkersWithBigInputsStoppedAfterTheFirstResult) {
  bounded("PebbleLargeData", [] {
    constexpr int count = 8;
    const std::vector<int> big(2'000'000, 7);
    procpool::Pool pool({.processes = count, .warn_oversubscription = false});
    std::vector<procpool::Future<std::size_t>> futures;
    for (int i = 0; i < count; ++i)
      futures.push_back(pool.submit(sleep_then_size, big, 100 + i * 10));
    ASSERT_EQ(futures[0].wait_for(20s), std::future_status::ready);
    pool.terminate();
    pool.join();
    int done = 0;
    int closed = 0;
    for (auto& f : futures) {
      ASSERT_EQ(f.wait_for(0s), std::future_status::ready);
      try {
        EXPECT_EQ(f.get(), big.size());
        ++done;
      } catch (const procpool::PoolClosed&) {
        ++closed;
      }
    }
    EXPECT_GE(done, 1);
    EXPECT_EQ(done + closed, count);
    EXPECT_TRUE(test_helpers::children().empty());
  });
}

/// The socket a worker talks to its parent over (its only socket).
int own_socket() {
  DIR* dir = ::opendir("/proc/self/fd");
  int found = -1;
  while (dirent* e = ::readdir(dir)) {
    const int fd = std::atoi(e->d_name);
    struct stat st {};
    if (e->d_name[0] != '.' && ::fstat(fd, &st) == 0 && S_ISSOCK(st.st_mode)) found = fd;
  }
  ::closedir(dir);
  return found;
}

int flood_own_socket(int x) {
  const int fd = own_socket();
  const char garbage[] = "spam spam spam spam spam spam spam spam spam spam spam spam spam";
  const auto end = std::chrono::steady_clock::now() + 30s;
  while (std::chrono::steady_clock::now() < end) {
    if (::send(fd, garbage, sizeof garbage, MSG_NOSIGNAL) < 0) break;
  }
  return x;
}

// test_process_pool_generic.py test_message_flood_from_worker: a task that floods its worker's
// channel without end. procpool refuses the first bytes that are not a frame (README "Garbage":
// ProtocolError, and the worker is replaced), so the flood ends the task, not the pool; and a
// pool stopped while a worker floods stops.
TEST(PebbleFlood, AWorkerFloodingItsChannelIsStoppedAndThePoolGoesOn) {
  bounded("PebbleFlood", [] {
    procpool::Pool pool({.processes = 1});
    const auto start = std::chrono::steady_clock::now();
    EXPECT_THROW((void)pool.submit(flood_own_socket, 1).get(), procpool::ProtocolError);
    EXPECT_LT(std::chrono::steady_clock::now() - start, 20s);
    EXPECT_EQ(pool.submit(identity, 2).get(), 2);
    (void)pool.submit(flood_own_socket, 3);  // dropped
    std::this_thread::sleep_for(20ms);
    pool.terminate();
    pool.join();
    EXPECT_TRUE(test_helpers::children().empty());
  });
}

// ---- processes -----------------------------------------------------------------------------

// test_process_pool_different_process (all three start-method files): five tasks on a pool of two
// run in exactly two processes, neither of them the caller. The same for a fork-per-call map.
TEST(PebbleProcesses, TasksRunInTheTwoWorkerProcesses) {
  bounded("PebbleProcesses", [] {
    for (Start start : start_methods) {
      SCOPED_TRACE(start_name(start));
      procpool::Pool pool({.processes = 2, .start = start});
      std::vector<procpool::Future<int>> futures;
      for (int i = 0; i < 5; ++i)
        futures.push_back(pool.submit(pid_function, i));
      std::set<int> pids;
      for (auto& f : futures)
        pids.insert(f.get());
      EXPECT_EQ(pids.size(), 2u);
      EXPECT_EQ(pids.count(static_cast<int>(::getpid())), 0u);
    }
    const auto pids_list =
        procpool::map(pid_function, std::vector<int>(5), {.processes = 2, .chunksize = 1});
    const std::set<int> pids(pids_list.begin(), pids_list.end());
    EXPECT_EQ(pids.size(), 2u);
    EXPECT_EQ(pids.count(static_cast<int>(::getpid())), 0u);
  });
}

// test_process_pool_future_limit (all three files): one worker, max_tasks = 2, four tasks: exactly
// two processes, two tasks each.
TEST(PebbleProcesses, MaxTasksOfTwoGivesFourTasksExactlyTwoWorkers) {
  bounded("PebbleProcesses", [] {
    for (Start start : start_methods) {
      SCOPED_TRACE(start_name(start));
      procpool::Pool pool({.processes = 1, .start = start, .max_tasks_per_child = 2});
      std::vector<procpool::Future<int>> futures;
      for (int i = 0; i < 4; ++i)
        futures.push_back(pool.submit(pid_function, i));
      std::map<int, int> per_pid;
      for (auto& f : futures)
        ++per_pid[f.get()];
      ASSERT_EQ(per_pid.size(), 2u);
      for (auto [pid, n] : per_pid)
        EXPECT_EQ(n, 2) << pid;
    }
  });
}

int process_function(int x) {
  const pid_t child = ::fork();
  if (child == 0) ::_exit(x);
  if (child < 0) return -1;
  int status = 0;
  if (::waitpid(child, &status, 0) != child) return -2;
  return WIFEXITED(status) ? WEXITSTATUS(status) : -3;
}

// test_process_pool_child_process: a task starts a process of its own and waits for it. The
// worker must not reap it first (waitpid() returns that child's own exit status).
TEST(PebbleChildren, ATaskMayStartAndReapItsOwnChildProcess) {
  bounded("PebbleChildren", [] {
    for (Start start : start_methods) {
      SCOPED_TRACE(start_name(start));
      procpool::Pool pool({.processes = 1, .start = start});
      EXPECT_EQ(pool.submit(process_function, 7).get(), 7);
      EXPECT_EQ(pool.map(process_function, std::vector{1, 2, 3}), (std::vector{1, 2, 3}));
    }
    EXPECT_EQ(procpool::map(process_function, std::vector{4, 5}, {.processes = 2}),
              (std::vector{4, 5}));
  });
  EXPECT_TRUE(test_helpers::children().empty());
}

int square(int x) {
  return x * x;
}

int pebble_function(int x) {
  procpool::Future<int> future;
  {
    procpool::Pool inner({.processes = 1});
    future = inner.submit(square, x);
  }  // Pebble's `with ProcessPool(...) as pool:` ends before f.result()
  return future.get();
}

int pool_function(int x) {
  procpool::Pool inner({.processes = 1});
  const int got = inner.submit(square, x).get();
  inner.close();
  inner.join();
  return got;
}

// test_process_pool_child_pebble and test_process_pool_child_pool: a task runs a pool of its own,
// its Future read after the inner pool's end (the destructor finished the accepted work), or
// closed and joined by hand.
TEST(PebbleChildren, ATaskMayRunAPoolWhoseFutureOutlivesIt) {
  SKIP_NESTED_POOLS_UNDER_TSAN();
  bounded("PebbleChildren", [] {
    procpool::Pool pool({.processes = 1, .task_timeout = 20s});
    EXPECT_EQ(pool.submit(pebble_function, 3).get(), 9);
    EXPECT_EQ(pool.submit(pool_function, 4).get(), 16);
    EXPECT_EQ(procpool::map(pebble_function, std::vector{5, 6}, {.processes = 2}),
              (std::vector{25, 36}));
  });
}

// ---- results that cannot be sent ---------------------------------------------------------

/// Pebble's pickle_error_function returns a threading.Lock: a value whose save() throws.
struct Unpicklable {
  int value = 0;
  std::string unsent;
  template <class Archive>
  void save(Archive&) const {
    throw std::runtime_error("cannot pickle '_thread.lock' object");
  }
  template <class Archive>
  void load(Archive& ar) {
    ar(value);
  }
};

Unpicklable pickle_error_function(int x) {
  return Unpicklable{x, {}};
}

// test_process_pool_pickling_error_result and test_concurrent_process_fork.py
// test_pickling_error_decorated: a result that cannot be encoded fails its task (TaskError, stage
// serialize_result), on a Future, through the handler for a dropped one, and in a fork-per-call
// map; the pool goes on.
TEST(PebblePickling, AResultThatCannotBeEncodedFailsItsTaskAndThePoolGoesOn) {
  bounded("PebblePickling", [] {
    procpool::Pool pool({.processes = 1});
    HandlerLog log;
    pool.set_error_handler(log.handler());
    try {
      (void)pool.submit(pickle_error_function, 1).get();
      ADD_FAILURE() << "no exception";
    } catch (const procpool::TaskError& e) {
      EXPECT_EQ(e.stage(), Stage::serialize_result) << e.what();
      EXPECT_NE(e.remote_what().find("cannot pickle"), std::string::npos) << e.what();
    }
    (void)pool.submit(pickle_error_function, 2);
    ASSERT_TRUE(log.wait_for(1));
    {
      std::lock_guard lock(log.m);
      try {
        std::rethrow_exception(log.errors[0]);
      } catch (const procpool::TaskError& e) {
        EXPECT_EQ(e.stage(), Stage::serialize_result) << e.what();
      } catch (const std::exception& e) {
        ADD_FAILURE() << "unexpected: " << e.what();
      }
    }
    EXPECT_EQ(pool.submit(identity, 3).get(), 3);
    try {
      (void)procpool::map(pickle_error_function, std::vector{0, 1}, {.processes = 2});
      ADD_FAILURE() << "no exception";
    } catch (const procpool::TaskError& e) {
      EXPECT_EQ(e.stage(), Stage::serialize_result) << e.what();
    }
  });
  EXPECT_TRUE(test_helpers::children().empty());
}

// test_process_pool_map_zero_chunk: Pebble refuses chunksize=0 (ValueError); in procpool 0 means
// automatic chunks (Options), on purpose: a map with it runs, empty or not.
TEST(PebbleMap, ChunksizeZeroMeansAutomaticChunks) {
  procpool::Pool pool({.processes = 1, .chunksize = 0});
  EXPECT_TRUE(pool.map(identity, std::vector<int>{}).empty());
  EXPECT_EQ(pool.map(identity, std::vector{1, 2, 3}), (std::vector{1, 2, 3}));
  EXPECT_EQ(procpool::map(identity, std::vector{1, 2, 3}, {.processes = 1, .chunksize = 0}),
            (std::vector{1, 2, 3}));
}

// ---- several threads, many tasks -----------------------------------------------------------

int mixed_task(int x) {
  switch (x % 4) {
    case 1:
      std::this_thread::sleep_for(10s);  // times out
      return x;
    case 2:
      ::_exit(3);
    case 3:
      throw std::runtime_error("BOOM!");
    default:
      return x * 2;
  }
}

// Pebble's single-thread cases (test_process_pool_timeout, test_process_pool_expired_worker,
// test_process_pool_error) at once from four threads sharing one pool: each thread gets its own
// tasks' outcomes, each of the right kind.
TEST(PebbleThreads, FourThreadsSubmitTasksThatReturnTimeOutExitOrThrow) {
  bounded("PebbleThreads", [] {
    procpool::Pool pool({.processes = 2, .task_timeout = 200ms});
    std::atomic<int> wrong{0};
    std::vector<std::thread> threads;
    for (int t = 0; t < 4; ++t) {
      threads.emplace_back([&, t] {
        std::vector<procpool::Future<int>> futures;
        for (int i = 0; i < 8; ++i)
          futures.push_back(pool.submit(mixed_task, t * 100 + i));
        for (int i = 0; i < 8; ++i) {
          const int x = t * 100 + i;
          try {
            const int v = futures[static_cast<std::size_t>(i)].get();
            if (x % 4 != 0 || v != x * 2) ++wrong;
          } catch (const procpool::TaskTimeout&) {
            if (x % 4 != 1) ++wrong;
          } catch (const procpool::WorkerCrashed& e) {
            if (x % 4 != 2 || e.exit_status() != 3) ++wrong;
          } catch (const procpool::TaskError& e) {
            if (x % 4 != 3 || e.remote_what() != "BOOM!") ++wrong;
          } catch (...) {
            ++wrong;
          }
        }
      });
    }
    for (auto& th : threads)
      th.join();
    EXPECT_EQ(wrong.load(), 0);
    EXPECT_EQ(pool.worker_pids().size(), 2u);
  });
}

// Pebble's test_process_pool_future_limit and multiple_futures at scale: ten thousand submits on a
// pool that recycles its workers every 1000 tasks; every result arrives, in its own Future.
TEST(PebbleMany, TenThousandSubmitsWithRecyclingAllArrive) {
  bounded("PebbleMany", [] {
    procpool::Pool pool({.processes = 2, .max_tasks_per_child = 1000});
    std::vector<procpool::Future<int>> futures;
    futures.reserve(10000);
    for (int i = 0; i < 10000; ++i)
      futures.push_back(pool.submit(square, i % 1000));
    int wrong = 0;
    for (int i = 0; i < 10000; ++i)
      wrong += futures[static_cast<std::size_t>(i)].get() == (i % 1000) * (i % 1000) ? 0 : 1;
    EXPECT_EQ(wrong, 0);
    EXPECT_GE(pool.insights().workers.size(), 2u);
  });
}

}  // namespace
