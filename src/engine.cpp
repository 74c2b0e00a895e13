#include "procpool/detail/engine.hpp"

#include <poll.h>
#include <sys/eventfd.h>
#include <sys/resource.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <csignal>
#include <cstdio>
#include <deque>
#include <limits>
#include <list>
#include <map>
#include <optional>
#include <string>
#include <system_error>
#include <utility>

#include "arena_cache.hpp"
#include "chunk_runner.hpp"
#include "fork_server.hpp"
#include "oom.hpp"
#include "procpool/detail/protocol.hpp"
#include "procpool/detail/schedule.hpp"
#include "procpool/detail/telemetry.hpp"
#include "procpool/detail/worker_link.hpp"
#include "procpool/errors.hpp"
#include "procpool/insights.hpp"
#include "worker.hpp"
#include "worker_process.hpp"

namespace procpool::detail {

namespace {
/// See Engine::IdleWorkersOnly.
thread_local bool opens_idle_workers_only_calls = false;
thread_local std::uint64_t* idle_workers_only_nanos = nullptr;
}  // namespace

Engine::IdleWorkersOnly::IdleWorkersOnly(std::uint64_t* worker_nanos) noexcept
    : was_(std::exchange(opens_idle_workers_only_calls, true)),
      was_nanos_(std::exchange(idle_workers_only_nanos, worker_nanos)) {}

Engine::IdleWorkersOnly::~IdleWorkersOnly() {
  opens_idle_workers_only_calls = was_;
  idle_workers_only_nanos = was_nanos_;
}

Chunk slice(const Chunk& chunk, std::uint64_t from, std::uint64_t to) {
  Chunk part;
  part.call = chunk.call;
  part.first = chunk.first + from;
  part.count = to - from;
  part.attempts = chunk.attempts;
  part.orphaned = chunk.orphaned;
  part.stride = chunk.stride;
  part.tail = chunk.tail;
  part.check_link = chunk.check_link;
  part.files = chunk.files;    // indices into it stay valid in any part
  part.source = chunk.source;  // only ever on a chunk of one input: the part is all of it
  // A large part is handed to its worker as a memory file, as the chunk was,
  // rather than copied through the socket.
  part.payload.share_when_large();
  if (chunk.handed_over()) return part;  // encoded again before it is sent
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

namespace {

/// The reason a pool ended (Pool::terminate()'s PoolClosed), as an exception
/// of each chunk's own: the calls those chunks belong to may be read on
/// different threads (an mpi node runs several at once), and an exception
/// shared through std::exception_ptr is counted inside libstdc++, where
/// ThreadSanitizer cannot see that its last owner frees it after the others
/// have read it.
std::exception_ptr copy_for_one_chunk(const std::exception_ptr& reason) {
  try {
    std::rethrow_exception(reason);
  } catch (const PoolClosed& e) {
    return std::make_exception_ptr(PoolClosed(e.what()));
  } catch (...) {
    return reason;
  }
}

[[noreturn]] void throw_errno(const char* what) {
  throw std::system_error(errno, std::generic_category(), std::string("procpool: ") + what);
}

bool is_resource_limit(const std::error_code& code) {
  const int e = code.value();
  return code.category() == std::generic_category() &&
         (e == EMFILE || e == ENFILE || e == EAGAIN || e == ENOMEM);
}

/// Names the limit behind a failure to start a worker, with its value.
std::string describe_resource_limit(const std::error_code& code) {
  const auto soft_limit = [](int resource) {
    rlimit limit{};
    if (::getrlimit(resource, &limit) != 0 || limit.rlim_cur == RLIM_INFINITY) {
      return std::string("unlimited");
    }
    return std::to_string(limit.rlim_cur);
  };
  switch (code.value()) {
    case EMFILE:
      return "the limit on open files (ulimit -n, RLIMIT_NOFILE) is " + soft_limit(RLIMIT_NOFILE);
    case ENFILE:
      return "the system's table of open files is full";
    case EAGAIN:
      return "the limit on processes (ulimit -u, RLIMIT_NPROC) is " + soft_limit(RLIMIT_NPROC);
    default:
      return "the memory or address space ran out (ulimit -v, RLIMIT_AS: " + soft_limit(RLIMIT_AS) +
             ")";
  }
}

/// "2.1 s": a span of time for a message.
std::string seconds_text(std::int64_t ns) {
  char text[32];
  std::snprintf(text, sizeof text, "%.1f s", static_cast<double>(ns) / 1e9);
  return text;
}

}  // namespace

class Engine::Impl final : private ReplySink {
 public:
  Impl(EngineConfig config, LogicFactory make_logic, LinkFactory start_link)
      : config_(std::move(config)),
        make_logic_(std::move(make_logic)),
        start_link_(std::move(start_link)),
        telemetry_(in_process() ? 1 : std::max(1u, config_.processes)),
        parent_pid_(::getpid()) {
    config_.processes = std::max(1u, config_.processes);
    if (in_process()) {
      telemetry_.worker_started(0, parent_pid_);
      return;
    }
    if (!start_link_) start_link_ = local_worker_factory();
    if (config_.wake_before_workers) {
      try {
        enable_wake();
      } catch (const std::system_error&) {  // (start_service's enable_wake() tries again)
      }
    }
    const std::uint64_t without_arenas = workers_without_arenas();
    try {
      start_workers();
    } catch (...) {
      kill_workers(nullptr);
      if (posts_fd_ >= 0) ::close(posts_fd_);  // (no destructor runs)
      throw;
    }
    if (config_.start == Start::fork && workers_without_arenas() != without_arenas) {
      telemetry_.add_note(address_space_limit_note());
    }
    keep_a_round_descriptor();
  }

  ~Impl() {
    if (outstanding() == 0) {
      stop_gracefully();
    } else {
      kill_workers(nullptr);
    }
    for (const int fd : spare_wakes_)
      ::close(fd);
    if (posts_fd_ >= 0) ::close(posts_fd_);
  }
  Impl(const Impl&) = delete;
  Impl& operator=(const Impl&) = delete;

  std::uint64_t open_call(Buffer setup, SetupScope scope);
  void close_call(std::uint64_t call, bool may_have_queued);
  void submit(Chunk chunk);
  std::uint64_t reserve_call() noexcept {
    return next_call_.fetch_add(1, std::memory_order_relaxed);
  }
  bool post(std::uint64_t call, Buffer setup, Chunk chunk, std::uint64_t input_ns);
  void refuse_posts() noexcept;
  int posts_fd() const noexcept { return posts_fd_; }
  void knock() noexcept;
  bool take_posts_word() noexcept;
  /// Registers the posted calls and queues their chunks (with the lock held).
  void take_in_posts();
  void pump(std::unique_lock<std::mutex>& lock, std::chrono::milliseconds timeout, Driver driver,
            std::uint64_t for_call);
  bool caller_driving(std::chrono::milliseconds recently) const {
    return callers_pumping_ != 0 ||
           steady_now_ns() - caller_pumped_ns_ <
               std::chrono::duration_cast<std::chrono::nanoseconds>(recently).count();
  }
  bool pumping() const noexcept { return rounds_in_progress_ != 0; }
  std::size_t queued() const noexcept {
    return pending_.size() + posted_.load(std::memory_order_acquire);
  }
  void enable_wake();
  void let_tail_chunks_queue() noexcept { tail_chunks_queue_ = true; }
  std::exception_ptr broken() const noexcept { return broken_; }
  bool workers_stopped() const noexcept { return stopping_; }
  std::uint64_t compute_nanos() const noexcept {
    return compute_nanos_.load(std::memory_order_relaxed);
  }
  /// Tells every waiter (Waiter) to end its round.
  void wake() noexcept;
  /// Has queued chunks handed to the workers now: tells the watcher (else a waiter).
  void nudge() noexcept;
  std::list<ChunkDone>& completed(std::uint64_t call) {
    take_in_posts();
    return calls_[call].completed;
  }
  double nanos_per_task(std::uint64_t call) const;
  std::size_t outstanding() const noexcept;
  void stop_gracefully();
  void kill_workers(std::exception_ptr reason);
  unsigned processes() const noexcept { return config_.processes; }
  Insights insights(double wall_seconds) const;
  void add_parent_time(std::uint64_t input_ns, std::uint64_t decode_ns) {
    telemetry_.add_parent_time(input_ns, decode_ns);
  }
  std::vector<pid_t> worker_pids() const;

 private:
  /// The engine's books on one worker; the link does the talking.
  struct Worker {
    std::unique_ptr<WorkerLink> link;
    std::deque<Chunk> inflight;  // sent, not yet answered, oldest first
    std::uint64_t serial = 0;
    std::uint64_t tasks_sent = 0;
    unsigned position = 0;  // which of the `processes` places this worker holds
  };
  /// How the last worker that died decoding a call's setup ended.
  struct SetupDeath {
    pid_t pid = 0;
    int signal = 0;
    int code = 0;
    bool timed_out = false;
    unsigned deaths = 0;
  };
  struct CallState {
    Buffer setup;
    SetupScope scope = SetupScope::every_worker;
    bool idle_workers_only = false;         // see Engine::IdleWorkersOnly
    std::uint64_t* worker_nanos = nullptr;  // and its `worker_nanos`
    // A list, not a deque: libstdc++ allocates a deque's first 576 bytes as
    // it is made, and a submitted task is a call of its own (100k futures
    // held at once took 253-274 MB, most of it three deques each).
    std::list<ChunkDone> completed;
    TaskTimeEstimate task_time;
    bool local_setup_done = false;  // Start::in_process
    /// Workers that died decoding this call's setup (no task of it running).
    unsigned setup_deaths = 0;
    /// Whether each of them was SIGKILLed, not by the engine: a kill storm's.
    bool setup_deaths_killed = true;
    /// Set once more than `retries` did: every task of the call not yet run
    /// then fails at once, rather than kill a worker or more each.
    std::optional<SetupDeath> setup_failed;
  };
  /// Why the engine gives up on a worker.
  enum class Loss { died, timed_out, corrupt };

  bool in_process() const noexcept { return config_.start == Start::in_process; }
  LinkFactory local_worker_factory();
  /// Starts the worker at `position`, timing it for insights, and sends it the open calls' setups.
  void start_worker(unsigned position);
  void restart_worker(unsigned position);
  /// Hands queued chunks to workers, oldest first; while the oldest must
  /// wait, chunks behind it may pass it (pass_waiting_head).
  void dispatch();
  /// The oldest queued chunk (the head) must wait: for an idle worker (a
  /// tail chunk, an untimed submit, a long task), a free input region, a
  /// recycled worker. A chunk of another call that a worker may take now goes
  /// ahead of it instead of waiting too, at most one to each worker while the
  /// same head waits, so that the head is held up by no more than one chunk
  /// at any worker. Whether a chunk went.
  bool pass_waiting_head();
  /// Sends the queued chunk at `at` to `worker`, or as much of it as the
  /// worker may still run (max_tasks_per_child): the rest stays in its place.
  void send_queued(std::deque<Chunk>::iterator at, Worker& worker);
  /// The worker with the fewest chunks queued that may take `chunk` now, or
  /// null; none of the workers in `skip` (by serial), if given.
  Worker* least_loaded_for(const Chunk& chunk, const std::vector<std::uint64_t>* skip = nullptr);
  void pump_round(std::unique_lock<std::mutex>& lock, std::chrono::milliseconds timeout,
                  bool hears_posts, std::uint64_t for_call);
  /// One wait of a round (see pump_round); whether the round waits on.
  bool wait_once(std::unique_lock<std::mutex>& lock, std::chrono::steady_clock::time_point until,
                 bool hears_posts, std::uint64_t for_call);
  /// Flushes each worker's pending bytes and lists what to poll it for.
  void workers_poll_set(std::vector<pollfd>& fds, std::vector<std::uint64_t>& serials);
  /// Moves bytes of `w` after poll() said `revents`; false if the worker was lost.
  bool serve_events(Worker& w, short revents);
  bool flush(Worker& w);
  bool take(Reply reply) override;
  void after_replies(Worker& w);
  void enforce_timeouts();
  std::chrono::milliseconds time_to_next_deadline() const;
  Worker* find_worker(std::uint64_t serial);
  /// `overran`: for a timeout, what the worker was found running past the
  /// limit (it may have moved on before the kill landed: that is charged).
  void lose(std::uint64_t serial, Loss loss, std::exception_ptr corrupt = nullptr,
            std::optional<RunningTaskRef> overran = std::nullopt);
  void recycle(std::uint64_t serial);
  /// Removes `serial` from the workers and, unless stopping, starts its successor.
  void replace(std::uint64_t serial, unsigned position);
  void charge(Chunk task, std::exception_ptr failure, std::deque<Chunk>& requeue);
  /// Sends again, in halves, a chunk whose worker died while it was not running.
  void orphan(Chunk chunk, pid_t pid, const WorkerExit& exit, std::deque<Chunk>& requeue);
  /// A worker died decoding `call`'s setup: charges the call, not a task.
  void charge_setup(std::uint64_t call, pid_t pid, const WorkerExit& exit, bool timed_out);
  /// Whether the OOM killer killed that worker (noted in the insights if so).
  bool killed_for_memory(pid_t pid, const WorkerExit& exit);
  /// Fails each task of `chunk` with its call's setup death, if it has one.
  bool fail_if_setup_failed(const Chunk& chunk);
  /// Gives up on the pool when new workers keep dying before they are ready.
  void note_start_up_death(pid_t pid, const WorkerExit& exit);
  /// The error for a task whose worker died under it: an OOM kill says so.
  std::exception_ptr crash_of(std::size_t index, pid_t pid, const WorkerExit& exit,
                              unsigned position);
  /// Starts `processes` workers, or as many as the machine's limits allow.
  void start_workers();
  void requeue_front(std::deque<Chunk>& chunks);
  void fail_pending(const std::exception_ptr& reason);
  void finish_chunk(const Chunk& chunk, ChunkDone done);
  /// A chunk whose payload went to a worker for good (Chunk::handed_over) is
  /// encoded again from the caller's range; false if that failed (the chunk
  /// then has its error).
  bool encode_again_if_handed_over(Chunk& chunk);
  /// Ends every worker the same way, all at once, and keeps their counters.
  void end_all(WorkerLink::Ending how, const std::exception_ptr& reason);
  void run_in_process();

  EngineConfig config_;
  LogicFactory make_logic_;
  // Start::fork_server: forks the workers, once it has built their logic.
  std::unique_ptr<ForkServer> fork_server_;
  LinkFactory start_link_;
  Telemetry telemetry_;
  // Start::in_process: the caller's process is the one worker.
  std::unique_ptr<WorkerLogic> local_logic_;
  std::unique_ptr<ChunkRunner> local_runner_;
  std::vector<Worker> workers_;
  std::deque<Chunk> pending_;
  /// The head of pending_ that chunks passed while it waited, and the
  /// workers (serials) that took one of them.
  struct HeadWait {
    std::uint64_t call = 0;
    std::uint64_t first = 0;
    std::vector<std::uint64_t> passed_to;
  };
  HeadWait head_wait_;
  /// The calls pass_waiting_head() has looked at (kept to reuse its memory).
  std::vector<std::uint64_t> calls_seen_behind_head_;
  /// How many chunks behind a waiting head pass_waiting_head() looks at.
  static constexpr std::size_t max_chunks_scanned_past_head = 64;
  std::map<std::uint64_t, CallState> calls_;
  std::atomic<std::uint64_t> next_call_{1};
  /// A call of one chunk posted without the engine's lock (see post()).
  struct PostedCall {
    std::uint64_t call = 0;
    Buffer setup;
    Chunk chunk;
    bool idle_workers_only = false;  // what IdleWorkersOnly said in the thread that posted it
    std::uint64_t* worker_nanos = nullptr;
    std::uint64_t input_ns = 0;
  };
  /// Guards posts_ and posts_refused_ only; taken after the engine's lock, never before it.
  std::mutex posts_mutex_;
  std::vector<PostedCall> posts_;
  bool posts_refused_ = false;
  /// posts_.size(), for queued() and outstanding() and a quick look without posts_mutex_.
  std::atomic<std::size_t> posted_{0};
  std::vector<PostedCall> taking_in_;  // posts_ swapped out by take_in_posts(), its memory kept
  int posts_fd_ = -1;                  // see Engine::posts_fd()
  /// open_call() and submit() for one posted call.
  void take_in(PostedCall& posted);
  /// submit() without taking posts in first; `chunk` is left as it was if this throws.
  void queue(Chunk&& chunk);
  bool wake_enabled_ = false;  // see enable_wake()
  /// A round waiting in poll(), on an event descriptor of its own that
  /// wake() and the other rounds write (see pump_round).
  struct Waiter {
    int fd;
    std::uint64_t call;  // whose outcomes it waits for; 0: any call's
    bool watches;        // it waits on the workers' sockets too
    unsigned told = 0;   // why it was written to (Told); read it empty before reuse
  };
  enum Told : unsigned {
    told_delivered = 1,  // outcomes for its call (any, for call 0)
    told_woken = 2,      // wake(): end the round
    told_refresh = 4,    // the watcher: what to poll the workers for has changed
    told_take_over = 8,  // nobody watches the workers' sockets any more
  };
  std::vector<Waiter> waiters_;
  /// Whether a round waits on the workers' sockets (the watcher), and for
  /// what (a pollfd per worker, in the workers' order).
  bool watched_ = false;
  std::vector<pollfd> watched_set_;
  std::vector<std::uint64_t> watched_serials_;  // whose sockets those are
  /// Calls that outcomes were delivered to since their waiters were told.
  std::vector<std::uint64_t> delivered_to_;
  void tell(Waiter& w, unsigned why) noexcept;
  /// Tells the waiters of the calls in delivered_to_ (and those of any
  /// call); whether `for_call`'s outcomes were among them.
  bool tell_delivered(std::uint64_t for_call) noexcept;
  /// Whether the watcher polls the workers for other than they need now.
  bool watched_set_stale() const noexcept;
  /// After a round: tells the watcher of a stale set, or, with none, hands
  /// the watch to a waiter.
  void keep_workers_watched() noexcept;
  /// Those descriptors between rounds: as many as rounds may run at once
  /// (one kept between rounds, more only while several run).
  std::vector<int> spare_wakes_;
  /// Makes the first of those if it can (after the workers: they come first
  /// under a tight ulimit -n; a round that gets none polls the workers itself).
  void keep_a_round_descriptor() noexcept;
  /// A descriptor for a Waiter (-1 if none can be made).
  int take_wake_fd() noexcept;
  /// Takes `fd` back, and closes those no round running now could use.
  void give_back_wake_fd(int fd) noexcept;
  RecentTaskTime submitted_task_time_;  // one-task calls (Pool::submit)
  unsigned callers_pumping_ = 0;
  unsigned rounds_in_progress_ = 0;
  std::int64_t caller_pumped_ns_ = 0;  // when a caller's round last ended
  std::uint64_t next_worker_serial_ = 1;
  // New workers that died before they were ready, in a row: see note_start_up_death.
  unsigned start_up_deaths_ = 0;
  std::int64_t start_up_row_ns_ = 0;  // when the first of them died
  bool start_up_row_killed_ = true;   // each by SIGKILL
  OomWatch oom_;
  static constexpr unsigned orphan_allowance = 3;
  static constexpr std::int64_t killed_start_up_row_ns = 2'000'000'000;  // see note_start_up_death
  bool stopping_ = false;
  bool tail_chunks_queue_ = false;  // see let_tail_chunks_queue()
  // Every chunk's time on its worker, summed: an MPI node reads it to tell the
  // root its workers' time apart from the time a chunk spends travelling.
  std::atomic<std::uint64_t> compute_nanos_{0};
  std::exception_ptr broken_;    // set when workers keep dying before doing any work
  Worker* receiving_ = nullptr;  // the worker whose replies take() is handed
  bool receiving_lost_ = false;  // take() found its reply answering the wrong chunk
  pid_t parent_pid_;
};

Engine::LinkFactory Engine::Impl::local_worker_factory() {
  if (config_.start == Start::spawn && !config_.spawn_logic) {
    throw Error(
        "procpool: Start::spawn works only with procpool::Pool. procpool::map, imap, "
        "imap_unordered and starmap always fork: their function may capture the caller's "
        "memory, which a freshly started process does not have. Use procpool::Pool with "
        "Start::spawn and a function pointer or capture-less lambda, or Start::fork here.");
  }
  if (config_.start == Start::fork_server) {
    fork_server_ = std::make_unique<ForkServer>(
        ForkServerBirth{parent_pid_, config_.inner_threads, config_.task_timeout.count() > 0,
                        config_.fork_from_helper_thread, &make_logic_});
  }
  return [this](unsigned) {
    WorkerBirth birth;
    birth.start = config_.start;
    birth.parent = parent_pid_;
    birth.inner_threads = config_.inner_threads;
    birth.task_timeout = config_.task_timeout.count() > 0;
    birth.from_helper_thread = config_.fork_from_helper_thread;
    birth.make_logic = &make_logic_;
    birth.spawn_logic = config_.spawn_logic.get();
    birth.fork_server = fork_server_.get();
    return start_worker_process(birth);
  };
}

void Engine::Impl::start_workers() {
  for (unsigned i = 0; i < config_.processes; ++i) {
    try {
      start_worker(i);
    } catch (const std::system_error& e) {
      // A limit on descriptors or processes (ulimit -n, -u) lets only some
      // start: run with those rather than not at all, and say which limit.
      if (!is_resource_limit(e.code())) throw;
      if (i == 0) {
        throw std::system_error(
            e.code(), "procpool: no worker could start: " + describe_resource_limit(e.code()) +
                          " (" + e.what() + "); raise the limit");
      }
      const std::string note =
          "started " + std::to_string(i) + " of " + std::to_string(config_.processes) +
          " workers: " + describe_resource_limit(e.code()) + " (" + e.what() + ")";
      std::fprintf(stderr, "procpool: warning: %s\n", note.c_str());
      telemetry_.add_note(note);
      telemetry_.keep_positions(i);
      config_.processes = i;
      return;
    }
  }
}

void Engine::Impl::start_worker(unsigned position) {
  const std::int64_t started = steady_now_ns();
  Worker worker;
  worker.link = start_link_(position);
  telemetry_.add_starting_time(static_cast<std::uint64_t>(steady_now_ns() - started));
  worker.serial = next_worker_serial_++;
  worker.position = position;
  telemetry_.worker_started(position, worker.link->pid());
  for (auto& [id, call] : calls_) {
    // Not a setup that killed its workers: no task of that call runs again.
    if (call.scope == SetupScope::every_worker && !call.setup.empty() && !call.setup_failed) {
      worker.link->send_setup(id, call.setup);
    }
  }
  workers_.push_back(std::move(worker));
}

void Engine::Impl::restart_worker(unsigned position) {
  if (stopping_) return;
  try {
    start_worker(position);
  } catch (const std::exception& e) {
    // No process (ulimit -u), no descriptor, or a fork server whose
    // initializer now fails: the others work on with one worker fewer (the
    // insights say so); with none left every task fails with why, rather
    // than wait for a worker for ever.
    const std::string why =
        "worker " + std::to_string(position) + " could not be replaced: " + e.what();
    telemetry_.add_note(why);
    if (!workers_.empty()) return;
    broken_ = std::make_exception_ptr(Error("procpool: no worker is left: " + why));
    fail_pending(broken_);
  }
}

std::uint64_t Engine::Impl::open_call(Buffer setup, SetupScope scope) {
  take_in_posts();  // (they came first)
  const std::uint64_t id = reserve_call();
  CallState& call = calls_[id];
  call.setup = std::move(setup);
  call.idle_workers_only = opens_idle_workers_only_calls;
  if (call.idle_workers_only) call.worker_nanos = idle_workers_only_nanos;
  // Such a call is a task or a few (a node's chunk of long tasks): its setup
  // goes with its chunk to the one worker that runs it, not to every worker
  // of the node and an end frame after (two frames per worker per task).
  call.scope = call.idle_workers_only ? SetupScope::each_chunk : scope;
  if (call.scope == SetupScope::every_worker && !call.setup.empty()) {
    const std::size_t quota = config_.max_tasks_per_child;
    for (Worker& w : workers_) {
      // One past its quota runs no task again: it would decode the setup
      // after its last reply, and its recycling wait for that decode to end.
      if (quota == 0 || w.tasks_sent < quota) w.link->send_setup(id, call.setup);
    }
  }
  return id;
}

void Engine::Impl::close_call(std::uint64_t call, bool may_have_queued) {
  try {
    take_in_posts();  // the call may be among them
  } catch (...) {
    // Out of memory: they stay posted. (This runs from destructors; a call
    // closed while still posted then runs when taken in, its outcome unread.)
  }
  auto it = calls_.find(call);
  if (it == calls_.end()) return;
  const bool had_setup = !it->second.setup.empty();
  const bool workers_keep_setup = had_setup && it->second.scope == SetupScope::every_worker;
  calls_.erase(it);
  if (may_have_queued) std::erase_if(pending_, [call](const Chunk& c) { return c.call == call; });
  if (!had_setup) return;
  if (local_logic_) local_logic_->end(call);
  if (!workers_keep_setup) return;  // each worker forgot it after its chunk
  for (Worker& w : workers_)
    w.link->send_end_call(call);
}

void Engine::Impl::submit(Chunk chunk) {
  take_in_posts();  // they came first
  queue(std::move(chunk));
}

void Engine::Impl::queue(Chunk&& chunk) {
  if (fail_if_setup_failed(chunk)) return;
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

bool Engine::Impl::post(std::uint64_t call, Buffer setup, Chunk chunk, std::uint64_t input_ns) {
  PostedCall posted{call,    std::move(setup), std::move(chunk), opens_idle_workers_only_calls,
                    nullptr, input_ns};
  if (posted.idle_workers_only) posted.worker_nanos = idle_workers_only_nanos;
  bool first = false;
  {
    std::lock_guard lock(posts_mutex_);
    if (posts_refused_) return false;
    posts_.push_back(std::move(posted));
    first = posts_.size() == 1;
    posted_.store(posts_.size(), std::memory_order_release);
  }
  if (first) knock();  // after the post is in: whoever reads the word then takes it in
  return true;
}

void Engine::Impl::knock() noexcept {
  if (posts_fd_ < 0) return;
  const std::uint64_t one = 1;
  [[maybe_unused]] const ssize_t n = ::write(posts_fd_, &one, sizeof one);
}

void Engine::Impl::refuse_posts() noexcept {
  std::lock_guard lock(posts_mutex_);
  posts_refused_ = true;
}

bool Engine::Impl::take_posts_word() noexcept {
  if (posts_fd_ < 0) return false;
  std::uint64_t words = 0;
  return ::read(posts_fd_, &words, sizeof words) == static_cast<ssize_t>(sizeof words);
}

void Engine::Impl::take_in_posts() {
  if (posted_.load(std::memory_order_acquire) == 0) return;
  {
    std::lock_guard lock(posts_mutex_);
    taking_in_.swap(posts_);
    posted_.store(0, std::memory_order_release);
  }
  std::size_t done = 0;
  try {
    for (; done < taking_in_.size(); ++done)
      take_in(taking_in_[done]);
  } catch (...) {
    // (Only memory runs out here.) Those not taken in yet stay first in line.
    std::lock_guard lock(posts_mutex_);
    posts_.insert(posts_.begin(),
                  std::make_move_iterator(taking_in_.begin() + static_cast<std::ptrdiff_t>(done)),
                  std::make_move_iterator(taking_in_.end()));
    posted_.store(posts_.size(), std::memory_order_release);
    taking_in_.clear();
    throw;
  }
  taking_in_.clear();
}

void Engine::Impl::take_in(PostedCall& posted) {
  // Nothing is taken from `posted` until nothing can throw: if memory runs
  // out, it goes back to the posts whole (see take_in_posts).
  auto [it, fresh] = calls_.try_emplace(posted.call);
  CallState& call = it->second;
  call.scope = SetupScope::each_chunk;
  call.idle_workers_only = posted.idle_workers_only;
  call.worker_nanos = posted.worker_nanos;
  try {
    if (posted.chunk.count != 0) queue(std::move(posted.chunk));  // (0: its input failed)
  } catch (...) {
    if (fresh) calls_.erase(it);
    throw;
  }
  call.setup = std::move(posted.setup);
  telemetry_.add_parent_time(posted.input_ns, 0);
}

double Engine::Impl::nanos_per_task(std::uint64_t call) const {
  auto it = calls_.find(call);
  if (it == calls_.end()) return 0.0;
  const double measured = it->second.task_time.nanos_per_task();
  // A submitted task is a call of its own, never timed before it runs: the
  // submits before it are the best guess, so that a stream of tiny submits
  // keeps each worker's pipeline full instead of two tasks deep.
  if (measured <= 0 && it->second.scope == SetupScope::each_chunk) {
    return submitted_task_time_.nanos_per_task();
  }
  return measured;
}

std::size_t Engine::Impl::outstanding() const noexcept {
  std::size_t n = queued();
  for (const Worker& w : workers_)
    n += w.inflight.size();
  return n;
}

std::vector<pid_t> Engine::Impl::worker_pids() const {
  std::vector<pid_t> pids;
  for (const Worker& w : workers_)
    pids.push_back(w.link->pid());
  return pids;
}

Engine::Impl::Worker* Engine::Impl::least_loaded_for(const Chunk& chunk,
                                                     const std::vector<std::uint64_t>* skip) {
  const CallState& call = calls_.at(chunk.call);
  const std::size_t depth =
      call.idle_workers_only
          ? 1
          : SchedulePolicy::queue_limit(chunk.count, chunk.tail && !tail_chunks_queue_,
                                        call.scope == SetupScope::each_chunk,
                                        nanos_per_task(chunk.call));
  const std::size_t quota = config_.max_tasks_per_child;
  Worker* best = nullptr;
  for (Worker& w : workers_) {
    if (quota != 0 && w.tasks_sent >= quota) continue;  // to be recycled once idle
    if (!w.link->ready_for(chunk)) continue;
    if (skip && std::find(skip->begin(), skip->end(), w.serial) != skip->end()) continue;
    if (w.inflight.size() < depth && (!best || w.inflight.size() < best->inflight.size())) {
      best = &w;
    }
  }
  return best;
}

void Engine::Impl::dispatch() {
  take_in_posts();
  while (!pending_.empty()) {
    if (!calls_.contains(pending_.front().call) || !encode_again_if_handed_over(pending_.front())) {
      pending_.pop_front();
      continue;
    }
    if (Worker* best = least_loaded_for(pending_.front())) {
      send_queued(pending_.begin(), *best);
      continue;
    }
    if (!pass_waiting_head()) return;
  }
}

bool Engine::Impl::pass_waiting_head() {
  const Chunk& head = pending_.front();
  if (head_wait_.call != head.call || head_wait_.first != head.first) {
    head_wait_.call = head.call;
    head_wait_.first = head.first;
    head_wait_.passed_to.clear();
  }
  if (head_wait_.passed_to.size() >= workers_.size()) return false;
  // A call's own chunks keep their order: only the first queued chunk of
  // each other call may pass.
  std::vector<std::uint64_t>& seen = calls_seen_behind_head_;
  seen.assign(1, head.call);
  const std::size_t end = std::min(pending_.size(), 1 + max_chunks_scanned_past_head);
  for (std::size_t i = 1; i < end; ++i) {
    const Chunk& chunk = pending_[i];
    if (std::find(seen.begin(), seen.end(), chunk.call) != seen.end()) continue;
    seen.push_back(chunk.call);
    // A closed call's chunks are dropped once they head the queue; one to
    // encode again (a retry of an input handed over) waits for its turn, so
    // that its bytes are not made and held before a worker can take them.
    if (!calls_.contains(chunk.call) || chunk.handed_over()) continue;
    if (Worker* best = least_loaded_for(chunk, &head_wait_.passed_to)) {
      head_wait_.passed_to.push_back(best->serial);
      send_queued(pending_.begin() + static_cast<std::ptrdiff_t>(i), *best);
      return true;
    }
  }
  return false;
}

void Engine::Impl::send_queued(std::deque<Chunk>::iterator at, Worker& worker) {
  Chunk chunk;
  const std::size_t quota = config_.max_tasks_per_child;
  if (quota != 0 && worker.tasks_sent + at->count > quota) {
    // Send only what the worker may still run; the rest stays queued for another.
    const std::uint64_t fits = quota - worker.tasks_sent;
    chunk = slice(*at, 0, fits);
    *at = slice(*at, fits, at->count);
  } else {
    chunk = std::move(*at);
    pending_.erase(at);
  }
  worker.tasks_sent += chunk.count;
  const CallState& call = calls_.at(chunk.call);
  const bool own_setup = call.scope == SetupScope::each_chunk && !call.setup.empty();
  worker.link->send_chunk(chunk, own_setup ? &call.setup : nullptr);
  // The link holds its own descriptor of the memory file (or a copy of the
  // bytes): the worker may now give its pages back as it decodes them.
  if (chunk.source) chunk.payload = Buffer{};
  worker.inflight.push_back(std::move(chunk));
}

bool Engine::Impl::encode_again_if_handed_over(Chunk& chunk) {
  if (!chunk.handed_over()) return true;
  try {
    chunk.source->encode(chunk);
    return true;
  } catch (...) {
    finish_chunk(chunk, ChunkDone::failed(chunk.first, chunk.count, std::current_exception()));
    return false;
  }
}

bool Engine::Impl::flush(Worker& w) {
  if (!w.link->wants_write() || w.link->flush().is_open()) return true;
  lose(w.serial, Loss::died);
  return false;
}

bool Engine::Impl::take(Reply reply) {
  Worker& w = *receiving_;
  const ChunkDone& done = reply.done;
  if (w.inflight.empty() || w.inflight.front().call != reply.call ||
      w.inflight.front().first != done.first || w.inflight.front().count != done.count) {
    receiving_lost_ = true;
    return false;
  }
  Chunk chunk = std::move(w.inflight.front());
  w.inflight.pop_front();
  telemetry_.chunk_done(w.position, done.count, reply.nanos, reply.slowest_index,
                        reply.slowest_nanos);
  compute_nanos_.fetch_add(reply.nanos, std::memory_order_relaxed);
  if (auto it = calls_.find(chunk.call); it != calls_.end()) {
    // A worker decoded the setup: deaths in it before were not the setup's.
    it->second.setup_deaths = 0;
    it->second.setup_deaths_killed = true;
    it->second.task_time.add(done.count, static_cast<double>(reply.nanos));
    if (it->second.worker_nanos) *it->second.worker_nanos += reply.nanos;
    if (it->second.scope == SetupScope::each_chunk) {
      submitted_task_time_.add(done.count, static_cast<double>(reply.nanos));
    }
  }
  finish_chunk(chunk, std::move(reply.done));
  return true;
}

bool Engine::Impl::serve_events(Worker& w, short revents) {
  if ((revents & POLLOUT) && !flush(w)) return false;
  if ((revents & (POLLIN | POLLHUP | POLLERR)) == 0) return true;
  receiving_ = &w;
  receiving_lost_ = false;
  const LinkState state = w.link->receive(*this);
  receiving_ = nullptr;
  if (receiving_lost_) {
    lose(w.serial, Loss::corrupt,
         std::make_exception_ptr(
             ProtocolError("procpool: worker " + std::to_string(w.link->pid()) +
                           " answered a task it was not running; the worker was replaced")));
    return false;
  }
  if (!state.is_open()) {
    lose(w.serial, state.kind == LinkState::corrupt ? Loss::corrupt : Loss::died, state.error);
    return false;
  }
  after_replies(w);
  return true;
}

void Engine::Impl::after_replies(Worker& w) {
  const std::size_t quota = config_.max_tasks_per_child;
  if (quota != 0 && w.tasks_sent >= quota && w.inflight.empty() && !w.link->mid_message()) {
    recycle(w.serial);
  }
}

void Engine::Impl::finish_chunk(const Chunk& chunk, ChunkDone done) {
  // Noted for a closed call too: a round that waits for any call's outcomes
  // (join(), waiting for the workers to finish) hears of it.
  if (std::find(delivered_to_.begin(), delivered_to_.end(), chunk.call) == delivered_to_.end())
    delivered_to_.push_back(chunk.call);
  auto it = calls_.find(chunk.call);
  if (it == calls_.end()) return;
  it->second.completed.push_back(std::move(done));
}

void Engine::Impl::requeue_front(std::deque<Chunk>& chunks) {
  while (!chunks.empty()) {
    if (calls_.contains(chunks.back().call) && !fail_if_setup_failed(chunks.back())) {
      pending_.push_front(std::move(chunks.back()));
    }
    chunks.pop_back();
  }
}

void Engine::Impl::charge_setup(std::uint64_t call_id, pid_t pid, const WorkerExit& exit,
                                bool timed_out) {
  // The worker was decoding the call's setup (its extra arguments), which
  // every worker decodes before the call's first task: no task is to blame,
  // and each would kill its own worker in turn. So the call is charged: its
  // chunks go again as they are while deaths <= retries, then every task of
  // it not yet run fails (requeue_front and submit fail them as they come).
  // Deaths that were all SIGKILLs from outside (a storm, while a big setup
  // is decoded) get the allowance of a task orphaned by them.
  auto it = calls_.find(call_id);
  if (it == calls_.end()) return;
  CallState& call = it->second;
  if (call.setup_failed) return;
  ++call.setup_deaths;
  const bool killed = exit.signal == SIGKILL && !timed_out && !killed_for_memory(pid, exit);
  call.setup_deaths_killed = call.setup_deaths_killed && killed;
  const unsigned allowed = config_.retries + (call.setup_deaths_killed ? orphan_allowance : 0);
  if (call.setup_deaths > allowed) {
    call.setup_failed = SetupDeath{pid, exit.signal, exit.code, timed_out, call.setup_deaths};
    std::erase_if(pending_, [this](const Chunk& c) { return fail_if_setup_failed(c); });
  }
}

bool Engine::Impl::killed_for_memory(pid_t pid, const WorkerExit& exit) {
  std::optional<std::string> seen = oom_.explain_kill(exit.counted.peak_rss_kb);
  if (!seen) return false;
  telemetry_.note_out_of_memory("worker " + std::to_string(pid) +
                                " decoding a call's extra arguments was killed by the OOM "
                                "killer: " +
                                seen->substr(seen->find(": ") + 2) +
                                "; use fewer processes, or smaller extra arguments");
  return true;
}

bool Engine::Impl::fail_if_setup_failed(const Chunk& chunk) {
  auto it = calls_.find(chunk.call);
  if (it == calls_.end() || !it->second.setup_failed) return false;
  const SetupDeath& death = *it->second.setup_failed;
  for (std::uint64_t i = 0; i < chunk.count; ++i) {
    const auto index = static_cast<std::size_t>(chunk.first + i);
    std::exception_ptr failure =
        death.timed_out
            ? std::make_exception_ptr(TaskTimeout::in_setup(index, config_.task_timeout))
            : std::make_exception_ptr(WorkerCrashed::in_setup(index, death.pid, death.signal,
                                                              death.code, death.deaths));
    finish_chunk(chunk, ChunkDone::failed(chunk.first + i, 1, std::move(failure)));
  }
  return true;
}

void Engine::Impl::charge(Chunk task, std::exception_ptr failure, std::deque<Chunk>& requeue) {
  ++task.attempts;
  if (task.attempts <= config_.retries) {
    requeue.push_back(std::move(task));
    return;
  }
  finish_chunk(task, ChunkDone::failed(task.first, task.count, std::move(failure)));
}

void Engine::Impl::fail_pending(const std::exception_ptr& reason) {
  while (!pending_.empty()) {
    Chunk c = std::move(pending_.front());
    pending_.pop_front();
    finish_chunk(c, ChunkDone::failed(c.first, c.count, copy_for_one_chunk(reason)));
  }
}

void Engine::Impl::lose(std::uint64_t serial, Loss loss, std::exception_ptr corrupt,
                        std::optional<RunningTaskRef> overran) {
  Worker& w = *find_worker(serial);
  const pid_t pid = w.link->pid();
  w.link->begin_end(loss == Loss::died ? WorkerLink::Ending::lost : WorkerLink::Ending::killed);
  WorkerExit exit = w.link->finish_end();
  if (overran) exit.running = overran;
  telemetry_.worker_left(w.position,
                         loss == Loss::died        ? Departure::crashed
                         : loss == Loss::timed_out ? Departure::timed_out
                                                   : Departure::corrupt,
                         exit.counted);
  std::deque<Chunk> requeue;
  bool charged = false;
  if (exit.running && exit.running->setup && loss != Loss::corrupt) {
    // It died decoding a call's setup: its chunks go again as they are (or
    // fail, in requeue_front, once that setup has killed too many workers).
    charge_setup(exit.running->call, pid, exit, loss == Loss::timed_out);
    for (Chunk& chunk : w.inflight)
      requeue.push_back(std::move(chunk));
    w.inflight.clear();
  }
  // The chunk the dead worker was working on, though no task of it was
  // running (it died between two, or with the reply on its way), goes again
  // in halves: under a storm of kills, smaller pieces get their replies home
  // between them. The chunks queued behind it had no chance to run: they go
  // again as they are.
  bool front = true;
  // A task of this chunk took the worker's link, which one the worker could
  // not tell (LinkWatch): it is the one worked on, wherever it stands.
  const auto took_the_link = [&](const Chunk& chunk) {
    const std::optional<RunningTaskRef>& near = exit.closed_link_near;
    return chunk.call == near->call && near->index >= chunk.first &&
           near->index < chunk.first + chunk.count;
  };
  const bool link_taken = exit.link_taken();
  const auto send_again = [&](Chunk chunk) {
    if (link_taken && !exit.closed_link_near) {
      // Any of them may hold the task that took it: none is charged, each is
      // checked on its own next time.
      chunk.check_link = true;
      requeue.push_back(std::move(chunk));
      return;
    }
    if (link_taken) chunk.check_link = true;
    const bool worked_on =
        exit.closed_link_near ? took_the_link(chunk) : std::exchange(front, false);
    if (worked_on && exit.ready && loss != Loss::corrupt && !exit.running) {
      orphan(std::move(chunk), pid, exit, requeue);
    } else {
      requeue.push_back(std::move(chunk));
    }
  };
  for (Chunk& chunk : w.inflight) {
    if (loss == Loss::corrupt) {
      // The garbage stood where the oldest unanswered chunk's reply belonged.
      if (charged) {
        send_again(std::move(chunk));
        continue;
      }
      finish_chunk(chunk, ChunkDone::failed(chunk.first, chunk.count, corrupt));
      charged = true;
      continue;
    }
    const bool holds_culprit = exit.running && chunk.call == exit.running->call &&
                               exit.running->index >= chunk.first &&
                               exit.running->index < chunk.first + chunk.count;
    if (!holds_culprit) {
      send_again(std::move(chunk));  // not started, or finished but its reply was lost
      continue;
    }
    front = false;
    const std::uint64_t culprit = exit.running->index;
    const std::uint64_t at = culprit - chunk.first;
    // Only the culprit is charged; its neighbours start their own count.
    const unsigned culprit_attempts = chunk.attempts;
    chunk.attempts = 0;
    if (at > 0) requeue.push_back(slice(chunk, 0, at));
    const auto index = static_cast<std::size_t>(culprit);
    std::exception_ptr failure =
        loss == Loss::timed_out ? std::make_exception_ptr(TaskTimeout(index, config_.task_timeout))
                                : crash_of(index, pid, exit, w.position);
    Chunk task = slice(chunk, at, at + 1);
    task.attempts = culprit_attempts;
    charge(std::move(task), failure, requeue);
    if (at + 1 < chunk.count) requeue.push_back(slice(chunk, at + 1, chunk.count));
    charged = true;
  }
  note_start_up_death(pid, exit);
  const unsigned position = w.position;
  std::erase_if(workers_, [serial](const Worker& x) { return x.serial == serial; });
  requeue_front(requeue);
  if (broken_) {
    fail_pending(broken_);
    return;
  }
  restart_worker(position);
}

std::exception_ptr Engine::Impl::crash_of(std::size_t index, pid_t pid, const WorkerExit& exit,
                                          unsigned position) {
  if (exit.link_taken()) {
    return std::make_exception_ptr(
        WorkerCrashed::closed_link(index, pid, exit.code, exit.closed_link_fd));
  }
  if (exit.signal == SIGKILL) {
    if (std::optional<std::string> seen = oom_.explain_kill(exit.counted.peak_rss_kb)) {
      telemetry_.note_out_of_memory(
          "worker " + std::to_string(position) + " (pid " + std::to_string(pid) +
          ") running task " + std::to_string(index) +
          " was killed by the OOM killer: " + seen->substr(seen->find(": ") + 2) +
          "; use fewer processes, or tasks that need less memory");
      return std::make_exception_ptr(WorkerCrashed::out_of_memory(index, pid, *seen));
    }
  }
  return std::make_exception_ptr(WorkerCrashed(index, pid, exit.signal, exit.code));
}

void Engine::Impl::orphan(Chunk chunk, pid_t pid, const WorkerExit& exit,
                          std::deque<Chunk>& requeue) {
  if (chunk.count > 1) {
    const std::uint64_t half = chunk.count / 2;
    requeue.push_back(slice(chunk, 0, half));
    requeue.push_back(slice(chunk, half, chunk.count));
    return;
  }
  // One task whose worker keeps dying while it waits or while its result is
  // on the way, never while it runs: after as many chances as a task that
  // crashes its worker gets (and a few more), it fails rather than loop.
  if (++chunk.orphaned <= config_.retries + orphan_allowance) {
    requeue.push_back(std::move(chunk));
    return;
  }
  const auto index = static_cast<std::size_t>(chunk.first);
  finish_chunk(chunk, ChunkDone::failed(chunk.first, chunk.count,
                                        std::make_exception_ptr(WorkerCrashed(
                                            index, pid, exit.signal, exit.code,
                                            "its worker died " + std::to_string(chunk.orphaned) +
                                                " times while it was queued or its result on "
                                                "the way, never while it ran"))));
}

void Engine::Impl::note_start_up_death(pid_t pid, const WorkerExit& exit) {
  if (exit.ready || stopping_) {
    start_up_deaths_ = 0;
    return;
  }
  // A worker that dies before it can run anything (its initializer crashes,
  // or exits) costs no task, but a pool whose every new worker dies can never
  // make progress. Deaths of ready workers between tasks are not counted:
  // under a storm of kills from outside the work still goes on.
  // But a storm on a loaded machine, where starting is slow, kills a few new
  // workers in a row now and then too. So when each was killed (SIGKILL: not
  // the worker's own doing), the row must also have lasted a while: the
  // killer sets the pace, and a restart loop is no faster than it.
  // Once broken, it stays broken with the same reason: the tasks it failed
  // carry that very exception (see Engine::broken).
  const std::int64_t now = steady_now_ns();
  if (++start_up_deaths_ == 1) {
    start_up_row_ns_ = now;
    start_up_row_killed_ = true;
  }
  start_up_row_killed_ = start_up_row_killed_ && exit.signal == SIGKILL;
  const std::int64_t lasted_ns = now - start_up_row_ns_;
  if (broken_ || start_up_deaths_ <= 2 * config_.processes + 2 ||
      (start_up_row_killed_ && lasted_ns < killed_start_up_row_ns))
    return;
  broken_ = std::make_exception_ptr(
      Error("procpool: " + std::to_string(start_up_deaths_) +
            " new workers in a row died while starting" +
            (start_up_row_killed_ ? ", over " + seconds_text(lasted_ns) : std::string()) +
            ", before they could run a task (the last, pid " + std::to_string(pid) + ", " +
            describe_death(exit.signal, exit.code) +
            "); check the pool's initializer, or what kills processes as they start"));
}

void Engine::Impl::recycle(std::uint64_t serial) {
  // Idle and past its quota: ask it to exit, wait for it, start a successor.
  Worker& w = *find_worker(serial);
  w.link->begin_end(WorkerLink::Ending::finished);
  telemetry_.worker_left(w.position, Departure::recycled, w.link->finish_end().counted);
  replace(serial, w.position);
}

void Engine::Impl::replace(std::uint64_t serial, unsigned position) {
  std::erase_if(workers_, [serial](const Worker& x) { return x.serial == serial; });
  restart_worker(position);
}

void Engine::Impl::enforce_timeouts() {
  if (config_.task_timeout.count() <= 0) return;
  const std::int64_t limit =
      std::chrono::duration_cast<std::chrono::nanoseconds>(config_.task_timeout).count();
  bool killed = true;
  while (killed) {  // lose() changes the worker list
    killed = false;
    const std::int64_t now = steady_now_ns();
    for (Worker& w : workers_) {
      const std::optional<RunningTaskRef> task = w.link->running_task();
      if (task && now - task->started_ns > limit) {
        lose(w.serial, Loss::timed_out, nullptr, task);
        killed = true;
        break;
      }
    }
  }
}

std::chrono::milliseconds Engine::Impl::time_to_next_deadline() const {
  constexpr std::chrono::milliseconds none{24 * 3600 * 1000};
  if (config_.task_timeout.count() <= 0) return none;
  const std::int64_t limit =
      std::chrono::duration_cast<std::chrono::nanoseconds>(config_.task_timeout).count();
  const std::int64_t now = steady_now_ns();
  std::int64_t nearest = std::numeric_limits<std::int64_t>::max();
  bool any = false;
  for (const Worker& w : workers_) {
    const std::optional<RunningTaskRef> task = w.link->running_task();
    if (!task) continue;
    any = true;
    nearest = std::min(nearest, task->started_ns + limit - now);
  }
  if (!any) {
    // A task may start any moment; look again well within the limit.
    return std::min(none, std::max(std::chrono::milliseconds(1), config_.task_timeout / 4));
  }
  return std::chrono::milliseconds(std::max<std::int64_t>(0, nearest / 1000000 + 1));
}

Engine::Impl::Worker* Engine::Impl::find_worker(std::uint64_t serial) {
  for (Worker& w : workers_) {
    if (w.serial == serial) return &w;
  }
  return nullptr;
}

void Engine::Impl::enable_wake() {
  if (wake_enabled_) return keep_a_round_descriptor();
  posts_fd_ = above_standard_streams(::eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK));
  if (posts_fd_ < 0) throw_errno("cannot create an event descriptor for a pool's service thread");
  wake_enabled_ = true;
}

void Engine::Impl::keep_a_round_descriptor() noexcept {
  if (!wake_enabled_ || !spare_wakes_.empty()) return;
  const int fd = above_standard_streams(::eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK));
  if (fd < 0) return;
  try {
    spare_wakes_.push_back(fd);
  } catch (...) {
    ::close(fd);
  }
}

int Engine::Impl::take_wake_fd() noexcept {
  if (spare_wakes_.empty()) return above_standard_streams(::eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK));
  const int fd = spare_wakes_.back();
  spare_wakes_.pop_back();
  return fd;
}

