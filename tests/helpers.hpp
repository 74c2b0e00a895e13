// Helpers the tests share: what /proc says about this process's children and files.
#pragma once

#include <dirent.h>
#include <sys/mman.h>
#include <sys/wait.h>
#include <unistd.h>

#include <csignal>
#include <cstdio>
#include <cstdlib>
#include <ctime>

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <filesystem>
#include <fstream>
#include <mutex>
#include <new>
#include <sstream>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

namespace test_helpers {

/// Built with ASan or TSan, whose runtimes reserve address space and keep
/// shadow memory that counts in a process's RSS.
constexpr bool under_sanitizer =
#if defined(__SANITIZE_ADDRESS__) || defined(__SANITIZE_THREAD__)
    true;
#else
    false;
#endif

/// Built with ThreadSanitizer, which slows page faults and large copies
/// most of all.
constexpr bool under_tsan =
#if defined(__SANITIZE_THREAD__)
    true;
#else
    false;
#endif

/// A crash as a segfault looks from outside: the process dies of SIGSEGV,
/// also under a sanitizer. (Its own handler would report the signal instead,
/// symbolizing the stack for a second or two in each crashed worker, and exit
/// with its own status: two thirds of mpi_peers' time under ASan.)
[[noreturn]] inline void segfault() {
  std::signal(SIGSEGV, SIG_DFL);
  std::raise(SIGSEGV);
  ::_exit(99);  // a SIGSEGV that returned: visible as "exit 99"
}

/// Ends the test program if `body` takes longer than `limit`: a hang must
/// fail the test, not block it until ctest's timeout.
template <class Body>
void within(std::chrono::seconds limit, const char* what, Body body) {
  std::mutex m;
  std::condition_variable cv;
  bool done = false;
  std::thread watchdog([&] {
    std::unique_lock lock(m);
    if (!cv.wait_for(lock, limit, [&] { return done; })) {
      std::fprintf(stderr, "%s did not finish within %lld s (a hang)\n", what,
                   static_cast<long long>(limit.count()));
      std::_Exit(1);
    }
  });
  body();
  {
    std::lock_guard lock(m);
    done = true;
  }
  cv.notify_all();
  watchdog.join();
}

/// Built with GCC 12's ThreadSanitizer, whose runtime takes no lock around
/// fork(): a child forked while another thread of the parent is inside the
/// sanitizer's allocator inherits its lock held and waits in its first
/// allocation for ever (gdb: SizeClassAllocator64::GetFromAllocator).
/// Tests that fork from one thread while others allocate at full tilt hang
/// so now and then under it (LLVM 19's runtime locks the allocator; the ASan
/// build links tests/support/asan_fork_gate.cpp for the same hole).
constexpr bool under_tsan_fork_hole = under_tsan;

/// CLOCK_REALTIME in seconds: every process of the host (a worker, an MPI
/// rank) reads the same clock, so times taken in them compare.
inline double realtime_seconds() {
  timespec t{};
  ::clock_gettime(CLOCK_REALTIME, &t);
  return static_cast<double>(t.tv_sec) + static_cast<double>(t.tv_nsec) * 1e-9;
}

struct Child {
  pid_t pid;
  char state;  // 'Z' for a zombie
};

/// Every process whose parent is this process, read from /proc.
inline std::vector<Child> children() {
  std::vector<Child> found;
  DIR* proc = ::opendir("/proc");
  if (!proc) return found;
  const pid_t self = ::getpid();
  while (dirent* entry = ::readdir(proc)) {
    char* end = nullptr;
    long pid = std::strtol(entry->d_name, &end, 10);
    if (*end != '\0' || pid <= 0) continue;
    std::ifstream stat("/proc/" + std::string(entry->d_name) + "/stat");
    std::string line;
    if (!std::getline(stat, line)) continue;
    // pid (comm) state ppid ...; comm may contain spaces, so parse after the last ')'.
    auto close = line.rfind(')');
    if (close == std::string::npos) continue;
    std::istringstream rest(line.substr(close + 2));
    char state = '?';
    long ppid = 0;
    rest >> state >> ppid;
    if (ppid == self) found.push_back(Child{static_cast<pid_t>(pid), state});
  }
  ::closedir(proc);
  return found;
}

inline int open_fd_count() {
  int n = 0;
  DIR* dir = ::opendir("/proc/self/fd");
  while (dirent* entry = ::readdir(dir)) {
    if (entry->d_name[0] != '.') ++n;
  }
  ::closedir(dir);
  return n - 1;  // the directory stream itself
}

/// Whether a process exists (a zombie counts as gone).
inline bool process_alive(pid_t pid) {
  std::ifstream stat("/proc/" + std::to_string(pid) + "/stat");
  std::string line;
  if (!std::getline(stat, line)) return false;
  auto close = line.rfind(')');
  return close != std::string::npos && line.size() > close + 2 && line[close + 2] != 'Z';
}

/// Whether `at` lies in a private mapping of one of procpool's memory files
/// ("rw-p", memfd:procpool): a file that another process filled and handed
/// over, rather than a buffer of this process that bytes were copied into
/// (mapped shared: "rw-s").
inline bool mapped_from_memory_file(const void* at) {
  const auto address = reinterpret_cast<std::uintptr_t>(at);
  std::ifstream maps("/proc/self/maps");
  std::string line;
  while (std::getline(maps, line)) {
    std::uintptr_t begin = 0, end = 0;
    char perms[5] = {};
    if (std::sscanf(line.c_str(), "%lx-%lx %4s", &begin, &end, perms) != 3) continue;
    if (address >= begin && address < end)
      return perms[3] == 'p' && line.find("memfd:procpool") != std::string::npos;
  }
  return false;
}

/// Private (unshared) memory of this process in KiB, from smaps_rollup.
inline long private_kib() {
  std::ifstream in("/proc/self/smaps_rollup");
  long total = 0;
  // The first line names the range ("...-... ---p ... [rollup]"), then "Key: value kB".
  for (std::string line; std::getline(in, line);) {
    std::istringstream fields(line);
    std::string key;
    long value = 0;
    if (fields >> key >> value && (key == "Private_Clean:" || key == "Private_Dirty:"))
      total += value;
  }
  return total;
}

/// Runs `body` in a child process with `fd` (stdout or stderr) going to a
/// pipe, and returns what it wrote. `exit_normally` ends the child with
/// exit(0), so atexit handlers and stdio flushing run there once.
template <class Body>
std::string output_of(int fd, Body body, bool exit_normally = false) {
  int fds[2];
  if (::pipe(fds) != 0) return "(pipe failed)";
  std::fflush(stdout);
  std::fflush(stderr);
  pid_t pid = ::fork();
  if (pid == 0) {
    ::dup2(fds[1], fd);
    ::close(fds[0]);
    ::close(fds[1]);
    body();
    if (exit_normally) std::exit(0);
    ::_exit(0);
  }
  ::close(fds[1]);
  std::string out;
  char buf[4096];
  for (ssize_t n; (n = ::read(fds[0], buf, sizeof buf)) > 0;)
    out.append(buf, static_cast<std::size_t>(n));
  ::close(fds[0]);
  int status = 0;
  ::waitpid(pid, &status, 0);
  return out;
}

/// A fresh directory under /tmp (`prefix` then six random characters), removed
/// with everything in it when this ends: a test's marker files leave nothing
/// behind on the machine.
class TempDir {
 public:
  explicit TempDir(const std::string& prefix) : path_("/tmp/" + prefix + "-XXXXXX") {
    if (::mkdtemp(path_.data()) == nullptr) throw std::runtime_error("mkdtemp failed: " + path_);
  }
  TempDir(const TempDir&) = delete;
  TempDir& operator=(const TempDir&) = delete;
  ~TempDir() {
    std::error_code ignored;
    std::filesystem::remove_all(path_, ignored);
  }
  const std::string& path() const noexcept { return path_; }

