// The hard cases of the peers' own test suites, translated: loky
// (tests/test_reusable_executor.py, tests/_test_process_executor.py),
// CPython's multiprocessing (Lib/test/_test_multiprocessing.py, _TestPool and
// friends) and concurrent.futures (Lib/test/test_concurrent_futures/
// test_deadlock.py, test_process_pool.py, test_shutdown.py). Each test names
// the case it comes from. "Pickling" is a value's save(), "unpickling" its
// load(); a crash is raise(SIGSEGV), sys.exit / libc exit is std::exit.
//
// Skipped, and why:
// - Crash or exit in the caller's own encoding of an input (ExitAtPickle /
//   CrashAtPickle of a task argument) or decoding of a result (ExitAtUnpickle /
//   CrashAtUnpickle of a result): that code runs in the caller's process, and
//   nothing can isolate the caller from itself.
// - The crash, exit and raise in the callable itself (test_crash_during_func_exec_on_worker
//   and its neighbours), the input range that throws (test_*_handle_iterable_exception),
//   errors in a result's save()/load() inside a map, a SIGKILL of the parent
//   (test_sigkill_shutdown_leaks_workers), a pool killed from outside between
//   tasks (test_deadlock_kill): already in errors_test, integrity_test,
//   failures_test and pool_test.
// - Executor resizing and reuse by options (get_reusable_executor(max_workers=...),
//   test_kill_workers_on_new_options, test_reusable_initializer), cancel()
//   (test_cancel_futures, test_hang_gh94440), done-callbacks (add_done_callback,
//   futures.wait / as_completed), keyword arguments, tracebacks, ResourceWarnings,
//   interpreter shutdown and atexit hooks, start methods and contexts:
//   procpool has no such API, or nothing like it.
// - Tests that mock the executor's internals (test_gh105829 wakeup pipe,
//   test_python_finalization_error, _force_shutdown mocks).
#include <gtest/gtest.h>
#include <procpool/procpool.hpp>

#include <sys/mman.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <csignal>
#include <cstdlib>
#include <exception>
#include <future>
#include <list>
#include <memory>
#include <mutex>
#include <new>
#include <numeric>
#include <optional>
#include <ranges>
#include <set>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

#include "helpers.hpp"

namespace {

using Stage = procpool::TaskError::Stage;
using namespace std::chrono_literals;

const pid_t test_process = ::getpid();

/// TSan cannot start threads in a child of a process that has threads (it
/// ends it: die_after_fork), and a Pool made in a worker starts threads.
#define SKIP_NESTED_POOLS_UNDER_TSAN() \
  if (test_helpers::under_tsan)        \
  GTEST_SKIP() << "TSan ends a forked child that starts threads (die_after_fork)"

using test_helpers::segfault;

using test_helpers::reset_shared;
using test_helpers::shared;
using test_helpers::wait_for_gate;
using test_helpers::wait_started;

int identity(int x) {
  return x;
}
int square(int x) {
  return x * x;
}
int mul(int x, int y) {
  return x * y;
}

/// What a value does as it is encoded or decoded (the peers' ErrorAtPickle,
/// CrashAtUnpickle, ExitAtPickle...).
enum class Fault : int {
  none,
  save_throws,
  save_crashes,
  save_exits,
  load_throws,
  load_crashes,
  load_exits
};

/// Acts out `fault` if it is one of a stage's three: throws `message`,
/// crashes or exits.
void act_out(Fault fault, Fault throws, Fault crashes, Fault exits, const char* message) {
  if (fault == throws) throw std::runtime_error(message);
  if (fault == crashes) segfault();
  if (fault == exits) std::exit(0);
}

struct Bad {
  Fault fault = Fault::none;
  int value = 0;
  std::string unsent;  // not trivially copyable: the value goes through save() and load()

