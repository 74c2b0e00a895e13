// A hostile machine: workers killed from outside in a storm, workers that die
// as they start. Deaths cost the tasks that were running, never the run.
#include <gtest/gtest.h>
#include <procpool/procpool.hpp>

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/resource.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>
#include <atomic>
#include <chrono>
#include <csignal>
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include "helpers.hpp"

namespace {

std::vector<std::string> storm_inputs() {
  std::vector<std::string> in(20000);
  for (std::size_t i = 0; i < in.size(); ++i)
    in[i] = "item" + std::to_string(i);
  return in;
}

// Every 50th result is 200 KB, so some replies take the shared arena and
// take long enough to write that kills land in the middle of them.
std::string storm_task(const std::string& s) {
  const std::size_t n = std::stoul(s.substr(4));
  return n % 50 == 0 ? std::string(200000, static_cast<char>('a' + n % 26)) : s + "!";
}

/// Kills a random one of `pids()` with SIGKILL every 10 ms until destroyed.
template <class Pids>
class KillStorm {
 public:
  explicit KillStorm(Pids pids)
      : thread_([this, pids] {
          std::mt19937 random(12345);
          while (!stop_) {
            std::this_thread::sleep_for(std::chrono::milliseconds(10));
            const std::vector<pid_t> targets = pids();
            if (targets.empty()) continue;
            if (::kill(targets[random() % targets.size()], SIGKILL) == 0) ++kills_;
          }
        }) {}
  ~KillStorm() {
    stop_ = true;
    thread_.join();
  }
  int kills() const { return kills_; }

