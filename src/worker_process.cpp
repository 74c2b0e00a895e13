#include "worker_process.hpp"

#include <fcntl.h>
#include <pthread.h>
#include <sys/mman.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>

#include <atomic>
#include <cerrno>
#include <condition_variable>
#include <csignal>
#include <cstdio>
#include <cstring>
#include <mutex>
#include <string>
#include <system_error>
#include <thread>
#include <utility>
#include <vector>

#include "arena_cache.hpp"
#include "channel.hpp"
#include "fork_server.hpp"
#include "procpool/detail/memory_file.hpp"
#include "procpool/errors.hpp"
#include "spawn.hpp"
#include "worker.hpp"

namespace procpool::detail {
namespace {

constexpr int socket_buffer_bytes = 1 << 20;

[[noreturn]] void throw_errno(const char* what, int error = errno) {
  throw std::system_error(error, std::generic_category(), std::string("procpool: ") + what);
}

/// The parent-side sockets of every engine in this process. A new worker closes
/// all of them, so that it never keeps another engine's worker from seeing EOF.
class ParentSockets {
 public:
  static ParentSockets& instance() {
    static auto* sockets = new ParentSockets();  // never destroyed: engines may outlive statics
    return *sockets;
  }
  void add(int fd) {
    std::lock_guard lock(mutex_);
    fds_.push_back(fd);
  }
  void remove(int fd) {
    std::lock_guard lock(mutex_);
    std::erase(fds_, fd);
  }
  std::vector<int> snapshot() {
    std::lock_guard lock(mutex_);
    return fds_;
  }

 private:
  ParentSockets() {
    // A child owns none of these (a worker closes them at once), and its own
    // descriptors may come to have their numbers: a Pool made in a worker
    // listed them still, and its workers closed their own socket with them
    // as they started (the nested mpi::Pool in mpi_calls). Nor may a child
    // inherit the lock held.
    ::pthread_atfork([] { instance().mutex_.lock(); }, [] { instance().mutex_.unlock(); },
                     [] { instance().forget_after_fork(); });
  }
  void forget_after_fork() {
    fds_.clear();
    mutex_.unlock();
  }

  std::mutex mutex_;
  std::vector<int> fds_;
};

/// Made as the library loads, not at first use: its constructor registers
/// fork handlers, and pthread_atfork waits for a fork in progress. A thread
/// making it then while another forked a worker left the worker a guard
/// of this static that never opens: it hung the first time it needed it
/// (four threads making their first map at once: 12 of 100 runs).
[[maybe_unused]] const ParentSockets& parent_sockets_made_as_the_library_loads =
    ParentSockets::instance();

/// See hold_child_births(). Made on first use, not as the library loads: a
/// spawned worker serves its pool from a static initialiser of another file
/// (enter_spawned_pool_worker), and a task there may make a pool of its own.
class ChildBirths {
 public:
  static std::mutex& mutex() {
    [[maybe_unused]] static const int renewed_in_children =
        ::pthread_atfork(nullptr, nullptr, [] { current() = new std::mutex; });
    return *current();
  }

