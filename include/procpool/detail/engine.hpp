// The task engine under every way of running: it queues the calls' chunks,
// hands them to workers through WorkerLinks (worker_link.hpp), collects the
// replies, and charges a lost worker's chunk to the task it was running.
// It knows nothing about types: inputs and results are bytes here.
//
// Its rooms: the schedule (schedule.hpp), the links to local worker processes
// (src/worker_process.cpp, over src/channel.cpp), the books (telemetry.hpp).
#pragma once

#include <sys/types.h>

#include <chrono>
#include <cstdint>
#include <exception>
#include <functional>
#include <list>
#include <memory>
#include <mutex>
#include <optional>
#include <vector>

#include "procpool/detail/buffer.hpp"
#include "procpool/detail/chunk.hpp"
#include "procpool/options.hpp"

namespace procpool {
struct Insights;
}

namespace procpool::detail {

class WorkerLogic;
class WorkerLink;

/// How the engine treats failing workers; filled from Options.
struct EngineConfig {
  unsigned processes = 1;
  Start start = Start::fork;
  unsigned retries = 0;
  std::chrono::milliseconds task_timeout{0};
  std::size_t max_tasks_per_child = 0;
  /// Fork from a helper thread that lives as long as the process (or from the
  /// main thread), so that a worker's PR_SET_PDEATHSIG never fires because the
  /// thread that forked it ended.
  bool fork_from_helper_thread = false;
  /// Value for the inner thread-count variables in workers; 0 leaves them alone.
  unsigned inner_threads = 0;
  /// Start::spawn: what a spawned worker builds its logic from (the make_logic
  /// given to the Engine cannot cross an exec). Null: this engine cannot spawn.
  std::shared_ptr<const Buffer> spawn_logic;
  /// Make the descriptors that enable_wake() makes before the workers start,
  /// so that under a tight ulimit -n the workers take what is left, not the
  /// pool's service thread's. If they cannot be made, enable_wake() tries again.
  bool wake_before_workers = false;
};

/// How many workers to start and what inner thread count to give them.
struct ProcessPlan {
  unsigned processes = 1;
  unsigned inner_threads = 0;
};

/// Resolves Options::processes against the usable CPUs (no more workers than
/// `inputs`, when known), warning once per process about oversubscription.
[[nodiscard]] ProcessPlan plan_processes(const Options& options, std::optional<std::size_t> inputs);

[[nodiscard]] inline EngineConfig engine_config(const Options& options, const ProcessPlan& plan,
                                                bool fork_from_helper_thread) {
  return EngineConfig{plan.processes,
                      options.start,
                      options.retries,
                      options.task_timeout,
                      options.max_tasks_per_child,
                      fork_from_helper_thread,
                      plan.inner_threads,
                      nullptr};
}

class Engine {
 public:
  /// Builds what a worker does with its messages; called in each worker right
  /// after the fork (or once in the caller for Start::in_process; never for
  /// Start::spawn, whose workers build it from EngineConfig::spawn_logic).
  using LogicFactory = std::function<std::unique_ptr<WorkerLogic>()>;
  /// Starts the worker for position `position` (0 .. processes - 1), e.g. a
  /// remote node's; the engine calls it again to replace a lost one.
  using LinkFactory = std::function<std::unique_ptr<WorkerLink>(unsigned position)>;

  /// Starts `config.processes` local workers now (none for Start::in_process).
  Engine(EngineConfig config, LogicFactory make_logic);
  /// Starts `config.processes` workers through `start_link` (config.start is not used).
  Engine(EngineConfig config, LinkFactory start_link);
  ~Engine();
  Engine(const Engine&) = delete;
  Engine& operator=(const Engine&) = delete;

  /// How a call's setup reaches the workers.
  enum class SetupScope {
    /// Once to every worker (replacements included) before the call's first
    /// task, and an end frame to each when the call closes: for calls of many chunks.
    every_worker,
    /// With each chunk, to the one worker that runs it, which forgets it
    /// after the chunk: O(1) messages for a call of one task (Pool::submit).
    each_chunk,
  };

  /// Registers a call; `setup` (if not empty) reaches the workers as `scope` says.
  [[nodiscard]] std::uint64_t open_call(Buffer setup = {},
                                        SetupScope scope = SetupScope::every_worker);
  /// Drops the call's queued chunks, discards its later results and lets workers forget it.
  /// `may_have_queued` false (every outcome was delivered) skips looking for
  /// queued chunks, which costs a pass over the queue.
  void close_call(std::uint64_t call, bool may_have_queued = true);
  void submit(Chunk chunk);

  /// A call id for post(); taken without the engine's lock.
  [[nodiscard]] std::uint64_t reserve_call() noexcept;
  /// Opens call `call` (from reserve_call()) with its setup sent along with
  /// its chunk (SetupScope::each_chunk), and queues `chunk` (nothing if it
  /// has no tasks): what open_call() and submit() do, but without the
  /// engine's lock, for Pool::submit. A thread submitting task after task
  /// then never waits for a round that holds the lock while it moves bytes
  /// (on 2 cores such waits cost each submit a few thread switches). Posted
  /// calls join the engine in the order posted, before anything else it does
  /// with the lock held; `input_ns` is the caller's time encoding the chunk.
  /// The first post since the last were taken in writes posts_fd(). False,
  /// and nothing queued, if refuse_posts() came first.
  [[nodiscard]] bool post(std::uint64_t call, Buffer setup, Chunk chunk, std::uint64_t input_ns);
  /// Refuses every later post() (the pool was closed); with or without the lock.
  void refuse_posts() noexcept;
  /// Readable after a first post() or a knock(), until take_posts_word()
  /// reads it; -1 before enable_wake(). A pool's service thread is its one
  /// reader (one word, one reader: none is lost): its rounds
  /// (Driver::service) wait on it too and take the posts in when it is
  /// written, and between rounds it waits on it alone.
  [[nodiscard]] int posts_fd() const noexcept;
  /// Writes posts_fd(), to wake the service thread; without the lock.
  void knock() noexcept;
  /// Reads posts_fd() empty; whether there was a word. Without the lock.
  bool take_posts_word() noexcept;