void Engine::Impl::give_back_wake_fd(int fd) noexcept {
  try {
    spare_wakes_.push_back(fd);
  } catch (...) {
    ::close(fd);
  }
  // The rounds still running hold their own; one more waits for the next.
  const std::size_t keep = std::max<std::size_t>(1, rounds_in_progress_);
  while (spare_wakes_.size() > keep) {
    ::close(spare_wakes_.back());
    spare_wakes_.pop_back();
  }
}

void Engine::Impl::tell(Waiter& w, unsigned why) noexcept {
  const bool first = w.told == 0;
  w.told |= why;
  if (!first) return;  // one word is enough
  const std::uint64_t one = 1;
  [[maybe_unused]] const ssize_t n = ::write(w.fd, &one, sizeof one);
}

void Engine::Impl::wake() noexcept {
  for (Waiter& w : waiters_)
    tell(w, told_woken);
}

void Engine::Impl::nudge() noexcept {
  for (Waiter& w : waiters_) {
    if (w.watches) {
      tell(w, told_refresh);
      return;
    }
  }
  if (!waiters_.empty()) tell(waiters_.front(), told_take_over);
}

bool Engine::Impl::tell_delivered(std::uint64_t for_call) noexcept {
  if (delivered_to_.empty()) return false;
  const auto got = [this](std::uint64_t call) {
    return call == 0 ||
           std::find(delivered_to_.begin(), delivered_to_.end(), call) != delivered_to_.end();
  };
  for (Waiter& w : waiters_) {
    if (got(w.call)) tell(w, told_delivered);
  }
  const bool mine = got(for_call);
  delivered_to_.clear();
  return mine;
}