 private:
  /// A child may be forked while another thread holds it (or this one: its
  /// owner is then a thread of the parent's): the child gets a new one.
  /// (The old one is left, never destroyed: a lock may still refer to it.)
  static std::mutex*& current() {
    static std::mutex* made = new std::mutex;
    return made;
  }
};

/// Its fork handler is registered as the library loads, not at first use:
/// pthread_atfork waits for a fork in progress, and a thread registering it
/// then, inside the static's guard, while another forked a worker left the
/// worker a guard that never opens (see ParentSockets).
[[maybe_unused]] const std::mutex& child_births_made_as_the_library_loads = ChildBirths::mutex();

/// Waits for a worker that has closed its socket (or was killed); one that
/// lingers is killed.
WorkerExit reap(pid_t pid) {
  int status = 0;
  for (int attempt = 0; attempt < 500; ++attempt) {
    const pid_t r = ::waitpid(pid, &status, WNOHANG);
    if (r == pid) break;
    if (r < 0 && errno != EINTR) return {};
    if (attempt == 499) {
      ::kill(pid, SIGKILL);
      while (::waitpid(pid, &status, 0) < 0 && errno == EINTR) {
      }
      break;
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(1));
  }
  WorkerExit exit;
  if (WIFSIGNALED(status)) {
    exit.signal = WTERMSIG(status);
  } else if (WIFEXITED(status)) {
    exit.code = WEXITSTATUS(status);
  }
  return exit;
}

/// Waits as long as it takes: for a worker that finishes what it was sent.
WorkerExit wait_blocking(pid_t pid) {
  int status = 0;
  while (::waitpid(pid, &status, 0) < 0 && errno == EINTR) {
  }
  WorkerExit exit;
  if (WIFSIGNALED(status)) exit.signal = WTERMSIG(status);
  if (WIFEXITED(status)) exit.code = WEXITSTATUS(status);
  return exit;
}

/// A thread that lives as long as the process and does nothing but fork (or
/// spawn): PR_SET_PDEATHSIG fires when the forking *thread* ends, so workers
/// of a long-lived pool must not be forked by a thread that may end first.
///
/// A child process inherits the object but not its thread (only the thread
/// that forked lives on there), and maybe its mutex held: a Pool made in a
/// worker starts a forker of its own. (Reusing the inherited one hung a
/// nested pool's first restart of a crashed worker: PeersNested.*.)
class ForkerThread {
 public:
  static ForkerThread& instance() {
    std::lock_guard lock(creation);
    // Never destroyed: it must outlive every pool. One inherited from the
    // parent process is kept (as `inherited_`), not used.
    if (current == nullptr || current->owner_ != ::getpid()) current = new ForkerThread(current);
    return *current;
  }
  /// No fork while a forker is being made: a child never inherits
  /// `creation` held. (Registered as the library loads, below.)
  static int guard_creation_against_forks() {
    return ::pthread_atfork([] { creation.lock(); }, [] { creation.unlock(); },
                            [] { creation.unlock(); });
  }
  /// Runs `start` (which creates a child process) on this thread.
  pid_t run(const std::function<pid_t()>& start) {
    std::unique_lock lock(mutex_);
    cv_.wait(lock, [&] { return job_ == nullptr; });
    job_ = &start;
    done_ = false;
    cv_.notify_all();
    cv_.wait(lock, [&] { return done_; });
    job_ = nullptr;
    cv_.notify_all();
    return result_;
  }

 private:
  explicit ForkerThread(ForkerThread* inherited) : inherited_(inherited) {
    std::thread([this] { serve(); }).detach();
  }
  static inline std::mutex creation;
  static inline ForkerThread* current = nullptr;
  void serve() {
    std::unique_lock lock(mutex_);
    for (;;) {
      cv_.wait(lock, [&] { return job_ != nullptr && !done_; });
      result_ = (*job_)();
      done_ = true;
      cv_.notify_all();
    }
  }
  std::mutex mutex_;
  std::condition_variable cv_;
  const std::function<pid_t()>* job_ = nullptr;
  bool done_ = false;
  pid_t result_ = -1;
  const pid_t owner_ = ::getpid();                  // the process its thread runs in
  [[maybe_unused]] ForkerThread* const inherited_;  // still reachable: not a leak to a checker
};

/// Before any thread can fork: a child must not inherit a registration half
/// done either (a static's guard).
[[maybe_unused]] const int forker_creation_guarded_against_forks =
    ForkerThread::guard_creation_against_forks();

/// The main thread ends only with the process (unless it calls pthread_exit),
/// so it may fork long-lived workers itself: the hand-off to the helper thread
/// costs two thread wake-ups, ~0.1 ms per fork on this kind of VM.
bool on_main_thread() {
  return ::gettid() == ::getpid();
}

/// A descriptor closed when it goes out of scope, unless released.
class OwnedFd {
 public:
  explicit OwnedFd(int fd) noexcept : fd_(fd) {}
  OwnedFd(OwnedFd&& other) noexcept : fd_(other.release()) {}
  ~OwnedFd() {
    if (fd_ >= 0) ::close(fd_);
  }
  OwnedFd(const OwnedFd&) = delete;
  OwnedFd& operator=(const OwnedFd&) = delete;
  int get() const noexcept { return fd_; }
  int release() noexcept { return std::exchange(fd_, -1); }

