// Start::fork_server: the pool's initializer runs once, in a server process,
// and every worker is forked from it (loky's and Python's forkserver).
#include <gtest/gtest.h>
#include <pthread.h>
#include <sys/mman.h>
#include <sys/wait.h>
#include <unistd.h>
#include <procpool/procpool.hpp>

#include <atomic>
#include <chrono>
#include <csignal>
#include <cstdio>
#include <cstring>
#include <memory>
#include <mutex>
#include <new>
#include <numeric>
#include <ranges>
#include <set>
#include <string>
#include <thread>
#include <tuple>
#include <vector>

#include "helpers.hpp"

namespace {

using procpool::Start;
using namespace test_helpers;

/// What an initializer built, and where.
struct Model {
  pid_t built_in = 0;
  int uses = 0;
  std::vector<char> table;  // big read-only data
};

Model small_model() {
  return Model{::getpid(), 0, {}};
}

constexpr std::size_t big_table_bytes = std::size_t{96} << 20;

Model big_model() {
  Model m{::getpid(), 0, std::vector<char>(big_table_bytes)};
  for (std::size_t i = 0; i < m.table.size(); i += 4096)
    m.table[i] = static_cast<char>(i >> 12);  // every page written
  return m;
}

/// (where the state was built, this worker, its parent)
std::tuple<pid_t, pid_t, pid_t> where(Model& m, const int&) {
  return {m.built_in, ::getpid(), ::getppid()};
}

/// Reads the whole table, then says how much of this worker's memory is its own.
long private_kib_after_reading(Model& m, const int&) {
  std::size_t sum = 0;
  for (std::size_t i = 0; i < m.table.size(); i += 4096)
    sum += static_cast<unsigned char>(m.table[i]);
  return sum != 0 ? private_kib() : -1;  // (never 0: page 1 holds 1)
}

int count_use(Model& m, const int&) {
  return ++m.uses;
}

std::set<pid_t> values_of(const std::vector<std::tuple<pid_t, pid_t, pid_t>>& rows, int column) {
  std::set<pid_t> seen;
  for (const auto& row : rows)
    seen.insert(column == 0 ? std::get<0>(row) : column == 1 ? std::get<1>(row) : std::get<2>(row));
  return seen;
}

TEST(ForkServer, TheInitializerRunsOnceAndEveryWorkerIsForkedWithItsState) {
  std::vector<std::tuple<pid_t, pid_t, pid_t>> rows;
  pid_t server = 0;
  {
    procpool::Pool pool(
        {.processes = 2, .chunksize = 1, .start = Start::fork_server, .max_tasks_per_child = 1},
        &small_model);
    rows = pool.map(&where, std::vector<int>(8, 0));
    server = std::get<0>(rows.front());
    EXPECT_TRUE(process_alive(server));
  }
  // One state, built outside the caller, for eight workers (one per task),
  // each a child of the caller: it waits for them and reads their status.
  EXPECT_EQ(values_of(rows, 0).size(), 1u);
  EXPECT_NE(server, ::getpid());
  EXPECT_EQ(values_of(rows, 1).size(), 8u);
  EXPECT_EQ(values_of(rows, 2), std::set<pid_t>{::getpid()});
  EXPECT_FALSE(values_of(rows, 1).contains(server));
  // The pool's end ends the server and leaves no process behind.
  EXPECT_FALSE(process_alive(server));
  EXPECT_TRUE(children().empty());
}

TEST(ForkServer, TheStateIsHeldOnceNotOncePerWorker) {
  // The same initializer under Start::fork: each worker builds and holds its
  // own table, all of it private. From the fork server it is the server's
  // pages, shared by every worker.
  procpool::Pool forked({.processes = 2, .chunksize = 1}, &big_model);
  const std::vector<long> own = forked.map(&private_kib_after_reading, std::vector<int>(2, 0));
  procpool::Pool served({.processes = 2, .chunksize = 1, .start = Start::fork_server}, &big_model);
  const std::vector<long> shared = served.map(&private_kib_after_reading, std::vector<int>(2, 0));
  const long table_kib = static_cast<long>(big_table_bytes >> 10);
  for (long kib : own)
    EXPECT_GT(kib, table_kib);
  for (long kib : shared)
    EXPECT_LT(kib, std::min(own[0], own[1]) - table_kib * 3 / 4) << "fork: " << own[0];
}

TEST(ForkServer, AWorkersWritesToItsStateStayItsOwn) {
  procpool::Pool pool(
      {.processes = 1, .chunksize = 1, .start = Start::fork_server, .max_tasks_per_child = 3},
      &small_model);
  // Each worker starts from the state as the initializer left it.
  EXPECT_EQ(pool.map(&count_use, std::vector<int>(7, 0)), (std::vector<int>{1, 2, 3, 1, 2, 3, 1}));
}

int crash_on_three(Model&, const int& x);
pid_t server_of(Model& m, const int&);

int scaled(Model& m, const int& x, const int& factor) {
  return x * factor + m.uses;
}

int add(int a, int b) {
  return a + b;
}

TEST(ForkServer, EveryCallOfAPoolGivesWhatItGivesWithFork) {
  // CPython runs its whole Pool suite again under forkserver; the calls here.
  procpool::Pool forked({.processes = 2, .chunksize = 2}, &small_model);
  procpool::Pool served({.processes = 2, .chunksize = 2, .start = Start::fork_server},
                        &small_model);
  std::vector<int> xs(50);
  std::iota(xs.begin(), xs.end(), 0);
  EXPECT_EQ(served.map(&scaled, xs, 3), forked.map(&scaled, xs, 3));
  std::vector<int> lazy;
  for (int v : served.imap([](int x) { return x * 2; }, std::views::iota(0) | std::views::take(40)))
    lazy.push_back(v);
  ASSERT_EQ(lazy.size(), 40u);
  EXPECT_EQ(lazy.back(), 78);
  std::set<std::size_t> indices;
  for (auto [index, value] : served.imap_unordered([](int x) { return x + 1; }, xs)) {
    EXPECT_EQ(value, static_cast<int>(index) + 1);
    indices.insert(index);
  }
  EXPECT_EQ(indices.size(), xs.size());
  const std::vector<std::pair<int, int>> pairs{{1, 1}, {2, 2}};
  EXPECT_EQ(served.starmap(add, pairs), (std::vector<int>{2, 4}));
  EXPECT_EQ(served.submit(add, 2, 3).get(), 5);
  const auto outcomes = served.map_outcomes(&crash_on_three, std::vector<int>{2, 3, 4});
  EXPECT_TRUE(outcomes[0].ok() && outcomes[2].ok() && !outcomes[1].ok());
}

// ---- a lock another thread of the caller holds while workers start

std::mutex caller_lock;  // constant-initialised

bool lock_is_free(const int&) {
  if (!caller_lock.try_lock()) return false;
  caller_lock.unlock();
  return true;
}

bool lock_is_free_in_state(Model&, const int& x) {
  return lock_is_free(x);
}

TEST(ForkServer, WorkersStartedWhileTheCallersThreadHoldsALockDoNotInheritItHeld) {
  procpool::Pool forked({.processes = 1, .chunksize = 1, .max_tasks_per_child = 1}, &small_model);
  procpool::Pool served(
      {.processes = 1, .chunksize = 1, .start = Start::fork_server, .max_tasks_per_child = 1},
      &small_model);
  std::atomic<bool> held{false}, release{false};
  std::thread holder([&] {
    std::lock_guard lock(caller_lock);
    held = true;
    while (!release)
      std::this_thread::sleep_for(std::chrono::milliseconds(1));
  });
  while (!held)
    std::this_thread::sleep_for(std::chrono::milliseconds(1));
  // Each task runs in a worker started while the lock was held (recycling).
  const std::vector<bool> fork_free = forked.map(&lock_is_free_in_state, std::vector<int>(3, 0));
  const std::vector<bool> served_free = served.map(&lock_is_free_in_state, std::vector<int>(3, 0));
  release = true;
  holder.join();
  // The first task of each ran in a worker forked before the lock was taken.
  EXPECT_EQ(fork_free, (std::vector<bool>{true, false, false}));
  EXPECT_EQ(served_free, (std::vector<bool>{true, true, true}));
}

// ---- failures are a worker's, as with Start::fork

int crash_on_three(Model&, const int& x) {
  if (x == 3) {
    std::signal(SIGSEGV, SIG_DFL);  // a sanitizer's handler would exit(1) instead
    std::raise(SIGSEGV);
  }
  if (x == 5) ::pause();
  return x * 10;
}

TEST(ForkServer, CrashesAndTimeoutsCostOneTaskAndTheWorkerIsReplacedFromTheServer) {
  procpool::Pool pool({.processes = 2,
                       .chunksize = 1,
                       .start = Start::fork_server,
                       .task_timeout = std::chrono::milliseconds(500)},
                      &small_model);
  const pid_t server = pool.map(&server_of, std::vector<int>{0}).front();
  const auto outcomes = pool.map_outcomes(&crash_on_three, std::vector<int>{0, 1, 2, 3, 4, 5, 6});
  ASSERT_EQ(outcomes.size(), 7u);
  for (int i : {0, 1, 2, 4, 6}) {
    ASSERT_TRUE(outcomes[static_cast<std::size_t>(i)].ok()) << i;
    EXPECT_EQ(*outcomes[static_cast<std::size_t>(i)].value, i * 10);
  }
  try {
    std::rethrow_exception(outcomes[3].error);
  } catch (const procpool::WorkerCrashed& e) {
    EXPECT_EQ(e.index(), 3u);
    EXPECT_EQ(e.signal(), SIGSEGV);
  }
  EXPECT_THROW(std::rethrow_exception(outcomes[5].error), procpool::TaskTimeout);
  // Replaced, from the same server: every worker now has its state.
  EXPECT_EQ(pool.map(&server_of, std::vector<int>(4, 0)), std::vector<pid_t>(4, server));
}

// ---- the server itself

pid_t server_of(Model& m, const int&) {
  return m.built_in;
}

TEST(ForkServer, AServerKilledFromOutsideIsStartedAgainWhenAWorkerIsNeeded) {
  procpool::Pool pool(
      {.processes = 1, .chunksize = 1, .start = Start::fork_server, .max_tasks_per_child = 1},
      &small_model);
  const pid_t first = pool.map(&server_of, std::vector<int>{0}).front();
  ASSERT_EQ(::kill(first, SIGKILL), 0);
  // The worker running now came from the old server; the next is forked by a new one.
  const std::vector<pid_t> after = pool.map(&server_of, std::vector<int>(3, 0));
  EXPECT_NE(after.back(), first);
  EXPECT_TRUE(process_alive(after.back()));
}

Model throwing_model() {
  throw std::runtime_error("no such vocabulary file");
}

TEST(ForkServer, AnInitializerThatThrowsFailsEveryTaskWithItsMessage) {
  procpool::Pool pool({.processes = 2, .start = Start::fork_server}, &throwing_model);
  const auto outcomes = pool.map_outcomes(&count_use, std::vector<int>(3, 0));
  for (const auto& outcome : outcomes) {
    ASSERT_FALSE(outcome.ok());
    try {
      std::rethrow_exception(outcome.error);
    } catch (const procpool::TaskError& e) {
      EXPECT_EQ(e.type_name(), "procpool::InitializerFailed");
      EXPECT_NE(std::string(e.what()).find("no such vocabulary file"), std::string::npos);
      EXPECT_NE(std::string(e.what()).find("in the pool's fork server (pid "), std::string::npos)
          << e.what();
    }
  }
}

Model exiting_model() {
  std::fprintf(stderr, "the model file is missing\n");
  std::exit(3);
}

TEST(ForkServer, AnInitializerThatEndsTheServerIsTheConstructorsError) {
  try {
    procpool::Pool pool({.processes = 2, .start = Start::fork_server}, &exiting_model);
    FAIL() << "the pool started";
  } catch (const procpool::Error& e) {
    const std::string what = e.what();
    EXPECT_NE(what.find("fork server"), std::string::npos) << what;
    EXPECT_NE(what.find("exited with status 3"), std::string::npos) << what;
    EXPECT_NE(what.find("initializer"), std::string::npos) << what;
  }
  EXPECT_TRUE(children().empty());
}

Model threading_model() {
  std::thread([] { ::pause(); }).detach();  // a runtime's pool thread, say
  return small_model();
}

TEST(ForkServer, AnInitializerThatLeavesThreadsRunningIsRefusedNotForkedFrom) {
  try {
    procpool::Pool pool({.processes = 2, .start = Start::fork_server}, &threading_model);
    FAIL() << "the pool started";
  } catch (const procpool::Error& e) {
    EXPECT_NE(std::string(e.what()).find("left threads running"), std::string::npos) << e.what();
  }
  EXPECT_TRUE(children().empty());
}

// ---- what other children of the caller hold

TEST(ForkServer, APoolStartedLaterDoesNotKeepTheServerFromEnding) {
  auto served = std::make_unique<procpool::Pool>(
      procpool::Options{.processes = 1, .start = Start::fork_server}, &small_model);
  procpool::Pool forked({.processes = 1}, &small_model);  // its worker forked after the server
  const pid_t server = served->map(&server_of, std::vector<int>{0}).front();
  (void)forked.map(&count_use, std::vector<int>{0});
  const auto before = std::chrono::steady_clock::now();
  served.reset();
  // Ended when told, not killed after the pool's one-second wait: no other
  // child kept its socket open.
  EXPECT_LT(std::chrono::steady_clock::now() - before, std::chrono::milliseconds(800));
  EXPECT_FALSE(process_alive(server));
  ::usleep(50'000);
  EXPECT_EQ(forked.map(&count_use, std::vector<int>{0}).size(), 1u);
}

Model slow_model() {
  ::usleep(300'000);
  return small_model();
}

int crash_now(Model&, const int&) {
  std::signal(SIGSEGV, SIG_DFL);
  std::raise(SIGSEGV);
  return 0;
}

TEST(ForkServer, APoolMadeWhileTheInitializerRunsDoesNotHideAWorkersCrash) {
  // A child forked while the new worker's socket was still open here would
  // keep it open: the worker's crash would never be seen (a hang).
  std::unique_ptr<procpool::Pool> other;
  std::thread maker([&] {
    ::usleep(100'000);  // while the server's initializer runs
    other = std::make_unique<procpool::Pool>(procpool::Options{.processes = 1}, &small_model);
  });
  procpool::Pool served({.processes = 1, .start = Start::fork_server}, &slow_model);
  maker.join();
  const auto outcomes = served.map_outcomes(&crash_now, std::vector<int>{0});
  ASSERT_EQ(outcomes.size(), 1u);
  EXPECT_FALSE(outcomes[0].ok());
}

// ---- glibc's per-thread record in a worker cloned from the server

/// A process-shared recursive mutex, and whether a worker holds it.
struct SharedLock {
  pthread_mutex_t mutex;
  std::atomic<int> held;
};

SharedLock* shared_recursive_lock() {
  void* page = ::mmap(nullptr, sizeof(SharedLock), PROT_READ | PROT_WRITE,
                      MAP_SHARED | MAP_ANONYMOUS, -1, 0);
  auto* lock = new (page) SharedLock{};
  pthread_mutexattr_t attributes;
  pthread_mutexattr_init(&attributes);
  pthread_mutexattr_setpshared(&attributes, PTHREAD_PROCESS_SHARED);
  pthread_mutexattr_settype(&attributes, PTHREAD_MUTEX_RECURSIVE);
  pthread_mutex_init(&lock->mutex, &attributes);
  return lock;
}

SharedLock* recursive_lock = nullptr;  // set before the pool starts

int hold_or_try(Model&, const int& x) {
  if (x == 0) {
    pthread_mutex_lock(&recursive_lock->mutex);  // held until this worker ends
    recursive_lock->held = 1;
    return 0;
  }
  for (int waited = 0; recursive_lock->held == 0 && waited < 10'000; ++waited)
    ::usleep(1000);  // until the other worker holds it
  const int result = pthread_mutex_trylock(&recursive_lock->mutex);
  if (result == 0) pthread_mutex_unlock(&recursive_lock->mutex);
  return result;
}

TEST(ForkServer, AWorkerIsItsOwnThreadToARecursiveProcessSharedMutex) {
  // Each worker must know its own thread id (glibc's fork writes it; a bare
  // clone would leave the server's, and every worker would own the mutex).
  recursive_lock = shared_recursive_lock();
  procpool::Pool pool({.processes = 2, .chunksize = 1, .start = Start::fork_server}, &small_model);
  EXPECT_EQ(pool.map(&hold_or_try, std::vector<int>{0, 1}), (std::vector<int>{0, EBUSY}));
}

// ---- a server restarted whose initializer then fails

const std::string fail_marker =  // the test's own: a sanitizer build may run beside it
    "/tmp/procpool_fork_server_test_fail." + std::to_string(::getpid());

Model fails_once_marked() {
  if (::access(fail_marker.c_str(), F_OK) == 0) std::exit(3);
  return small_model();
}

TEST(ForkServer, AServerThatCannotBeStartedAgainFailsTheTasksInsteadOfHanging) {
  ::unlink(fail_marker.c_str());
  procpool::Pool pool(
      {.processes = 1, .chunksize = 1, .start = Start::fork_server, .max_tasks_per_child = 1},
      &fails_once_marked);
  const pid_t server = pool.map(&server_of, std::vector<int>{0}).front();
  std::fclose(std::fopen(fail_marker.c_str(), "w"));
  ASSERT_EQ(::kill(server, SIGKILL), 0);
  // The worker there now (forked by the old server) runs one task; its
  // replacement needs a new server, whose initializer exits.
  const auto outcomes = pool.map_outcomes(&count_use, std::vector<int>(3, 0));
  ::unlink(fail_marker.c_str());
  ASSERT_EQ(outcomes.size(), 3u);
  EXPECT_TRUE(outcomes[0].ok());
  for (std::size_t i = 1; i < 3; ++i) {
    ASSERT_FALSE(outcomes[i].ok());
    try {
      std::rethrow_exception(outcomes[i].error);
    } catch (const procpool::Error& e) {
      EXPECT_NE(std::string(e.what()).find("exited with status 3"), std::string::npos) << e.what();
    }
  }
  EXPECT_THROW((void)pool.map(&count_use, std::vector<int>{0}), procpool::Error);
}

Model printing_model() {
  std::printf("model loaded\n");  // buffered: stdout is a pipe here
  return small_model();
}

TEST(ForkServer, WhatTheInitializerPrintsIsPrintedOnce) {
  const std::string out = output_of(STDOUT_FILENO, [] {
    procpool::Pool pool(
        {.processes = 2, .chunksize = 1, .start = Start::fork_server, .max_tasks_per_child = 1},
        &printing_model);
    (void)pool.map(&count_use, std::vector<int>(4, 0));
  });
  EXPECT_EQ(out, "model loaded\n");
}

TEST(ForkServer, TheFunctionsThatForkPerCallWorkWithItToo) {
  const int offset = 7;  // captured: the server is forked at the call's start
  const std::vector<int> got = procpool::map(
      [&](int x) { return x + offset; }, std::vector<int>{1, 2, 3}, {.start = Start::fork_server});
  EXPECT_EQ(got, (std::vector<int>{8, 9, 10}));
}

}  // namespace