 private:
  std::atomic<bool> stop_{false};
  std::atomic<int> kills_{0};
  std::thread thread_;
};

void expect_storm_results(const std::vector<std::string>& in, const std::vector<std::string>& out) {
  ASSERT_EQ(out.size(), in.size());
  std::size_t wrong = 0;
  for (std::size_t i = 0; i < in.size(); ++i)
    wrong += out[i] == storm_task(in[i]) ? 0 : 1;
  EXPECT_EQ(wrong, 0u);
}

std::vector<pid_t> live_children() {
  std::vector<pid_t> pids;
  for (const auto& child : test_helpers::children()) {
    if (child.state != 'Z') pids.push_back(child.pid);
  }
  return pids;
}

TEST(KillStorm, ForkPerCallMapLosesNothing) {
  // The reproduction: a kill every 10 ms used to end the call within
  // seconds with "workers keep dying before they finish any task".
  const std::vector<std::string> in = storm_inputs();
  std::vector<std::string> out;
  int kills = 0;
  {
    KillStorm storm(&live_children);
    out = procpool::map(&storm_task, in, {.processes = 2, .retries = 50});
    kills = storm.kills();
  }
  expect_storm_results(in, out);
  EXPECT_GT(kills, 0) << "the storm never hit a worker: the test proves nothing";
}

TEST(KillStorm, PoolLosesNothing) {
  const std::vector<std::string> in = storm_inputs();
  procpool::Pool pool({.processes = 2, .retries = 50});
  std::vector<std::string> out;
  int kills = 0;
  {
    KillStorm storm([&pool] { return pool.worker_pids(); });
    out = pool.map(&storm_task, in);
    kills = storm.kills();
  }
  expect_storm_results(in, out);
  EXPECT_GT(kills, 0) << "the storm never hit a worker: the test proves nothing";
  // And the pool is still whole afterwards.
  EXPECT_EQ(pool.map([](int x) { return x + 1; }, std::vector<int>{1, 2, 3}),
            (std::vector<int>{2, 3, 4}));
}

int dies_while_starting() {
  std::_Exit(3);  // as an initializer that crashes would
}

struct StartUpFailure {
  std::string what;  // empty: the map did not fail
  std::chrono::steady_clock::duration took{};
};

/// A map on a Pool of two whose workers start with `init`, expected to fail.
StartUpFailure map_failing_at_start_up(int (*init)()) {
  procpool::Pool pool({.processes = 2}, init);
  const auto start = std::chrono::steady_clock::now();
  StartUpFailure failure;
  try {
    (void)pool.map([](int&, int x) { return x; }, std::vector<int>{1, 2, 3});
  } catch (const procpool::Error& e) {
    failure.what = e.what();
  }
  failure.took = std::chrono::steady_clock::now() - start;
  return failure;
}

TEST(StartUp, WorkersThatDieWhileStartingEndTheCallWithAClearError) {
  const StartUpFailure failure = map_failing_at_start_up(&dies_while_starting);
  const std::string& what = failure.what;
  ASSERT_FALSE(what.empty()) << "no error";
  EXPECT_NE(what.find("new workers in a row died while starting"), std::string::npos) << what;
  EXPECT_NE(what.find("exited with status 3"), std::string::npos) << what;
  EXPECT_NE(what.find("check the pool's initializer"), std::string::npos) << what;
  EXPECT_LT(failure.took, std::chrono::seconds(10));
}

// Counts starts across the workers (forked from the test, they share it).
std::atomic<int>* shared_start_count() {
  static auto* count = [] {
    void* at = ::mmap(nullptr, sizeof(std::atomic<int>), PROT_READ | PROT_WRITE,
                      MAP_SHARED | MAP_ANONYMOUS, -1, 0);
    return at == MAP_FAILED ? nullptr : new (at) std::atomic<int>(0);
  }();
  return count;
}

// What a storm does to new workers on a loaded machine, where starting is
// slow: kills them (SIGKILL, from outside) before they are ready, more than
// 2 x processes + 2 in a row, and then lets them be.
constexpr int killed_starts = 9;
int killed_while_starting_nine_times() {
  if (shared_start_count()->fetch_add(1) < killed_starts) ::raise(SIGKILL);
  return 0;
}

int always_killed_while_starting() {
  ::raise(SIGKILL);
  return 0;
}

TEST(StartUp, NewWorkersKilledInARowAreStartedAgainWhileTheKillsAreRecent) {
  ASSERT_NE(shared_start_count(), nullptr);
  shared_start_count()->store(0);
  procpool::Pool pool({.processes = 2}, &killed_while_starting_nine_times);
  EXPECT_EQ(pool.map([](int&, int x) { return x * 2; }, std::vector<int>{1, 2, 3}),
            (std::vector<int>{2, 4, 6}));
  EXPECT_GE(shared_start_count()->load(), killed_starts + 1);
}

TEST(StartUp, NewWorkersAlwaysKilledWhileStartingEndTheCallWithinSeconds) {
  const StartUpFailure failure = map_failing_at_start_up(&always_killed_while_starting);
  const std::string& what = failure.what;
  ASSERT_FALSE(what.empty()) << "no error";
  EXPECT_NE(what.find("new workers in a row died while starting, over 2."), std::string::npos)
      << what;
  EXPECT_NE(what.find("was killed by signal 9"), std::string::npos) << what;
  EXPECT_GE(failure.took, std::chrono::seconds(2));
  EXPECT_LT(failure.took, std::chrono::seconds(10));
}

struct ShellRun {
  int status = -1;
  std::string output;  // stdout and stderr
};

/// Runs a shell command line, collecting its output and exit status.
ShellRun run_shell(const std::string& command) {
  ShellRun run;
  FILE* pipe = ::popen(("( " + command + " ) 2>&1").c_str(), "r");
  if (!pipe) return run;
  char buffer[4096];
  while (std::fgets(buffer, sizeof buffer, pipe))
    run.output += buffer;
  const int status = ::pclose(pipe);
  run.status = WIFEXITED(status) ? WEXITSTATUS(status) : -1;
  return run;
}

TEST(Limits, EightWorkersRunUnderAnAddressSpaceLimitOfAGigabyte) {
  if (test_helpers::under_sanitizer)
    GTEST_SKIP() << "sanitizer runtimes reserve terabytes of address space";
  // Each worker's arenas would take 256 MiB of address space: 8 used to fail
  // under 4 GB with "cannot map a worker's arenas".
  const ShellRun run = run_shell(std::string("ulimit -v 1000000 && ") + LIMITS_HELPER);
  EXPECT_EQ(run.status, 0) << run.output;
  EXPECT_NE(run.output.find("wrong 0"), std::string::npos) << run.output;
  EXPECT_NE(run.output.find("note: workers run without shared memory for large messages"),
            std::string::npos)
      << run.output;
  EXPECT_NE(run.output.find("(ulimit -v, RLIMIT_AS) is 976 MiB"), std::string::npos) << run.output;
}

TEST(Limits, TooFewDescriptorsRunTheWorkersThatCouldStart) {
  if (test_helpers::under_sanitizer)
    GTEST_SKIP() << "sanitizer runtimes take descriptors and threads of their own";
  const ShellRun run = run_shell(std::string(LIMITS_HELPER) + " --open-files-beyond 6");
  EXPECT_EQ(run.status, 0) << run.output;
  EXPECT_NE(run.output.find("wrong 0"), std::string::npos) << run.output;
  EXPECT_NE(run.output.find("procpool: warning: started "), std::string::npos) << run.output;
  EXPECT_NE(run.output.find("of 8 workers: the limit on open files (ulimit -n, RLIMIT_NOFILE) is "),
            std::string::npos)
      << run.output;
  EXPECT_NE(run.output.find("note: started "), std::string::npos) << "not in the insights\n"
                                                                  << run.output;
}

TEST(Limits, NoDescriptorForAnyWorkerIsAClearError) {
  if (test_helpers::under_sanitizer)
    GTEST_SKIP() << "sanitizer runtimes take descriptors and threads of their own";
  const ShellRun run = run_shell(std::string(LIMITS_HELPER) + " --open-files 3");
  EXPECT_EQ(run.status, 2) << run.output;
  EXPECT_NE(run.output.find("procpool: no worker could start: the limit on open files (ulimit "
                            "-n, RLIMIT_NOFILE) is "),
            std::string::npos)
      << run.output;
}

TEST(Limits, LargeResultsBeyondTheDescriptorLimitSayWhichLimit) {
  // helper-62's case: a caller four descriptors from its limit could not
  // receive a 32 MiB result's memory file (MSG_CTRUNC), and was told its
  // worker "sent a corrupt message ... Does the task write to file
  // descriptors it does not own?": the task was blamed for the caller's limit.
  if (test_helpers::under_sanitizer)
    GTEST_SKIP() << "sanitizer runtimes take descriptors and threads of their own";
  const ShellRun run = run_shell(std::string(LIMITS_HELPER) + " --large-results-beyond 4");
  EXPECT_EQ(run.status, 2) << run.output;
  EXPECT_NE(run.output.find("could not receive: it is at its limit of open files (ulimit -n: "),
            std::string::npos)
      << run.output;
  EXPECT_EQ(run.output.find("corrupt message"), std::string::npos) << run.output;
}

struct Unit {};
Unit make_unit() {
  return {};
}
int identity(Unit&, const int& x) {
  return x;
}

/// In a child: a one-worker pool whose worker is recycled after each task,
/// and then no descriptor left for its replacement. 0 when the first task's
/// result came and the others failed with why; otherwise what went wrong.
int run_out_of_descriptors_mid_call(procpool::Start start) {
  ::alarm(30);  // a hang fails the test
  procpool::Pool pool({.processes = 1, .chunksize = 1, .start = start, .max_tasks_per_child = 1},
                      &make_unit);
  if (pool.map(&identity, std::vector<int>{7}) != std::vector<int>{7}) return 10;
  rlimit limit{};
  ::getrlimit(RLIMIT_NOFILE, &limit);
  limit.rlim_cur = 64;
  ::setrlimit(RLIMIT_NOFILE, &limit);
  while (::open("/dev/null", O_RDONLY | O_CLOEXEC) >= 0) {
  }
  try {
    const auto outcomes = pool.map_outcomes(&identity, std::vector<int>{1, 2, 3});
    if (outcomes.size() != 3 || !outcomes[0].ok()) return 11;
    for (std::size_t i = 1; i < 3; ++i) {
      try {
        std::rethrow_exception(outcomes[i].error);
      } catch (const procpool::Error& e) {
        const std::string what = e.what();
        if (what.find("no worker is left: worker 0 could not be replaced") == std::string::npos)
          return 12;
      } catch (...) {
        return 13;
      }
    }
  } catch (...) {
    return 14;  // the call itself threw (the replacement's error escaped it)
  }
  return 0;
}

TEST(Limits, AWorkerThatCannotBeReplacedFailsTheTasksLeftWithWhy) {
  if (test_helpers::under_sanitizer)
    GTEST_SKIP() << "sanitizer runtimes take descriptors and threads of their own";
  for (const procpool::Start start : {procpool::Start::fork, procpool::Start::fork_server}) {
    std::fflush(nullptr);
    const pid_t child = ::fork();
    if (child == 0) ::_exit(run_out_of_descriptors_mid_call(start));
    int status = 0;
    ::waitpid(child, &status, 0);
    ASSERT_TRUE(WIFEXITED(status)) << "killed by signal " << WTERMSIG(status);
    EXPECT_EQ(WEXITSTATUS(status), 0) << (start == procpool::Start::fork ? "fork" : "fork_server");
  }
}

TEST(Limits, TooFewProcessesRunTheWorkersThatCouldStart) {
  if (test_helpers::under_sanitizer)
    GTEST_SKIP() << "sanitizer runtimes take descriptors and threads of their own";
  // RLIMIT_NPROC does not bind root: run as nobody, allowed a few processes
  // more than nobody has now (the shell and the helper among them).
  if (::geteuid() != 0 || ::access("/usr/bin/setpriv", X_OK) != 0) {
    GTEST_SKIP() << "needs root and setpriv to run the helper as nobody";
  }
  if (::access(LIMITS_HELPER, R_OK | X_OK) != 0) GTEST_SKIP() << "helper not executable";
  const ShellRun run = run_shell(
      std::string("setpriv --reuid=nobody --regid=nogroup --clear-groups bash -c "
                  "'n=$(ps -u nobody --no-headers | wc -l); ulimit -u $((n + 4)) && exec ") +
      LIMITS_HELPER + "'");
  EXPECT_EQ(run.status, 0) << run.output;
  EXPECT_NE(run.output.find("wrong 0"), std::string::npos) << run.output;
  EXPECT_NE(run.output.find("of 8 workers: the limit on processes (ulimit -u, RLIMIT_NPROC)"),
            std::string::npos)
      << run.output;
}

/// A memory cgroup of its own for a test, removed when done; empty path
/// where no cgroup can be made (not root, read-only cgroup file system).
class MemoryCgroup {
 public:
  explicit MemoryCgroup(const std::string& limit_bytes) {
    const std::string name = "procpool-oom-test-" + std::to_string(::getpid());
    // cgroup v1's memory controller, under this process's own group.
    std::ifstream self("/proc/self/cgroup");
    std::string line;
    while (std::getline(self, line)) {
      const auto at = line.find(":memory:");
      if (at == std::string::npos) continue;
      try_make("/sys/fs/cgroup/memory" + line.substr(at + 8) + "/" + name, "memory.limit_in_bytes",
               limit_bytes);
    }
    // cgroup v2: a child of the root, where processes and children may mix.
    if (path_.empty()) try_make("/sys/fs/cgroup/" + name, "memory.max", limit_bytes);
  }
  ~MemoryCgroup() {
    if (!path_.empty()) ::rmdir(path_.c_str());
  }
  const std::string& path() const { return path_; }

