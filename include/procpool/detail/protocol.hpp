// The messages between the parent and its workers, and the interfaces the
// worker side is built from.
#pragma once

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdint>
#include <cstring>
#include <exception>
#include <string>
#include <utility>

#include "procpool/detail/buffer.hpp"
#include "procpool/detail/memory_file.hpp"
#include "procpool/detail/telemetry.hpp"
#include "procpool/serialize.hpp"

namespace procpool::detail {

inline constexpr std::uint32_t frame_magic = 0x31505050;  // "PPP1"

enum class FrameKind : std::uint16_t {
  task = 1,      // parent -> worker: run `count` inputs starting at `first` of call `call`
  result = 2,    // worker -> parent: their outcomes, and the time spent computing
  setup = 3,     // parent -> worker: what a call needs once per worker (function, extra arguments)
  end_call = 4,  // parent -> worker: forget a call's setup
  /// Either way: `count` descriptors of memory files come attached to this
  /// header (SCM_RIGHTS) for the next task or result frame, which then owns
  /// them; several attach frames in a row add up. `first`: where the payload
  /// of a next frame flagged flag_in_file starts in the last of them.
  attach = 5,
  /// Either way: `count` memory files attached (SCM_RIGHTS) that the sender
  /// has read and lets go of, for the receiver to write its next large
  /// messages in (keep_spare_memory_file): from the parent, files of the
  /// worker's earlier replies; from a worker, files of inputs it decoded.
  spare = 6,
};

/// Result flags: the payload is in the worker's reply arena, not on the
/// socket, and in which of its regions (two bits).
inline constexpr std::uint16_t flag_in_arena = 1;
inline constexpr std::uint16_t flag_region_shift = 1;
inline constexpr std::uint16_t flag_region_mask = 3 << flag_region_shift;
/// A result whose payload is `count` fixed-size values, all successes, with
/// no outcome tags: the caller copies them out in one go.
inline constexpr std::uint16_t flag_dense = 8;
/// Task flag: the call's setup came just before this task, for this task
/// only; the worker forgets the call once it has run it.
inline constexpr std::uint16_t flag_end_call_after = 16;
/// Task or result: the payload is in the last memory file attached before it
/// (FrameKind::attach), not on the socket. For payloads too big for an arena
/// region: handed over, never copied on the way.
inline constexpr std::uint16_t flag_in_file = 32;
/// Task flag, with flag_in_file: the parent let go of the file (it can
/// encode the inputs again), so the worker gives its pages back as it
/// decodes them, or, for a file of at most spare_files_limit, gives the
/// whole file back (FrameKind::spare) once decoded.
inline constexpr std::uint16_t flag_file_handed_over = 64;

/// Task flag: a task that ran near this chunk took its worker's link to the
/// parent (LinkWatch); the worker checks its link before and after it.
inline constexpr std::uint16_t flag_check_link = 128;

/// Flags for a payload in arena region `region`.
inline std::uint16_t arena_flags(std::size_t region) {
  return static_cast<std::uint16_t>(flag_in_arena | (region << flag_region_shift));
}
inline std::size_t arena_region(std::uint16_t flags) {
  return static_cast<std::size_t>((flags & flag_region_mask) >> flag_region_shift);
}

/// Shared memory, mapped before the fork and reused for the worker's life,
/// through which large replies travel: the worker copies a reply into warm
/// pages, the parent decodes straight from them, and no socket copies happen.
/// Several regions, so the worker can fill one while the parent still decodes others.
struct ReplyArena {
  // A whole page, so that every region starts on a page: madvise() on a
  // region (MADV_REMOVE, MADV_POPULATE_*) needs page-aligned addresses.
  static constexpr std::size_t header_bytes = 4096;
  static constexpr std::size_t capacity = std::size_t{32} << 20;  // per region
  /// Four: a worker can be two replies ahead of a parent that takes results
  /// in input order and is waiting for another worker, and still have one.
  static constexpr std::size_t regions = 4;
  static constexpr std::size_t mapped_bytes = header_bytes + regions * capacity;
  static constexpr std::size_t threshold = std::size_t{64} << 10;  // smaller ones use the socket
  std::atomic<std::uint32_t> busy[regions] =
      {};                                  // set by the writer, cleared by the reader once decoded
  std::atomic<std::uint32_t> released{0};  // bumped (and woken) each time a region is freed
  std::atomic<std::uint32_t> written[regions] = {};  // the most bytes ever written to each