 private:
  int fd_;
};

/// The status page a local worker shares with the parent (see WorkerSlot).
WorkerSlot* map_slot() {
  void* page = ::mmap(nullptr, sizeof(WorkerSlot), PROT_READ | PROT_WRITE,
                      MAP_SHARED | MAP_ANONYMOUS, -1, 0);
  if (page == MAP_FAILED) throw_errno("cannot map a worker's shared status page");
  return new (page) WorkerSlot();
}

void unmap_slot(WorkerSlot* slot) noexcept {
  ::munmap(slot, sizeof(WorkerSlot));
}

/// The descriptors of reply files on their way back to a worker (leased,
/// or waiting in a SpareReturns): a child forked meanwhile (a new worker, a
/// fork server) closes them, or their pages would outlive the worker they
/// are for, held by a process that never uses them.
class SpareDescriptors {
 public:
  static SpareDescriptors& instance() {
    static SpareDescriptors* const made = [] {
      auto* made_now = new SpareDescriptors;  // never destroyed: children use it after exit
      ::pthread_atfork([] { instance().mutex_.lock(); }, [] { instance().mutex_.unlock(); },
                       [] { instance().forget_in_child(); });
      return made_now;
    }();
    return *made;
  }
  /// False (the descriptor is not listed) when there is no memory to list it.
  bool add(int fd) noexcept {
    std::lock_guard lock(mutex_);
    try {
      fds_.push_back(fd);
      return true;
    } catch (...) {
      return false;
    }
  }
  void remove(int fd) noexcept {
    std::lock_guard lock(mutex_);
    std::erase(fds_, fd);
  }
  /// What the process's SpareReturns hold together (see SpareReturns).
  std::atomic<std::size_t> bytes_waiting{0};

 private:
  void forget_in_child() noexcept {
    for (int fd : fds_)
      ::close(fd);
    fds_.clear();
    bytes_waiting.store(0, std::memory_order_relaxed);
    mutex_.unlock();  // taken by the prepare handler, in the thread that forked
  }
  std::mutex mutex_;
  std::vector<int> fds_;
};

/// Made as the library loads, not at first use: its constructor registers
/// fork handlers, and pthread_atfork waits for a fork in progress. A thread
/// making it then while another forked a worker left the worker a guard
/// of this static that never opens: it hung the first time it needed it
/// (four threads making their first map at once: 12 of 100 runs).
[[maybe_unused]] const SpareDescriptors& spare_descriptors_made_as_the_library_loads =
    SpareDescriptors::instance();

/// Memory files of a worker's large replies that the parent has read (their
/// leases let go, on whatever thread decoded them), waiting to go back to
/// that worker as spares (FrameKind::spare) with the next chunk it is sent.
/// What waits is bounded, for a worker (what it would keep) and for all of
/// this process's workers together (a pool idle after a call holds them
/// until its next one): a file past either bound is closed at once, as it
/// is once the worker has ended.
class SpareReturns {
 public:
  /// Takes over `fd`, listed in SpareDescriptors.
  void give(int fd) noexcept {
    const std::size_t size = memory_file_size(fd);
    std::lock_guard lock(mutex_);
    if (closed_ || size == 0 || bytes_ + size > spare_files_limit || !reserve_in_process(size)) {
      forget(fd);
      return;
    }
    try {
      fds_.push_back(fd);
    } catch (...) {  // no memory for the list: the file is only a spare
      release_in_process(size);
      forget(fd);
      return;
    }
    bytes_ += size;
  }
  /// What waits, no longer listed in SpareDescriptors: the caller sends it.
  std::vector<int> take() {
    std::lock_guard lock(mutex_);
    release_in_process(std::exchange(bytes_, 0));
    for (int fd : fds_)
      SpareDescriptors::instance().remove(fd);
    return std::exchange(fds_, {});
  }
  void close() noexcept {
    std::lock_guard lock(mutex_);
    closed_ = true;
    for (int fd : fds_)
      forget(fd);
    fds_.clear();
    release_in_process(std::exchange(bytes_, 0));
  }
  ~SpareReturns() { close(); }

  /// Closes a listed descriptor.
  static void forget(int fd) noexcept {
    SpareDescriptors::instance().remove(fd);
    ::close(fd);
  }

