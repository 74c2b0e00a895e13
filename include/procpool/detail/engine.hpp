// The task engine under every way of running: it starts workers, moves chunks
// of tasks to them and their results back, and notices workers that die.
// It knows nothing about types: inputs and results are bytes here.
#pragma once

#include <sys/types.h>
#include <algorithm>
#include <chrono>
#include <cstdint>
#include <deque>
#include <exception>
#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <optional>
#include <vector>

#include "procpool/detail/buffer.hpp"
#include "procpool/detail/protocol.hpp"
#include "procpool/options.hpp"

namespace procpool::detail {

/// Tasks `first` .. `first + count - 1` of one call, sent to a worker as one message.
struct Chunk {
  std::uint64_t call = 0;
  std::uint64_t first = 0;
  std::uint64_t count = 0;
  /// Serialised inputs; empty when the workers read the inputs from inherited memory.
  Buffer payload;
  /// Where each input starts in `payload`, so that a chunk can be split into single tasks.
  std::vector<std::uint64_t> offsets;
  /// When non-zero, every input is this many bytes and `offsets` stays empty.
  std::uint64_t stride = 0;
  /// Times a task of this chunk was charged with its worker's death or a timeout.
  unsigned attempts = 0;
  /// One of a call's last chunks: it goes only to a worker with nothing
  /// queued, so that no worker sits idle while another still has two to do.
  bool tail = false;
};

/// A chunk's outcome as the engine hands it to the call that submitted it.
struct ChunkDone {
  std::uint64_t first = 0;
  std::uint64_t count = 0;
  /// The encoded outcome of each task (see OutcomeTag), from `offset` on, when `failure` is empty.
  Buffer payload;
  /// Set when the chunk produced no outcomes: its worker died or replied garbage.
  std::exception_ptr failure;
  std::size_t offset = 0;
  /// The outcomes are `count` fixed-size values without tags (see flag_dense).
  bool dense = false;
  /// When the outcomes are in a worker's reply arena instead of `payload`:
  /// where, and what keeps the arena mapped (and hands it back when released).
  const std::byte* external = nullptr;
  std::size_t external_size = 0;
  std::shared_ptr<void> lease;

  /// A chunk that produced no outcomes, for `failure`.
  static ChunkDone failed(std::uint64_t first, std::uint64_t count, std::exception_ptr failure) {
    ChunkDone done;
    done.first = first;
    done.count = count;
    done.failure = std::move(failure);
    return done;
  }

  const std::byte* bytes() const noexcept { return external ? external : payload.data() + offset; }
  std::size_t size() const noexcept { return external ? external_size : payload.size() - offset; }
};

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
};

/// How many workers to start and what inner thread count to give them.
struct ProcessPlan {
  unsigned processes = 1;
  unsigned inner_threads = 0;
};

/// Resolves Options::processes against the usable CPUs (no more workers than
/// `inputs`, when known), warning once per process about oversubscription.
ProcessPlan plan_processes(const Options& options, std::optional<std::size_t> inputs);

