#include "spawn.hpp"

#include <fcntl.h>
#include <spawn.h>
#include <sys/mman.h>
#include <sys/prctl.h>
#include <sys/socket.h>
#include <unistd.h>

#include <cerrno>
#include <csignal>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <system_error>
#include <utility>
#include <vector>

#include "procpool/detail/code_identity.hpp"
#include "procpool/errors.hpp"
#include "worker.hpp"

extern char** environ;

namespace procpool::detail {
namespace {

/// Set (to the parent's pid) only in the environment of a process procpool
/// spawns as a worker; the worker unsets it at once, so that nothing it
/// starts in turn mistakes itself for a worker.
constexpr char spawn_variable[] = "PROCPOOL_SPAWNED_WORKER";
/// Where a spawned worker finds its socket and the memfd of its status page.
constexpr int worker_socket_fd = 3;
constexpr int worker_slot_fd = 4;
constexpr std::uint32_t hello_magic = 0x57535050;  // "PPSW"

/// The parent that spawned this process as a worker, or 0: read from
/// spawn_variable before the program's own static initialisers run.
pid_t spawned_by = 0;

/// Runs before the program's own static initialisers (priority 101; the
/// worker itself starts after them, see serve_if_spawned_worker), so that a
/// spawned worker is tied to its parent before any of the program's code
/// runs: one whose initialisers hang or loop does not outlive a parent
/// killed meanwhile. Its marker is unset, and its socket and status page
/// are kept from what those initialisers start (a program started with
/// system() took itself for a worker of another parent and exited at once).
__attribute__((constructor(101))) void recognise_spawned_worker() {
  const char* marker = std::getenv(spawn_variable);
  if (marker == nullptr) return;
  spawned_by = static_cast<pid_t>(std::strtol(marker, nullptr, 10));
  ::unsetenv(spawn_variable);
  ::prctl(PR_SET_PDEATHSIG, SIGKILL);
  if (::getppid() != spawned_by) ::_exit(0);  // the parent died before prctl took effect
  ::fcntl(worker_socket_fd, F_SETFD, FD_CLOEXEC);
  ::fcntl(worker_slot_fd, F_SETFD, FD_CLOEXEC);
}

[[noreturn]] void throw_errno(int error, const char* what) {
  throw std::system_error(error, std::generic_category(), std::string("procpool: ") + what);
}

/// Closes a descriptor when it goes out of scope.
struct OwnedFd {
  int fd = -1;
  explicit OwnedFd(int f) : fd(f) {}
  ~OwnedFd() {
    if (fd >= 0) ::close(fd);
  }
  OwnedFd(const OwnedFd&) = delete;
  OwnedFd& operator=(const OwnedFd&) = delete;
};

/// The new process's environment: the caller's, the inner thread counts it
/// did not set (runtimes such as OpenMP read them before main, so setting
/// them in the worker would be too late), and the worker marker.
std::vector<std::string> worker_environment(const SpawnRequest& request) {
  std::vector<std::string> env;
  const std::string marker = std::string(spawn_variable) + "=";
  for (char** e = environ; e && *e; ++e) {
    if (std::strncmp(*e, marker.c_str(), marker.size()) != 0) env.emplace_back(*e);
  }
  if (request.inner_threads != 0) {
    for (const char* name : inner_thread_variables) {
      if (std::getenv(name) == nullptr) {
        env.push_back(std::string(name) + "=" + std::to_string(request.inner_threads));
      }
    }
  }
  env.push_back(marker + std::to_string(request.parent));
  return env;
}

/// The start-up message: what the worker checks and builds its logic from.
Buffer hello_message(const SpawnRequest& request) {
  Buffer body;
  Writer out(body);
  const std::string& identity = executable_identity();
  out.put(static_cast<std::uint64_t>(identity.size()));
  out.write(identity.data(), identity.size());
  out.put(static_cast<std::uint8_t>(request.task_timeout ? 1 : 0));
  const std::uint64_t setup_size = request.logic_setup ? request.logic_setup->size() : 0;
  out.put(setup_size);
  if (setup_size != 0) out.write(request.logic_setup->data(), setup_size);
  Buffer message;
  Writer framed(message);
  framed.put(hello_magic);
  framed.put(static_cast<std::uint64_t>(body.size()));
  framed.write(body.data(), body.size());
  return message;
}

void send_all(int fd, const Buffer& bytes) {
  std::size_t sent = 0;
  while (sent < bytes.size()) {
    const ssize_t n = ::send(fd, bytes.data() + sent, bytes.size() - sent, MSG_NOSIGNAL);
    if (n > 0) {
      sent += static_cast<std::size_t>(n);
    } else if (n < 0 && errno != EINTR) {
      throw_errno(errno, "cannot send a spawned worker its start-up message");
    }
  }
}

bool receive_all(int fd, void* into, std::size_t n) {
  auto* at = static_cast<std::byte*>(into);
  while (n > 0) {
    const ssize_t got = ::recv(fd, at, n, 0);
    if (got > 0) {
      at += got;
      n -= static_cast<std::size_t>(got);
    } else if (got == 0 || errno != EINTR) {
      return false;
    }
  }
  return true;
}

[[noreturn]] void worker_fails(const std::string& why) {
  std::fprintf(stderr, "procpool spawned worker %d could not start: %s\n",
               static_cast<int>(::getpid()), why.c_str());
  std::fflush(stderr);
  ::_exit(70);
}

}  // namespace

SlotFile create_slot_file() {
  OwnedFd memfd(above_standard_streams(::memfd_create("procpool-worker-slot", MFD_CLOEXEC)));
  if (memfd.fd < 0) throw_errno(errno, "cannot create a worker's status page (memfd)");
  if (::ftruncate(memfd.fd, static_cast<off_t>(sizeof(WorkerSlot))) != 0) {
    throw_errno(errno, "cannot size a worker's status page");
  }
  void* page = ::mmap(nullptr, sizeof(WorkerSlot), PROT_READ | PROT_WRITE, MAP_SHARED, memfd.fd, 0);
  if (page == MAP_FAILED) throw_errno(errno, "cannot map a worker's status page");
  SlotFile file{memfd.fd, new (page) WorkerSlot()};
  memfd.fd = -1;
  return file;
}

SpawnedWorker spawn_worker_process(int parent_end, int child_end, const SpawnRequest& request) {
  OwnedFd child(child_end);
  // The status page must outlive exec, so it is a memfd both sides map.
  const SlotFile slot_file = create_slot_file();
  OwnedFd memfd(slot_file.fd);
  void* page = slot_file.slot;
  WorkerSlot* slot = slot_file.slot;
  try {
    // Queued in the socket before the worker exists, so it comes before any
    // frame the engine sends later.
    send_all(parent_end, hello_message(request));

    // dup2 in the child must not overwrite a source it has yet to copy:
    // move both sources above the targets first (close-on-exec, like every
    // descriptor procpool owns).
    OwnedFd socket_src(::fcntl(child.fd, F_DUPFD_CLOEXEC, worker_slot_fd + 1));
    OwnedFd slot_src(::fcntl(memfd.fd, F_DUPFD_CLOEXEC, worker_slot_fd + 1));
    if (socket_src.fd < 0 || slot_src.fd < 0) {
      throw_errno(errno, "cannot duplicate a spawned worker's descriptors");
    }
    posix_spawn_file_actions_t actions;
    posix_spawn_file_actions_init(&actions);
    posix_spawn_file_actions_adddup2(&actions, socket_src.fd, worker_socket_fd);
    posix_spawn_file_actions_adddup2(&actions, slot_src.fd, worker_slot_fd);
    // Nothing else crosses: not other pools' sockets, not the caller's
    // descriptors that lack close-on-exec. 0-2 (stdio) stay.
    posix_spawn_file_actions_addclosefrom_np(&actions, worker_slot_fd + 1);
    posix_spawnattr_t attr;
    posix_spawnattr_init(&attr);
    sigset_t none;
    sigemptyset(&none);
    posix_spawnattr_setsigmask(&attr, &none);  // the spawning thread's mask is not the worker's
    posix_spawnattr_setflags(&attr, POSIX_SPAWN_SETSIGMASK);

    std::vector<std::string> env = worker_environment(request);
    std::vector<char*> envp;
    envp.reserve(env.size() + 1);
    for (std::string& e : env)
      envp.push_back(e.data());
    envp.push_back(nullptr);
    static char exe_path[] = "/proc/self/exe";
    char* argv[] = {exe_path, nullptr};

    const pid_t pid = start_child_process(request.from_helper_thread, [&]() -> pid_t {
      pid_t child_pid = -1;
      const int error = ::posix_spawn(&child_pid, exe_path, &actions, &attr, argv, envp.data());
      return error == 0 ? child_pid : -error;
    });
    posix_spawnattr_destroy(&attr);
    posix_spawn_file_actions_destroy(&actions);
    if (pid < 0) throw_errno(-pid, "cannot spawn a worker process (posix_spawn of /proc/self/exe)");
    return SpawnedWorker{pid, slot};
  } catch (...) {
    ::munmap(page, sizeof(WorkerSlot));
    throw;
  }
}

void serve_if_spawned_worker(SpawnedLogicFactory make_logic) {
  if (spawned_by == 0) return;
  // Exits at once if the parent is gone by now. The inner thread counts are
  // already in this process's environment.
  prepare_worker_process(std::exchange(spawned_by, 0), 0);
  void* page =
      ::mmap(nullptr, sizeof(WorkerSlot), PROT_READ | PROT_WRITE, MAP_SHARED, worker_slot_fd, 0);
  ::close(worker_slot_fd);
  if (page == MAP_FAILED)
    worker_fails("cannot map the status page: " + std::string(std::strerror(errno)));
  try {
    std::uint32_t magic = 0;
    std::uint64_t size = 0;
    if (!receive_all(worker_socket_fd, &magic, sizeof magic) || magic != hello_magic ||
        !receive_all(worker_socket_fd, &size, sizeof size) || size > (std::uint64_t{1} << 30)) {
      worker_fails("no valid start-up message from the parent");
    }
    Buffer hello(static_cast<std::size_t>(size));
    if (!receive_all(worker_socket_fd, hello.data(), hello.size())) {
      worker_fails("the start-up message from the parent was cut short");
    }
    Reader in(hello);
    std::string identity(static_cast<std::size_t>(in.get<std::uint64_t>()), '\0');
    in.read(identity.data(), identity.size());
    check_executable_identity(identity);
    WorkerContext context;
    context.slot = static_cast<WorkerSlot*>(page);
    context.task_timeout = in.get<std::uint8_t>() != 0;
    Buffer setup(static_cast<std::size_t>(in.get<std::uint64_t>()));
    in.read(setup.data(), setup.size());
    Reader setup_reader(setup);
    std::unique_ptr<WorkerLogic> logic = make_logic(setup_reader);
    run_worker(worker_socket_fd, *logic, context);
  } catch (const std::exception& e) {
    worker_fails(e.what());
  }
  worker_fails("unknown error");
}

}  // namespace procpool::detail