 private:
  static constexpr std::size_t process_limit = std::size_t{1} << 30;
  static bool reserve_in_process(std::size_t size) noexcept {
    std::atomic<std::size_t>& waiting = SpareDescriptors::instance().bytes_waiting;
    std::size_t now = waiting.load(std::memory_order_relaxed);
    do {
      if (now + size > process_limit) return false;
    } while (!waiting.compare_exchange_weak(now, now + size, std::memory_order_relaxed));
    return true;
  }
  static void release_in_process(std::size_t size) noexcept {
    SpareDescriptors::instance().bytes_waiting.fetch_sub(size, std::memory_order_relaxed);
  }

  std::mutex mutex_;
  std::vector<int> fds_;
  std::size_t bytes_ = 0;
  bool closed_ = false;
};

/// One local worker process and everything the parent holds for it.
class WorkerProcess final : public WorkerLink {
 public:
  WorkerProcess(pid_t pid, int fd, WorkerSlot* slot, std::shared_ptr<ReplyArena> arena,
                std::shared_ptr<ReplyArena> input_arena)
      : pid_(pid),
        channel_(fd),
        slot_(slot),
        arena_(std::move(arena)),
        input_arena_(std::move(input_arena)) {
    ::fcntl(fd, F_SETFL, O_NONBLOCK);  // no other status flag is ever set on these sockets
    ParentSockets::instance().add(fd);
  }
  ~WorkerProcess() override {
    if (ended_) return;
    begin_end(Ending::killed);
    [[maybe_unused]] const WorkerExit exit = finish_end();
  }
  WorkerProcess(const WorkerProcess&) = delete;
  WorkerProcess& operator=(const WorkerProcess&) = delete;

  pid_t pid() const noexcept override { return pid_; }

  void send_setup(std::uint64_t call, const Buffer& setup) override {
    channel_.queue_frame(FrameKind::setup, call, 0, 0, setup);
  }
  void send_end_call(std::uint64_t call) override {
    channel_.queue_frame(FrameKind::end_call, call, 0, 0, Buffer{});
  }
  void send_chunk(const Chunk& chunk, const Buffer* own_setup) override {
    give_back_spares();
    auto flags = static_cast<std::uint16_t>(chunk.check_link ? flag_check_link : 0);
    if (own_setup) {
      send_setup(chunk.call, *own_setup);
      flags = static_cast<std::uint16_t>(flags | flag_end_call_after);
    }
    // SharedBuffer inputs' files first: an input file, if any, comes last.
    std::vector<int> files = duplicate_files(chunk.files.get());
    for (std::size_t from = 0; from < files.size(); from += max_fds_per_message) {
      const auto to = std::min(files.size(), from + max_fds_per_message);
      channel_.queue_attachment(std::vector<int>(files.begin() + static_cast<std::ptrdiff_t>(from),
                                                 files.begin() + static_cast<std::ptrdiff_t>(to)),
                                0);
    }
    if (!send_in_memory_file(chunk, flags) && !send_through_arena(chunk, flags)) {
      channel_.queue_frame(FrameKind::task, chunk.call, chunk.first, chunk.count, chunk.payload,
                           flags);
    }
  }
  bool ready_for(const Chunk& chunk) const noexcept override {
    // Large inputs wait for a free region of the worker's input arena (it
    // frees one before it replies) rather than taking two more copies
    // through the socket and growing the outbox.
    return !ReplyArena::fits(chunk.payload.size()) || !input_arena_ ||
           chunk.payload.shared_fd() >= 0 || input_arena_->has_free_region();
  }

  int wait_fd() const noexcept override { return channel_.fd(); }
  bool wants_write() const noexcept override { return channel_.has_unsent(); }
  LinkState flush() override {
    return channel_.flush() ? LinkState{} : LinkState{LinkState::lost, nullptr};
  }
  LinkState receive(ReplySink& sink) override;
  bool mid_message() const noexcept override { return channel_.mid_message(); }

  std::optional<RunningTaskRef> running_task() const noexcept override {
    const std::uint32_t running = slot_->running.load(std::memory_order_acquire);
    if (running == 0) return std::nullopt;
    return RunningTaskRef{
        slot_->call.load(std::memory_order_relaxed), slot_->index.load(std::memory_order_relaxed),
        slot_->started_ns.load(std::memory_order_relaxed), running == WorkerSlot::running_setup};
  }
  WorkerCounters counters() const noexcept override { return slot_->counters(); }