  /// Records that `bytes` were written to `region` (by its one writer).
  void note_written(std::size_t region, std::size_t bytes) noexcept {
    const auto n = static_cast<std::uint32_t>(std::min(bytes, capacity));
    if (n > written[region].load(std::memory_order_relaxed)) {
      written[region].store(n, std::memory_order_relaxed);
    }
  }

  std::byte* data(std::size_t region) noexcept {
    return reinterpret_cast<std::byte*>(this) + header_bytes + region * capacity;
  }
  /// Whether `bytes` go through an arena rather than the socket.
  static constexpr bool fits(std::size_t bytes) noexcept {
    return bytes >= threshold && bytes <= capacity;
  }
  bool has_free_region() const noexcept {
    for (const auto& flag : busy) {
      if (flag.load(std::memory_order_acquire) == 0) return true;
    }
    return false;
  }
  /// Claims a free region for the writer; -1 if all are busy.
  int claim() noexcept;
  /// Like claim(), but when all are busy waits up to `patience` for the
  /// reader to free one: a writer that is ahead of its reader waits instead
  /// of sending through the socket, which costs the reader two more copies.
  int claim_waiting(std::chrono::milliseconds patience) noexcept;
  /// The reader is done with `region`: frees it and wakes a waiting writer.
  void release(std::size_t region) noexcept;
};
static_assert(sizeof(ReplyArena) <= ReplyArena::header_bytes);

/// Fixed-size header in front of every message; sizes are 64-bit.
struct FrameHeader {
  std::uint32_t magic = frame_magic;
  FrameKind kind = FrameKind::task;
  std::uint16_t flags = 0;
  std::uint64_t call = 0;
  std::uint64_t first = 0;
  std::uint64_t count = 0;
  std::uint64_t size = 0;           // payload bytes that follow the header
  std::uint64_t nanos = 0;          // result only: time the worker spent computing
  std::uint64_t slowest_index = 0;  // result only: the chunk's slowest task
  std::uint64_t slowest_nanos = 0;  // and how long it took
};
static_assert(sizeof(FrameHeader) == 64);

/// Whether a worker's reply header can be trusted enough to read its payload:
/// a length beyond `max_payload` (physical memory) is garbage, never an allocation.
inline bool valid_reply_header(const FrameHeader& header, std::uint64_t max_payload) {
  if (header.magic != frame_magic) return false;
  if (header.kind == FrameKind::attach) {
    return header.size == 0 && header.flags == 0 && header.count != 0 &&
           header.count <= max_fds_per_message && header.first <= max_payload;
  }
  if (header.kind == FrameKind::spare) {
    return header.size == 0 && header.flags == 0 && header.count != 0 &&
           header.count <= max_fds_per_message;
  }
  const bool in_arena = (header.flags & flag_in_arena) != 0;
  const bool in_file = (header.flags & flag_in_file) != 0;
  return header.kind == FrameKind::result && !(in_arena && in_file) &&
         header.size <= (in_arena ? ReplyArena::capacity : max_payload) &&
         (header.flags & ~(flag_in_arena | flag_region_mask | flag_dense | flag_in_file)) == 0;
}

/// Bytes of a frame on the socket: its payload travels there unless it is in
/// an arena or a memory file.
inline std::uint64_t frame_bytes_on_socket(const FrameHeader& header) {
  const bool elsewhere = (header.flags & (flag_in_arena | flag_in_file)) != 0;
  return sizeof(FrameHeader) + (elsewhere ? 0 : header.size);
}

/// Each task's outcome inside a result payload starts with one of these tags.
/// The error tags say at which stage the exception was thrown (each is
/// followed by its type name and what()), so the caller can say what failed.
enum class OutcomeTag : std::uint8_t {
  value = 0,
  error = 1,         // the task threw
  input_error = 2,   // decoding its input in the worker threw; the task did not run
  result_error = 3,  // the task returned; serialising its result threw
};

/// The demangled type name and what() of the exception being handled.
std::pair<std::string, std::string> current_exception_type_and_what();

/// Writes the exception being handled as an error outcome tagged `tag`
/// (InputDecodeFailed is unwrapped and tagged input_error).
void write_current_exception(Writer& out, OutcomeTag tag = OutcomeTag::error);

/// Thrown in a worker when an input cannot be decoded, so the outcome says
/// so instead of blaming the task; `cause` is what the decoder threw.
struct InputDecodeFailed {
  std::exception_ptr cause;
};

/// Writes `value`, with its byte length in front when decoding it runs user
/// code (see runs_user_code_v): a reader then decodes it from exactly its own
/// bytes and skips to the next value whatever the decoder did.
template <class T>
void save_framed(Writer& out, const T& value) {
  if constexpr (runs_user_code_v<T>) {
    const std::size_t at = out.size();
    out.put(std::uint64_t{0});
    save(out, value);
    const auto bytes = static_cast<std::uint64_t>(out.size() - at - sizeof(std::uint64_t));
    std::memcpy(out.buffer().data() + at, &bytes, sizeof bytes);
  } else {
    save(out, value);
  }
}

/// The next framed value's bytes as a reader of their own; `in` moves past
/// them before anything is decoded. ProtocolError if the length is corrupt.
inline Reader take_frame(Reader& in) {
  const std::size_t bytes = load_count(in, 1);
  return in.take_reader(bytes);
}

/// Decodes a value written by save_framed<T>. For a framed T, `in` is past
/// the value even when this throws.
template <class T>
T load_framed(Reader& in) {
  if constexpr (runs_user_code_v<T>) {
    Reader own = take_frame(in);
    return load_value<T>(own);
  } else {
    return load_value<T>(in);
  }
}

/// A worker decodes one input; whatever goes wrong is that input's failure
/// (InputDecodeFailed), and the next input is still read from its own bytes.
/// Its bytes are then given back if the reader may (Reader::consumed): an
/// input's own decoding gives back only what it copies in bulk.
template <class Item>
Item load_input(Reader& in) {
  const std::byte* start = in.position();
  try {
    Item item = load_framed<Item>(in);
    in.consumed(start, static_cast<std::size_t>(in.position() - start));
    return item;
  } catch (...) {
    throw InputDecodeFailed{std::current_exception()};
  }
}

/// A page shared between a worker and the parent, where the worker notes the
/// task it is running. The parent reads it to charge a crash or a timeout to
/// that exact task, without the worker having to send anything per task.
struct WorkerSlot {
  std::atomic<std::uint64_t> call{0};
  std::atomic<std::uint64_t> index{0};
  std::atomic<std::int64_t> started_ns{0};  // steady_clock, the same clock in every process
  /// What `call` and `started_ns` name: nothing, a task (`index`), or the
  /// call's setup being decoded (its extra arguments' load(), no task yet).
  std::atomic<std::uint32_t> running{0};
  static constexpr std::uint32_t running_task = 1;
  static constexpr std::uint32_t running_setup = 2;
  /// Set by the worker once started (initializer included), before its first task.
  std::atomic<std::uint32_t> ready{0};
  /// A fork server's worker: its pid, written by the kernel as the server
  /// clones it (CLONE_PARENT_SETTID), before the server can answer. The
  /// worker is the pool's child; a server killed before it answered leaves
  /// the pool only this to find, and reap, the worker.
  std::atomic<std::int32_t> cloned_pid{0};
  /// The worker's descriptor of its link to the parent, plus one, once a
  /// task closed or replaced it (LinkWatch): why the worker ended. With
  /// `running` 0, no task was told apart: `call` and `index` then name the
  /// first of the chunk's tasks that could have, if `link_closed_in_chunk`
  /// (tasks of earlier chunks could not have).
  std::atomic<std::int32_t> link_closed{0};
  std::atomic<std::uint32_t> link_closed_in_chunk{0};