inline EngineConfig engine_config(const Options& options, const ProcessPlan& plan,
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

/// What one worker position did, summed over the processes that held it.
struct WorkerRecord {
  pid_t pid = 0;  // the current (or last) process
  std::uint64_t tasks = 0;
  std::uint64_t compute_ns = 0;
  std::uint64_t serialize_ns = 0;
  std::uint64_t wait_ns = 0;
  std::uint64_t bytes_in = 0;   // to the worker
  std::uint64_t bytes_out = 0;  // from the worker
  std::uint64_t peak_rss_kb = 0;
  unsigned crashes = 0;
  unsigned timeouts = 0;
  unsigned recycles = 0;
};

struct SlowTask {
  std::uint64_t call = 0;
  std::uint64_t index = 0;
  std::uint64_t nanos = 0;
};

class Engine {
 public:
  /// Builds what a worker does with its messages; called in each worker right
  /// after the fork (or once in the caller for Start::in_process; never for
  /// Start::spawn, whose workers build it from EngineConfig::spawn_logic).
  using LogicFactory = std::function<std::unique_ptr<WorkerLogic>()>;

  /// Starts `config.processes` workers now (none for Start::in_process).
  Engine(EngineConfig config, LogicFactory make_logic);
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
  std::uint64_t open_call(Buffer setup = {}, SetupScope scope = SetupScope::every_worker);
  /// Drops the call's queued chunks, discards its later results and lets workers forget it.
  /// `may_have_queued` false (every outcome was delivered) skips looking for
  /// queued chunks, which costs a pass over the queue.
  void close_call(std::uint64_t call, bool may_have_queued = true);
  void submit(Chunk chunk);
  /// Who drives a round: a caller waiting for its results, or a Pool's
  /// service thread, which steps aside while callers drive.
  enum class Driver { caller, service };

  /// One round: hands queued chunks to workers, moves bytes, collects results.
  /// Waits at most `timeout` for something to happen. The lock (which guards
  /// this engine) is released while waiting so other threads can submit.
  void pump(std::unique_lock<std::mutex>& lock, std::chrono::milliseconds timeout,
            Driver driver = Driver::caller);
  /// Whether a caller is driving the engine now or did so within `recently`:
  /// then a service thread has nothing to add but a second poll of the same sockets.
  [[nodiscard]] bool caller_driving(std::chrono::milliseconds recently) const;
  /// Chunks submitted and not yet handed to a worker.
  [[nodiscard]] std::size_t queued() const noexcept { return pending_.size(); }
  /// Whether a round is in progress in any thread (it waits with the lock released).
  [[nodiscard]] bool pumping() const noexcept { return rounds_in_progress_ != 0; }
  /// Whether a worker has less than two chunks to do: work queued now should
  /// reach it without waiting for the next reply.
  [[nodiscard]] bool worker_running_dry() const noexcept;
  /// Lets wake() end a round's wait early (for a thread that must stop promptly).
  void enable_wake();
  /// Ends the wait of a round in progress, if enable_wake() was called; any thread.
  void wake() noexcept;
  /// Finished chunks of a call, oldest first.
  std::deque<ChunkDone>& completed(std::uint64_t call);
  /// Average compute time per task of a call in nanoseconds; 0 until measured.
  double nanos_per_task(std::uint64_t call) const;
  /// How many chunks of `count` tasks of this call a worker should have queued
  /// so that it never waits for the next message (about 2 ms of work).
  std::size_t pipeline_depth(std::uint64_t call, std::uint64_t count) const;
  /// Chunks queued or running in workers, for all calls.
  std::size_t outstanding() const noexcept;

  /// Lets workers finish what they were sent, then ends and reaps them.
  void stop_gracefully();
  /// Kills every worker at once (SIGKILL) and reaps it. Queued and running
  /// chunks fail with `reason`, or are dropped if it is empty. Later
  /// submissions fail with PoolClosed.
  void kill_workers(std::exception_ptr reason = nullptr);

  unsigned processes() const noexcept { return config_.processes; }
  /// Everything above as Insights, with the diagnosis, for a run of `wall_seconds`.
  Insights insights(double wall_seconds) const;
  /// One record per worker position, live counters included.
  std::vector<WorkerRecord> worker_records() const;
  /// The slowest tasks seen, slowest first.
  const std::vector<SlowTask>& slowest_tasks() const noexcept { return slowest_; }
  /// Time the callers spent producing and serialising inputs, and decoding results.
  void add_parent_time(std::uint64_t input_ns, std::uint64_t decode_ns) {
    parent_input_ns_ += input_ns;
    parent_decode_ns_ += decode_ns;
  }
  std::uint64_t parent_input_ns() const noexcept { return parent_input_ns_; }
  std::uint64_t parent_decode_ns() const noexcept { return parent_decode_ns_; }
  std::vector<pid_t> worker_pids() const;

 private:
  struct Worker;
  struct CallState {
    Buffer setup;
    SetupScope scope = SetupScope::every_worker;
    std::deque<ChunkDone> completed;
    double nanos_per_task = 0;
    double timed_nanos = 0;
    double timed_tasks = 0;
    /// The estimate is the average over all tasks timed so far, but never below
    /// the latest chunk's: a slow first task (cold caches, page faults) is
    /// forgotten as soon as more tasks are timed, and a slowdown shows at once.
    void time_tasks(std::uint64_t count, double nanos) {
      if (count == 0) return;
      timed_nanos += nanos;
      timed_tasks += static_cast<double>(count);
      nanos_per_task = std::max(timed_nanos / timed_tasks, nanos / static_cast<double>(count));
    }
    bool local_setup_done = false;  // Start::in_process
  };

  enum class Death { died, timed_out, corrupt };
  /// Starts the worker at `position`, timing it for insights.
  void spawn_worker(unsigned position);
  void start_worker_process(unsigned position);
  /// Takes a newly started worker into the engine and sends it the open calls' setups.
  void adopt_worker(unsigned position, pid_t pid, int fd, WorkerSlot* slot,
                    std::shared_ptr<ReplyArena> arena, std::shared_ptr<ReplyArena> input_arena);
  void fold_slot(const Worker& w);
  void note_slow_task(std::uint64_t call, std::uint64_t index, std::uint64_t nanos);
  void recycle(Worker& w);
  void enforce_timeouts();
  std::chrono::milliseconds time_to_next_deadline() const;
  /// A frame header whose `size` bytes of payload travel elsewhere (or follow).
  void append_header(Worker& w, FrameKind kind, std::uint64_t call, std::uint64_t first,
                     std::uint64_t count, std::uint64_t size, std::uint16_t flags);
  void send_frame(Worker& w, FrameKind kind, std::uint64_t call, std::uint64_t first,
                  std::uint64_t count, const Buffer& payload, std::uint16_t flags = 0);
  void dispatch();
  /// Whether a chunk may go only to a worker with nothing queued.
  bool goes_to_idle_worker(const Chunk& chunk) const;
  /// Copies a large chunk's inputs into a free region of the worker's input arena.
  bool send_through_arena(Worker& w, const Chunk& chunk, std::uint16_t flags);
  void pump_round(std::unique_lock<std::mutex>& lock, std::chrono::milliseconds timeout);
  bool flush(Worker& w);
  bool receive(Worker& w);
  bool handle_frame(Worker& w, const FrameHeader& header, const std::byte* payload,
                    bool take_inbox);
  void retire(Worker& w, Death death, std::exception_ptr corrupt = nullptr);
  void charge(Chunk task, std::exception_ptr failure, std::deque<Chunk>& requeue);
  void requeue_front(std::deque<Chunk>& chunks);
  void finish_chunk(const Chunk& chunk, ChunkDone done);
  void run_in_process();
  Worker* find_worker(std::uint64_t serial);

  EngineConfig config_;
  LogicFactory make_logic_;
  std::vector<WorkerRecord> records_;
  std::vector<SlowTask> slowest_;
  std::uint64_t parent_input_ns_ = 0;
  std::uint64_t parent_decode_ns_ = 0;
  std::uint64_t starting_ns_ = 0;             // the caller's time in spawn_worker (forks, restarts)
  std::unique_ptr<WorkerLogic> local_logic_;  // Start::in_process
  std::vector<std::unique_ptr<Worker>> workers_;
  std::deque<Chunk> pending_;
  std::map<std::uint64_t, CallState> calls_;
  std::uint64_t next_call_ = 1;
  int wake_fd_ = -1;                     // eventfd, see enable_wake()
  double submitted_nanos_per_task_ = 0;  // recent tasks of one-task calls (Pool::submit)
  unsigned callers_pumping_ = 0;
  unsigned rounds_in_progress_ = 0;
  std::int64_t caller_pumped_ns_ = 0;  // when a caller's round last ended
  std::uint64_t next_worker_serial_ = 1;
  unsigned deaths_without_progress_ = 0;
  bool stopping_ = false;
  std::exception_ptr broken_;  // set when workers keep dying before doing any work
  pid_t parent_pid_;
};

}  // namespace procpool::detail