  void begin_end(Ending how) noexcept override {
    how_ = how;
    if (how == Ending::killed) ::kill(pid_, SIGKILL);
    if (how == Ending::finished) channel_.send_rest_and_end();
  }

  WorkerExit finish_end() noexcept override {
    ended_ = true;
    spares_->close();
    if (how_ == Ending::finished) channel_.drain(pid_);
    ParentSockets::instance().remove(channel_.fd());
    ::close(channel_.fd());
    WorkerExit exit = how_ == Ending::lost ? reap(pid_) : wait_blocking(pid_);
    // The process is gone, so its slot no longer changes: it names the task
    // it was running, and its counters are final.
    exit.running = running_task();
    exit.closed_link_fd = slot_->link_closed.load(std::memory_order_relaxed) - 1;
    if (exit.closed_link_fd >= 0 && !exit.running &&
        slot_->link_closed_in_chunk.load(std::memory_order_relaxed) != 0) {
      exit.closed_link_near = RunningTaskRef{slot_->call.load(std::memory_order_relaxed),
                                             slot_->index.load(std::memory_order_relaxed)};
    }
    exit.ready = slot_->ready.load(std::memory_order_acquire) != 0;
    exit.counted = counters();
    unmap_slot(slot_);
    return exit;
  }

 private:
  /// Hands a chunk whose inputs were serialised into a memory file (large
  /// ones, see Buffer::share_when_large) to the worker as that file: no copy.
  /// The chunk keeps its own descriptor, should it have to be sent again.
  bool send_in_memory_file(const Chunk& chunk, std::uint16_t flags) {
    if (chunk.payload.shared_fd() < 0) return false;
    const int fd = ::fcntl(chunk.payload.shared_fd(), F_DUPFD_CLOEXEC, 0);
    if (fd < 0) return false;  // out of descriptors: the socket still works
    channel_.queue_attachment({fd}, 0);
    if (chunk.source) flags = static_cast<std::uint16_t>(flags | flag_file_handed_over);
    channel_.queue_header(FrameKind::task, chunk.call, chunk.first, chunk.count,
                          chunk.payload.size(), static_cast<std::uint16_t>(flags | flag_in_file));
    return true;
  }

  /// Copies a large chunk's inputs into a free region of the worker's input arena.
  bool send_through_arena(const Chunk& chunk, std::uint16_t flags) {
    const std::size_t size = chunk.payload.size();
    if (!ReplyArena::fits(size) || !input_arena_) return false;
    const int claimed = input_arena_->claim();
    if (claimed < 0) return false;
    const auto region = static_cast<std::size_t>(claimed);
    std::memcpy(input_arena_->data(region), chunk.payload.data(), size);
    input_arena_->note_written(region, size);
    channel_.queue_header(FrameKind::task, chunk.call, chunk.first, chunk.count, size,
                          static_cast<std::uint16_t>(flags | arena_flags(region)));
    return true;
  }

  /// The outcomes of a reply, wherever they travelled.
  ChunkDone outcomes(const FrameHeader& header, const std::byte* payload, bool whole_inbox,
                     ParentChannel::Attached attached) {
    ChunkDone done;
    done.first = header.first;
    done.count = header.count;
    done.dense = (header.flags & flag_dense) != 0;
    if (header.flags & flag_in_file) {
      // The payload's file is the last one attached (the channel checked there is one).
      const int fd = attached.fds.back();
      attached.fds.pop_back();
      lease_from_file(fd, attached.file_offset, header.size, done);
    }
    if (!attached.fds.empty())
      done.files = std::make_shared<AttachedFiles>(std::move(attached.fds));
    if (header.flags & flag_in_file) {
      // done.external is set
    } else if (header.flags & flag_in_arena) {
      lease_from_arena(header, done);
    } else if (whole_inbox) {
      done.payload = channel_.take_inbox();
      done.offset = sizeof header;
    } else {
      done.payload.append(payload, header.size);
    }
    return done;
  }