  // Cumulative, written by the worker alone, read by the parent for insights.
  std::atomic<std::uint64_t> tasks{0};
  std::atomic<std::uint64_t> serialize_ns{0};  // writing results (sampled, see RunningTask)
  std::atomic<std::uint64_t> wait_ns{0};       // blocked, waiting for work
  std::atomic<std::uint64_t> bytes_in{0};
  std::atomic<std::uint64_t> bytes_out{0};
  std::atomic<std::uint64_t> peak_rss_kb{0};
  // The slowest task of the chunk being run.
  std::atomic<std::uint64_t> chunk_slowest_index{0};
  std::atomic<std::uint64_t> chunk_slowest_ns{0};

  WorkerCounters counters() const noexcept {
    return {serialize_ns.load(std::memory_order_relaxed), wait_ns.load(std::memory_order_relaxed),
            bytes_in.load(std::memory_order_relaxed), bytes_out.load(std::memory_order_relaxed),
            peak_rss_kb.load(std::memory_order_relaxed)};
  }

  /// Adds to a counter that only this process writes (no read-modify-write needed).
  static void add(std::atomic<std::uint64_t>& counter, std::uint64_t amount) {
    counter.store(counter.load(std::memory_order_relaxed) + amount, std::memory_order_relaxed);
  }
};

inline std::int64_t steady_now_ns() {
  return std::chrono::duration_cast<std::chrono::nanoseconds>(
             std::chrono::steady_clock::now().time_since_epoch())
      .count();
}

class LinkWatch;

/// One chunk being run: what its tasks need to know about where they run,
/// handed down explicitly from the chunk runner to each task (a worker holds
/// no globals), and what the run reports back.
struct ChunkRun {
  std::uint64_t call = 0;
  std::uint64_t first = 0;
  std::uint64_t count = 0;
  /// The worker's slot, where the running task is noted; null where nobody
  /// watches the tasks (Start::in_process).
  WorkerSlot* slot = nullptr;
  /// Whether each task is timed. Off for tasks of a few microseconds (a clock
  /// read would cost more than the task) unless a task timeout needs every
  /// start time; the chunk as a whole is always timed.
  bool time_each_task = false;
  /// When the current task started: the end of the one before (or the
  /// chunk's start), so each task costs one clock read, not two.
  std::int64_t task_start_ns = 0;
  /// Out: the outcomes were written dense (see flag_dense).
  bool dense = false;
  /// The worker's link to its parent, checked after tasks; null in process.
  LinkWatch* link = nullptr;
};

/// Watches a worker's link to its parent (its socket's descriptor) for
/// tasks that close or replace it: closefrom(), close_range() or a loop of
/// close() or dup2() over every descriptor takes the pool's too. Without the
/// link the worker cannot send its result: it tells the parent which task
/// ran (its slot) and ends, rather than die silently ("the parent is gone")
/// and have the task retried and its neighbours charged. Checking costs a
/// system call (fstat, 1.6 us on the CI's VM; a chunk of one tiny task
/// takes about as long), so it happens after a task that took
/// check_after_ns or more (it alone is then named), before a chunk once the
/// chunks since the last check took that long together, and whenever the
/// link fails. Tasks of one chunk that took less are not told apart: the
/// parent runs their chunk again in smaller ones. When tasks of several
/// chunks ran unchecked, it runs every chunk the worker had again,
/// uncharged, each checked before and after (flag_check_link).
class LinkWatch {
 public:
  static constexpr std::int64_t check_after_ns = 100'000;

