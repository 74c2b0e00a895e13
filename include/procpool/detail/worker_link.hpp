// The transport seam: how the engine reaches one worker.
//
// The engine decides what each worker runs and keeps the books: the chunks in
// flight, which chunk a reply answers, retries, the schedule (schedule.hpp)
// and insights (telemetry.hpp). A WorkerLink only carries messages and says
// how its worker is doing. A local process is one implementation
// (src/worker_process.cpp: born by fork or spawn, a socket and shared pages);
// a remote node (an MPI rank that serves its own local workers) is meant to
// be another, so that a new backend adds a room instead of editing the engine.
//
// The contract, as the engine relies on it:
// - Messages arrive in the order they were queued, and a worker answers the
//   chunks in the order it was sent them, one Reply each.
// - send_*() only queue; flush() moves what it can without blocking.
// - wait_fd() becomes readable when receive() has something to do (for a
//   remote link, e.g. an eventfd its progress thread signals); the engine
//   polls it for writing too while wants_write().
// - flush() and receive() report a lost worker instead of throwing; the
//   engine then ends the link (begin_end(), then finish_end(), each once)
//   and destroys it. Ending is in two steps so that many workers end at once.
// - running_task() names the task the worker is running, if any: a lost
//   worker's chunk is split around it and only that task is charged.
#pragma once

#include <sys/types.h>

#include <cstdint>
#include <exception>
#include <optional>

#include "procpool/detail/buffer.hpp"
#include "procpool/detail/chunk.hpp"
#include "procpool/detail/telemetry.hpp"

namespace procpool::detail {

/// A worker's answer to one chunk.
struct Reply {
  std::uint64_t call = 0;
  std::uint64_t nanos = 0;          // time the worker spent on the chunk
  std::uint64_t slowest_index = 0;  // the chunk's slowest task
  std::uint64_t slowest_nanos = 0;
  /// Its outcomes (first and count name the tasks it answers).
  ChunkDone done;
};

/// Takes a link's replies as they are received.
class ReplySink {
 public:
  /// False stops receive(): the engine gave up on the link (it answered a
  /// chunk it was not sent) and ends it.
  virtual bool take(Reply reply) = 0;

 protected:
  ~ReplySink() = default;
};

/// How a link is after a flush() or receive().
struct LinkState {
  enum Kind { open, lost, corrupt };
  Kind kind = open;
  /// For `corrupt`: what the worker sent, as a ProtocolError to charge its chunk with.
  std::exception_ptr error;

  bool is_open() const noexcept { return kind == open; }
};

/// The task a worker is running, or the call whose setup it is decoding.
struct RunningTaskRef {
  std::uint64_t call = 0;
  std::uint64_t index = 0;      // the task's; meaningless for a setup
  std::int64_t started_ns = 0;  // steady clock, the same in every process of a node
  /// Decoding `call`'s setup (its extra arguments): no task of it has run.
  bool setup = false;
};

/// How a worker ended: its exit status, and the task it was running then.
struct WorkerExit {
  int signal = 0;
  int code = 0;
  /// Whether it had finished starting (its initializer included) and was
  /// serving tasks; a worker that dies before is no sign of a bad task.
  bool ready = true;
  std::optional<RunningTaskRef> running;
  /// The descriptor of its link to the pool, if a task closed or replaced
  /// it (see LinkWatch): `running` is that task, if the worker could tell;
  /// if not, `closed_link_near` is the first task that could have.
  int closed_link_fd = -1;
  std::optional<RunningTaskRef> closed_link_near;
  /// It ended itself because a task took its link (no signal killed it first).
  bool link_taken() const noexcept { return closed_link_fd >= 0 && signal == 0; }
  /// Its counters, final.
  WorkerCounters counted;
};

class WorkerLink {
 public:
  /// How to end a link (see begin_end).
  enum class Ending {
    lost,      // it is gone already (flush or receive said so): collect its exit
    killed,    // kill it now: it hangs, sent garbage, or the work is abandoned
    finished,  // let it run what it was sent, then tell it to exit
  };

  virtual ~WorkerLink() = default;

  /// The worker's process id, for messages and insights.
  [[nodiscard]] virtual pid_t pid() const noexcept = 0;

  /// Queues a call's setup; the worker keeps it until send_end_call.
  virtual void send_setup(std::uint64_t call, const Buffer& setup) = 0;
  virtual void send_end_call(std::uint64_t call) = 0;
  /// Queues a chunk. `own_setup`, when given, is its call's setup for this
  /// chunk alone: the worker forgets the call after running it.
  virtual void send_chunk(const Chunk& chunk, const Buffer* own_setup) = 0;
  /// Whether `chunk` can be sent now; a large one may wait for room.
  [[nodiscard]] virtual bool ready_for(const Chunk& chunk) const noexcept = 0;

  [[nodiscard]] virtual int wait_fd() const noexcept = 0;
  [[nodiscard]] virtual bool wants_write() const noexcept = 0;
  /// Sends what was queued, as far as it goes without blocking.
  [[nodiscard]] virtual LinkState flush() = 0;
  /// Hands every reply that has arrived to `sink`, without blocking.
  [[nodiscard]] virtual LinkState receive(ReplySink& sink) = 0;
  /// Whether part of a message has arrived and the rest has not.
  [[nodiscard]] virtual bool mid_message() const noexcept = 0;

  [[nodiscard]] virtual std::optional<RunningTaskRef> running_task() const noexcept = 0;
  /// The worker's counters so far.
  [[nodiscard]] virtual WorkerCounters counters() const noexcept = 0;

  /// The first step of ending: kills the worker or tells it to finish.
  virtual void begin_end(Ending how) noexcept = 0;
  /// Waits for the worker to be gone and releases what the link held.
  [[nodiscard]] virtual WorkerExit finish_end() noexcept = 0;
};

}  // namespace procpool::detail