  /// Sends the worker the memory files of its replies read since the last chunk.
  void give_back_spares() {
    std::vector<int> fds = spares_->take();
    for (std::size_t from = 0; from < fds.size(); from += max_fds_per_message) {
      const auto to = std::min(fds.size(), from + max_fds_per_message);
      channel_.queue_spares(std::vector<int>(fds.begin() + static_cast<std::ptrdiff_t>(from),
                                             fds.begin() + static_cast<std::ptrdiff_t>(to)));
    }
  }

  /// Whether the memory file of a reply goes back to the worker once read
  /// (see keep_spare_memory_file): one it would keep.
  static bool worth_giving_back(int fd) noexcept {
    const std::size_t size = memory_file_size(fd);
    return size != 0 && size <= spare_files_limit;
  }

  /// Decoded straight from the worker's memory file, which is this reply's
  /// alone. One small enough goes back to the worker once read, to write a
  /// later reply in; a larger one's pages are given back as decoding copies
  /// them out, and the rest when the lease goes, so that a result of N
  /// bytes never costs the caller 2N.
  void lease_from_file(int fd, std::uint64_t offset, std::uint64_t size, ChunkDone& done) {
    const std::size_t mapped = static_cast<std::size_t>(offset + size);
    std::byte* at = nullptr;
    try {
      at = mapped != 0 ? map_memory_file(fd, mapped, true) : nullptr;
    } catch (const std::exception& e) {
      done.failure = std::make_exception_ptr(
          Error("procpool: the reply of worker " + std::to_string(pid_) + " (" +
                std::to_string(size) + " bytes) could not be mapped: " + e.what() +
                "; free some memory or return smaller results"));
    }
    const bool spare =
        !done.failure && worth_giving_back(fd) && SpareDescriptors::instance().add(fd);
    if (!spare) ::close(fd);  // the mapping keeps the file
    if (done.failure) return;
#ifdef MADV_POPULATE_READ
    if (at) ::madvise(at, mapped, MADV_POPULATE_READ);  // one call, not a fault per 4 KiB
#endif
    done.external = at + offset;
    done.external_size = static_cast<std::size_t>(size);
    done.give_back = !spare;
    if (!spare) {
      done.lease = std::shared_ptr<void>(at, [mapped](void* p) { unmap_memory_file(p, mapped); });
      return;
    }
    // Should the lease's own allocation fail, shared_ptr calls this at once.
    done.lease = std::shared_ptr<void>(at, [mapped, fd, returns = spares_](void* p) {
      unmap_memory_file(p, mapped);
      returns->give(fd);
    });
  }

  /// Decoded straight from the arena; handing the lease back frees the region for the next reply.
  void lease_from_arena(const FrameHeader& header, ChunkDone& done) {
    std::shared_ptr<ReplyArena> arena = arena_;
    const std::size_t region = arena_region(header.flags);
    done.external = arena->data(region);
    done.external_size = header.size;
#ifdef MADV_POPULATE_READ
    // Map the reply's pages in one call instead of one fault per 4 KiB (a hint; Linux >= 5.14).
    // Once mapped they stay mapped here, so only a reply larger than any before needs it.
    if (header.size > arena_mapped_[region]) {
      const auto page = static_cast<std::uintptr_t>(::sysconf(_SC_PAGESIZE));
      const auto begin = reinterpret_cast<std::uintptr_t>(done.external) & ~(page - 1);
      ::madvise(reinterpret_cast<void*>(begin),
                reinterpret_cast<std::uintptr_t>(done.external) + header.size - begin,
                MADV_POPULATE_READ);
      arena_mapped_[region] = header.size;
    }
#endif
    done.lease =
        std::shared_ptr<void>(arena.get(), [arena, region](void*) { arena->release(region); });
  }

  /// Memory files it sent (large results, SharedBuffers) did not fit: the
  /// fault is this process's limit, not the worker's message.
  static std::string descriptors_lost_message() {
    rlimit limit{};
    std::string now = "at its limit of open files";
    if (::getrlimit(RLIMIT_NOFILE, &limit) == 0 && limit.rlim_cur != RLIM_INFINITY)
      now += " (ulimit -n: " + std::to_string(limit.rlim_cur) + ")";
    return " sent memory files (large results or SharedBuffers) that this process could not "
           "receive: it is " +
           now +
           "; the worker was replaced. Raise the limit (ulimit -n), or keep fewer files open "
           "while large results arrive";
  }