  LinkWatch(int fd, WorkerSlot* slot) noexcept;

  /// Task `index` of `call` returned or threw, `took_ns` after it started
  /// (0: not timed). Checks the link if the task took long enough; ends
  /// the worker if it is gone.
  void task_returned(std::uint64_t call, std::uint64_t index, std::int64_t took_ns) noexcept {
    if (unchecked_++ == 0 || std::exchange(new_chunk_, false)) first_ = index;
    call_ = call;
    index_ = index;
    if (took_ns >= check_after_ns) check();
  }
  /// Before a chunk runs: checks the link if the tasks run since it was
  /// last seen whole took check_after_ns or more; the chunk's tasks are then
  /// told apart from theirs.
  void chunk_starts() noexcept {
    if (unchecked_ != 0 && unchecked_ns_ >= check_after_ns) check();
    if (unchecked_ != 0) {
      ++earlier_chunks_;
      new_chunk_ = true;
    }
  }
  /// A chunk ended, `nanos` after it started.
  void chunk_ended(std::int64_t nanos) noexcept { unchecked_ns_ += nanos; }
  bool tasks_unchecked() const noexcept { return unchecked_ != 0; }
  /// The parent's bytes arrived on the descriptor: it is still the link.
  void heard_from_parent() noexcept { forget_tasks(); }
  /// Ends the worker if the descriptor is no longer the link.
  void check() noexcept;
  /// A send or receive on the link failed or met its end: ends the worker,
  /// with status 0 if the descriptor is still the link (the parent is gone).
  [[noreturn]] void lost() noexcept;