  template <class Archive>
  void save(Archive& ar) const {
    act_out(fault, Fault::save_throws, Fault::save_crashes, Fault::save_exits, "Error in pickle");
    ar(static_cast<int>(fault), value);
  }
  template <class Archive>
  void load(Archive& ar) {
    int f = 0;
    ar(f, value);
    fault = static_cast<Fault>(f);
    act_out(fault, Fault::load_throws, Fault::load_crashes, Fault::load_exits, "the error message");
  }
};

int value_of(const Bad& b) {
  return b.value;
}
Bad make_bad(int fault) {
  return Bad{static_cast<Fault>(fault), 7, {}};
}

/// What a case must end with.
struct Expect {
  enum Kind { task_error, crashed } kind;
  Stage stage = Stage::task;  // task_error
  int signal = 0;             // crashed: the signal, or 0 for an exit
  int exit_status = 0;
};

template <class Fn>
void expect_failure(Fn&& get, const Expect& expect, std::size_t index, const std::string& name) {
  SCOPED_TRACE(name);
  try {
    get();
    ADD_FAILURE() << "no exception";
  } catch (const procpool::TaskError& e) {
    ASSERT_EQ(expect.kind, Expect::task_error) << e.what();
    EXPECT_EQ(e.stage(), expect.stage) << e.what();
    EXPECT_EQ(e.index(), index) << e.what();
  } catch (const procpool::WorkerCrashed& e) {
    ASSERT_EQ(expect.kind, Expect::crashed) << e.what();
    EXPECT_EQ(e.signal(), expect.signal) << e.what();
    if (expect.signal == 0) {
      EXPECT_EQ(e.exit_status(), expect.exit_status) << e.what();
    }
    EXPECT_EQ(e.index(), index) << e.what();
  } catch (const std::exception& e) {
    ADD_FAILURE() << "unexpected exception: " << e.what();
  }
}

// loky test_reusable_executor.py TestExecutorDeadLock::test_crashes (its
// crash_cases) and CPython test_deadlock.py ExecutorDeadlockTest: a failure
// at each stage a task's input and result go through, each on the same
// reused pool, which must serve the next task afterwards.
TEST(PeersCrashMatrix, EveryStageOfATaskFailsItAloneAndThePoolGoesOn) {
  procpool::Pool pool({.processes = 2});
  struct Case {
    const char* name;
    Fault fault;
    Expect expect;
  };
  const Case inputs[] = {
      {"test_error_at_task_pickle",
       Fault::save_throws,
       {Expect::task_error, Stage::serialize_input}},
      {"test_error_at_task_unpickle",
       Fault::load_throws,
       {Expect::task_error, Stage::deserialize_input}},
      {"test_crash_at_task_unpickle", Fault::load_crashes, {Expect::crashed, {}, SIGSEGV}},
      {"test_exit_at_task_unpickle (CExitAtUnpickle)",
       Fault::load_exits,
       {Expect::crashed, {}, 0, 0}},
  };
  for (const Case& c : inputs) {
    auto f = pool.submit(value_of, Bad{c.fault, 1, {}});
    expect_failure([&] { (void)f.get(); }, c.expect, 0, c.name);
    EXPECT_EQ(pool.submit(identity, 42).get(), 42) << "after " << c.name;
  }
  const Case results[] = {
      {"test_crash_during_result_pickle_on_worker",
       Fault::save_crashes,
       {Expect::crashed, {}, SIGSEGV}},
      {"test_exit_during_result_pickle_on_worker (CExitAtPickle)",
       Fault::save_exits,
       {Expect::crashed, {}, 0, 0}},
      {"test_error_during_result_pickle_on_worker",
       Fault::save_throws,
       {Expect::task_error, Stage::serialize_result}},
      {"test_error_during_result_unpickle_in_result_handler",
       Fault::load_throws,
       {Expect::task_error, Stage::deserialize_result}},
  };
  for (const Case& c : results) {
    auto f = pool.submit(make_bad, static_cast<int>(c.fault));
    expect_failure([&] { (void)f.get(); }, c.expect, 0, c.name);
    EXPECT_EQ(pool.submit(identity, 42).get(), 42) << "after " << c.name;
  }
  EXPECT_EQ(pool.worker_pids().size(), 2u);
}

// loky test_informative_error_when_fail_at_unpickle: the worker's message
// reaches the caller.
TEST(PeersCrashMatrix, AnInputsLoadErrorCarriesTheWorkersTypeAndMessage) {
  procpool::Pool pool({.processes = 2});
  auto f = pool.submit(value_of, Bad{Fault::load_throws, 1, {}});
  try {
    (void)f.get();
    FAIL() << "no exception";
  } catch (const procpool::TaskError& e) {
    EXPECT_EQ(e.type_name(), "std::runtime_error");
    EXPECT_EQ(e.remote_what(), "the error message");
    EXPECT_NE(std::string(e.what()).find("the error message"), std::string::npos) << e.what();
  }
}

/// The crash matrix inside a chunk: one input of eight fails at `fault`, the
/// seven others in the same message are delivered.
template <class Outcomes>
void expect_only_3_failed(const Outcomes& outcomes, const Expect& expect, const char* name) {
  SCOPED_TRACE(name);
  ASSERT_EQ(outcomes.size(), 8u);
  for (std::size_t i = 0; i < 8; ++i) {
    if (i == 3) {
      ASSERT_FALSE(outcomes[i].ok());
      expect_failure([&] { std::rethrow_exception(outcomes[i].error); }, expect, 3, name);
    } else {
      ASSERT_TRUE(outcomes[i].ok()) << i << ": " << outcomes[i].what();
    }
  }
}

std::vector<Bad> bad_inputs(Fault at_3) {
  std::vector<Bad> v;
  for (int i = 0; i < 8; ++i)
    v.push_back(Bad{i == 3 ? at_3 : Fault::none, i, {}});
  return v;
}

// CPython test_crash_at_task_unpickle / loky CrashAtUnpickle, with the bad
// input in the middle of a chunk: the crash is charged to that input alone.
TEST(PeersCrashMatrix, AnInputThatCrashesItsWorkerAsItIsDecodedCostsThatInputAloneInAChunk) {
  procpool::Pool pool({.processes = 2, .chunksize = 8});
  for (Fault fault : {Fault::load_crashes, Fault::load_exits}) {
    const Expect expect{Expect::crashed, {}, fault == Fault::load_crashes ? SIGSEGV : 0, 0};
    expect_only_3_failed(pool.map_outcomes(value_of, bad_inputs(fault)), expect, "Pool");
    const std::vector<Bad> v = bad_inputs(fault);
    std::list<Bad> listed(v.begin(), v.end());  // not random access: the inputs travel
    expect_only_3_failed(procpool::map_outcomes(value_of, listed, {.processes = 2, .chunksize = 8}),
                         expect, "fork per call");
  }
}

// CPython test_crash_during_result_pickle_on_worker / loky CrashAtPickle,
// with the bad result in the middle of a chunk.
TEST(PeersCrashMatrix, AResultThatCrashesItsWorkerAsItIsEncodedCostsThatResultAloneInAChunk) {
  auto make = [](int i) { return make_bad(i == 3 ? static_cast<int>(Fault::save_crashes) : 0); };
  std::vector<int> inputs(8);
  std::iota(inputs.begin(), inputs.end(), 0);
  const Expect expect{Expect::crashed, {}, SIGSEGV};
  procpool::Pool pool({.processes = 2, .chunksize = 8});
  expect_only_3_failed(
      pool.map_outcomes(
          [](int i) { return make_bad(i == 3 ? static_cast<int>(Fault::save_crashes) : 0); },
          inputs),
      expect, "Pool");
  expect_only_3_failed(procpool::map_outcomes(make, inputs, {.processes = 2, .chunksize = 8}),
                       expect, "fork per call");
}

// loky test_queue_full_deadlock: a hundred tasks whose input cannot be
// encoded, then a hundred that can, on one worker.
TEST(PeersQueue, AHundredUnencodableInputsThenAHundredGoodOnesOnOneWorker) {
  procpool::Pool pool({.processes = 1});
  (void)pool.submit(identity, 42).get();
  std::vector<procpool::Future<int>> failing;
  std::vector<procpool::Future<int>> good;
  for (int i = 0; i < 100; ++i)
    failing.push_back(pool.submit(value_of, Bad{Fault::save_throws, i, {}}));
  for (int i = 0; i < 100; ++i)
    good.push_back(pool.submit(value_of, Bad{Fault::none, i, {}}));
  expect_failure([&] { (void)failing[99].get(); }, {Expect::task_error, Stage::serialize_input}, 0,
                 "fs_fail[99]");
  EXPECT_EQ(good[99].get(), 99);
  for (int i = 0; i < 99; ++i) {
    EXPECT_THROW((void)failing[static_cast<std::size_t>(i)].get(), procpool::TaskError);
    EXPECT_EQ(good[static_cast<std::size_t>(i)].get(), i);
  }
}

/// loky CrashAtGCInWorker / CExitAtGCInWorker: a value whose destructor kills
/// the worker (not the caller).
struct DiesWhenDestroyedInAWorker {
  int value = 0;
  int how = SIGSEGV;  // or 0: exit(0)  (SIGSEGV: segfault())
  std::string unsent;
  DiesWhenDestroyedInAWorker() = default;
  DiesWhenDestroyedInAWorker(int v, int h) : value(v), how(h) {}
  DiesWhenDestroyedInAWorker(const DiesWhenDestroyedInAWorker&) = default;
  DiesWhenDestroyedInAWorker& operator=(const DiesWhenDestroyedInAWorker&) = default;
  ~DiesWhenDestroyedInAWorker() {
    if (::getpid() == test_process || value < 0) return;
    if (how == 0) std::exit(0);
    segfault();
  }
  template <class Archive>
  void serialize(Archive& ar) {
    ar(value, how);
  }
};

// loky test_call_item_gc_crash_or_exit: the task's argument is destroyed
// after the task returned, and its destructor kills the worker. The caller
// gets the result or the worker's death charged to that task (never another
// error, never a hang), and the pool serves the next calls.
TEST(PeersGc, AnArgumentWhoseDestructorKillsTheWorkerCostsAtMostThatTask) {
  for (int how : {SIGSEGV, 0}) {
    SCOPED_TRACE(how == 0 ? "exit" : "SIGSEGV");
    procpool::Pool pool({.processes = 1});
    auto f = pool.submit([](const DiesWhenDestroyedInAWorker& d) { return d.value; },
                         DiesWhenDestroyedInAWorker(5, how));
    try {
      EXPECT_EQ(f.get(), 5);
    } catch (const procpool::WorkerCrashed& e) {
      EXPECT_EQ(e.index(), 0u) << e.what();
      EXPECT_EQ(e.signal(), how) << e.what();
    }
    std::vector<int> inputs(100);
    std::iota(inputs.begin(), inputs.end(), 0);
    EXPECT_EQ(pool.map(identity, inputs), inputs);
  }
}

// The same with a result whose destructor (run in the worker once the result
// is encoded) kills the worker.
TEST(PeersGc, AResultWhoseDestructorKillsTheWorkerCostsAtMostThatTask) {
  procpool::Pool pool({.processes = 1});
  auto f = pool.submit([](int v) { return DiesWhenDestroyedInAWorker(v, SIGSEGV); }, 5);
  try {
    DiesWhenDestroyedInAWorker got = f.get();
    EXPECT_EQ(got.value, 5);
  } catch (const procpool::WorkerCrashed& e) {
    EXPECT_EQ(e.index(), 0u) << e.what();
    EXPECT_EQ(e.signal(), SIGSEGV) << e.what();
  }
  std::vector<int> inputs(100);
  std::iota(inputs.begin(), inputs.end(), 0);
  EXPECT_EQ(pool.map(identity, inputs), inputs);
}

int kill_friend(int pid) {
  ::kill(static_cast<pid_t>(pid), SIGKILL);
  std::this_thread::sleep_for(20ms);  // the friend may be this very worker
  return pid;
}

// loky test_crash_races: each worker's task SIGKILLs a worker (another, or
// itself). Every task either returns or fails with WorkerCrashed(SIGKILL);
// the pool serves the next call with all its workers.
TEST(PeersCrashRaces, TasksThatKillTheirPeersFailWithSigkillAndThePoolGoesOn) {
  for (unsigned n : {1u, 2u, 5u}) {
    SCOPED_TRACE(n);
    procpool::Pool pool({.processes = n, .chunksize = 1, .warn_oversubscription = false});
    std::vector<int> warm(n);
    (void)pool.map(identity, warm);
    const std::vector<pid_t> pids = pool.worker_pids();
    ASSERT_EQ(pids.size(), n);
    std::vector<int> friends(pids.rbegin(), pids.rend());
    auto outcomes = pool.map_outcomes(kill_friend, friends);
    ASSERT_EQ(outcomes.size(), n);
    int crashed = 0;
    for (std::size_t i = 0; i < n; ++i) {
      if (outcomes[i].ok()) {
        EXPECT_EQ(*outcomes[i].value, friends[i]);
        continue;
      }
      ++crashed;
      try {
        std::rethrow_exception(outcomes[i].error);
      } catch (const procpool::WorkerCrashed& e) {
        EXPECT_EQ(e.signal(), SIGKILL) << e.what();
        EXPECT_EQ(e.index(), i) << e.what();
      } catch (const std::exception& e) {
        ADD_FAILURE() << "unexpected: " << e.what();
      }
    }
    if (n % 2 == 1) {
      EXPECT_GE(crashed, 1) << "the middle task killed its own worker";
    }
    std::vector<int> inputs(50);
    std::iota(inputs.begin(), inputs.end(), 0);
    EXPECT_EQ(pool.map(identity, inputs), inputs);
    EXPECT_EQ(pool.worker_pids().size(), n);
  }
}

// CPython test_deadlock.py test_shutdown_deadlock: a worker that crashes
// after close(): join() returns and the task fails with WorkerCrashed.
TEST(PeersShutdown, AWorkerCrashingAfterCloseDoesNotHangJoin) {
  procpool::Pool pool({.processes = 2});
  auto f = pool.submit(
      [](int) {
        std::this_thread::sleep_for(100ms);
        segfault();
        return 0;
      },
      0);
  pool.close();
  const auto start = std::chrono::steady_clock::now();
  pool.join();
  EXPECT_LT(std::chrono::steady_clock::now() - start, 3s);
  expect_failure([&] { (void)f.get(); }, {Expect::crashed, {}, SIGSEGV}, 0, "crash after close");
  EXPECT_TRUE(test_helpers::children().empty());
}

// loky TestTerminateExecutor::test_shutdown_deadlock: a task that kills a
// sibling worker, then close() and join() at once.
TEST(PeersShutdown, ATaskKillingASiblingJustBeforeJoinDoesNotHangIt) {
  procpool::Pool pool({.processes = 2});
  std::vector<int> warm(2);
  (void)pool.map(identity, warm);
  auto f = pool.submit(kill_friend, static_cast<int>(pool.worker_pids()[0]));
  std::this_thread::sleep_for(10ms);
  pool.close();
  pool.join();
  try {
    (void)f.get();
  } catch (const procpool::WorkerCrashed& e) {
    EXPECT_EQ(e.signal(), SIGKILL) << e.what();  // it may have killed itself
  }
  EXPECT_TRUE(test_helpers::children().empty());
}

// CPython test_deadlock.py test_shutdown_deadlock_pickle (bpo-39104) and
// loky test_shutdown_with_pickle_error: an input that cannot be encoded,
// submitted just before close().
TEST(PeersShutdown, AnUnencodableInputSubmittedJustBeforeCloseFailsAndJoinReturns) {
  for (int round = 0; round < 5; ++round) {
    procpool::Pool pool({.processes = 2});
    EXPECT_EQ(pool.submit(identity, 42).get(), 42);
    auto f = pool.submit(value_of, Bad{Fault::save_throws, 1, {}});
    pool.close();
    expect_failure([&] { (void)f.get(); }, {Expect::task_error, Stage::serialize_input}, 0,
                   "ErrorAtPickle");
    pool.join();
  }
  EXPECT_TRUE(test_helpers::children().empty());
}

// CPython test_shutdown.py / loky test_hang_issue12364: fifty short tasks,
// then close() and join(); every result is there.
TEST(PeersShutdown, FiftyTasksThenCloseAndJoinDeliverEveryResult) {
  procpool::Pool pool({.processes = 2});
  std::vector<procpool::Future<int>> fs;
  for (int i = 0; i < 50; ++i)
    fs.push_back(pool.submit(
        [](int x) {
          std::this_thread::sleep_for(2ms);
          return x;
        },
        i));
  pool.close();
  pool.join();
  for (int i = 0; i < 50; ++i)
    EXPECT_EQ(fs[static_cast<std::size_t>(i)].get(), i);
}

int wait_and_return(int x) {
  ++shared().started;
  wait_for_gate();
  return x;
}

// loky _test_process_executor.py test_shutdown_no_wait: tasks still waiting
// when the pool is closed; a submit after close() is refused, and the
// waiting tasks finish once let go.
TEST(PeersShutdown, TasksWaitingAtCloseFinishAndNewWorkIsRefused) {
  reset_shared();
  procpool::Pool pool({.processes = 2});
  std::vector<procpool::Future<int>> res;
  for (int x = -5; x < 5; ++x)
    res.push_back(pool.submit(wait_and_return, x));
  pool.close();
  EXPECT_THROW((void)pool.submit(identity, 42), procpool::PoolClosed);
  EXPECT_EQ(res[9].wait_for(0ms), std::future_status::timeout);
  shared().gate = true;
  pool.join();
  for (int x = -5; x < 5; ++x)
    EXPECT_EQ(res[static_cast<std::size_t>(x + 5)].get(), x);
}

// CPython test_process_pool.py test_max_tasks_per_child: one worker, three
// tasks per child: the fourth task runs in a new process.
TEST(PeersMaxTasksPerChild, TheFourthTaskRunsInANewWorker) {
  procpool::Pool pool({.processes = 1, .max_tasks_per_child = 3});
  auto getpid_task = [](int) { return static_cast<int>(::getpid()); };
  const int original = pool.submit(getpid_task, 0).get();
  EXPECT_EQ(pool.submit(getpid_task, 0).get(), original);
  EXPECT_EQ(pool.submit(getpid_task, 0).get(), original);
  const int renewed = pool.submit(getpid_task, 0).get();
  EXPECT_NE(renewed, original);
  EXPECT_EQ(pool.worker_pids().size(), 1u);
}

// CPython test_max_tasks_per_child_pending_tasks_gh115634: a backlog of
// submits while workers reach their quota must not deadlock.
TEST(PeersMaxTasksPerChild, ABacklogWhileWorkersReachTheirQuotaAllRuns) {
  struct Case {
    unsigned workers;
    std::size_t max_tasks;
    int tasks;
  };
  for (Case c : {Case{1, 2, 6}, Case{2, 2, 8}}) {
    procpool::Pool pool({.processes = c.workers, .max_tasks_per_child = c.max_tasks});
    std::vector<procpool::Future<int>> fs;
    for (int i = 0; i < c.tasks; ++i)
      fs.push_back(pool.submit(mul, i, 2));
    for (int i = 0; i < c.tasks; ++i) {
      ASSERT_EQ(fs[static_cast<std::size_t>(i)].wait_for(5s), std::future_status::ready) << i;
      EXPECT_EQ(fs[static_cast<std::size_t>(i)].get(), i * 2);
    }
  }
}

// CPython test_max_tasks_early_shutdown and _TestPoolWorkerLifetime::
// test_pool_worker_lifetime_early_close (issue #10332): workers of one task
// each, closed and joined with work still queued.
TEST(PeersMaxTasksPerChild, EarlyCloseWithOneTaskPerChildRunsEveryTask) {
  procpool::Pool pool({.processes = 3, .max_tasks_per_child = 1, .warn_oversubscription = false});
  std::vector<procpool::Future<int>> fs;
  for (int i = 0; i < 6; ++i)
    fs.push_back(pool.submit(
        [](int x) {
          std::this_thread::sleep_for(30ms);
          return x * x;
        },
        i));
  pool.close();
  pool.join();
  for (int i = 0; i < 6; ++i)
    EXPECT_EQ(fs[static_cast<std::size_t>(i)].get(), i * i);
}

// CPython test_shutdown_no_wait_max_tasks_gh119592 (drop_reference=False): a
// worker that leaves at its quota after close() is replaced and the queued
// work runs.
TEST(PeersMaxTasksPerChild, AWorkerLeavingAtItsQuotaAfterCloseIsReplaced) {
  reset_shared();
  procpool::Pool pool({.processes = 1, .max_tasks_per_child = 1});
  std::vector<procpool::Future<int>> futs;
  for (int i = 0; i < 3; ++i)
    futs.push_back(pool.submit(wait_and_return, i));
  ASSERT_TRUE(wait_started(1));
  pool.close();
  shared().gate = true;
  for (int i = 0; i < 3; ++i) {
    ASSERT_EQ(futs[static_cast<std::size_t>(i)].wait_for(5s), std::future_status::ready) << i;
    EXPECT_EQ(futs[static_cast<std::size_t>(i)].get(), i);
  }
  pool.join();
}

// CPython test_gc_during_max_tasks_worker_exit_gh152967 and gh119592 with
// drop_reference=True: the pool is destroyed while its only worker is inside
// the first of three tasks and will leave at its quota. procpool's destructor
// finishes accepted work, so all three results arrive.
TEST(PeersMaxTasksPerChild, APoolDestroyedWhileItsWorkerLeavesAtItsQuotaFinishesTheWork) {
  reset_shared();
  std::vector<procpool::Future<int>> futs;
  std::thread opener([] {
    if (wait_started(1)) std::this_thread::sleep_for(50ms);
    shared().gate = true;
  });
  {
    procpool::Pool pool({.processes = 1, .max_tasks_per_child = 1});
    for (int i = 0; i < 3; ++i)
      futs.push_back(pool.submit(wait_and_return, i));
  }
  opener.join();
  for (int i = 0; i < 3; ++i)
    EXPECT_EQ(futs[static_cast<std::size_t>(i)].get(), i);
  EXPECT_TRUE(test_helpers::children().empty());
}

int good_task(int n) {
  std::this_thread::sleep_for(std::chrono::milliseconds(10 * n));
  return n;
}
int failing_task(int) {
  throw std::invalid_argument("failing task");
}

// CPython test_shutdown.py test_shutdown_gh_132969 (cases 1 and 2): one task
// per child, a task that throws, and the pool closed while a later task may
// still run.
TEST(PeersMaxTasksPerChild, AFailedTaskWithOneTaskPerChildThenCloseDoesNotHang) {
  for (unsigned workers : {2u, 4u}) {
    SCOPED_TRACE(workers);
    const auto start = std::chrono::steady_clock::now();
    {
      procpool::Pool pool(
          {.processes = workers, .max_tasks_per_child = 1, .warn_oversubscription = false});
      auto f1 = pool.submit(good_task, 1);
      auto f2 = pool.submit(failing_task, 2);
      auto f3 = pool.submit(good_task, 3);
      int result = 0;
      try {
        result += f1.get();
        result += f2.get();
        result += f3.get();
      } catch (const procpool::TaskError& e) {
        EXPECT_EQ(e.remote_what(), "failing task");
      }
      EXPECT_EQ(result, 1);
      pool.close();
    }
    EXPECT_LT(std::chrono::steady_clock::now() - start, 5s);
    EXPECT_TRUE(test_helpers::children().empty());
  }
}

int wait_and_crash(int) {
  wait_for_gate();
  segfault();
  return 0;
}

// loky test_processes_crash_handling_after_executor_gc: a pool dropped while
// five short tasks and one that will crash are pending. The short results
// arrive, the crash is reported, no worker is left.
TEST(PeersShutdown, APoolDestroyedWithACrashStillPendingReportsIt) {
  reset_shared();
  std::vector<procpool::Future<int>> results;
  procpool::Future<int> crash;
  std::thread opener([] {
    std::this_thread::sleep_for(50ms);
    shared().gate = true;
  });
  {
    procpool::Pool pool({.processes = 2});
    for (int i = 0; i < 5; ++i)
      results.push_back(pool.submit(good_task, i));
    crash = pool.submit(wait_and_crash, 0);
  }
  opener.join();
  for (int i = 0; i < 5; ++i)
    EXPECT_EQ(results[static_cast<std::size_t>(i)].get(), i);
  expect_failure([&] { (void)crash.get(); }, {Expect::crashed, {}, SIGSEGV}, 0, "crash");
  EXPECT_TRUE(test_helpers::children().empty());
}

int block_until_gate(int x) {
  ++shared().started;
  wait_for_gate();
  ++shared().finished;
  return x;
}

// CPython test_process_pool.py test_saturation and test_shutdown.py
// test_processes_terminate: 15 x workers tasks blocked at once do not start
// more processes than asked; released, they all finish.
TEST(PeersSaturation, ManyBlockedTasksUseOnlyThePoolsWorkersAndAllFinish) {
  reset_shared();
  procpool::Pool pool({.processes = 2});
  std::vector<procpool::Future<int>> fs;
  for (int i = 0; i < 30; ++i)
    fs.push_back(pool.submit(block_until_gate, i));
  ASSERT_TRUE(wait_started(2));
  std::this_thread::sleep_for(20ms);
  EXPECT_EQ(shared().started.load(), 2) << "more tasks running than workers";
  EXPECT_EQ(pool.worker_pids().size(), 2u);
  EXPECT_EQ(test_helpers::children().size(), 2u);
  shared().gate = true;
  for (int i = 0; i < 30; ++i)
    EXPECT_EQ(fs[static_cast<std::size_t>(i)].get(), i);
  EXPECT_EQ(shared().finished.load(), 30);
}

// loky _test_process_executor.py test_killed_child_with_cancelled_work_items
// (CPython gh-107219) and CPython test_killed_child: a worker killed (SIGTERM)
// in the middle of a long queue. procpool charges the death to the task it
// was running; every other queued task still runs.
TEST(PeersKilledChild, AWorkerTerminatedUnderALongQueueCostsOnlyItsRunningTask) {
  reset_shared();
  procpool::Pool pool({.processes = 2});
  std::vector<procpool::Future<int>> fs;
  const int n = 2 * 2 + 50;
  for (int i = 0; i < n; ++i)
    fs.push_back(pool.submit(block_until_gate, i));
  ASSERT_TRUE(wait_started(2));
  const pid_t victim = pool.worker_pids()[0];
  ::kill(victim, SIGTERM);
  std::this_thread::sleep_for(50ms);
  shared().gate = true;
  int crashed = 0;
  for (int i = 0; i < n; ++i) {
    try {
      EXPECT_EQ(fs[static_cast<std::size_t>(i)].get(), i);
    } catch (const procpool::WorkerCrashed& e) {
      ++crashed;
      EXPECT_EQ(e.signal(), SIGTERM) << e.what();
      EXPECT_EQ(e.pid(), victim) << e.what();
      EXPECT_EQ(e.index(), 0u) << e.what();
    }
  }
  EXPECT_EQ(crashed, 1);
}

int sleep_100ms(int x) {
  std::this_thread::sleep_for(100ms);
  return x;
}

// CPython _TestPool.test_terminate: a long map running (here on another
// thread) when terminate() is called: it ends within 2 s, with PoolClosed.
TEST(PeersTerminate, TerminateDuringAMapOnAnotherThreadEndsItPromptly) {
  procpool::Pool pool({.processes = 2, .chunksize = 1});
  std::exception_ptr error;
  std::atomic<bool> returned{false};
  std::thread mapper([&] {
    try {
      std::vector<int> inputs(10000);
      (void)pool.map(sleep_100ms, inputs);
    } catch (...) {
      error = std::current_exception();
    }
    returned = true;
  });
  std::this_thread::sleep_for(200ms);
  const auto start = std::chrono::steady_clock::now();
  pool.terminate();
  while (!returned && std::chrono::steady_clock::now() - start < 5s)
    std::this_thread::sleep_for(1ms);
  const auto took = std::chrono::steady_clock::now() - start;
  ASSERT_TRUE(returned.load()) << "map still running 5 s after terminate()";
  mapper.join();
  EXPECT_LT(took, 2s);
  ASSERT_TRUE(error);
  EXPECT_THROW(std::rethrow_exception(error), procpool::PoolClosed);
  EXPECT_TRUE(test_helpers::children().empty());
}

// CPython test_process_pool.py test_force_shutdown_workers_dead_workers and
// test_force_shutdown_workers_stops_pool: terminate() after a worker died is
// fine, and the pool then refuses work.
TEST(PeersTerminate, TerminateAfterAWorkerDiedThenSubmitIsRefused) {
  procpool::Pool pool({.processes = 1});
  auto f = pool.submit(
      [](int) {
        ::_exit(1);
        return 0;
      },
      0);
  expect_failure([&] { (void)f.get(); }, {Expect::crashed, {}, 0, 1}, 0, "os._exit(1)");
  EXPECT_NO_THROW(pool.terminate());
  EXPECT_THROW((void)pool.submit(identity, 0), procpool::PoolClosed);
  EXPECT_NO_THROW(pool.join());
  EXPECT_TRUE(test_helpers::children().empty());
}

// CPython _TestPool.test_empty_iterable and test_map_chunksize ("map_async
// with chunksize stalled on null list").
TEST(PeersEmpty, EveryCallOnAnEmptyInputReturnsAtOnce) {
  procpool::Pool pool({.processes = 1, .chunksize = 1});
  const std::vector<int> none;
  EXPECT_TRUE(pool.map(square, none).empty());
  int n = 0;
  for (int v : pool.imap(square, none))
    n += v + 1;
  for (auto [i, v] : pool.imap_unordered(square, none))
    n += v + static_cast<int>(i) + 1;
  EXPECT_EQ(n, 0);
  EXPECT_TRUE(pool.map_outcomes(square, none).empty());
  EXPECT_TRUE(pool.map(square, std::views::iota(0, 0)).empty());
  EXPECT_TRUE(pool.starmap(mul, std::vector<std::pair<int, int>>{}).empty());
  EXPECT_TRUE(procpool::map(square, none, {.processes = 2, .chunksize = 1}).empty());
  EXPECT_EQ(pool.map(square, std::vector<int>{3}), std::vector<int>{9});
}

// CPython test_process_pool.py / loky test_map_chunksize: chunks of 6, 50
// (more than the inputs) and 40 (exactly the inputs).
TEST(PeersChunksize, ChunksLargerThanOrEqualToTheInputKeepOrder) {
  std::vector<std::pair<int, int>> args;
  std::vector<int> ref;
  for (int i = 0; i < 40; ++i) {
    args.emplace_back(i, i % 7);
    ref.push_back(i * (i % 7));
  }
  for (std::size_t chunk : {6u, 50u, 40u}) {
    procpool::Pool pool({.processes = 2, .chunksize = chunk});
    EXPECT_EQ(pool.starmap(mul, args), ref) << chunk;
    EXPECT_EQ(procpool::starmap(mul, args, {.processes = 2, .chunksize = chunk}), ref) << chunk;
  }
}

/// CPython CountedObject: how many exist in this process.
int counted_alive = 0;
struct Counted {
  int value = 0;
  std::string unsent;
  Counted() { ++counted_alive; }
  explicit Counted(int v) : value(v) { ++counted_alive; }
  Counted(const Counted& o) : value(o.value), unsent(o.unsent) { ++counted_alive; }
  Counted(Counted&& o) noexcept : value(o.value), unsent(std::move(o.unsent)) { ++counted_alive; }
  Counted& operator=(const Counted&) = default;
  Counted& operator=(Counted&&) = default;
  ~Counted() { --counted_alive; }
  template <class Archive>
  void serialize(Archive& ar) {
    ar(value);
  }
};

// CPython _TestPool.test_release_task_refs: once a call returns, the pool
// holds no copy of its inputs or results.
TEST(PeersReleaseRefs, APoolKeepsNoCopyOfInputsOrResultsAfterACall) {
  counted_alive = 0;
  procpool::Pool pool({.processes = 2, .chunksize = 3});
  {
    std::vector<Counted> objs;
    for (int i = 0; i < 10; ++i)
      objs.emplace_back(i);
    ASSERT_EQ(counted_alive, 10);
    {
      auto out = pool.map([](const Counted& c) { return Counted(c.value * 2); }, objs);
      EXPECT_EQ(out.size(), 10u);
      EXPECT_EQ(counted_alive, 20);
    }
    auto f = pool.submit([](const Counted& c) { return c.value; }, objs[3]);
    EXPECT_EQ(f.get(), 3);
    EXPECT_EQ(counted_alive, 10);
  }
  EXPECT_EQ(counted_alive, 0);
}

// loky TestGetReusableExecutor::test_reusable_executor_thread_safety with
// "broken_start": a pool whose worker crashed while encoding a result is then
// used by ten threads at once.
TEST(PeersThreads, TenThreadsShareAPoolRightAfterACrash) {
  procpool::Pool pool({.processes = 2});
  expect_failure([&] { (void)pool.submit(make_bad, static_cast<int>(Fault::save_crashes)).get(); },
                 {Expect::crashed, {}, SIGSEGV}, 0, "CrashAtPickle");
  std::vector<int> inputs(10);
  std::iota(inputs.begin(), inputs.end(), 0);
  std::vector<int> expected;
  for (int x : inputs)
    expected.push_back(x * x);
  std::atomic<int> ok{0};
  std::vector<std::thread> threads;
  for (int t = 0; t < 10; ++t) {
    threads.emplace_back([&] {
      bool all = true;
      for (int step = 0; step < 5; ++step)
        all = all && pool.map(square, inputs) == expected;
      if (all) ++ok;
    });
  }
  for (auto& t : threads)
    t.join();
  EXPECT_EQ(ok.load(), 10);
}

// loky test_in_callback_submit_with_crash and test_callback_crash_on_submit:
// procpool's only callback is the error handler (called on the pool's
// service thread). A handler that submits work from there (here: a task
// whose worker crashes), and a handler that throws, leave the pool working.
TEST(PeersCallback, AnErrorHandlerThatSubmitsOrThrowsLeavesThePoolWorking) {
  procpool::Pool pool({.processes = 2});
  std::mutex m;
  std::condition_variable cv;
  std::optional<procpool::Future<int>> from_handler;
  int calls = 0;
  pool.set_error_handler([&](std::exception_ptr) {
    std::lock_guard lock(m);
    if (++calls == 1) {
      from_handler = pool.submit(
          [](int) {
            segfault();
            return 0;
          },
          0);
    }
    cv.notify_all();
  });
  (void)pool.submit(failing_task, 0);  // dropped: its error goes to the handler
  {
    std::unique_lock lock(m);
    ASSERT_TRUE(cv.wait_for(lock, 5s, [&] { return from_handler.has_value(); }));
  }
  expect_failure([&] { (void)from_handler->get(); }, {Expect::crashed, {}, SIGSEGV}, 0,
                 "submitted from the handler");
  EXPECT_EQ(pool.submit(identity, 42).get(), 42);

  pool.set_error_handler([](std::exception_ptr) { throw std::runtime_error("handler fails"); });
  (void)pool.submit(failing_task, 0);
  std::this_thread::sleep_for(50ms);
  EXPECT_EQ(pool.submit(identity, 42).get(), 42);
  std::vector<int> inputs(20);
  std::iota(inputs.begin(), inputs.end(), 0);
  EXPECT_EQ(pool.map(identity, inputs), inputs);
}

int nested_fork_per_call(int x) {
  std::vector<int> inner{0, 1, 2, 3};
  auto squares = procpool::map(square, inner, {.processes = 2});
  return x + std::accumulate(squares.begin(), squares.end(), 0);
}

int nested_pool(int x) {
  procpool::Pool inner({.processes = 2});
  std::vector<int> v{0, 1, 2, 3};
  auto squares = inner.map(square, v);
  return x + std::accumulate(squares.begin(), squares.end(), 0);
}

// loky test_no_deadlock_on_nested_reusable_exector (#363): a task that runs
// its own parallel call, fork per call and Pool, in both kinds of worker.
TEST(PeersNested, ATaskMayRunItsOwnParallelCall) {
  SKIP_NESTED_POOLS_UNDER_TSAN();
  const std::vector<int> outer{0, 100};
  const std::vector<int> expected{14, 114};
  EXPECT_EQ(procpool::map(nested_fork_per_call, outer, {.processes = 2}), expected);
  EXPECT_EQ(procpool::map(nested_pool, outer, {.processes = 2}), expected);
  procpool::Pool pool({.processes = 2, .task_timeout = 10s});
  EXPECT_EQ(pool.map(nested_fork_per_call, outer), expected);
  EXPECT_EQ(pool.map(nested_pool, outer), expected);
  EXPECT_EQ(test_helpers::children().size(), 2u) << "only the pool's own workers are left";
}

// The same from a worker of a pool with many workers, whose sockets the
// worker closes as it starts: a Pool it makes gets descriptors of the same
// numbers. Its workers closed their own sockets with them as they started
// (exited 0, WorkerCrashed), until a child forgot its parent's list.
TEST(PeersNested, AnInnerPoolInAWorkerOfAWidePoolGetsItsOwnSockets) {
  SKIP_NESTED_POOLS_UNDER_TSAN();
  procpool::Pool wide({.processes = 6, .task_timeout = 10s});
  std::vector<int> outer(12);
  std::iota(outer.begin(), outer.end(), 0);
  std::vector<int> expected;
  for (int x : outer)
    expected.push_back(x + 14);
  EXPECT_EQ(wide.map(nested_pool, outer), expected);
  EXPECT_EQ(wide.map(nested_fork_per_call, outer), expected);
}

int nested_raise(int) {
  std::vector<int> inner{0, 1, 2};
  (void)procpool::map([](int) -> int { throw std::invalid_argument("inner"); }, inner,
                      {.processes = 2});
  return 0;
}

// loky test_error_in_nested_call_keeps_resource_tracker_silent: the inner
// call's error reaches the outer caller, naming itself.
TEST(PeersNested, AnInnerCallsErrorReachesTheOuterCaller) {
  SKIP_NESTED_POOLS_UNDER_TSAN();
  procpool::Pool pool({.processes = 2});
  try {
    (void)pool.map(nested_raise, std::vector<int>{0});
    FAIL() << "no exception";
  } catch (const procpool::TaskError& e) {
    EXPECT_EQ(e.type_name(), "procpool::TaskError") << e.what();
    EXPECT_NE(e.remote_what().find("std::invalid_argument: inner"), std::string::npos) << e.what();
  }
}

int nested_pool_with_a_crash(int x) {
  procpool::Pool inner({.processes = 1});
  // Dropped: the inner pool's service thread sees the crash and starts the
  // replacement worker.
  (void)inner.submit(
      [](int) {
        segfault();
        return 0;
      },
      0);
  std::this_thread::sleep_for(300ms);
  std::vector<int> v{0, 1, 2, 3};
  auto squares = inner.map(square, v);
  return x + std::accumulate(squares.begin(), squares.end(), 0);
}

// loky test_no_deadlock_on_nested_reusable_exector, in a worker of a Pool
// made by a thread that is not the main thread (as loky's executors are):
// the inner pool must replace a crashed worker.
//
// This hung until the outer task_timeout (TaskTimeout after 5 s), a bug
// this translation found: the inner pool's service thread forked the
// replacement through the process's forker thread (src/worker_process.cpp),
// an object the outer worker had inherited from the test process without its
// thread, and with its mutex held (the outer worker was forked by that
// thread, under it). Now a process starts a forker of its own.
TEST(PeersNested, AnInnerPoolReplacesACrashedWorkerInAPoolMadeOffTheMainThread) {
  SKIP_NESTED_POOLS_UNDER_TSAN();
  std::vector<int> got;
  std::exception_ptr error;
  std::thread maker([&] {
    try {
      procpool::Pool pool({.processes = 1, .task_timeout = 5s});
      got = pool.map(nested_pool_with_a_crash, std::vector<int>{100});
    } catch (...) {
      error = std::current_exception();
    }
  });
  maker.join();
  if (error) {
    try {
      std::rethrow_exception(error);
    } catch (const std::exception& e) {
      FAIL() << e.what();
    }
  }
  EXPECT_EQ(got, std::vector<int>{114});
}

// The same hazard from a fork-per-call worker: once any Pool of the process
// has forked a worker from a thread other than the main one (here: a pool
// made and destroyed on a std::thread), the ForkerThread singleton exists;
// a procpool::map worker inherits it without its thread, and a Pool made in
// the task cannot replace a crashed worker from its service thread.
//
// This hung too (the forker inherited without its thread, waited for in vain).
TEST(PeersNested, AnInnerPoolInAForkPerCallWorkerReplacesACrashedWorker) {
  SKIP_NESTED_POOLS_UNDER_TSAN();
  std::thread([] { procpool::Pool made_off_main({.processes = 1}); }).join();
  EXPECT_EQ(procpool::map(nested_pool_with_a_crash, std::vector<int>{100},
                          {.processes = 1, .task_timeout = 5s}),
            std::vector<int>{114});
}

int crash_with_data(const std::string& data) {
  if (!data.empty()) segfault();
  return 0;
}

// CPython test_deadlock.py test_crash_big_data (gh-94777): workers that crash
// while large inputs (more than a pipe holds: 1 MiB each) are being written
// to them.
TEST(PeersCrashBigData, WorkersCrashingWhileLargeInputsAreOnTheirWayFailTheCallCleanly) {
  const std::vector<std::string> data(6, std::string(1u << 20, 'a'));
  procpool::Pool pool({.processes = 2});
  const auto start = std::chrono::steady_clock::now();
  EXPECT_THROW((void)pool.map(crash_with_data, data), procpool::WorkerCrashed);
  auto outcomes = pool.map_outcomes(crash_with_data, data);
  ASSERT_EQ(outcomes.size(), 6u);
  for (std::size_t i = 0; i < outcomes.size(); ++i) {
    ASSERT_FALSE(outcomes[i].ok()) << i;
    expect_failure([&] { std::rethrow_exception(outcomes[i].error); },
                   {Expect::crashed, {}, SIGSEGV}, i, "outcome");
  }
  std::list<std::string> listed(data.begin(), data.end());
  EXPECT_THROW((void)procpool::map(crash_with_data, listed, {.processes = 2}),
               procpool::WorkerCrashed);
  EXPECT_LT(std::chrono::steady_clock::now() - start, 10s);
  EXPECT_EQ(pool.map(crash_with_data, std::vector<std::string>(3)), std::vector<int>(3, 0));
}

}  // namespace