  LinkState corrupt(const std::string& what) const {
    return LinkState{
        LinkState::corrupt,
        std::make_exception_ptr(ProtocolError("procpool: worker " + std::to_string(pid_) + what))};
  }

  pid_t pid_;
  ParentChannel channel_;
  WorkerSlot* slot_;                         // shared with the worker: the task it is running
  std::shared_ptr<ReplyArena> arena_;        // shared with the worker: its large replies
  std::shared_ptr<ReplyArena> input_arena_;  // and large input chunks, the other way
  std::size_t arena_mapped_[ReplyArena::regions] = {};  // bytes of each region mapped here
  Ending how_ = Ending::killed;
  bool ended_ = false;
  std::shared_ptr<SpareReturns> spares_ = std::make_shared<SpareReturns>();
};

LinkState WorkerProcess::receive(ReplySink& sink) {
  const ParentChannel::Received received = channel_.receive(
      arena_ != nullptr,  // a worker without a reply arena (spawned) cannot reply through one
      [&](const FrameHeader& header, const std::byte* payload, bool whole_inbox) {
        return sink.take(Reply{header.call, header.nanos, header.slowest_index,
                               header.slowest_nanos,
                               outcomes(header, payload, whole_inbox, channel_.take_attached())});
      });
  switch (received) {
    case ParentChannel::Received::drained:
    case ParentChannel::Received::stopped:
      return {};
    case ParentChannel::Received::bad_header:
      if (channel_.descriptors_lost()) return corrupt(descriptors_lost_message());
      return corrupt(
          " sent a corrupt message (bad magic, kind or length); the worker was replaced. Does "
          "the task write to file descriptors it does not own?");
    case ParentChannel::Received::closed:
      break;
  }
  if (channel_.mid_message() && slot_->running.load(std::memory_order_acquire) == 0) {
    // It died between tasks in the middle of a reply: the reply is what is wrong.
    return corrupt(" ended in the middle of a message (truncated reply); the worker was replaced");
  }
  return LinkState{LinkState::lost, nullptr};  // EOF or reset: the worker died
}

/// A socket pair for a new worker: [0] the parent's end, [1] the worker's.
std::pair<OwnedFd, OwnedFd> worker_sockets() {
  int sv[2];
  if (::socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, sv) != 0) {
    throw_errno("cannot create a socket pair for a worker");
  }
  for (int& fd : sv) {
    fd = above_standard_streams(fd);
    ::setsockopt(fd, SOL_SOCKET, SO_SNDBUF, &socket_buffer_bytes, sizeof socket_buffer_bytes);
    ::setsockopt(fd, SOL_SOCKET, SO_RCVBUF, &socket_buffer_bytes, sizeof socket_buffer_bytes);
  }
  return {OwnedFd(sv[0]), OwnedFd(sv[1])};
}

/// A worker that a fork server cloned and was killed before it could name:
/// the pool's child all the same (CLONE_PARENT), known only by the pid the
/// kernel wrote to its status page. Left alone, it would end as a zombie.
void reap_unannounced_worker(const WorkerSlot& slot) noexcept {
  const pid_t unannounced = slot.cloned_pid.load(std::memory_order_acquire);
  if (unannounced <= 0) return;
  ::kill(unannounced, SIGKILL);
  while (::waitpid(unannounced, nullptr, 0) < 0 && errno == EINTR) {
  }
}

/// A worker forked by the pool's fork server: it shares no mapping made here
/// after the server started, so its status page is a memory file and it has
/// no arenas (large payloads travel as memory files or on the socket).

std::unique_ptr<WorkerLink> fork_server_worker(const WorkerBirth& birth) {
  // A server killed from outside is started again; one killed each time,
  // before it forks a worker, is a storm this does not outlast.
  for (int attempt = 0; attempt < 5; ++attempt) {
    // Before the descriptors it must not inherit.
    if (!birth.fork_server->ensure_running()) continue;
    const auto born_alone = hold_child_births();
    auto [parent_end, child_end] = worker_sockets();
    const SlotFile slot = create_slot_file();
    const OwnedFd slot_file(slot.fd);
    pid_t pid = 0;
    try {
      pid = birth.fork_server->start_worker(child_end.release(), slot_file.get());
    } catch (...) {
      unmap_slot(slot.slot);
      throw;
    }
    if (pid > 0) {
      return std::make_unique<WorkerProcess>(pid, parent_end.release(), slot.slot, nullptr,
                                             nullptr);
    }
    reap_unannounced_worker(*slot.slot);
    unmap_slot(slot.slot);
  }
  throw Error(
      "procpool: the pool's fork server ended 5 times in a row, each time before it could "
      "fork a worker (while it ran the pool's initializer again, or after); find what kills "
      "it (the OOM killer, a kill storm)");
}

std::unique_ptr<WorkerLink> spawn_worker(const WorkerBirth& birth) {
  const auto born_alone = hold_child_births();
  auto [parent_end, child_end] = worker_sockets();
  // No arenas: everything travels through the socket.
  const SpawnedWorker born =
      spawn_worker_process(parent_end.get(), child_end.release(),
                           SpawnRequest{birth.parent, birth.inner_threads, birth.task_timeout,
                                        birth.spawn_logic, birth.from_helper_thread});
  return std::make_unique<WorkerProcess>(born.pid, parent_end.release(), born.slot, nullptr,
                                         nullptr);
}

std::unique_ptr<WorkerLink> fork_worker(const WorkerBirth& birth) {
  const auto born_alone = hold_child_births();
  // Named, not a structured binding: the child's lambda captures them, which
  // clang 14 refuses for bindings.
  std::pair<OwnedFd, OwnedFd> sockets = worker_sockets();
  OwnedFd& parent_end = sockets.first;
  OwnedFd& child_end = sockets.second;
  WorkerSlot* slot = map_slot();
  WorkerArenas arenas = map_worker_arenas();  // none under a tight ulimit -v: the socket serves
  std::shared_ptr<ReplyArena> arena = std::move(arenas.replies);
  std::shared_ptr<ReplyArena> input_arena = std::move(arenas.inputs);
  const std::vector<int> to_close = ParentSockets::instance().snapshot();
  const WorkerContext context{slot, arena.get(), input_arena.get(), birth.task_timeout};
  auto in_child = [&] {
    ::close(parent_end.get());
    for (int fd : to_close)
      ::close(fd);
    prepare_worker_process(birth.parent, birth.inner_threads);
    try {
      std::unique_ptr<WorkerLogic> logic = (*birth.make_logic)();
      run_worker(child_end.get(), *logic, context);
    } catch (const std::exception& e) {
      std::fprintf(stderr, "procpool worker %d could not start: %s\n", ::getpid(), e.what());
    } catch (...) {
      std::fprintf(stderr, "procpool worker %d could not start\n", ::getpid());
    }
    std::fflush(stderr);
    ::_exit(70);
  };
  skip_parent_exit_handlers_in_workers();
  const pid_t pid = start_child_process(birth.from_helper_thread, [&]() -> pid_t {
    const pid_t child = ::fork();
    if (child == 0) in_child();
    return child < 0 ? -errno : child;
  });
  ::close(child_end.release());
  if (pid < 0) {
    unmap_slot(slot);
    throw_errno("cannot fork a worker process", -pid);
  }
  return std::make_unique<WorkerProcess>(pid, parent_end.release(), slot, std::move(arena),
                                         std::move(input_arena));
}

}  // namespace

pid_t start_child_process(bool from_helper_thread, const std::function<pid_t()>& start) {
  return from_helper_thread && !on_main_thread() ? ForkerThread::instance().run(start) : start();
}

std::unique_ptr<WorkerLink> start_worker_process(const WorkerBirth& birth) {
  switch (birth.start) {
    case Start::spawn:
      return spawn_worker(birth);
    case Start::fork_server:
      return fork_server_worker(birth);
    default:
      return fork_worker(birth);
  }
}

std::vector<int> parent_sockets() {
  return ParentSockets::instance().snapshot();
}

void add_parent_socket(int fd) {
  ParentSockets::instance().add(fd);
}

void remove_parent_socket(int fd) {
  ParentSockets::instance().remove(fd);
}

std::unique_lock<std::mutex> hold_child_births() {
  return std::unique_lock(ChildBirths::mutex());
}

}  // namespace procpool::detail