 private:
  bool intact() const noexcept;
  [[noreturn]] void report_closed() noexcept;
  void forget_tasks() noexcept {
    unchecked_ = 0;
    unchecked_ns_ = 0;
    earlier_chunks_ = 0;
    new_chunk_ = false;
  }

  int fd_;
  WorkerSlot* slot_;
  std::uint64_t device_ = 0, inode_ = 0;
  // The tasks run since the link was last seen whole: the call and first
  // and last index of those of the latest chunk, how many in all, how long
  // they took, and how many chunks ran before the latest.
  std::uint64_t call_ = 0, first_ = 0, index_ = 0, unchecked_ = 0;
  std::int64_t unchecked_ns_ = 0;
  std::uint64_t earlier_chunks_ = 0;
  bool new_chunk_ = false;
};

/// Marks task `index` as running in this worker's slot for the scope, and
/// times it for insights (serialisation is timed on every 64th task only:
/// two more clock reads per task would cost more than a tiny task's work).
class RunningTask {
 public:
  static constexpr std::uint64_t serialize_sample = 64;

  RunningTask(ChunkRun& run, std::uint64_t index) : run_(run), slot_(run.slot), index_(index) {
    if (!slot_) return;
    slot_->index.store(index, std::memory_order_relaxed);
    slot_->started_ns.store(run.task_start_ns, std::memory_order_relaxed);
    slot_->running.store(WorkerSlot::running_task, std::memory_order_release);
  }
  /// The task's function returned; what follows is serialisation (after
  /// the link is checked: a task that took its descriptor may have opened
  /// a file of its own under the number of one the reply would be written to).
  void computed() {
    if (slot_ && index_ % serialize_sample == 0) computed_ = steady_now_ns();
    if (run_.link) {
      const std::int64_t took =
          run_.time_each_task ? (computed_ != 0 ? computed_ : steady_now_ns()) - run_.task_start_ns
                              : 0;
      run_.link->task_returned(run_.call, index_, took);
      checked_ = true;
    }
  }
  ~RunningTask() {
    if (!slot_) return;
    if (run_.link && !checked_) run_.link->task_returned(run_.call, index_, 0);  // it threw
    WorkerSlot::add(slot_->tasks, 1);
    const bool timed = run_.time_each_task;
    const std::int64_t end = computed_ != 0 || timed ? steady_now_ns() : 0;
    if (computed_ != 0) {
      WorkerSlot::add(slot_->serialize_ns,
                      static_cast<std::uint64_t>(end - computed_) * serialize_sample);
    }
    if (timed) {
      const auto took = static_cast<std::uint64_t>(end - run_.task_start_ns);
      run_.task_start_ns = end;  // the next task starts now
      if (took >= slot_->chunk_slowest_ns.load(std::memory_order_relaxed)) {
        slot_->chunk_slowest_ns.store(took, std::memory_order_relaxed);
        slot_->chunk_slowest_index.store(index_, std::memory_order_relaxed);
      }
    }
    slot_->running.store(0, std::memory_order_release);
  }
  RunningTask(const RunningTask&) = delete;
  RunningTask& operator=(const RunningTask&) = delete;