 private:
  void try_make(const std::string& dir, const char* limit_file, const std::string& limit) {
    if (::mkdir(dir.c_str(), 0755) != 0) return;
    std::ofstream out(dir + "/" + limit_file);
    out << limit;
    out.close();
    if (!out) {
      ::rmdir(dir.c_str());
      return;
    }
    // Best effort: with swap the task would swap instead of being killed.
    std::ofstream(dir + "/memory.swap.max") << 0;
    std::ofstream(dir + "/memory.memsw.limit_in_bytes") << limit;
    path_ = dir;
  }
  std::string path_;
};

TEST(OutOfMemory, AWorkerKilledForMemorySaysSoWithTheLimit) {
  if (test_helpers::under_sanitizer)
    GTEST_SKIP() << "sanitizer runtimes change memory use beyond measure";
  MemoryCgroup cgroup("268435456");  // 256 MiB; the task wants 1 GiB
  if (cgroup.path().empty()) {
    GTEST_SKIP() << "cannot create a memory cgroup here (needs root and a writable cgroup fs)";
  }
  // $$ of a shell of its own: run_shell's subshell would report its parent's.
  const ShellRun run = run_shell("sh -c 'echo $$ > " + cgroup.path() + "/cgroup.procs && exec " +
                                 LIMITS_HELPER + " --out-of-memory'");
  EXPECT_EQ(run.status, 0) << run.output;
  EXPECT_NE(run.output.find("was killed by signal 9 (Killed): the OOM killer killed it: memory "
                            "limit 0.25 GiB"),
            std::string::npos)
      << run.output;
  EXPECT_NE(run.output.find("Use fewer processes, or tasks that need less memory"),
            std::string::npos)
      << run.output;
  EXPECT_NE(run.output.find("diagnosis: worker 0 (pid "), std::string::npos) << run.output;
  EXPECT_NE(run.output.find("was killed by the OOM killer: memory limit 0.25 GiB"),
            std::string::npos)
      << run.output;
}

}  // namespace
