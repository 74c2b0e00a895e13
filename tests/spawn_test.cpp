// Start::spawn: Pool workers that are fresh runs of this test binary, and
// the identity by which functions cross to them.
#include <dlfcn.h>
#include <fcntl.h>
#include <gtest/gtest.h>
#include <sys/prctl.h>
#include <sys/stat.h>
#include <procpool/detail/code_identity.hpp>
#include <procpool/procpool.hpp>

#include <atomic>
#include <condition_variable>
#include <csignal>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <mutex>
#include <set>
#include <string>
#include <thread>
#include <tuple>
#include <vector>

#include "helpers.hpp"

namespace {

using procpool::Start;

// ---- the reproduction: a logging mutex that other threads hold all the time

std::mutex log_mutex;  // constant-initialised: usable in a spawned worker too
std::size_t logged_bytes = 0;

void log_line(const char* text) {
  std::lock_guard lock(log_mutex);
  logged_bytes += std::strlen(text);
}

int logged_task(int x) {
  log_line("task ran");
  return 2 * x;
}

TEST(Spawn, WorkersDoNotInheritALockHeldByAnotherThread) {
  std::atomic<bool> stop{false};
  std::vector<std::thread> loggers;
  for (int i = 0; i < 3; ++i) {
    loggers.emplace_back([&] {
      while (!stop.load(std::memory_order_relaxed))
        log_line("parent thread logging");
    });
  }
  std::vector<int> inputs(20);
  for (int i = 0; i < 20; ++i)
    inputs[static_cast<std::size_t>(i)] = i;
  std::vector<int> results;
  test_helpers::within(std::chrono::seconds(60), "a spawn pool whose workers log", [&] {
    procpool::Pool pool({.processes = 2, .start = Start::spawn, .max_tasks_per_child = 1});
    results = pool.map(&logged_task, inputs);
  });
  stop = true;
  for (auto& t : loggers)
    t.join();
  ASSERT_EQ(results.size(), 20u);
  for (int i = 0; i < 20; ++i)
    EXPECT_EQ(results[static_cast<std::size_t>(i)], 2 * i);
}

// ---- state, functions, calls

struct Vocabulary {
  std::string prefix;
  pid_t built_in = 0;
  int calls = 0;
};

Vocabulary load_vocabulary() {
  return Vocabulary{"fp:", ::getpid(), 0};
}

TEST(Spawn, CaptureLessLambdaInitializerBuildsStateInEachWorker) {
  procpool::Pool pool({.processes = 2, .start = Start::spawn}, [] {
    return Vocabulary{"lambda:", ::getpid(), 0};
  });
  std::vector<int> xs{1, 2, 3, 4, 5, 6};
  for (int round = 0; round < 2; ++round) {
    auto out = pool.map(
        [](Vocabulary& v, int x) {
          ++v.calls;
          return std::tuple<std::string, pid_t, pid_t>{v.prefix + std::to_string(x), v.built_in,
                                                       ::getpid()};
        },
        xs);
    for (std::size_t i = 0; i < xs.size(); ++i) {
      EXPECT_EQ(std::get<0>(out[i]), "lambda:" + std::to_string(xs[i]));
      EXPECT_EQ(std::get<1>(out[i]), std::get<2>(out[i])) << "state built in another process";
      EXPECT_NE(std::get<2>(out[i]), ::getpid());
    }
  }
}

std::string with_prefix(Vocabulary& v, int x) {
  return v.prefix + std::to_string(x);
}

TEST(Spawn, FunctionPointerInitializerAndFunctionPointerTask) {
  procpool::Pool pool({.processes = 2, .start = Start::spawn}, &load_vocabulary);
  std::vector<int> xs{7, 8};
  EXPECT_EQ(pool.map(&with_prefix, xs), (std::vector<std::string>{"fp:7", "fp:8"}));
}

int add(int x, int y) {
  return x + y;
}

int square(int x) {
  return x * x;
}

TEST(Spawn, MapImapStarmapSubmitWithPointersAndLambdas) {
  procpool::Pool pool({.processes = 2, .start = Start::spawn});
  std::vector<int> xs{1, 2, 3, 4};
  EXPECT_EQ(pool.map(&square, xs), (std::vector<int>{1, 4, 9, 16}));
  EXPECT_EQ(pool.map(add, xs, 10), (std::vector<int>{11, 12, 13, 14}));
  EXPECT_EQ(pool.map([](int x, const std::string& s) { return s + std::to_string(x); }, xs,
                     std::string("n")),
            (std::vector<std::string>{"n1", "n2", "n3", "n4"}));
  std::vector<int> lazy;
  for (int v : pool.imap([](int x) { return -x; }, xs))
    lazy.push_back(v);
  EXPECT_EQ(lazy, (std::vector<int>{-1, -2, -3, -4}));
  std::set<std::size_t> seen;
  for (auto [index, value] : pool.imap_unordered(&square, xs)) {
    EXPECT_EQ(value, xs[index] * xs[index]);
    seen.insert(index);
  }
  EXPECT_EQ(seen.size(), xs.size());
  std::vector<std::tuple<int, int>> pairs{{1, 2}, {3, 4}};
  EXPECT_EQ(pool.starmap(&add, pairs), (std::vector<int>{3, 7}));
  EXPECT_EQ(pool.starmap([](int a, int b) { return a * b; }, pairs), (std::vector<int>{2, 12}));
  auto sum = pool.submit(&add, 20, 22);
  EXPECT_EQ(sum.get(), 42);
  auto pid = pool.submit([] { return ::getpid(); });
  EXPECT_NE(pid.get(), ::getpid());
}

TEST(Spawn, LargeInputsAndResultsTravelThroughTheSocket) {
  // Spawned workers have no shared reply or input arenas: megabytes go by socket.
  procpool::Pool pool({.processes = 2, .start = Start::spawn});
  std::vector<std::vector<char>> inputs;
  for (char c : {'a', 'b', 'c', 'd'})
    inputs.emplace_back(std::size_t{3} << 20, c);
  auto out = pool.map(
      [](const std::vector<char>& v) {
        std::vector<char> doubled(v);
        doubled.insert(doubled.end(), v.begin(), v.end());
        return doubled;
      },
      inputs);
  ASSERT_EQ(out.size(), inputs.size());
  for (std::size_t i = 0; i < out.size(); ++i) {
    ASSERT_EQ(out[i].size(), 2 * inputs[i].size());
    EXPECT_EQ(out[i].front(), inputs[i].front());
    EXPECT_EQ(out[i].back(), inputs[i].back());
  }
}

// ---- failures

int crash_on_three(int x) {
  if (x == 3) std::raise(SIGSEGV);
  return x;
}

TEST(Spawn, ACrashIsReportedWithPidAndSignalAndThePoolGoesOn) {
  procpool::Pool pool({.processes = 2, .start = Start::spawn});
  const auto pids = pool.worker_pids();
  std::vector<int> xs{1, 2, 3, 4};
  try {
    pool.map(&crash_on_three, xs);
    FAIL() << "expected WorkerCrashed";
  } catch (const procpool::WorkerCrashed& e) {
    EXPECT_EQ(e.index(), 2u);
#if defined(__SANITIZE_ADDRESS__) || defined(__SANITIZE_THREAD__)
    // The sanitizer runtime catches the segfault and exits with a status itself.
    EXPECT_TRUE(e.signal() == SIGSEGV || e.exit_status() != 0);
#else
    EXPECT_EQ(e.signal(), SIGSEGV);
#endif
    EXPECT_NE(e.pid(), ::getpid());
    EXPECT_TRUE(std::find(pids.begin(), pids.end(), e.pid()) != pids.end())
        << "the crash names a pid that was not a worker";
  }
  EXPECT_EQ(pool.map(&square, xs), (std::vector<int>{1, 4, 9, 16}));
  EXPECT_EQ(pool.worker_pids().size(), 2u);
}

/// Crashes the first time it runs for input 1 (a marker file remembers it
/// across processes), then succeeds.
int crash_once(int x, const std::string& marker) {
  if (x == 1 && ::access(marker.c_str(), F_OK) != 0) {
    std::FILE* f = std::fopen(marker.c_str(), "w");
    if (f) std::fclose(f);
    std::raise(SIGKILL);
  }
  return x + 100;
}

TEST(Spawn, RetriesRunACrashedTaskOnANewWorker) {
  const std::string marker = std::filesystem::temp_directory_path() /
                             ("procpool_spawn_retry_" + std::to_string(::getpid()));
  std::filesystem::remove(marker);
  procpool::Pool pool({.processes = 2, .start = Start::spawn, .retries = 1});
  std::vector<int> xs{0, 1, 2};
  EXPECT_EQ(pool.map(&crash_once, xs, marker), (std::vector<int>{100, 101, 102}));
  EXPECT_TRUE(std::filesystem::exists(marker)) << "the task did not crash the first time";
  std::filesystem::remove(marker);
  const auto in = pool.insights();
  unsigned crashes = 0;
  for (const auto& w : in.workers)
    crashes += w.crashes;
  EXPECT_EQ(crashes, 1u);
}

int sleep_on_one(int x) {
  if (x == 1) std::this_thread::sleep_for(std::chrono::seconds(30));
  return x;
}

TEST(Spawn, TaskTimeoutKillsTheWorkerAndReportsTheTask) {
  procpool::Pool pool(
      {.processes = 2, .start = Start::spawn, .task_timeout = std::chrono::milliseconds(300)});
  std::vector<int> xs{0, 1, 2};
  const auto started = std::chrono::steady_clock::now();
  auto out = pool.map_outcomes(&sleep_on_one, xs);
  EXPECT_LT(std::chrono::steady_clock::now() - started, std::chrono::seconds(10));
  ASSERT_EQ(out.size(), 3u);
  EXPECT_TRUE(out[0].ok());
  EXPECT_TRUE(out[2].ok());
  ASSERT_FALSE(out[1].ok());
  EXPECT_THROW(std::rethrow_exception(out[1].error), procpool::TaskTimeout);
  EXPECT_EQ(pool.map(&square, xs), (std::vector<int>{0, 1, 4}));
}

// ---- what a spawned worker is

std::string exe_of(pid_t pid) {
  return std::filesystem::read_symlink("/proc/" + std::to_string(pid) + "/exe").string();
}

pid_t parent_of(pid_t pid) {
  std::ifstream stat("/proc/" + std::to_string(pid) + "/stat");
  std::string line;
  std::getline(stat, line);
  std::istringstream rest(line.substr(line.rfind(')') + 2));
  char state = '?';
  long ppid = 0;
  rest >> state >> ppid;
  return static_cast<pid_t>(ppid);
}

/// A task of a spawned worker that makes a pool of its own (each kind).
int sum_in_an_inner_pool(int n) {
  procpool::Pool inner({.processes = 1});
  std::vector<int> ones(static_cast<std::size_t>(n), 1);
  int sum = 0;
  for (int one : inner.map(&square, ones))
    sum += one;
  return sum + procpool::map([](int x) { return x; }, std::vector<int>{n}, {.processes = 1})[0];
}

TEST(Spawn, ATaskMayMakeAPoolOfItsOwn) {
  // A spawned worker serves its pool from a static initialiser: the library's
  // own statics (one made as a later file loads) were not made yet there, and
  // the inner pool threw "Operation not permitted" from an unmade mutex.
  procpool::Pool pool({.processes = 2, .start = Start::spawn});
  EXPECT_EQ(pool.map(&sum_in_an_inner_pool, std::vector<int>{2, 3}), (std::vector<int>{4, 6}));
}

TEST(Spawn, WorkersAreChildrenRunningThisExecutable) {
  procpool::Pool pool({.processes = 2, .start = Start::spawn});
  const auto pids = pool.worker_pids();
  ASSERT_EQ(pids.size(), 2u);
  EXPECT_NE(pids[0], pids[1]);
  for (pid_t pid : pids) {
    EXPECT_NE(pid, ::getpid());
    EXPECT_EQ(parent_of(pid), ::getpid());
    EXPECT_EQ(exe_of(pid), exe_of(::getpid()));
  }
  std::vector<int> xs(50);
  auto ran_in = pool.map([](int) { return ::getpid(); }, xs);
  for (pid_t pid : ran_in)
    EXPECT_TRUE(std::find(pids.begin(), pids.end(), pid) != pids.end());
  const auto in = pool.insights();
  ASSERT_EQ(in.workers.size(), 2u);
  std::uint64_t tasks = 0;
  for (const auto& w : in.workers) {
    EXPECT_TRUE(std::find(pids.begin(), pids.end(), w.pid) != pids.end());
    tasks += w.tasks;
  }
  EXPECT_EQ(tasks, 50u);
  EXPECT_EQ(in.tasks, 50u);
}

// A static constructor of this program: it runs once in the parent, and once
// in each spawned worker (procpool is linked statically, after this object),
// so that task code may use the program's globals.
int static_constructors_run = 0;
// What the process looked like as the program's static constructors ran.
struct AsConstructed {
  bool marker_visible = false;  // a program they start would see it
  int death_signal = 0;         // PR_GET_PDEATHSIG
  int socket_flags = -1;        // of descriptor 3, a spawned worker's socket
};
AsConstructed as_constructed;
struct CountsItsConstruction {
  CountsItsConstruction() {
    ++static_constructors_run;
    as_constructed.marker_visible = std::getenv("PROCPOOL_SPAWNED_WORKER") != nullptr;
    ::prctl(PR_GET_PDEATHSIG, &as_constructed.death_signal);
    as_constructed.socket_flags = ::fcntl(3, F_GETFD);
  }
};
CountsItsConstruction counted;
const std::string program_global = "initialised by a static constructor";

// main() never runs in a worker: gtest_main's main would run every test there.
bool main_ran = false;
struct MainRanListener : testing::EmptyTestEventListener {
  void OnTestProgramStart(const testing::UnitTest&) override { main_ran = true; }
};
struct RegistersListener {
  RegistersListener() {
    // Called once main() has started the test program; never in a worker.
    testing::UnitTest::GetInstance()->listeners().Append(new MainRanListener);
  }
} registers_listener;

TEST(Spawn, WorkersRunTheProgramsStaticConstructorsButNotMain) {
  ASSERT_EQ(static_constructors_run, 1);
  ASSERT_TRUE(main_ran);
  procpool::Pool pool({.processes = 1, .start = Start::spawn});
  auto seen = pool.submit([] {
    return std::tuple<int, std::string, bool, bool, pid_t>{
        static_constructors_run, program_global, main_ran,
        std::getenv("PROCPOOL_SPAWNED_WORKER") != nullptr, ::getppid()};
  });
  auto [constructors, global, ran_main, marker_left, parent] = seen.get();
  EXPECT_EQ(constructors, 1) << "the worker did not run the program's static constructors";
  EXPECT_EQ(global, "initialised by a static constructor");
  EXPECT_FALSE(ran_main) << "the worker ran main()";
  EXPECT_FALSE(marker_left) << "the worker left its marker variable for its own children";
  EXPECT_EQ(parent, ::getpid());
}

TEST(Spawn, AWorkerIsTiedToItsParentBeforeTheProgramsStaticConstructorsRun) {
  // helper-66's cases: a worker whose static constructors hung outlived a
  // SIGKILLed parent (PR_SET_PDEATHSIG came after them), and a procpool
  // program they started with system() saw the marker, took itself for a
  // worker of another parent, and exited 0 without running its main().
  procpool::Pool pool({.processes = 1, .start = Start::spawn});
  auto seen = pool.submit([] {
    return std::tuple<bool, int, int>{as_constructed.marker_visible, as_constructed.death_signal,
                                      as_constructed.socket_flags};
  });
  const auto [marker_visible, death_signal, socket_flags] = seen.get();
  EXPECT_FALSE(marker_visible) << "what the static constructors start takes itself for a worker";
  EXPECT_EQ(death_signal, SIGKILL) << "the worker is not tied to its parent yet";
  EXPECT_EQ(socket_flags, FD_CLOEXEC) << "what the static constructors start gets the socket";
}

TEST(Spawn, WorkersGetNoDescriptorTheParentDidNotMeanToGive) {
  int leaky[2];
  ASSERT_EQ(::pipe(leaky), 0);  // no O_CLOEXEC: fork would hand these down
  // Well above the descriptors a spawned worker is given (its socket is 3).
  const int high = ::fcntl(leaky[0], F_DUPFD, 100);
  ASSERT_GE(high, 100);
  procpool::Pool pool({.processes = 1, .start = Start::spawn});
  auto open_there = pool.submit([](int fd) { return ::fcntl(fd, F_GETFD) != -1; }, high);
  EXPECT_FALSE(open_there.get());
  auto socket_there = pool.submit([] { return ::fcntl(3, F_GETFD); });
  EXPECT_EQ(socket_there.get(), FD_CLOEXEC) << "the worker's socket would leak into its children";
  for (int fd : {leaky[0], leaky[1], high})
    ::close(fd);
}

TEST(Spawn, InnerThreadCountsAreInTheNewProcessEnvironment) {
  ::unsetenv("OMP_NUM_THREADS");
  procpool::Pool pool({.processes = 2, .start = Start::spawn});
  auto value = pool.submit([] {
    const char* v = std::getenv("OMP_NUM_THREADS");
    return std::string(v ? v : "");
  });
  const std::string got = value.get();
  EXPECT_FALSE(got.empty());
  EXPECT_GE(std::atoi(got.c_str()), 1);
}

TEST(Spawn, APoolMadeOnAThreadThatEndsKeepsItsWorkers) {
  std::unique_ptr<procpool::Pool> pool;
  std::thread([&] {
    pool =
        std::make_unique<procpool::Pool>(procpool::Options{.processes = 2, .start = Start::spawn});
  }).join();
  std::this_thread::sleep_for(std::chrono::milliseconds(100));
  std::vector<int> xs{1, 2, 3};
  EXPECT_EQ(pool->map(&square, xs), (std::vector<int>{1, 4, 9}));
}

TEST(Spawn, LeavesNoDescriptorAndNoProcessBehind) {
  {
    procpool::Pool warm({.processes = 1, .start = Start::spawn});  // one-time allocations
    warm.submit(&square, 2).get();
  }
  const int before = test_helpers::open_fd_count();
  for (int round = 0; round < 3; ++round) {
    procpool::Pool pool({.processes = 2, .start = Start::spawn, .max_tasks_per_child = 2});
    std::vector<int> xs(10, 3);
    EXPECT_EQ(pool.map(&square, xs), std::vector<int>(10, 9));
  }
  EXPECT_EQ(test_helpers::open_fd_count(), before);
  EXPECT_TRUE(test_helpers::children().empty()) << "a worker outlived its pool (or is a zombie)";
}

// ---- misuse

TEST(Spawn, ACapturingInitializerIsRejectedWithAReason) {
  const std::string prefix = "captured";
  try {
    procpool::Pool pool({.processes = 1, .start = Start::spawn}, [prefix] {
      return Vocabulary{prefix, 0, 0};
    });
    FAIL() << "expected procpool::Error";
  } catch (const procpool::Error& e) {
    const std::string what = e.what();
    EXPECT_NE(what.find("capture-less lambda"), std::string::npos) << what;
    EXPECT_NE(what.find("Start::fork"), std::string::npos) << what;
  }
  EXPECT_TRUE(test_helpers::children().empty());
  // The same initializer is fine for forked workers.
  procpool::Pool forked({.processes = 1}, [prefix] { return Vocabulary{prefix, 0, 0}; });
  EXPECT_EQ(forked.submit(&with_prefix, 1).get(), "captured1");
}

TEST(Spawn, ForkPerCallFunctionsRejectSpawnWithAReason) {
  std::vector<int> xs{1, 2};
  const int offset = 1;
  auto expect_rejected = [](auto call) {
    try {
      call();
      ADD_FAILURE() << "expected procpool::Error";
    } catch (const procpool::Error& e) {
      const std::string what = e.what();
      EXPECT_NE(what.find("always fork"), std::string::npos) << what;
      EXPECT_NE(what.find("procpool::Pool with Start::spawn"), std::string::npos) << what;
    }
  };
  const procpool::Options spawn{.start = Start::spawn};
  expect_rejected([&] { procpool::map([&](int x) { return x + offset; }, xs, spawn); });
  expect_rejected([&] {
    for (int v : procpool::imap([&](int x) { return x + offset; }, xs, spawn))
      (void)v;
  });
  expect_rejected([&] {
    for (auto v : procpool::imap_unordered([&](int x) { return x + offset; }, xs, spawn))
      (void)v;
  });
  std::vector<std::tuple<int, int>> pairs{{1, 2}};
  expect_rejected([&] { procpool::starmap([](int a, int b) { return a + b; }, pairs, spawn); });
  EXPECT_TRUE(test_helpers::children().empty());
}

// ---- code identity

TEST(CodeIdentity, AFunctionOfTheExecutableRoundTrips) {
  const procpool::detail::CodeRef ref = procpool::detail::code_ref_of(&square);
  EXPECT_TRUE(ref.module.empty()) << "the executable is named '" << ref.module << "'";
  EXPECT_EQ(procpool::detail::function_at<int(int)>(ref), &square);
  procpool::detail::Buffer bytes;
  procpool::detail::Writer out(bytes);
  procpool::detail::save_code_ref(out, ref);
  procpool::detail::Reader in(bytes);
  EXPECT_EQ(procpool::detail::load_code_ref(in), ref);
}

TEST(CodeIdentity, AFunctionOfASharedLibraryRoundTrips) {
  using Strlen = std::size_t(const char*);
  Strlen* strlen_here = &std::strlen;
  const procpool::detail::CodeRef ref = procpool::detail::code_ref_of(strlen_here);
  // libc's, or a sanitizer runtime's that intercepts strlen.
  EXPECT_NE(ref.module.find(".so"), std::string::npos) << ref.module;
  EXPECT_FALSE(ref.identity.empty()) << "a shared library's reference names its build";
  Strlen* back = procpool::detail::function_at<Strlen>(ref);
  EXPECT_EQ(back, strlen_here);
  EXPECT_EQ(back("four"), 4u);
  procpool::detail::Buffer bytes;
  procpool::detail::Writer out(bytes);
  procpool::detail::save_code_ref(out, ref);
  procpool::detail::Reader in(bytes);
  EXPECT_EQ(procpool::detail::load_code_ref(in), ref);
}

// The same path may hold another build of a library elsewhere (another
// node's copy, one rebuilt while the program ran): a reference made in
// another build is refused by name, never followed to whatever code lies at
// its offset here.
TEST(CodeIdentity, AnotherBuildOfASharedLibraryIsRejectedWithAClearMessage) {
  using Strlen = std::size_t(const char*);
  Strlen* strlen_here = &std::strlen;
  procpool::detail::CodeRef ref = procpool::detail::code_ref_of(strlen_here);
  ASSERT_FALSE(ref.module.empty());
  ref.identity = "build-id:0123456789abcdef";
  try {
    (void)procpool::detail::code_address(ref);
    FAIL() << "expected procpool::Error";
  } catch (const procpool::Error& e) {
    const std::string what = e.what();
    EXPECT_NE(what.find(ref.module), std::string::npos) << what;
    EXPECT_NE(what.find("another build"), std::string::npos) << what;
    EXPECT_NE(what.find("build-id:0123456789abcdef"), std::string::npos) << what;
  }
}

TEST(CodeIdentity, ReferencesThatNameNoCodeAreErrors) {
  EXPECT_THROW(procpool::detail::code_ref(nullptr), procpool::Error);
  try {
    procpool::detail::code_address({"/nonexistent/libprocpool_missing.so", 16, ""});
    FAIL() << "expected procpool::Error";
  } catch (const procpool::Error& e) {
    EXPECT_NE(std::string(e.what()).find("libprocpool_missing.so"), std::string::npos) << e.what();
  }
  EXPECT_THROW(procpool::detail::code_address({"", std::uint64_t{1} << 60, ""}), procpool::Error);
}

TEST(CodeIdentity, AnotherBuildIsRejectedWithAClearMessage) {
  const std::string& mine = procpool::detail::executable_identity();
  EXPECT_EQ(mine.rfind("build-id:", 0), 0u) << mine;  // the toolchain adds a build id
  EXPECT_NO_THROW(procpool::detail::check_executable_identity(mine));
  try {
    procpool::detail::check_executable_identity("build-id:0123456789abcdef");
    FAIL() << "expected procpool::Error";
  } catch (const procpool::Error& e) {
    const std::string what = e.what();
    EXPECT_NE(what.find("different executable"), std::string::npos) << what;
    EXPECT_NE(what.find("build-id:0123456789abcdef"), std::string::npos) << what;
  }
}

// A plugin rebuilt (replaced on disk) while the program runs: a worker started
// after that loads the new build from the same path, and the old build's
// function reference is refused with a message that names the library, not
// followed to whatever code lies at its offset now.
TEST(CodeIdentity, APluginReplacedOnDiskIsRefusedBySpawnedWorkers) {
  const test_helpers::TempDir dir("procpool-plugin");
  const std::string path = dir.path() + "/libplugin.so";
  std::filesystem::copy_file(PLUGIN_V1, path);
  void* handle = ::dlopen(path.c_str(), RTLD_NOW | RTLD_LOCAL);
  ASSERT_NE(handle, nullptr) << ::dlerror();
  using AddVersion = int(int);
  auto* add_version = reinterpret_cast<AddVersion*>(::dlsym(handle, "plugin_add_version"));
  ASSERT_NE(add_version, nullptr);
  const std::vector<int> inputs{10, 20};
  {
    procpool::Pool pool({.processes = 1, .start = Start::spawn});
    EXPECT_EQ(pool.map(add_version, inputs), (std::vector<int>{11, 21}));
  }
  // Replaced as a build does it: a new file renamed over the old one (the
  // copy this process loaded lives on).
  std::filesystem::copy_file(PLUGIN_V2, path + ".new");
  std::filesystem::rename(path + ".new", path);
  {
    procpool::Pool pool({.processes = 1, .start = Start::spawn});
    try {
      const std::vector<int> got = pool.map(add_version, inputs);
      ADD_FAILURE() << "expected procpool::Error, got " << got[0] << ", " << got[1];
    } catch (const procpool::Error& e) {
      const std::string what = e.what();
      EXPECT_NE(what.find("another build"), std::string::npos) << what;
      EXPECT_NE(what.find(path), std::string::npos) << what;
    }
  }
  EXPECT_EQ(add_version(1), 2) << "the caller's copy is the first build";
  EXPECT_TRUE(test_helpers::children().empty());
}

}  // namespace