 private:
  ChunkRun& run_;
  WorkerSlot* slot_;
  std::uint64_t index_;
  std::int64_t computed_ = 0;
  bool checked_ = false;
};

/// Runs task `index` and writes its outcome: the value, or the exception it threw.
template <class Out, class Fn>
void run_task(ChunkRun& run, Writer& out, std::uint64_t index, Fn&& fn) {
  RunningTask running(run, index);
  const std::size_t mark = out.size();
  out.put(OutcomeTag::value);
  bool returned = false;  // past this point an exception is the result's serialisation failing
  try {
    if constexpr (std::is_empty_v<Out>) {
      std::forward<Fn>(fn)();  // nothing to send for a void task
      running.computed();
    } else {
      decltype(auto) value = std::forward<Fn>(fn)();
      running.computed();
      returned = true;
      save_framed(out, static_cast<const Out&>(value));
    }
  } catch (...) {
    out.truncate(mark);
    write_current_exception(out, returned ? OutcomeTag::result_error : OutcomeTag::error);
  }
}

/// Results that travel dense when a whole chunk succeeds.
template <class Out>
inline constexpr bool dense_result_v =
    is_raw_v<Out> && !std::is_empty_v<Out> && !std::is_same_v<Out, bool>;

/// Turns `n` dense values of `size` bytes at `start` into tagged outcomes, in place.
void retag_dense_values(Buffer& buffer, std::size_t start, std::uint64_t n, std::size_t size);

/// Runs the chunk's tasks `run.first` .. `run.first + run.count - 1`;
/// `task(i)` is the callable of the i-th. Fixed-size results are written
/// dense, without a tag each (and `run.dense` set), until a task throws: then
/// what was written is retagged and the rest goes tagged.
template <class Out, class TaskFor>
void run_chunk(ChunkRun& run, Writer& out, TaskFor&& task) {
  const std::uint64_t first = run.first;
  const std::uint64_t count = run.count;
  run.dense = false;
  if constexpr (dense_result_v<Out>) {
    // The reply's size is known: map its pages in one go (a chunk too big
    // for a reply region grows as it goes, as before).
    if (count <= ReplyArena::capacity / sizeof(Out)) {
      out.prepare_for(static_cast<std::size_t>(count) * sizeof(Out));
    }
    const std::size_t start = out.size();
    std::uint64_t i = 0;
    for (; i < count; ++i) {
      RunningTask running(run, first + i);
      bool returned = false;
      try {
        decltype(auto) value = task(i)();
        running.computed();
        returned = true;
        out.put(static_cast<const Out&>(value));
      } catch (...) {
        out.truncate(start + static_cast<std::size_t>(i) * sizeof(Out));
        retag_dense_values(out.buffer(), start, i, sizeof(Out));
        write_current_exception(out, returned ? OutcomeTag::result_error : OutcomeTag::error);
        break;
      }
    }
    if (i == count) {
      run.dense = true;
      return;
    }
    for (++i; i < count; ++i)
      run_task<Out>(run, out, first + i, task(i));
  } else {
    for (std::uint64_t i = 0; i < count; ++i)
      run_task<Out>(run, out, first + i, task(i));
  }
}

/// One call's task code, as run inside a worker.
class TaskRunner {
 public:
  virtual ~TaskRunner() = default;
  /// Runs the chunk's inputs; serialised inputs, if any, come from `in`.
  virtual void run(ChunkRun& run, Reader& in, Writer& out) = 0;
};

/// What a worker process does with the messages it receives.
class WorkerLogic {
 public:
  virtual ~WorkerLogic() = default;
  virtual void setup(std::uint64_t call, Reader& payload) = 0;
  virtual void run(ChunkRun& run, Reader& in, Writer& out) = 0;
  virtual void end(std::uint64_t call) = 0;
};

/// Fork per call: the worker was forked for one call and runs one runner.
class SingleCallLogic final : public WorkerLogic {
 public:
  explicit SingleCallLogic(TaskRunner& runner) : runner_(runner) {}
  void setup(std::uint64_t, Reader&) override {}
  void run(ChunkRun& run, Reader& in, Writer& out) override { runner_.run(run, in, out); }
  void end(std::uint64_t) override {}

 private:
  TaskRunner& runner_;
};

/// Demangled name of a type, for messages.
std::string demangle(const char* mangled);

}  // namespace procpool::detail