bool Engine::Impl::watched_set_stale() const noexcept {
  if (watched_set_.size() != workers_.size()) return true;
  for (std::size_t i = 0; i < workers_.size(); ++i) {
    // (A replaced worker's socket may reuse its predecessor's number.)
    if (watched_serials_[i] != workers_[i].serial) return true;
    const WorkerLink& link = *workers_[i].link;
    const short events = link.wants_write() ? POLLIN | POLLOUT : POLLIN;
    if (watched_set_[i].fd != link.wait_fd() || watched_set_[i].events != events) return true;
  }
  return false;
}

void Engine::Impl::keep_workers_watched() noexcept {
  if (!wake_enabled_ || waiters_.empty()) return;
  if (!watched_) {
    tell(waiters_.front(), told_take_over);
    return;
  }
  if (!watched_set_stale()) return;
  for (Waiter& w : waiters_) {
    if (w.watches) tell(w, told_refresh);
  }
}

void Engine::Impl::pump(std::unique_lock<std::mutex>& lock, std::chrono::milliseconds timeout,
                        Driver driver, std::uint64_t for_call) {
  struct Round {  // counted until the round ends, even by an exception
    Impl& engine;
    bool caller;
    Round(Impl& e, bool by_caller) : engine(e), caller(by_caller) {
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
  pump_round(lock, timeout, driver == Driver::service, for_call);
}

void Engine::Impl::pump_round(std::unique_lock<std::mutex>& lock, std::chrono::milliseconds timeout,
                              bool hears_posts, std::uint64_t for_call) {
  if (in_process()) {
    run_in_process();
    return;
  }
  // Several threads may pump at once (callers of concurrent calls, the
  // service thread; on a node of an mpi::Pool, a call per long task). One of
  // them, the watcher, waits on the workers' sockets; the others each wait
  // on a descriptor of their own, which a round writes when it delivers
  // outcomes to their call, so that each reply wakes the thread that waits
  // for it and no other. All of them polling every socket, each woken by
  // every reply, a node of 16 workers running 800 tasks of 10 ms spent
  // 278-393 ms of its rank's CPU per map (85-106 now), with 37k polls and
  // 80k context switches over 2400 tasks (4.7k and 27k now). (One
  // descriptor shared by all lost its word to whichever waiter read it
  // first, or to one not yet in poll(): a free worker's next task then
  // started a poll's 100 ms late.)
  struct KeepWatched {
    Impl& engine;
    ~KeepWatched() { engine.keep_workers_watched(); }
  } keep_watched{*this};
  const auto until = std::chrono::steady_clock::now() + timeout;
  // (Without wake(), one thread drives the engine: a round is one wait.)
  while (wait_once(lock, until, hears_posts, for_call) && wake_enabled_) {
  }
}

void Engine::Impl::workers_poll_set(std::vector<pollfd>& fds, std::vector<std::uint64_t>& serials) {
  fds.clear();
  serials.clear();
  for (std::size_t i = 0; i < workers_.size(); ++i) {
    Worker& w = workers_[i];
    if (!flush(w)) {
      i = static_cast<std::size_t>(-1);  // the worker list changed: start over
      fds.clear();
      serials.clear();
      continue;
    }
    const short events = w.link->wants_write() ? POLLIN | POLLOUT : POLLIN;
    fds.push_back(pollfd{w.link->wait_fd(), events, 0});
    serials.push_back(w.serial);
  }
}

bool Engine::Impl::wait_once(std::unique_lock<std::mutex>& lock,
                             std::chrono::steady_clock::time_point until, bool hears_posts,
                             std::uint64_t for_call) {
  enforce_timeouts();
  dispatch();
  std::vector<pollfd> fds;
  std::vector<std::uint64_t> serials;
  workers_poll_set(fds, serials);
  if (fds.empty()) return false;
  const auto left =
      std::chrono::ceil<std::chrono::milliseconds>(until - std::chrono::steady_clock::now());
  auto wait = std::max(std::chrono::milliseconds(0), std::min(left, time_to_next_deadline()));
  // Outcomes delivered before this wait (by this round, above, or one that
  // threw before it could tell): their waiters hear of it now, and this
  // round does not wait if some are its own.
  if (tell_delivered(for_call)) wait = std::chrono::milliseconds(0);
  // Waiting for any call's outcomes with none to come (join(), its last
  // chunks dropped by dispatch() as their call had closed): nothing to wait for.
  if (for_call == 0 && outstanding() == 0) wait = std::chrono::milliseconds(0);
  watched_set_.reserve(fds.size());
  watched_serials_.reserve(fds.size());
  fds.reserve(fds.size() + 1);
  waiters_.reserve(waiters_.size() + 1);  // (nothing below throws, the fd taken)
  // The service thread's round waits on the posts descriptor as its own (it
  // is that descriptor's one reader): a post wakes it as a word from another
  // round does, and the thread that posts (submit) never takes the lock to
  // have its task sent.
  hears_posts = hears_posts && wake_enabled_ && posts_fd_ >= 0;
  const int own = hears_posts ? posts_fd_ : wake_enabled_ ? take_wake_fd() : -1;
  // A round that does not wait, or has no descriptor of its own, polls the
  // sockets itself; so does the first to wait while none watches them.
  const bool polls_workers = wait.count() == 0 || own < 0 || !watched_;
  const bool watches = polls_workers && wait.count() > 0 && own >= 0;
  if (!polls_workers && watched_set_stale()) keep_workers_watched();  // (tells the watcher)
  const std::size_t sockets = fds.size();
  if (own >= 0) {
    fds.push_back(pollfd{own, POLLIN, 0});
    waiters_.push_back(Waiter{own, for_call, watches});
  }
  if (watches) {
    watched_ = true;
    watched_set_.assign(fds.begin(), fds.begin() + static_cast<std::ptrdiff_t>(sockets));
    watched_serials_.assign(serials.begin(), serials.end());
  }
  pollfd* first = polls_workers ? fds.data() : fds.data() + sockets;
  const auto count = static_cast<nfds_t>(fds.data() + fds.size() - first);
  lock.unlock();
  const int ready = ::poll(first, count, static_cast<int>(wait.count()));
  lock.lock();
  unsigned told = 0;
  bool posted = false;
  if (own >= 0) {
    const bool readable = fds.back().revents != 0;
    fds.pop_back();
    const auto me = std::find_if(waiters_.begin(), waiters_.end(),
                                 [own](const Waiter& w) { return w.fd == own; });
    told = me->told;
    waiters_.erase(me);
    if (hears_posts) {
      // (Read before the posts are taken in, below: one posted after that writes again.)
      posted = (readable || told != 0) && take_posts_word();
    } else {
      if (told != 0) {
        std::uint64_t words = 0;
        [[maybe_unused]] const ssize_t n = ::read(own, &words, sizeof words);
      }
      give_back_wake_fd(own);
    }
  }
  if (watches) watched_ = false;
  enforce_timeouts();
  const bool served = polls_workers && ready > 0;
  if (served) {
    for (std::size_t i = 0; i < sockets; ++i) {
      if (fds[i].revents == 0) continue;
      Worker* w = find_worker(serials[i]);
      if (!w || w->link->wait_fd() != fds[i].fd) continue;
      serve_events(*w, fds[i].revents);
    }
  }
  // A round told anything (nudge() among others) hands out what is queued
  // even if its wait had ended before the word came: it may be the last.
  if (served || told != 0 || posted) {
    dispatch();
    for (std::size_t i = 0; i < workers_.size(); ++i) {
      if (!flush(workers_[i])) break;
    }
  }
  // The round ends once outcomes of its call are here (any, for call 0),
  // wake() says so, its time is up, or a signal broke its poll (Ctrl-C).
  const bool mine = tell_delivered(for_call) || (told & (told_delivered | told_woken)) != 0;
  return !mine && ready >= 0 && wait.count() != 0 && std::chrono::steady_clock::now() < until;
}

void Engine::Impl::run_in_process() {
  if (!local_logic_) {
    local_logic_ = make_logic_();
    // No slot and no task timeout: in the caller's own process there is no
    // worker to watch, and nothing to charge a crash or a timeout to.
    local_runner_ = std::make_unique<ChunkRunner>(*local_logic_, nullptr, false);
  }
  take_in_posts();
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
    AttachedFiles files(duplicate_files(chunk.files.get()));
    ScopedPointer<AttachedFiles> decoding(files_being_decoded(), &files);
    const ChunkReport report = local_runner_->run(chunk.call, chunk.first, chunk.count, in, out);
    done.dense = report.dense;
    telemetry_.chunk_done(0, chunk.count, report.nanos, report.slowest_index, report.slowest_nanos);
    compute_nanos_.fetch_add(report.nanos, std::memory_order_relaxed);
    call.task_time.add(chunk.count, static_cast<double>(report.nanos));
    call.completed.push_back(std::move(done));
  }
}

void Engine::Impl::end_all(WorkerLink::Ending how, const std::exception_ptr& reason) {
  stopping_ = true;
  for (Worker& w : workers_)
    w.link->begin_end(how);
  for (Worker& w : workers_) {
    telemetry_.worker_left(w.position, Departure::stopped, w.link->finish_end().counted);
    if (!reason) continue;
    for (Chunk& c : w.inflight)
      finish_chunk(c, ChunkDone::failed(c.first, c.count, copy_for_one_chunk(reason)));
  }
  workers_.clear();
  wake();  // every round waiting on them (their ends' hang-ups told the watcher only)
}

void Engine::Impl::stop_gracefully() {
  take_in_posts();  // to fail them below, as the chunks queued
  // The caller waited for every chunk; one that another thread's call sent
  // since (its lazy range, while join() let go of the lock) fails instead of
  // vanishing: that call would wait for its outcomes for ever.
  const auto late = std::make_exception_ptr(
      PoolClosed("procpool: the pool was joined before this task could run"));
  end_all(WorkerLink::Ending::finished, late);
  fail_pending(late);
}

void Engine::Impl::kill_workers(std::exception_ptr reason) {
  take_in_posts();  // they are queued chunks too
  end_all(WorkerLink::Ending::killed, reason);
  if (reason) fail_pending(reason);
  pending_.clear();
}

Insights Engine::Impl::insights(double wall_seconds) const {
  std::vector<std::pair<unsigned, WorkerCounters>> live;
  for (const Worker& w : workers_)
    live.emplace_back(w.position, w.link->counters());
  return telemetry_.insights(wall_seconds, config_.processes, live);
}

// The public face: every call goes to the Impl, whose members stay out of
// the users' translation units.

namespace {

/// The engines (pools and calls) of this process.
std::atomic<int> live_engines{0};

}  // namespace

Engine::Engine(EngineConfig config, LogicFactory make_logic)
    : impl_(std::make_unique<Impl>(std::move(config), std::move(make_logic), nullptr)) {
  live_engines.fetch_add(1, std::memory_order_relaxed);
  cancel_idle_spare_drop();
}
Engine::Engine(EngineConfig config, LinkFactory start_link)
    : impl_(std::make_unique<Impl>(std::move(config), nullptr, std::move(start_link))) {
  live_engines.fetch_add(1, std::memory_order_relaxed);
  cancel_idle_spare_drop();
}
Engine::~Engine() {
  impl_.reset();  // its workers end
  // The input files workers gave back wait for the next large input of a
  // pool or call; with none left they give their memory back, unless
  // another starts soon (a loop of calls). Not in a worker, whose spares
  // are mostly its own replies' files, kept until it ends (and whose count
  // was inherited from its parent at the fork).
  if (live_engines.fetch_sub(1, std::memory_order_acq_rel) == 1 && !in_worker_process()) {
    drop_spare_memory_files_when_idle();
  }
}

std::uint64_t Engine::open_call(Buffer setup, SetupScope scope) {
  return impl_->open_call(std::move(setup), scope);
}
void Engine::close_call(std::uint64_t call, bool may_have_queued) {
  impl_->close_call(call, may_have_queued);
}
void Engine::submit(Chunk chunk) {
  impl_->submit(std::move(chunk));
}
std::uint64_t Engine::reserve_call() noexcept {
  return impl_->reserve_call();
}
bool Engine::post(std::uint64_t call, Buffer setup, Chunk chunk, std::uint64_t input_ns) {
  return impl_->post(call, std::move(setup), std::move(chunk), input_ns);
}
void Engine::refuse_posts() noexcept {
  impl_->refuse_posts();
}
int Engine::posts_fd() const noexcept {
  return impl_->posts_fd();
}
void Engine::knock() noexcept {
  impl_->knock();
}
bool Engine::take_posts_word() noexcept {
  return impl_->take_posts_word();
}
void Engine::pump(std::unique_lock<std::mutex>& lock, std::chrono::milliseconds timeout,
                  Driver driver, std::uint64_t for_call) {
  impl_->pump(lock, timeout, driver, for_call);
}
bool Engine::caller_driving(std::chrono::milliseconds recently) const {
  return impl_->caller_driving(recently);
}
std::size_t Engine::queued() const noexcept {
  return impl_->queued();
}

bool Engine::pumping() const noexcept {
  return impl_->pumping();
}
void Engine::enable_wake() {
  impl_->enable_wake();
}
void Engine::wake() noexcept {
  impl_->wake();
}
void Engine::nudge() noexcept {
  impl_->nudge();
}
std::list<ChunkDone>& Engine::completed(std::uint64_t call) {
  return impl_->completed(call);
}
double Engine::nanos_per_task(std::uint64_t call) const {
  return impl_->nanos_per_task(call);
}
void Engine::let_tail_chunks_queue() noexcept {
  impl_->let_tail_chunks_queue();
}

std::exception_ptr Engine::broken() const noexcept {
  return impl_->broken();
}

bool Engine::workers_stopped() const noexcept {
  return impl_->workers_stopped();
}

std::uint64_t Engine::compute_nanos() const noexcept {
  return impl_->compute_nanos();
}

std::size_t Engine::outstanding() const noexcept {
  return impl_->outstanding();
}
void Engine::stop_gracefully() {
  impl_->stop_gracefully();
}
void Engine::kill_workers(std::exception_ptr reason) {
  impl_->kill_workers(std::move(reason));
}
unsigned Engine::processes() const noexcept {
  return impl_->processes();
}
Insights Engine::insights(double wall_seconds) const {
  return impl_->insights(wall_seconds);
}
void Engine::add_parent_time(std::uint64_t input_ns, std::uint64_t decode_ns) {
  impl_->add_parent_time(input_ns, decode_ns);
}
std::vector<pid_t> Engine::worker_pids() const {
  return impl_->worker_pids();
}

}  // namespace procpool::detail