 private:
  std::string path_;
};

/// Counters and a gate that a test and every forked worker share: a
/// MAP_SHARED page made before any pool, so every forked worker inherits
/// it (a spawned worker has a copy of its own).
struct Shared {
  std::atomic<int> started{0};
  std::atomic<int> finished{0};
  std::atomic<bool> gate{false};
};

inline Shared& shared() {
  static Shared* const made = [] {
    void* p =
        ::mmap(nullptr, sizeof(Shared), PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS, -1, 0);
    if (p == MAP_FAILED) std::abort();
    return new (p) Shared{};
  }();
  return *made;
}

inline void reset_shared() {
  shared().started = 0;
  shared().finished = 0;
  shared().gate = false;
}

/// Waits in a worker until the test opens the gate, or 30 s: a test that
/// fails before it opens the gate then shows its failure, not ctest's
/// timeout (a pool's destructor waits for the gated tasks).
inline void wait_for_gate() {
  const auto end = std::chrono::steady_clock::now() + std::chrono::seconds(30);
  while (!shared().gate.load() && std::chrono::steady_clock::now() < end)
    ::usleep(1000);
}

/// Waits in the test (without touching any pool) until `n` tasks have started.
inline bool wait_started(int n,
                         std::chrono::milliseconds limit = std::chrono::milliseconds(20000)) {
  const auto end = std::chrono::steady_clock::now() + limit;
  while (shared().started.load() < n) {
    if (std::chrono::steady_clock::now() > end) return false;
    std::this_thread::sleep_for(std::chrono::milliseconds(1));
  }
  return true;
}

}  // namespace test_helpers
