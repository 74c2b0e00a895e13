#include "fork_server.hpp"

#include <dirent.h>
#include <linux/futex.h>
#include <poll.h>
#include <sys/mman.h>
#include <sys/prctl.h>
#include <sys/socket.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <unistd.h>

#include <atomic>
#include <cerrno>
#include <chrono>
#include <csignal>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <string>
#include <system_error>
#include <thread>
#include <vector>

#include "procpool/detail/memory_file.hpp"
#include "procpool/errors.hpp"
#include "spawn.hpp"
#include "worker.hpp"
#include "worker_process.hpp"

namespace procpool::detail {
namespace {

constexpr char worker_request = 'W';
/// What the server says once the initializer has run: ready, or it will not
/// fork because the initializer left threads running.
constexpr char server_ready = 'R';
constexpr char server_has_threads = 'T';

[[noreturn]] void throw_errno(const char* what, int error) {
  throw std::system_error(error, std::generic_category(), std::string("procpool: ") + what);
}

bool send_all(int fd, const void* data, std::size_t n) noexcept {
  const auto* at = static_cast<const char*>(data);
  while (n > 0) {
    const ssize_t sent = ::send(fd, at, n, MSG_NOSIGNAL);
    if (sent < 0 && errno == EINTR) continue;
    if (sent <= 0) return false;
    at += sent;
    n -= static_cast<std::size_t>(sent);
  }
  return true;
}

/// How long the pool waits for its server to answer a request for a worker:
/// a clone and a reply, well under a millisecond for a small server, but a
/// clone copies the page tables of all the server holds (a large model: a
/// second or more), so a running server is given long; one that stays
/// stopped (SIGSTOP, a debugger), far less: it answers nothing until continued.
constexpr std::chrono::milliseconds answer_patience{60'000};
constexpr std::chrono::milliseconds stopped_patience{2'000};

/// Whether process `pid` is stopped or traced (its state in /proc).
bool is_stopped(pid_t pid) noexcept {
  char path[64];
  std::snprintf(path, sizeof path, "/proc/%d/stat", static_cast<int>(pid));
  std::FILE* f = std::fopen(path, "r");
  if (f == nullptr) return false;
  char line[512] = {};
  const bool read = std::fgets(line, sizeof line, f) != nullptr;
  std::fclose(f);
  const char* after_name = read ? std::strrchr(line, ')') : nullptr;  // the name may hold ')'
  return after_name != nullptr && (after_name[2] == 'T' || after_name[2] == 't');
}

/// Whether `fd` has something to read before `server` has run out of patience.
bool answers_in_time(int fd, pid_t server) noexcept {
  using Clock = std::chrono::steady_clock;
  const auto deadline = Clock::now() + answer_patience;
  Clock::time_point stopped_since{};
  for (;;) {
    pollfd p{fd, POLLIN, 0};
    const int ready = ::poll(&p, 1, 100);
    if (ready > 0) return true;  // an answer, or the server's end closed
    if (ready < 0 && errno != EINTR) return false;
    const auto now = Clock::now();
    if (now >= deadline) return false;
    if (!is_stopped(server)) {
      stopped_since = {};
    } else if (stopped_since == Clock::time_point{}) {
      stopped_since = now;
    } else if (now - stopped_since >= stopped_patience) {
      return false;
    }
  }
}

bool receive_all(int fd, void* into, std::size_t n) noexcept {
  auto* at = static_cast<char*>(into);
  while (n > 0) {
    const ssize_t got = ::recv(fd, at, n, 0);
    if (got < 0 && errno == EINTR) continue;
    if (got <= 0) return false;
    at += got;
    n -= static_cast<std::size_t>(got);
  }
  return true;
}

/// clone()'s arguments after the flags and the stack differ by architecture.
long clone_syscall(unsigned long flags, int* parent_tid, int* child_tid) noexcept {
#if defined(__x86_64__)
  return ::syscall(SYS_clone, flags, nullptr, parent_tid, child_tid, nullptr);
#else  // arm64 and most others: flags, stack, parent_tid, tls, child_tid
  return ::syscall(SYS_clone, flags, nullptr, parent_tid, nullptr, child_tid);
#endif
}

static_assert(sizeof(std::atomic<std::int32_t>) == sizeof(pid_t),
              "the kernel writes a pid_t into WorkerSlot::cloned_pid");

/// fork() whose child is a child of this process's parent (the pool's
/// process), not of this one. Raw, as glibc's fork() takes no flags; the
/// server is single-threaded, so no lock can be held across it. What glibc's
/// fork does for the child, done here: its thread id written where glibc
/// keeps it (else pthread_self() would name the server's thread: recursive
/// and robust mutexes, pthread_setaffinity_np), and its robust mutex list
/// registered again, empty (the kernel gives a new process none). The
/// child's pid is also written to `slot->cloned_pid` before the clone
/// returns, in memory the pool shares.
pid_t fork_as_sibling(WorkerSlot* slot) noexcept {
  int* tid_address = nullptr;
  if (::prctl(PR_GET_TID_ADDRESS, &tid_address) != 0) tid_address = nullptr;
  robust_list_head* robust = nullptr;
  std::size_t robust_size = 0;
  if (::syscall(SYS_get_robust_list, 0, &robust, &robust_size) != 0) robust = nullptr;
  const unsigned long flags = CLONE_PARENT | CLONE_PARENT_SETTID | SIGCHLD |
                              (tid_address ? CLONE_CHILD_SETTID | CLONE_CHILD_CLEARTID : 0);
  auto* cloned_pid = reinterpret_cast<int*>(&slot->cloned_pid);
  const auto child = static_cast<pid_t>(clone_syscall(flags, cloned_pid, tid_address));
  if (child == 0 && robust != nullptr) {
    robust->list.next = &robust->list;
    robust->list_op_pending = nullptr;
    ::syscall(SYS_set_robust_list, robust, robust_size);
  }
  return child;
}

/// A fork child of a threaded process has one thread, but ThreadSanitizer
/// starts its own background thread in it again.
constexpr std::size_t server_threads_allowed =
#if defined(__SANITIZE_THREAD__)
    2;
#else
    1;
#endif

/// This process's threads, from /proc/self/task.
std::size_t thread_count() noexcept {
  std::size_t threads = 0;
  if (DIR* dir = ::opendir("/proc/self/task")) {
    while (const dirent* entry = ::readdir(dir))
      threads += entry->d_name[0] != '.' ? 1 : 0;
    ::closedir(dir);
  }
  return threads;
}

/// Set in a fork server, before the initializer runs; cleared in each of its
/// workers (see in_fork_server).
bool is_fork_server = false;

/// In a new worker: becomes the worker that the pool's process sees. `slot`
/// is the server's mapping of its status page, which the clone shares.
[[noreturn]] void become_worker(const ForkServerBirth& birth, int control, int socket,
                                int slot_file, WorkerSlot* slot, WorkerLogic& logic) {
  is_fork_server = false;  // a pool it makes has workers of its own, not a server's
  ::close(control);
  ::close(slot_file);
  ::prctl(PR_SET_PDEATHSIG, SIGKILL);           // a fork does not inherit it
  if (::getppid() != birth.parent) ::_exit(0);  // the pool's process is already gone
  WorkerContext context;
  context.slot = slot;
  context.task_timeout = birth.task_timeout;
  run_worker(socket, logic, context);
}

/// The status page of a worker about to be cloned, or nullptr (errno says why).
WorkerSlot* map_status_page(int slot_file) noexcept {
  void* page =
      ::mmap(nullptr, sizeof(WorkerSlot), PROT_READ | PROT_WRITE, MAP_SHARED, slot_file, 0);
  return page == MAP_FAILED ? nullptr : static_cast<WorkerSlot*>(page);
}

/// Clones the worker that serves socket `fds[0]` with the status page in
/// memory file `fds[1]`: its pid, or -errno.
int clone_worker(const ForkServerBirth& birth, int control, const std::vector<int>& fds,
                 WorkerLogic& logic) {
  WorkerSlot* slot = map_status_page(fds[1]);
  if (slot == nullptr) return -errno;
  const pid_t child = fork_as_sibling(slot);
  if (child == 0) become_worker(birth, control, fds[0], fds[1], slot, logic);
  const int reply = child > 0 ? child : -errno;
  ::munmap(slot, sizeof(WorkerSlot));
  return reply;
}

/// The server's life: builds the logic (runs the initializer), then forks a
/// worker for each request until the pool closes its end.
[[noreturn]] void serve(const ForkServerBirth& birth, int control) {
  is_fork_server = true;
  std::unique_ptr<WorkerLogic> logic = (*birth.make_logic)();
  // What the initializer printed is printed once, not again by each worker.
  std::fflush(nullptr);
  // A thread the initializer left running (an OpenMP or BLAS pool, a logger)
  // may hold a lock at a fork that no worker could ever take.
  const char state = thread_count() > server_threads_allowed ? server_has_threads : server_ready;
  if (!send_all(control, &state, 1) || state != server_ready) exit_worker(0);
  for (;;) {
    char request = 0;
    std::vector<int> fds;
    bool truncated = false;
    const long got = receive_with_fds(control, &request, 1, 0, fds, truncated);
    if (got < 0 && errno == EINTR) continue;
    if (got <= 0 || request != worker_request) exit_worker(0);
    // Short of descriptors (ulimit -n): the kernel drops what does not fit.
    const int reply =
        fds.size() != 2 || truncated ? -EMFILE : clone_worker(birth, control, fds, *logic);
    for (int fd : fds)
      ::close(fd);
    if (!send_all(control, &reply, sizeof reply)) exit_worker(0);
  }
}

}  // namespace

ForkServer::~ForkServer() {
  end_server();
}

bool in_fork_server() noexcept {
  return is_fork_server;
}

bool ForkServer::start_server() {
  auto born_alone = hold_child_births();
  int sv[2];
  if (::socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, sv) != 0) {
    throw_errno("cannot create the socket of the pool's fork server", errno);
  }
  for (int& fd : sv)
    fd = above_standard_streams(fd);
  const std::vector<int> to_close = parent_sockets();
  const ForkServerBirth& birth = birth_;
  skip_parent_exit_handlers_in_workers();
  const pid_t pid = start_child_process(birth.from_helper_thread, [&]() -> pid_t {
    const pid_t child = ::fork();
    if (child != 0) return child < 0 ? -errno : child;
    ::close(sv[0]);
    for (int fd : to_close)
      ::close(fd);
    prepare_worker_process(birth.parent, birth.inner_threads);
    try {
      serve(birth, sv[1]);
    } catch (const std::exception& e) {
      std::fprintf(stderr, "procpool fork server %d could not start: %s\n", ::getpid(), e.what());
    } catch (...) {
      std::fprintf(stderr, "procpool fork server %d could not start\n", ::getpid());
    }
    std::fflush(stderr);
    ::_exit(70);
  });
  ::close(sv[1]);
  if (pid < 0) {
    ::close(sv[0]);
    throw_errno("cannot fork the pool's fork server", -pid);
  }
  pid_ = pid;
  control_ = sv[0];
  add_parent_socket(control_);  // a child forked later must not keep the server from its EOF
  born_alone.unlock();          // others may start children while the initializer runs
  return wait_until_ready();
}

bool ForkServer::wait_until_ready() {
  char state = 0;
  if (receive_all(control_, &state, 1) && state == server_ready) {
    was_ready_ = true;
    return true;
  }
  const pid_t server = pid_;
  const int status = end_server();
  // SIGKILL: from outside (a kill storm, the OOM killer), not a crash of the
  // initializer, which has its own signal and message below.
  if (state != server_has_threads && was_ready_ && WIFSIGNALED(status) &&
      WTERMSIG(status) == SIGKILL) {
    return false;
  }
  if (state == server_has_threads) {
    throw Error("procpool: the pool's initializer left threads running in its fork server (pid " +
                std::to_string(server) +
                "); workers are forked from it, which is safe only while it has one thread (a "
                "thread may hold a lock, malloc's or a library's, that the worker could never "
                "take). End them before the initializer returns (an OpenMP or BLAS runtime keeps "
                "its threads: limit it to one there), or use Start::fork");
  }
  throw Error("procpool: the pool's fork server (pid " + std::to_string(server) + ") " +
              describe_death(WIFSIGNALED(status) ? WTERMSIG(status) : 0,
                             WIFEXITED(status) ? WEXITSTATUS(status) : 0) +
              " while it ran the pool's initializer, before it could start a worker. With "
              "Start::fork_server the initializer runs there, once for every worker: check the "
              "initializer (what the server printed is above)");
}

pid_t ForkServer::ask(int socket, int slot_file) noexcept {
  const int fds[] = {socket, slot_file};
  const bool sent = send_with_fds(control_, &worker_request, 1, fds);
  ::close(socket);  // in flight now: no child forked from here meanwhile can hold it
  if (!sent) return 0;
  if (!answers_in_time(control_, pid_)) {
    // Stopped (SIGSTOP, a debugger) or stuck: the pool waits under its lock,
    // so it gets no longer; killed, it is started again like a dead one.
    ::kill(pid_, SIGKILL);
    return 0;
  }
  int reply = 0;
  if (!receive_all(control_, &reply, sizeof reply)) return 0;
  return reply;
}

bool ForkServer::ensure_running() {
  int status = 0;
  if (pid_ > 0 && ::waitpid(pid_, &status, WNOHANG) == pid_) {
    // Killed from outside since the last worker (it exits only when told):
    // reaped here, so end_server() must not wait for it.
    pid_ = -1;
    end_server();
  }
  return pid_ >= 0 || start_server();
}

pid_t ForkServer::start_worker(int socket, int slot_file) {
  if (pid_ <= 0) {
    ::close(socket);
    return 0;
  }
  const pid_t reply = ask(socket, slot_file);
  if (reply < 0) throw_errno("the pool's fork server cannot fork a worker", -reply);
  if (reply == 0) end_server();  // killed from outside: the caller starts another
  return reply;
}

int ForkServer::end_server() noexcept {
  if (control_ >= 0) {
    remove_parent_socket(control_);
    ::close(control_);  // the server exits when it sees this
  }
  control_ = -1;
  int status = 0;
  if (pid_ <= 0) return status;
  // It exits at once unless stopped or stuck: give it a second, then kill it.
  for (int attempt = 0; attempt < 1000; ++attempt) {
    const pid_t r = ::waitpid(pid_, &status, WNOHANG);
    if (r == pid_ || (r < 0 && errno != EINTR)) break;
    if (attempt == 999) {
      ::kill(pid_, SIGKILL);
      while (::waitpid(pid_, &status, 0) < 0 && errno == EINTR) {
      }
      break;
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(1));
  }
  pid_ = -1;
  return status;
}

}  // namespace procpool::detail