  /// Who drives a round: a caller waiting for its results, or a Pool's
  /// service thread, which steps aside while callers drive.
  enum class Driver { caller, service };

  /// One round: hands queued chunks to workers, moves bytes, collects results.
  /// Waits at most `timeout` for outcomes of call `for_call` (of any call,
  /// for 0), or for wake(). The lock (which guards this engine) is released
  /// while waiting so other threads can submit.
  void pump(std::unique_lock<std::mutex>& lock, std::chrono::milliseconds timeout,
            Driver driver = Driver::caller, std::uint64_t for_call = 0);
  /// Whether a caller is driving the engine now or did so within `recently`:
  /// then a service thread has nothing to add but a second poll of the same sockets.
  [[nodiscard]] bool caller_driving(std::chrono::milliseconds recently) const;
  /// Chunks submitted and not yet handed to a worker.
  [[nodiscard]] std::size_t queued() const noexcept;
  /// Whether a round is in progress in any thread (it waits with the lock released).
  [[nodiscard]] bool pumping() const noexcept;
  /// Lets wake() end a round's wait early (for a thread that must stop
  /// promptly), and makes posts_fd(). Throws std::system_error if it cannot
  /// make the descriptors it needs.
  void enable_wake();
  /// Ends the wait of every round in progress, if enable_wake() was called;
  /// with the lock that the rounds run under held (see pump). Nothing is
  /// kept for a round that starts later: a caller checks, under that lock,
  /// what it would have been woken for before it starts one.
  void wake() noexcept;
  /// Has a round in progress hand queued chunks to the workers now, without
  /// ending the others' waits; with the lock held. (A round does so anyway
  /// once a reply arrives.)
  void nudge() noexcept;
  /// Finished chunks of a call, oldest first.
  [[nodiscard]] std::list<ChunkDone>& completed(std::uint64_t call);
  /// Average compute time per task of a call in nanoseconds; 0 until measured.
  [[nodiscard]] double nanos_per_task(std::uint64_t call) const;
  /// Chunks queued or running in workers, for all calls.
  [[nodiscard]] std::size_t outstanding() const noexcept;
  /// Lets a call's last chunks queue behind a busy worker, as its others do
  /// (by default they wait for an idle one, so that the workers finish
  /// together). For a node of an mpi::Pool: the root already deals the last
  /// tasks to nodes with free workers, and a node's next task queued at its
  /// worker starts without waiting for the node's threads to be scheduled.
  void let_tail_chunks_queue() noexcept;

  /// While one lives, the calls that this thread opens send their tasks to
  /// idle workers only, never queued behind a busy one, and their setup
  /// with each chunk (SetupScope::each_chunk). A node of an
  /// mpi::Pool runs each chunk of long tasks as a call of its own: queued at
  /// a busy worker, a task could wait for the slowest task of the node while
  /// another worker was free.
  class IdleWorkersOnly {
   public:
    /// `worker_nanos`, if given, gets the time that the workers spent on
    /// those calls' chunks, as each timed its own, added as each ends (with
    /// the pool's lock held): the node tells the root its task's own time,
    /// not its time in the node's queue too.
    explicit IdleWorkersOnly(std::uint64_t* worker_nanos = nullptr) noexcept;
    ~IdleWorkersOnly();
    IdleWorkersOnly(const IdleWorkersOnly&) = delete;
    IdleWorkersOnly& operator=(const IdleWorkersOnly&) = delete;

   private:
    bool was_;
    std::uint64_t* was_nanos_;
  };
  /// Why the pool can run nothing more (new workers keep dying before they
  /// are ready); null while it can. Every task it fails for that reason
  /// carries this very exception.
  [[nodiscard]] std::exception_ptr broken() const noexcept;
  /// Whether the workers were stopped (stop_gracefully(), kill_workers()):
  /// a chunk submitted now fails with PoolClosed.
  [[nodiscard]] bool workers_stopped() const noexcept;
  /// The time every worker spent running chunks so far (each chunk as its
  /// worker timed it), summed over workers; read without the pool's lock.
  [[nodiscard]] std::uint64_t compute_nanos() const noexcept;

  /// Lets workers finish what they were sent, then ends and reaps them.
  void stop_gracefully();
  /// Kills every worker at once (SIGKILL) and reaps it. Queued and running
  /// chunks fail with `reason`, or are dropped if it is empty. Later
  /// submissions fail with PoolClosed.
  void kill_workers(std::exception_ptr reason = nullptr);

  [[nodiscard]] unsigned processes() const noexcept;
  /// What the workers did, with the diagnosis, for a run of `wall_seconds`.
  [[nodiscard]] Insights insights(double wall_seconds) const;
  /// Time the callers spent producing and serialising inputs, and decoding results.
  void add_parent_time(std::uint64_t input_ns, std::uint64_t decode_ns);
  [[nodiscard]] std::vector<pid_t> worker_pids() const;

 private:
  class Impl;
  std::unique_ptr<Impl> impl_;
};

}  // namespace procpool::detail
