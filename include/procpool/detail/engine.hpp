// The task engine under every way of running: it starts workers, moves chunks
// of tasks to them and their results back, and notices workers that die.
// It knows nothing about types: inputs and results are bytes here.
#pragma once

#include <sys/types.h>
#include <chrono>
#include <cstdint>
#include <deque>
#include <exception>
#include <functional>
#include <map>
#include <memory>
#include <mutex>
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
  /// Re-run alone after a worker died with it in flight: if it dies again, it is the culprit.
  bool isolated = false;
};

/// A chunk's outcome as the engine hands it to the call that submitted it.
struct ChunkDone {
  std::uint64_t first = 0;
  std::uint64_t count = 0;
  /// The encoded outcome of each task (see OutcomeTag) when `failure` is empty.
  Buffer payload;
  /// Set when the chunk produced no outcomes: its worker died or replied garbage.
  std::exception_ptr failure;
};

class Engine {
 public:
  /// Builds what a worker does with its messages; called in each worker right
  /// after the fork (or once in the caller for Start::in_process).
  using LogicFactory = std::function<std::unique_ptr<WorkerLogic>()>;

  /// Starts `processes` workers now (none for Start::in_process).
  Engine(unsigned processes, Start start, LogicFactory make_logic);
  ~Engine();
  Engine(const Engine&) = delete;
  Engine& operator=(const Engine&) = delete;

  /// Registers a call. A non-empty `setup` is sent once to every worker
  /// (including replacements) before that call's first task.
  std::uint64_t open_call(Buffer setup = {});
  /// Drops the call's queued chunks, discards its later results and lets workers forget it.
  void close_call(std::uint64_t call);
  void submit(Chunk chunk);
  /// One round: hands queued chunks to workers, moves bytes, collects results.
  /// Waits at most `timeout` for something to happen. The lock (which guards
  /// this engine) is released while waiting so other threads can submit.
  void pump(std::unique_lock<std::mutex>& lock, std::chrono::milliseconds timeout);
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

  unsigned processes() const noexcept { return processes_; }
  std::vector<pid_t> worker_pids() const;

 private:
  struct Worker;
  struct CallState {
    Buffer setup;
    std::deque<ChunkDone> completed;
    double nanos_per_task = 0;
    bool local_setup_done = false;  // Start::in_process
  };

  void spawn_worker();
  void send_frame(Worker& w, FrameKind kind, std::uint64_t call, std::uint64_t first,
                  std::uint64_t count, const Buffer& payload, std::uint16_t flags = 0);
  void dispatch();
  bool flush(Worker& w);
  bool receive(Worker& w);
  bool handle_frame(Worker& w, const FrameHeader& header, const std::byte* payload);
  void retire(Worker& w, std::exception_ptr reason);
  void requeue_front(std::deque<Chunk>& chunks);
  void finish_chunk(const Chunk& chunk, ChunkDone done);
  void run_in_process();
  Worker* find_worker(std::uint64_t serial);

  unsigned processes_;
  Start start_;
  LogicFactory make_logic_;
  std::unique_ptr<WorkerLogic> local_logic_;  // Start::in_process
  std::vector<std::unique_ptr<Worker>> workers_;
  std::deque<Chunk> pending_;
  std::map<std::uint64_t, CallState> calls_;
  std::uint64_t next_call_ = 1;
  std::uint64_t next_worker_serial_ = 1;
  unsigned deaths_without_progress_ = 0;
  bool stopping_ = false;
  std::exception_ptr broken_;  // set when workers keep dying before doing any work
  pid_t parent_pid_;
};

}  // namespace procpool::detail
