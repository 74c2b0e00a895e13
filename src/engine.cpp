#include "procpool/detail/engine.hpp"

#include <fcntl.h>
#include <poll.h>
#include <pthread.h>
#include <sys/eventfd.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>

#include <sys/mman.h>
#include <algorithm>
#include <cerrno>
#include <condition_variable>
#include <csignal>
#include <cstdio>
#include <cstring>
#include <limits>
#include <system_error>
#include <thread>

#include "procpool/cpu_count.hpp"
#include "procpool/errors.hpp"
#include "procpool/insights.hpp"
#include "spawn.hpp"
#include "worker.hpp"

namespace procpool::detail {
namespace {

/// The caller's resident anonymous memory (RssAnon in /proc/self/status):
/// what fork copies page-table entries for.
std::uint64_t caller_anonymous_kb() {
  std::FILE* status = std::fopen("/proc/self/status", "re");
  if (!status) return 0;
  char line[256];
  unsigned long long kb = 0;
  while (std::fgets(line, sizeof line, status)) {
    if (std::sscanf(line, "RssAnon: %llu kB", &kb) == 1) break;
  }
  std::fclose(status);
  return kb;
}

constexpr std::size_t receive_size = 64 * 1024;  // large replies come through the arena
constexpr int socket_buffer_bytes = 1 << 20;
constexpr double pipeline_target_nanos = 5e5;  // keep ~0.5 ms of work queued per worker
constexpr std::size_t min_pipeline = 2;
constexpr std::size_t max_pipeline = 64;

[[noreturn]] void throw_errno(const char* what) {
  throw std::system_error(errno, std::generic_category(), std::string("procpool: ") + what);
}

/// The parent-side sockets of every engine in this process. A new worker closes
/// all of them, so that it never keeps another engine's worker from seeing EOF.
class ParentSockets {
 public:
  static ParentSockets& instance() {
    static ParentSockets sockets;
    return sockets;
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
  std::mutex mutex_;
  std::vector<int> fds_;
};

struct ExitStatus {
  int signal = 0;
  int code = 0;
};

/// Waits for a worker that has closed its socket; one that lingers is killed.
ExitStatus reap(pid_t pid) {
  int status = 0;
  for (int attempt = 0; attempt < 500; ++attempt) {
    pid_t r = ::waitpid(pid, &status, WNOHANG);
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
  if (WIFSIGNALED(status)) return {WTERMSIG(status), 0};
  return {0, WIFEXITED(status) ? WEXITSTATUS(status) : 0};
}

void wait_blocking(pid_t pid) {
  int status = 0;
  while (::waitpid(pid, &status, 0) < 0 && errno == EINTR) {
  }
}

/// Forks and runs `in_child` in the child; returns the pid, or -errno.
pid_t fork_here(const std::function<void()>& in_child) {
  const pid_t pid = ::fork();
  if (pid == 0) {
    in_child();
    ::_exit(70);
  }
  return pid < 0 ? -errno : pid;
}

/// A thread that lives as long as the process and does nothing but fork (or
/// spawn): PR_SET_PDEATHSIG fires when the forking *thread* ends, so workers
/// of a long-lived pool must not be forked by a thread that may end first.
class ForkerThread {
 public:
  static ForkerThread& instance() {
    static auto* forker = new ForkerThread();  // never destroyed: it must outlive every pool
    return *forker;
  }
  pid_t fork(const std::function<void()>& in_child) {
    return run([&] { return fork_here(in_child); });
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
  ForkerThread() {
    std::thread([this] { serve(); }).detach();
  }
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
};

pid_t fork_on_helper_thread(const std::function<void()>& in_child) {
  return ForkerThread::instance().fork(in_child);
}

/// The main thread ends only with the process (unless it calls pthread_exit),
/// so it may fork long-lived workers itself: the hand-off to the helper thread
/// costs two thread wake-ups, ~0.1 ms per fork on this kind of VM.
bool on_main_thread() {
  return ::gettid() == ::getpid();
}

}  // namespace

pid_t start_child_process(bool from_helper_thread, const std::function<pid_t()>& start) {
  return from_helper_thread && !on_main_thread() ? ForkerThread::instance().run(start) : start();
}

namespace {

/// Tasks `from` .. `to - 1` (relative to the chunk's first) as a chunk of their own.
Chunk slice(const Chunk& chunk, std::uint64_t from, std::uint64_t to) {
  Chunk part;
  part.call = chunk.call;
  part.first = chunk.first + from;
  part.count = to - from;
  part.attempts = chunk.attempts;
  part.stride = chunk.stride;
  part.tail = chunk.tail;
  if (chunk.stride != 0) {
    part.payload.append(chunk.payload.data() + from * chunk.stride, (to - from) * chunk.stride);
  } else if (!chunk.offsets.empty()) {
    const std::uint64_t begin = chunk.offsets[from];
    const std::uint64_t end = to < chunk.count ? chunk.offsets[to] : chunk.payload.size();
    part.payload.append(chunk.payload.data() + begin, end - begin);
    for (std::uint64_t i = from; i < to; ++i)
      part.offsets.push_back(chunk.offsets[i] - begin);
  }
  return part;
}

/// Arenas of workers that are gone (reaped), kept mapped for the next
/// workers: their pages stay allocated and mapped in this process, so the
/// next Pool or call does not pay a page fault per 4 KiB to fill them again.
class ArenaCache {
 public:
  static ArenaCache& instance() {
    static auto* cache = new ArenaCache();  // never destroyed: arenas may outlive statics
    return *cache;
  }

  ReplyArena* take() {
    std::lock_guard lock(mutex_);
    if (arenas_.empty()) return nullptr;
    ReplyArena* arena = arenas_.back();
    arenas_.pop_back();
    return arena;
  }

  /// Called once no process can write to `arena` any more (its worker was reaped).
  void give(ReplyArena* arena) noexcept {
    // Keep the first MiB of each region warm; give the rest of a large reply's pages back.
    for (std::size_t region = 0; region < ReplyArena::regions; ++region) {
      if (arena->written[region].load(std::memory_order_relaxed) <= kept_per_region) continue;
      ::madvise(arena->data(region) + kept_per_region, ReplyArena::capacity - kept_per_region,
                MADV_REMOVE);
    }
    new (arena) ReplyArena();  // every region free again
    {
      std::lock_guard lock(mutex_);
      if (arenas_.size() < max_arenas) {
        arenas_.push_back(arena);
        return;
      }
    }
    ::munmap(arena, ReplyArena::mapped_bytes);
  }

 private:
  static constexpr std::size_t max_arenas = 8;
  static constexpr std::size_t kept_per_region = std::size_t{1} << 20;

  ArenaCache() {
    arenas_.reserve(max_arenas);
    // A new child must not hand out arenas it shares with this process.
    ::pthread_atfork([] { instance().mutex_.lock(); }, [] { instance().mutex_.unlock(); },
                     [] { instance().forget_after_fork(); });
  }
  void forget_after_fork() {
    for (ReplyArena* arena : arenas_)
      ::munmap(arena, ReplyArena::mapped_bytes);
    arenas_.clear();
    mutex_.unlock();
  }

  std::mutex mutex_;
  std::vector<ReplyArena*> arenas_;
};

/// A worker's arena: shared with it; recycled when the last user lets go.
std::shared_ptr<ReplyArena> map_arena() {
  ReplyArena* arena = ArenaCache::instance().take();
  if (!arena) {
    void* pages = ::mmap(nullptr, ReplyArena::mapped_bytes, PROT_READ | PROT_WRITE,
                         MAP_SHARED | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    if (pages == MAP_FAILED) return nullptr;
    arena = new (pages) ReplyArena();
  }
  return std::shared_ptr<ReplyArena>(arena, [](ReplyArena* a) { ArenaCache::instance().give(a); });
}

std::size_t max_payload_bytes() {
  // No honest message is larger than physical memory; a bigger length is garbage.
  long pages = ::sysconf(_SC_PHYS_PAGES);
  long page = ::sysconf(_SC_PAGESIZE);
  return pages > 0 && page > 0 ? static_cast<std::size_t>(pages) * static_cast<std::size_t>(page)
                               : (std::size_t{1} << 40);
}

}  // namespace

struct Engine::Worker {
  std::uint64_t serial = 0;
  pid_t pid = -1;
  int fd = -1;
  Buffer outbox;
  std::size_t out_pos = 0;
  Buffer inbox;
  std::size_t in_pos = 0;
  std::deque<Chunk> inflight;
  WorkerSlot* slot = nullptr;               // shared with the worker: the task it is running
  std::shared_ptr<ReplyArena> arena;        // shared with the worker: its large replies
  std::shared_ptr<ReplyArena> input_arena;  // and large input chunks, the other way
  std::size_t arena_mapped[ReplyArena::regions] = {};  // bytes of each region mapped here
  std::uint64_t tasks_sent = 0;
  unsigned position = 0;  // which of the `processes` places this worker holds
};

Engine::Engine(EngineConfig config, LogicFactory make_logic)
    : config_(config), make_logic_(std::move(make_logic)), parent_pid_(::getpid()) {
  config_.processes = std::max(1u, config_.processes);
  records_.resize(config_.start == Start::in_process ? 1 : config_.processes);
  if (config_.start == Start::in_process) {
    records_[0].pid = parent_pid_;
    return;
  }
  if (config_.start == Start::spawn && !config_.spawn_logic) {
    throw Error(
        "procpool: Start::spawn works only with procpool::Pool. procpool::map, imap, "
        "imap_unordered and starmap always fork: their function may capture the caller's "
        "memory, which a freshly started process does not have. Use procpool::Pool with "
        "Start::spawn and a function pointer or capture-less lambda, or Start::fork here.");
  }
  try {
    for (unsigned i = 0; i < config_.processes; ++i)
      spawn_worker(i);
  } catch (...) {
    kill_workers();
    throw;
  }
}

Engine::~Engine() {
  if (outstanding() == 0) {
    stop_gracefully();
  } else {
    kill_workers();
  }
  if (wake_fd_ >= 0) ::close(wake_fd_);
}

void Engine::spawn_worker(unsigned position) {
  const std::int64_t started = steady_now_ns();
  start_worker_process(position);
  starting_ns_ += static_cast<std::uint64_t>(steady_now_ns() - started);
}

void Engine::start_worker_process(unsigned position) {
  int sv[2];
  if (::socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, sv) != 0) {
    throw_errno("cannot create a socket pair for a worker");
  }
  for (int fd : sv) {
    ::setsockopt(fd, SOL_SOCKET, SO_SNDBUF, &socket_buffer_bytes, sizeof socket_buffer_bytes);
    ::setsockopt(fd, SOL_SOCKET, SO_RCVBUF, &socket_buffer_bytes, sizeof socket_buffer_bytes);
  }
  if (config_.start == Start::spawn) {
    SpawnedWorker born;
    try {
      born = spawn_worker_process(
          sv[0], sv[1],
          SpawnRequest{parent_pid_, config_.inner_threads, config_.task_timeout.count() > 0,
                       config_.spawn_logic.get(), config_.fork_from_helper_thread});
    } catch (...) {
      ::close(sv[0]);
      throw;
    }
    // No reply arenas yet: everything travels through the socket.
    adopt_worker(position, born.pid, sv[0], born.slot, nullptr, nullptr);
    return;
  }
  void* page = ::mmap(nullptr, sizeof(WorkerSlot), PROT_READ | PROT_WRITE,
                      MAP_SHARED | MAP_ANONYMOUS, -1, 0);
  if (page == MAP_FAILED) {
    ::close(sv[0]);
    ::close(sv[1]);
    throw_errno("cannot map a worker's shared status page");
  }
  auto* slot = new (page) WorkerSlot();
  std::shared_ptr<ReplyArena> arena = map_arena();
  std::shared_ptr<ReplyArena> input_arena = map_arena();
  if (!arena || !input_arena) {
    ::munmap(page, sizeof(WorkerSlot));
    ::close(sv[0]);
    ::close(sv[1]);
    throw_errno("cannot map a worker's arenas");
  }
  std::vector<int> to_close = ParentSockets::instance().snapshot();
  auto in_child = [&] {
    ::close(sv[0]);
    for (int fd : to_close)
      ::close(fd);
    prepare_worker_process(parent_pid_, config_.inner_threads);
    current_worker_slot = slot;
    current_reply_arena = arena.get();
    current_input_arena = input_arena.get();
    worker_has_task_timeout = config_.task_timeout.count() > 0;
    try {
      std::unique_ptr<WorkerLogic> logic = make_logic_();
      run_worker(sv[1], *logic);
    } catch (const std::exception& e) {
      std::fprintf(stderr, "procpool worker %d could not start: %s\n", ::getpid(), e.what());
    } catch (...) {
      std::fprintf(stderr, "procpool worker %d could not start\n", ::getpid());
    }
    std::fflush(stderr);
    ::_exit(70);
  };
  const pid_t pid = config_.fork_from_helper_thread && !on_main_thread()
                        ? fork_on_helper_thread(in_child)
                        : fork_here(in_child);
  ::close(sv[1]);
  if (pid < 0) {
    const int saved = -pid;
    ::close(sv[0]);
    ::munmap(page, sizeof(WorkerSlot));
    errno = saved;
    throw_errno("cannot fork a worker process");
  }
  adopt_worker(position, pid, sv[0], slot, std::move(arena), std::move(input_arena));
}

void Engine::adopt_worker(unsigned position, pid_t pid, int fd, WorkerSlot* slot,
                          std::shared_ptr<ReplyArena> arena,
                          std::shared_ptr<ReplyArena> input_arena) {
  ::fcntl(fd, F_SETFL, O_NONBLOCK);  // no other status flag is ever set on these sockets
  ParentSockets::instance().add(fd);
  auto worker = std::make_unique<Worker>();
  worker->serial = next_worker_serial_++;
  worker->pid = pid;
  worker->fd = fd;
  worker->slot = slot;
  worker->arena = std::move(arena);
  worker->input_arena = std::move(input_arena);
  worker->position = position;
  records_[position].pid = pid;
  for (auto& [id, call] : calls_) {
    if (call.scope == SetupScope::every_worker && !call.setup.empty()) {
      send_frame(*worker, FrameKind::setup, id, 0, 0, call.setup);
    }
  }
  workers_.push_back(std::move(worker));
}

std::uint64_t Engine::open_call(Buffer setup, SetupScope scope) {
  const std::uint64_t id = next_call_++;
  CallState& call = calls_[id];
  call.setup = std::move(setup);
  call.scope = scope;
  if (scope == SetupScope::every_worker && !call.setup.empty()) {
    for (auto& w : workers_)
      send_frame(*w, FrameKind::setup, id, 0, 0, call.setup);
  }
  return id;
}

void Engine::close_call(std::uint64_t call, bool may_have_queued) {
  auto it = calls_.find(call);
  if (it == calls_.end()) return;
  const bool had_setup = !it->second.setup.empty();
  const bool workers_keep_setup = had_setup && it->second.scope == SetupScope::every_worker;
  calls_.erase(it);
  if (may_have_queued) std::erase_if(pending_, [call](const Chunk& c) { return c.call == call; });
  if (!had_setup) return;
  if (local_logic_) local_logic_->end(call);
  if (!workers_keep_setup) return;  // each worker forgot it after its chunk
  for (auto& w : workers_)
    send_frame(*w, FrameKind::end_call, call, 0, 0, Buffer{});
}

void Engine::submit(Chunk chunk) {
  if (broken_ || stopping_) {
    std::exception_ptr reason =
        broken_ ? broken_
                : std::make_exception_ptr(
                      PoolClosed("procpool: the pool's workers were stopped; create a new pool"));
    finish_chunk(chunk, ChunkDone::failed(chunk.first, chunk.count, reason));
    return;
  }
  pending_.push_back(std::move(chunk));
}

std::deque<ChunkDone>& Engine::completed(std::uint64_t call) {
  return calls_[call].completed;
}

double Engine::nanos_per_task(std::uint64_t call) const {
  auto it = calls_.find(call);
  if (it == calls_.end()) return 0.0;
  // A submitted task is a call of its own, never timed before it runs: the
  // submits before it are the best guess, so that a stream of tiny submits
  // keeps each worker's pipeline full instead of two tasks deep.
  if (it->second.nanos_per_task <= 0 && it->second.scope == SetupScope::each_chunk) {
    return submitted_nanos_per_task_;
  }
  return it->second.nanos_per_task;
}

std::size_t Engine::outstanding() const noexcept {
  std::size_t n = pending_.size();
  for (const auto& w : workers_)
    n += w->inflight.size();
  return n;
}

std::vector<pid_t> Engine::worker_pids() const {
  std::vector<pid_t> pids;
  for (const auto& w : workers_)
    pids.push_back(w->pid);
  return pids;
}

void Engine::append_header(Worker& w, FrameKind kind, std::uint64_t call, std::uint64_t first,
                           std::uint64_t count, std::uint64_t size, std::uint16_t flags) {
  FrameHeader header;
  header.kind = kind;
  header.flags = flags;
  header.call = call;
  header.first = first;
  header.count = count;
  header.size = size;
  w.outbox.append(&header, sizeof header);
}

void Engine::send_frame(Worker& w, FrameKind kind, std::uint64_t call, std::uint64_t first,
                        std::uint64_t count, const Buffer& payload, std::uint16_t flags) {
  append_header(w, kind, call, first, count, payload.size(), flags);
  w.outbox.append(payload.data(), payload.size());
}

std::size_t Engine::pipeline_depth(std::uint64_t call, std::uint64_t count) const {
  const double per_task = nanos_per_task(call);
  if (per_task <= 0) return min_pipeline;
  const double chunk_nanos = per_task * static_cast<double>(count);
  const double depth = pipeline_target_nanos / std::max(chunk_nanos, 1.0);
  return std::clamp(static_cast<std::size_t>(depth), min_pipeline, max_pipeline);
}

bool Engine::send_through_arena(Worker& w, const Chunk& chunk, std::uint16_t flags) {
  const std::size_t size = chunk.payload.size();
  if (!ReplyArena::fits(size) || !w.input_arena) return false;
  const int claimed = w.input_arena->claim();
  if (claimed < 0) return false;
  const auto region = static_cast<std::size_t>(claimed);
  std::memcpy(w.input_arena->data(region), chunk.payload.data(), size);
  w.input_arena->note_written(region, size);
  append_header(w, FrameKind::task, chunk.call, chunk.first, chunk.count, size,
                static_cast<std::uint16_t>(flags | arena_flags(region)));
  return true;
}

bool Engine::goes_to_idle_worker(const Chunk& chunk) const {
  const CallState& call = calls_.at(chunk.call);
  if (call.scope != SetupScope::each_chunk) return chunk.tail;
  // Each submitted task is a call's only chunk, so every one would count as
  // a tail. Queue tasks known to be short behind others, or a stream of them
  // ping-pongs one task at a time; long or unknown ones wait for an idle
  // worker, so that none waits behind a long task while a worker is free.
  constexpr double short_chunk_nanos = 1e6;
  const double per_task = nanos_per_task(chunk.call);
  return per_task <= 0 || per_task * static_cast<double>(chunk.count) >= short_chunk_nanos;
}

void Engine::dispatch() {
  const std::size_t quota = config_.max_tasks_per_child;
  while (!pending_.empty()) {
    if (!calls_.contains(pending_.front().call)) {
      pending_.pop_front();
      continue;
    }
    const std::size_t depth = goes_to_idle_worker(pending_.front())
                                  ? 1
                                  : pipeline_depth(pending_.front().call, pending_.front().count);
    const bool via_arena = ReplyArena::fits(pending_.front().payload.size());
    Worker* best = nullptr;
    for (auto& w : workers_) {
      if (quota != 0 && w->tasks_sent >= quota) continue;  // to be recycled once idle
      // Large inputs wait for a free region of the worker's input arena (it
      // frees one before it replies) rather than taking two more copies
      // through the socket and growing the outbox.
      if (via_arena && w->input_arena && !w->input_arena->has_free_region()) continue;
      if (w->inflight.size() < depth && (!best || w->inflight.size() < best->inflight.size())) {
        best = w.get();
      }
    }
    if (!best) return;
    Chunk chunk = std::move(pending_.front());
    pending_.pop_front();
    if (quota != 0 && best->tasks_sent + chunk.count > quota) {
      // Send only what the worker may still run; the rest goes to its successor.
      const std::uint64_t fits = quota - best->tasks_sent;
      pending_.push_front(slice(chunk, fits, chunk.count));
      chunk = slice(chunk, 0, fits);
    }
    best->tasks_sent += chunk.count;
    const CallState& call = calls_.at(chunk.call);
    std::uint16_t flags = 0;
    if (call.scope == SetupScope::each_chunk && !call.setup.empty()) {
      send_frame(*best, FrameKind::setup, chunk.call, 0, 0, call.setup);
      flags = flag_end_call_after;
    }
    if (!send_through_arena(*best, chunk, flags)) {
      send_frame(*best, FrameKind::task, chunk.call, chunk.first, chunk.count, chunk.payload,
                 flags);
    }
    best->inflight.push_back(std::move(chunk));
  }
}

bool Engine::flush(Worker& w) {
  while (w.out_pos < w.outbox.size()) {
    ssize_t n = ::send(w.fd, w.outbox.data() + w.out_pos, w.outbox.size() - w.out_pos,
                       MSG_NOSIGNAL | MSG_DONTWAIT);
    if (n > 0) {
      w.out_pos += static_cast<std::size_t>(n);
    } else if (n < 0 && errno == EINTR) {
      continue;
    } else if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) {
      return true;
    } else {
      retire(w, Death::died);  // EPIPE / ECONNRESET: the worker is gone
      return false;
    }
  }
  w.outbox.clear();
  w.out_pos = 0;
  return true;
}

bool Engine::receive(Worker& w) {
  static const std::size_t max_payload = max_payload_bytes();
  for (;;) {
    // Parse every complete frame already here.
    while (w.inbox.size() - w.in_pos >= sizeof(FrameHeader)) {
      FrameHeader header;
      std::memcpy(&header, w.inbox.data() + w.in_pos, sizeof header);
      // A worker without a reply arena (spawned) cannot have replied through one.
      if (!valid_reply_header(header, max_payload) ||
          ((header.flags & flag_in_arena) != 0 && !w.arena)) {
        retire(w, Death::corrupt,
               std::make_exception_ptr(ProtocolError(
                   "procpool: worker " + std::to_string(w.pid) +
                   " sent a corrupt message (bad magic, kind or length); the worker was "
                   "replaced. Does the task write to file descriptors it does not own?")));
        return false;
      }
      const std::size_t whole = frame_bytes_on_socket(header);
      if (w.inbox.size() - w.in_pos < whole) {
        if (w.in_pos != 0) {
          w.inbox.consume(w.in_pos);
          w.in_pos = 0;
        }
        w.inbox.reserve(whole);
        break;
      }
      const std::byte* payload = w.inbox.data() + w.in_pos + sizeof header;
      // A big reply usually fills the inbox alone: hand the buffer over instead of copying it.
      const bool take_inbox = w.in_pos == 0 && whole == w.inbox.size() && whole > receive_size;
      w.in_pos += whole;
      if (!handle_frame(w, header, payload, take_inbox)) return false;
      if (take_inbox) w.in_pos = 0;
    }
    if (w.in_pos == w.inbox.size()) {
      w.inbox.clear();
      w.in_pos = 0;
    }
    const std::size_t room = std::max(receive_size, w.inbox.capacity() - w.inbox.size());
    std::byte* at = w.inbox.grow(room);
    ssize_t n = ::recv(w.fd, at, room, MSG_DONTWAIT);
    w.inbox.resize(w.inbox.size() - room + (n > 0 ? static_cast<std::size_t>(n) : 0));
    if (n > 0) continue;
    if (n < 0 && errno == EINTR) continue;
    if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) return true;
    if (w.inbox.size() > w.in_pos && w.slot->running.load(std::memory_order_acquire) == 0) {
      // It died between tasks in the middle of a reply: the reply is what is wrong.
      retire(w, Death::corrupt,
             std::make_exception_ptr(ProtocolError(
                 "procpool: worker " + std::to_string(w.pid) +
                 " ended in the middle of a message (truncated reply); the worker was replaced")));
      return false;
    }
    retire(w, Death::died);  // EOF or reset: the worker died
    return false;
  }
}

bool Engine::handle_frame(Worker& w, const FrameHeader& header, const std::byte* payload,
                          bool take_inbox) {
  if (w.inflight.empty() || w.inflight.front().call != header.call ||
      w.inflight.front().first != header.first || w.inflight.front().count != header.count) {
    retire(w, Death::corrupt,
           std::make_exception_ptr(
               ProtocolError("procpool: worker " + std::to_string(w.pid) +
                             " answered a task it was not running; the worker was replaced")));
    return false;
  }
  Chunk chunk = std::move(w.inflight.front());
  w.inflight.pop_front();
  deaths_without_progress_ = 0;
  records_[w.position].tasks += header.count;
  records_[w.position].compute_ns += header.nanos;
  if (header.count != 0) note_slow_task(header.call, header.slowest_index, header.slowest_nanos);
  if (auto it = calls_.find(chunk.call); it != calls_.end()) {
    it->second.time_tasks(header.count, static_cast<double>(header.nanos));
    if (it->second.scope == SetupScope::each_chunk && header.count != 0) {
      // Recent submits weigh most: a slow one shows at once, then fades.
      const double per_task = static_cast<double>(header.nanos) / static_cast<double>(header.count);
      submitted_nanos_per_task_ =
          submitted_nanos_per_task_ <= 0
              ? per_task
              : std::max(per_task, 0.9 * submitted_nanos_per_task_ + 0.1 * per_task);
    }
  }
  ChunkDone done;
  done.first = chunk.first;
  done.count = chunk.count;
  done.dense = (header.flags & flag_dense) != 0;
  if (header.flags & flag_in_arena) {
    // Decoded straight from the arena; handing the lease back frees it for the next reply.
    std::shared_ptr<ReplyArena> arena = w.arena;
    const std::size_t region = arena_region(header.flags);
    done.external = arena->data(region);
    done.external_size = header.size;
#ifdef MADV_POPULATE_READ
    // Map the reply's pages in one call instead of one fault per 4 KiB (a hint; Linux >= 5.14).
    // Once mapped they stay mapped here, so only a reply larger than any before needs it.
    if (header.size > w.arena_mapped[region]) {
      const auto page = static_cast<std::uintptr_t>(::sysconf(_SC_PAGESIZE));
      const auto begin = reinterpret_cast<std::uintptr_t>(done.external) & ~(page - 1);
      ::madvise(reinterpret_cast<void*>(begin),
                reinterpret_cast<std::uintptr_t>(done.external) + header.size - begin,
                MADV_POPULATE_READ);
      w.arena_mapped[region] = header.size;
    }
#endif
    done.lease =
        std::shared_ptr<void>(arena.get(), [arena, region](void*) { arena->release(region); });
  } else if (take_inbox) {
    done.payload = std::move(w.inbox);
    done.offset = sizeof header;
  } else {
    done.payload.append(payload, header.size);
  }
  finish_chunk(chunk, std::move(done));
  if (config_.max_tasks_per_child != 0 && w.tasks_sent >= config_.max_tasks_per_child &&
      w.inflight.empty() && w.in_pos == w.inbox.size()) {
    recycle(w);
    return false;
  }
  return true;
}

void Engine::recycle(Worker& w) {
  // Idle and past its quota: ask it to exit (EOF), wait for it, start a successor.
  ::shutdown(w.fd, SHUT_WR);
  ::fcntl(w.fd, F_SETFL, 0);  // blocking
  std::byte sink[256];
  for (;;) {
    ssize_t n = ::recv(w.fd, sink, sizeof sink, 0);
    if (n == 0 || (n < 0 && errno != EINTR)) break;
  }
  ParentSockets::instance().remove(w.fd);
  ::close(w.fd);
  wait_blocking(w.pid);
  fold_slot(w);
  ::munmap(w.slot, sizeof(WorkerSlot));
  ++records_[w.position].recycles;
  const unsigned position = w.position;
  const std::uint64_t serial = w.serial;
  std::erase_if(workers_, [serial](const auto& p) { return p->serial == serial; });
  if (!stopping_) spawn_worker(position);
}

void Engine::finish_chunk(const Chunk& chunk, ChunkDone done) {
  auto it = calls_.find(chunk.call);
  if (it != calls_.end()) it->second.completed.push_back(std::move(done));
}

void Engine::requeue_front(std::deque<Chunk>& chunks) {
  while (!chunks.empty()) {
    if (calls_.contains(chunks.back().call)) pending_.push_front(std::move(chunks.back()));
    chunks.pop_back();
  }
}

void Engine::charge(Chunk task, std::exception_ptr failure, std::deque<Chunk>& requeue) {
  ++task.attempts;
  if (task.attempts <= config_.retries) {
    requeue.push_back(std::move(task));
    return;
  }
  finish_chunk(task, ChunkDone::failed(task.first, task.count, std::move(failure)));
}

void Engine::retire(Worker& w, Death death, std::exception_ptr corrupt) {
  if (death != Death::died) ::kill(w.pid, SIGKILL);
  ParentSockets::instance().remove(w.fd);
  ::close(w.fd);
  const ExitStatus status = reap(w.pid);
  // The worker is gone, so its slot no longer changes: it names the task it was running.
  const bool was_running = w.slot->running.load(std::memory_order_acquire) != 0;
  const std::uint64_t culprit_call = w.slot->call.load(std::memory_order_relaxed);
  const std::uint64_t culprit = w.slot->index.load(std::memory_order_relaxed);
  fold_slot(w);
  ::munmap(w.slot, sizeof(WorkerSlot));
  const unsigned position = w.position;
  switch (death) {
    case Death::died:
      ++records_[position].crashes;
      break;
    case Death::timed_out:
      ++records_[position].timeouts;
      break;
    case Death::corrupt:
      break;
  }

  std::deque<Chunk> requeue;
  bool charged = false;
  if (death == Death::corrupt) {
    // The garbage stood where the oldest unanswered chunk's reply belonged.
    for (Chunk& chunk : w.inflight) {
      if (!charged) {
        finish_chunk(chunk, ChunkDone::failed(chunk.first, chunk.count, corrupt));
        charged = true;
      } else {
        requeue.push_back(std::move(chunk));
      }
    }
  }
  for (Chunk& chunk : w.inflight) {
    if (death == Death::corrupt) break;  // handled above
    const bool holds_culprit = was_running && chunk.call == culprit_call &&
                               culprit >= chunk.first && culprit < chunk.first + chunk.count;
    if (!holds_culprit) {
      requeue.push_back(std::move(chunk));  // not started, or finished but its reply was lost
      continue;
    }
    const std::uint64_t at = culprit - chunk.first;
    if (at > 0) requeue.push_back(slice(chunk, 0, at));
    const auto index = static_cast<std::size_t>(culprit);
    std::exception_ptr failure =
        death == Death::timed_out
            ? std::make_exception_ptr(TaskTimeout(index, config_.task_timeout))
            : std::make_exception_ptr(WorkerCrashed(index, w.pid, status.signal, status.code));
    charge(slice(chunk, at, at + 1), failure, requeue);
    if (at + 1 < chunk.count) requeue.push_back(slice(chunk, at + 1, chunk.count));
    charged = true;
  }
  if (!charged && !stopping_ && ++deaths_without_progress_ > 2 * config_.processes + 2) {
    broken_ = std::make_exception_ptr(
        Error("procpool: workers keep dying before they finish any task (the last, pid " +
              std::to_string(w.pid) + ", " +
              (status.signal ? "was killed by signal " + std::to_string(status.signal)
                             : "exited with status " + std::to_string(status.code)) +
              "); check the pool's initializer"));
  }
  const std::uint64_t serial = w.serial;
  std::erase_if(workers_, [serial](const auto& p) { return p->serial == serial; });
  requeue_front(requeue);
  if (broken_) {
    while (!pending_.empty()) {
      Chunk c = std::move(pending_.front());
      pending_.pop_front();
      finish_chunk(c, ChunkDone::failed(c.first, c.count, broken_));
    }
    return;
  }
  if (!stopping_) spawn_worker(position);
}

void Engine::fold_slot(const Worker& w) {
  // The process is gone: keep what it counted. Tasks and compute come from its replies.
  WorkerRecord& r = records_[w.position];
  r.serialize_ns += w.slot->serialize_ns.load(std::memory_order_relaxed);
  r.wait_ns += w.slot->wait_ns.load(std::memory_order_relaxed);
  r.bytes_in += w.slot->bytes_in.load(std::memory_order_relaxed);
  r.bytes_out += w.slot->bytes_out.load(std::memory_order_relaxed);
  r.peak_rss_kb = std::max(r.peak_rss_kb, w.slot->peak_rss_kb.load(std::memory_order_relaxed));
}

std::vector<WorkerRecord> Engine::worker_records() const {
  std::vector<WorkerRecord> records = records_;
  for (const auto& w : workers_) {
    WorkerRecord& r = records[w->position];
    r.serialize_ns += w->slot->serialize_ns.load(std::memory_order_relaxed);
    r.wait_ns += w->slot->wait_ns.load(std::memory_order_relaxed);
    r.bytes_in += w->slot->bytes_in.load(std::memory_order_relaxed);
    r.bytes_out += w->slot->bytes_out.load(std::memory_order_relaxed);
    r.peak_rss_kb = std::max(r.peak_rss_kb, w->slot->peak_rss_kb.load(std::memory_order_relaxed));
  }
  return records;
}

Insights Engine::insights(double wall_seconds) const {
  Insights in;
  in.wall_seconds = wall_seconds;
  in.processes = config_.processes;
  try {
    const CpuReport report = procpool::cpu_report();
    in.usable_cpus = report.usable;
    in.cpu_reason = report.to_string();
  } catch (const Error&) {
    in.usable_cpus = 0;  // a malformed PROCPOOL_CPUS was reported when the call started
  }
  in.parent_input_seconds = static_cast<double>(parent_input_ns_) * 1e-9;
  in.parent_decode_seconds = static_cast<double>(parent_decode_ns_) * 1e-9;
  in.starting_seconds = static_cast<double>(starting_ns_) * 1e-9;
  in.caller_anonymous_kb = caller_anonymous_kb();
  double compute = 0;
  const auto records = worker_records();
  for (std::size_t i = 0; i < records.size(); ++i) {
    const WorkerRecord& r = records[i];
    WorkerInsights w;
    w.position = static_cast<unsigned>(i);
    w.pid = r.pid;
    w.tasks = r.tasks;
    // Replies time whole chunks, serialisation included; take that part out.
    w.compute_seconds =
        static_cast<double>(r.compute_ns - std::min(r.compute_ns, r.serialize_ns)) * 1e-9;
    w.waiting_seconds = static_cast<double>(r.wait_ns) * 1e-9;
    w.serialize_seconds = static_cast<double>(r.serialize_ns) * 1e-9;
    w.bytes_received = r.bytes_in;
    w.bytes_sent = r.bytes_out;
    w.peak_rss_kb = r.peak_rss_kb;
    w.crashes = r.crashes;
    w.timeouts = r.timeouts;
    w.recycles = r.recycles;
    in.tasks += r.tasks;
    compute += w.compute_seconds;
    in.workers.push_back(w);
  }
  if (wall_seconds > 0) {
    in.efficiency = compute / (wall_seconds * static_cast<double>(config_.processes));
  }
  for (const SlowTask& t : slowest_) {
    in.slowest_tasks.push_back(
        {static_cast<std::size_t>(t.index), static_cast<double>(t.nanos) * 1e-9});
  }
  in.diagnosis = detail::diagnose(in);
  return in;
}

void Engine::note_slow_task(std::uint64_t call, std::uint64_t index, std::uint64_t nanos) {
  constexpr std::size_t keep = 5;
  if (slowest_.size() == keep && nanos <= slowest_.back().nanos) return;
  slowest_.push_back(SlowTask{call, index, nanos});
  std::sort(slowest_.begin(), slowest_.end(),
            [](const SlowTask& a, const SlowTask& b) { return a.nanos > b.nanos; });
  if (slowest_.size() > keep) slowest_.pop_back();
}

void Engine::enforce_timeouts() {
  if (config_.task_timeout.count() <= 0) return;
  const std::int64_t limit =
      std::chrono::duration_cast<std::chrono::nanoseconds>(config_.task_timeout).count();
  bool killed = true;
  while (killed) {  // retire() changes the worker list
    killed = false;
    const std::int64_t now = steady_now_ns();
    for (auto& w : workers_) {
      if (w->slot->running.load(std::memory_order_acquire) != 0 &&
          now - w->slot->started_ns.load(std::memory_order_relaxed) > limit) {
        retire(*w, Death::timed_out);
        killed = true;
        break;
      }
    }
  }
}

std::chrono::milliseconds Engine::time_to_next_deadline() const {
  constexpr std::chrono::milliseconds none{24 * 3600 * 1000};
  if (config_.task_timeout.count() <= 0) return none;
  const std::int64_t limit =
      std::chrono::duration_cast<std::chrono::nanoseconds>(config_.task_timeout).count();
  const std::int64_t now = steady_now_ns();
  std::int64_t nearest = std::numeric_limits<std::int64_t>::max();
  bool any = false;
  for (const auto& w : workers_) {
    if (w->slot->running.load(std::memory_order_acquire) == 0) continue;
    any = true;
    nearest = std::min(nearest, w->slot->started_ns.load(std::memory_order_relaxed) + limit - now);
  }
  if (!any) {
    // A task may start any moment; look again well within the limit.
    return std::min(none, std::max(std::chrono::milliseconds(1), config_.task_timeout / 4));
  }
  return std::chrono::milliseconds(std::max<std::int64_t>(0, nearest / 1000000 + 1));
}

Engine::Worker* Engine::find_worker(std::uint64_t serial) {
  for (auto& w : workers_) {
    if (w->serial == serial) return w.get();
  }
  return nullptr;
}

void Engine::enable_wake() {
  if (wake_fd_ < 0) wake_fd_ = ::eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
  if (wake_fd_ < 0) throw_errno("cannot create an event descriptor for a pool's service thread");
}

void Engine::wake() noexcept {
  if (wake_fd_ < 0) return;
  const std::uint64_t one = 1;
  [[maybe_unused]] const ssize_t n = ::write(wake_fd_, &one, sizeof one);
}

bool Engine::worker_running_dry() const noexcept {
  return std::any_of(workers_.begin(), workers_.end(),
                     [](const auto& w) { return w->inflight.size() < min_pipeline; });
}

bool Engine::caller_driving(std::chrono::milliseconds recently) const {
  return callers_pumping_ != 0 ||
         steady_now_ns() - caller_pumped_ns_ <
             std::chrono::duration_cast<std::chrono::nanoseconds>(recently).count();
}

void Engine::pump(std::unique_lock<std::mutex>& lock, std::chrono::milliseconds timeout,
                  Driver driver) {
  struct Round {  // counted until the round ends, even by an exception
    Engine& engine;
    bool caller;
    Round(Engine& e, bool by_caller) : engine(e), caller(by_caller) {
      ++engine.rounds_in_progress_;
      if (caller) ++engine.callers_pumping_;
    }
    ~Round() {
      --engine.rounds_in_progress_;
      if (!caller) return;
      --engine.callers_pumping_;
      engine.caller_pumped_ns_ = steady_now_ns();
    }
    Round(const Round&) = delete;
    Round& operator=(const Round&) = delete;
  } round(*this, driver == Driver::caller);
  pump_round(lock, timeout);
}

void Engine::pump_round(std::unique_lock<std::mutex>& lock, std::chrono::milliseconds timeout) {
  if (config_.start == Start::in_process) {
    run_in_process();
    return;
  }
  enforce_timeouts();
  dispatch();
  std::vector<pollfd> fds;
  std::vector<std::uint64_t> serials;
  for (std::size_t i = 0; i < workers_.size(); ++i) {
    Worker* w = workers_[i].get();
    if (w->out_pos < w->outbox.size() && !flush(*w)) {
      i = static_cast<std::size_t>(-1);  // the worker list changed: start over
      fds.clear();
      serials.clear();
      continue;
    }
    short events = POLLIN;
    if (w->out_pos < w->outbox.size()) events |= POLLOUT;
    fds.push_back(pollfd{w->fd, events, 0});
    serials.push_back(w->serial);
  }
  if (fds.empty()) return;
  if (wake_fd_ >= 0) fds.push_back(pollfd{wake_fd_, POLLIN, 0});
  const auto wait = std::min(timeout, time_to_next_deadline());
  lock.unlock();
  int ready = ::poll(fds.data(), fds.size(), static_cast<int>(wait.count()));
  lock.lock();
  if (wake_fd_ >= 0) {
    if (fds.back().revents != 0) {
      std::uint64_t count = 0;
      [[maybe_unused]] const ssize_t n = ::read(wake_fd_, &count, sizeof count);
    }
    fds.pop_back();
  }
  enforce_timeouts();
  if (ready <= 0) return;
  for (std::size_t i = 0; i < fds.size(); ++i) {
    if (fds[i].revents == 0) continue;
    Worker* w = find_worker(serials[i]);
    if (!w || w->fd != fds[i].fd) continue;
    if ((fds[i].revents & POLLOUT) && !flush(*w)) continue;
    if (fds[i].revents & (POLLIN | POLLHUP | POLLERR)) receive(*w);
  }
  dispatch();
  for (std::size_t i = 0; i < workers_.size(); ++i) {
    if (workers_[i]->out_pos < workers_[i]->outbox.size() && !flush(*workers_[i])) break;
  }
}

void Engine::run_in_process() {
  if (!local_logic_) local_logic_ = make_logic_();
  while (!pending_.empty()) {
    Chunk chunk = std::move(pending_.front());
    pending_.pop_front();
    auto it = calls_.find(chunk.call);
    if (it == calls_.end()) continue;
    CallState& call = it->second;
    if (!call.setup.empty() && !call.local_setup_done) {
      Reader setup(call.setup);
      local_logic_->setup(chunk.call, setup);
      call.local_setup_done = true;
    }
    ChunkDone done;
    done.first = chunk.first;
    done.count = chunk.count;
    Writer out(done.payload);
    Reader in(chunk.payload);
    const auto start = std::chrono::steady_clock::now();
    chunk_reply_dense = false;
    local_logic_->run(chunk.call, chunk.first, chunk.count, in, out);
    done.dense = chunk_reply_dense;
    const double nanos = static_cast<double>(std::chrono::duration_cast<std::chrono::nanoseconds>(
                                                 std::chrono::steady_clock::now() - start)
                                                 .count());
    records_[0].tasks += chunk.count;
    records_[0].compute_ns += static_cast<std::uint64_t>(nanos);
    call.time_tasks(chunk.count, nanos);
    call.completed.push_back(std::move(done));
  }
}

void Engine::stop_gracefully() {
  stopping_ = true;
  for (auto& w : workers_) {
    // shutdown() reaches the worker even if another process holds a copy of our socket.
    ::fcntl(w->fd, F_SETFL, 0);  // blocking
    if (w->out_pos < w->outbox.size()) {
      ::send(w->fd, w->outbox.data() + w->out_pos, w->outbox.size() - w->out_pos, MSG_NOSIGNAL);
    }
    ::shutdown(w->fd, SHUT_WR);
  }
  for (auto& w : workers_) {
    std::byte sink[4096];
    for (;;) {
      ssize_t n = ::recv(w->fd, sink, sizeof sink, 0);
      if (n == 0 || (n < 0 && errno != EINTR)) break;
    }
    ParentSockets::instance().remove(w->fd);
    ::close(w->fd);
    wait_blocking(w->pid);
    fold_slot(*w);
    ::munmap(w->slot, sizeof(WorkerSlot));
  }
  workers_.clear();
  pending_.clear();
}

void Engine::kill_workers(std::exception_ptr reason) {
  stopping_ = true;
  for (auto& w : workers_)
    ::kill(w->pid, SIGKILL);
  for (auto& w : workers_) {
    ParentSockets::instance().remove(w->fd);
    ::close(w->fd);
    wait_blocking(w->pid);
    fold_slot(*w);
    ::munmap(w->slot, sizeof(WorkerSlot));
    if (reason) {
      for (Chunk& c : w->inflight)
        finish_chunk(c, ChunkDone::failed(c.first, c.count, reason));
    }
  }
  workers_.clear();
  if (reason) {
    for (Chunk& c : pending_)
      finish_chunk(c, ChunkDone::failed(c.first, c.count, reason));
  }
  pending_.clear();
}

}  // namespace procpool::detail
