#include "worker.hpp"

#include "channel.hpp"
#include "chunk_runner.hpp"
#include "procpool/detail/memory_file.hpp"

#include <malloc.h>
#include <stdio_ext.h>
#include <sys/mman.h>
#include <sys/prctl.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <chrono>
#include <csignal>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <iterator>
#include <string>

namespace procpool::detail {
namespace {

constexpr std::size_t flush_threshold = 1024 * 1024;

[[noreturn]] void die(const char* what) {
  std::fprintf(stderr, "procpool worker %d: %s\n", static_cast<int>(::getpid()), what);
  exit_worker(70);
}

/// How long a worker waits for its parent to free a reply region before
/// sending a large reply through the socket instead.
constexpr std::chrono::milliseconds arena_patience{50};

/// A worker's message loop and what it remembers between chunks.
class WorkerLoop {
 public:
  WorkerLoop(int fd, WorkerLogic& logic, const WorkerContext& context)
      : logic_(logic),
        context_(context),
        channel_(fd, context.slot),
        chunks_(logic, context.slot, context.task_timeout, &channel_.link()) {}

  [[noreturn]] void run();

 private:
  /// The parent closed its end: this worker is done. Its own end is shut
  /// down first, so that the parent sees it close now even while a process
  /// a task forked (without exec) holds a copy of it.
  [[noreturn]] void end_at_parents_eof() { channel_.link().lost(); }
  void run_task_frame(const FrameHeader& header, Reader& payload);
  /// Decodes a call's setup, noted in the slot: if its extra arguments'
  /// load() kills this worker, the parent charges the call, not a task.
  void set_up_call(std::uint64_t call, Reader& payload);
  bool move_into_arena(std::size_t at, FrameHeader& reply);
  void map_reply_region(std::size_t region, std::size_t bytes);
  /// Remembers how large the reply was, to guess where to write the next one.
  void note_reply_size(const FrameHeader& task, const FrameHeader& reply);
  /// Takes the descriptors an attach frame announces; dies if they did not arrive.
  void take_attachment(const FrameHeader& header);
  /// Keeps the memory files a spare frame brought (keep_spare_memory_file).
  void keep_spares(const FrameHeader& header);
  /// Maps the memory file a task frame's payload is in (flag_in_file).
  Reader map_input_file(const FrameHeader& header);
  /// Sends the input file mapped above back to the parent (FrameKind::spare):
  /// its inputs are decoded, before their task runs.
  void give_input_file_back() noexcept;
  /// Unmaps it and closes what came attached.
  void drop_attachments() noexcept;

  WorkerLogic& logic_;
  WorkerContext context_;
  WorkerChannel channel_;
  ChunkRunner chunks_;
  /// Whether the previous reply went (or would have gone) through the arena:
  /// then the next one is written straight into a free region, saving a copy.
  bool last_reply_was_large_ = false;
  /// Bytes at the start of each reply region that this process has mapped.
  /// The regions' pages exist (the parent keeps them warm across workers), but
  /// a new worker's page tables lack them: each first write to a 4 KiB page
  /// would be a fault, an exception that costs ~1 us on a VM. Mapping the
  /// range about to be written in one call is cheaper.
  std::size_t reply_region_mapped_[ReplyArena::regions] = {};
  /// Reply bytes per task of the previous chunk: the guess for the size of a
  /// reply written straight into a region (exact for fixed-size results).
  double last_reply_bytes_per_task_ = 0;
  /// Memory files attached to the next frame, and where its payload starts in the last.
  std::vector<int> attached_;
  std::uint64_t attached_offset_ = 0;
  std::byte* input_file_ = nullptr;  // the mapped input file of the frame being run
  std::size_t input_file_size_ = 0;
};

void WorkerLoop::map_reply_region(std::size_t region, std::size_t bytes) {
  ReplyArena& arena = *context_.reply_arena;
  bytes = std::min(bytes, ReplyArena::capacity);
  std::size_t& mapped = reply_region_mapped_[region];
  if (bytes <= mapped) return;
  // Counted as written: the parent's arena cache then knows these pages exist
  // and gives them back when the region is cached, even if this worker dies.
  arena.note_written(region, bytes);
  prefault_for_writing(arena.data(region) + mapped, bytes - mapped);
  mapped = bytes;
}

/// Puts a reply already written to `out` (after its header slot at `at`)
/// into a free arena region, waiting a little for one; false if none freed up.
bool WorkerLoop::move_into_arena(std::size_t at, FrameHeader& reply) {
  ReplyArena* arena = context_.reply_arena;
  if (!arena || !ReplyArena::fits(reply.size)) return false;
  // Replies already queued go first: the parent frees regions as it decodes them.
  channel_.send_front(at);
  // Bounded: the parent may be stuck on another call's consumer, and a reply
  // through the socket is slower but never waits for anyone.
  const int region = arena->claim_waiting(arena_patience);
  if (region < 0) return false;
  Buffer& out = channel_.out();
  map_reply_region(static_cast<std::size_t>(region), reply.size);
  std::memcpy(arena->data(static_cast<std::size_t>(region)), out.data() + at + sizeof(FrameHeader),
              reply.size);
  out.resize(at + sizeof(FrameHeader));
  reply.flags =
      static_cast<std::uint16_t>(reply.flags | arena_flags(static_cast<std::size_t>(region)));
  return true;
}

void WorkerLoop::set_up_call(std::uint64_t call, Reader& payload) {
  WorkerSlot* slot = context_.slot;
  if (slot) {
    slot->call.store(call, std::memory_order_relaxed);
    slot->started_ns.store(steady_now_ns(), std::memory_order_relaxed);
    slot->running.store(WorkerSlot::running_setup, std::memory_order_release);
  }
  logic_.setup(call, payload);
  if (slot) slot->running.store(0, std::memory_order_release);
}

void WorkerLoop::run_task_frame(const FrameHeader& header, Reader& payload) {
  Buffer& out = channel_.out();
  const std::size_t at = out.size();
  out.grow(sizeof(FrameHeader));
  ReplyArena* arena = context_.reply_arena;
  const int region = arena && last_reply_was_large_ ? arena->claim() : -1;
  Buffer direct = region >= 0 ? Buffer::over(arena->data(static_cast<std::size_t>(region)),
                                             ReplyArena::capacity)
                              : Buffer{};
  direct.share_when_large(WrittenPages::kept_mapped);
  if (region >= 0) {
    const double expected = last_reply_bytes_per_task_ * static_cast<double>(header.count);
    map_reply_region(static_cast<std::size_t>(region),
                     static_cast<std::size_t>(std::min(expected, double{ReplyArena::capacity})));
  }
  Writer writer(region >= 0 ? direct : out);
  // Results that are memory files of their own (SharedBuffer) are handed
  // over with the reply rather than copied into it.
  std::vector<int> files;
  ChunkReport report;
  {
    ScopedPointer<std::vector<int>> attaching(files_to_attach(), &files);
    const bool suspect = (header.flags & flag_check_link) != 0;
    if (suspect) channel_.link().check();  // earlier chunks' tasks are not this one's
    report = chunks_.run(header.call, header.first, header.count, payload, writer);
    if (suspect) channel_.link().check();
  }
  FrameHeader reply;
  reply.kind = FrameKind::result;
  reply.call = header.call;
  reply.first = header.first;
  reply.count = header.count;
  reply.nanos = report.nanos;
  reply.slowest_index = report.slowest_index;
  reply.slowest_nanos = report.slowest_nanos;
  if (report.dense) reply.flags = flag_dense;
  if (region >= 0) {  // written up to its end if the reply outgrew it
    arena->note_written(static_cast<std::size_t>(region),
                        direct.borrowed() ? direct.size() : ReplyArena::capacity);
  }
  if (region >= 0 && !direct.borrowed()) arena->release(static_cast<std::size_t>(region));
  // Where the reply's bytes are, unless in the arena: their memory file, if they grew into one.
  const bool in_direct = region >= 0 && !direct.borrowed();
  Buffer& body = in_direct ? direct : out;
  const std::size_t body_at = in_direct ? 0 : at + sizeof(FrameHeader);
  const std::size_t body_size = body.size() - body_at;
  const bool in_region = region >= 0 && direct.borrowed();
  if (!in_region && body.shared_fd() >= 0 && body_size >= ReplyArena::threshold) {
    // Hand the file over: the parent maps it, and this worker writes its next
    // replies elsewhere.
    reply.size = body_size;
    reply.flags = static_cast<std::uint16_t>(reply.flags | flag_in_file);
    files.push_back(body.shared_fd());
    channel_.send_attached(at, files, body_at);
    files.pop_back();  // the buffer closes its own
    close_all(files);
    channel_.send_header_and_renew_out(at, reply);
    note_reply_size(header, reply);
    return;
  }
  if (!files.empty()) {
    channel_.send_attached(at, files, 0);
    close_all(files);
  }
  if (in_region) {
    reply.size = direct.size();  // already in the region, whatever its size
    reply.flags =
        static_cast<std::uint16_t>(reply.flags | arena_flags(static_cast<std::size_t>(region)));
  } else {
    if (in_direct) out.append(direct.data(), direct.size());  // it outgrew the region
    reply.size = out.size() - at - sizeof(FrameHeader);
    move_into_arena(at, reply);
  }
  note_reply_size(header, reply);
  std::memcpy(out.data() + at, &reply, sizeof reply);
}

void WorkerLoop::note_reply_size(const FrameHeader& task, const FrameHeader& reply) {
  last_reply_was_large_ = ReplyArena::fits(reply.size);
  if (task.count != 0) {
    last_reply_bytes_per_task_ = static_cast<double>(reply.size) / static_cast<double>(task.count);
  }
}

}  // namespace

namespace {

/// Hands back the free pages of the heap inherited from the parent: while this
/// process maps them, each write of the parent to them (malloc reuses them
/// for its next result vector) copies the page. malloc_trim walks every free
/// chunk and may make a system call for each: ~15 us for a small heap, but
/// ~0.3 s in a test with a fragmented 8 GB one. So only where the process
/// (the parent's resident memory at the fork, as a child's peak RSS starts
/// from it) holds at most 64 MiB.
void give_back_inherited_free_heap() {
  constexpr long small_process_kb = 64 * 1024;
  rusage usage{};
  if (::getrusage(RUSAGE_SELF, &usage) == 0 && usage.ru_maxrss <= small_process_kb) {
    ::malloc_trim(0);
  }
}

}  // namespace

const char* const inner_thread_variables[6] = {"OMP_NUM_THREADS",        "OPENBLAS_NUM_THREADS",
                                               "MKL_NUM_THREADS",        "BLIS_NUM_THREADS",
                                               "VECLIB_MAXIMUM_THREADS", "NUMEXPR_NUM_THREADS"};

namespace {

/// Set in a worker as it starts (and inherited by a nested pool's workers).
bool this_process_is_a_worker = false;

void end_worker_at_exit(int status, void* /*unused*/) {
  if (this_process_is_a_worker) exit_worker(status);
}

}  // namespace

bool in_worker_process() noexcept {
  return this_process_is_a_worker;
}

void skip_parent_exit_handlers_in_workers() {
  // Once per process, in the parent, on the thread about to fork: glibc's
  // fork does not reset the lock of the exit handlers' list, so a worker that
  // registered its own would hang for ever whenever another thread of the
  // parent was registering one at the fork (a static's first use).
  static std::atomic<pid_t> registered_in{0};
  pid_t seen = registered_in.load(std::memory_order_relaxed);
  const pid_t self = ::getpid();
  if (seen == self || !registered_in.compare_exchange_strong(seen, self)) return;
  // Fails only without memory for the handler: exit() then runs the others.
  (void)::on_exit(&end_worker_at_exit, nullptr);
}

void prepare_worker_process(pid_t parent, unsigned inner_threads) {
  ::prctl(PR_SET_PDEATHSIG, SIGKILL);
  if (::getppid() != parent) ::_exit(0);  // the parent died before prctl took effect
  std::signal(SIGINT, SIG_IGN);
  __fpurge(stdout);
  __fpurge(stderr);
  this_process_is_a_worker = true;
  give_back_inherited_free_heap();
  if (inner_threads == 0) return;
  const std::string value = std::to_string(inner_threads);
  for (const char* name : inner_thread_variables) {
    ::setenv(name, value.c_str(), 0);  // 0: what the caller set stays
  }
}

namespace {

void WorkerLoop::take_attachment(const FrameHeader& header) {
  if (header.count == 0 || header.count > max_fds_per_message ||
      !channel_.take_fds(static_cast<std::size_t>(header.count), attached_)) {
    die("corrupt message from the parent (memory files announced but not received)");
  }
  attached_offset_ = header.first;
}

Reader WorkerLoop::map_input_file(const FrameHeader& header) {
  input_file_size_ = static_cast<std::size_t>(attached_offset_ + header.size);
  const bool handed_over = (header.flags & flag_file_handed_over) != 0;
  // A file the parent let go of goes back to it whole once decoded, for its
  // next large input (its pages exist already); a larger one is given back
  // page by page as it is decoded (MADV_REMOVE), which needs a writable
  // shared mapping.
  const std::size_t file_size = memory_file_size(attached_.back());
  const bool goes_back_whole = handed_over && file_size != 0 && file_size <= spare_files_limit;
  try {
    input_file_ =
        map_memory_file(attached_.back(), input_file_size_, handed_over && !goes_back_whole);
  } catch (const std::exception& e) {
    die(e.what());
  }
#ifdef MADV_POPULATE_READ
  if (input_file_) ::madvise(input_file_, input_file_size_, MADV_POPULATE_READ);
#endif
  Reader payload(input_file_ + attached_offset_, static_cast<std::size_t>(header.size));
  if (goes_back_whole) {
    payload.when_all_consumed(
        [](void* loop) { static_cast<WorkerLoop*>(loop)->give_input_file_back(); }, this);
  } else if (handed_over) {
    payload.allow_giving_back();
  }
  return payload;
}

void WorkerLoop::give_input_file_back() noexcept {
  unmap_memory_file(input_file_, input_file_size_);
  input_file_ = nullptr;
  input_file_size_ = 0;
  const int fd = attached_.back();  // the task's own files were taken out of attached_
  attached_.pop_back();
  channel_.send_spares({&fd, 1});
  ::close(fd);
}

void WorkerLoop::keep_spares(const FrameHeader& header) {
  std::vector<int> spares;
  if (header.count == 0 || header.count > max_fds_per_message ||
      !channel_.take_fds(static_cast<std::size_t>(header.count), spares)) {
    die("corrupt message from the parent (spare memory files announced but not received)");
  }
  for (int fd : spares)
    keep_spare_memory_file(fd);
}

void WorkerLoop::drop_attachments() noexcept {
  unmap_memory_file(input_file_, input_file_size_);
  input_file_ = nullptr;
  input_file_size_ = 0;
  close_all(attached_);
}

void WorkerLoop::run() {
  WorkerChannel& channel = channel_;
  ReplyArena* const input_arena = context_.input_arena;
  for (;;) {
    if (channel.available() < sizeof(FrameHeader)) {
      if (!channel.read_more(sizeof(FrameHeader))) end_at_parents_eof();
      continue;
    }
    FrameHeader header;
    std::memcpy(&header, channel.head(), sizeof header);
    if (header.magic != frame_magic) die("corrupt message from the parent (bad magic)");
    if (header.kind == FrameKind::attach) {
      take_attachment(header);
      channel.skip(sizeof header);
      continue;
    }
    if (header.kind == FrameKind::spare) {
      keep_spares(header);
      channel.skip(sizeof header);
      continue;
    }
    const bool in_arena = (header.flags & flag_in_arena) != 0;
    const bool in_file = (header.flags & flag_in_file) != 0;
    if (in_file && (header.kind != FrameKind::task || attached_.empty())) {
      die("corrupt message from the parent (bad memory file reference)");
    }
    if (in_arena && (!input_arena || header.size > ReplyArena::capacity)) {
      die("corrupt message from the parent (bad input arena reference)");
    }
    const std::size_t whole = frame_bytes_on_socket(header);
    if (channel.available() < whole) {
      if (!channel.read_more(whole)) end_at_parents_eof();
      continue;
    }
    const std::size_t region = arena_region(header.flags);
    Reader payload =
        in_file ? map_input_file(header)
                : Reader(in_arena ? input_arena->data(region) : channel.head() + sizeof header,
                         header.size);
    try {
      switch (header.kind) {
        case FrameKind::task: {
          // The files that came with the task, but for its input file (the
          // last, mapped above): SharedBuffer inputs, in the order written.
          const auto own = attached_.end() - (in_file ? 1 : 0);
          AttachedFiles inputs(std::vector<int>(attached_.begin(), own));
          attached_.erase(attached_.begin(), own);
          ScopedPointer<AttachedFiles> decoding(files_being_decoded(), &inputs);
          run_task_frame(header, payload);
        }
          // The inputs are decoded: the parent may fill this region again.
          if (in_arena) input_arena->busy[region].store(0, std::memory_order_release);
          drop_attachments();
          if (header.flags & flag_end_call_after) logic_.end(header.call);
          break;
        case FrameKind::setup:
          set_up_call(header.call, payload);
          break;
        case FrameKind::end_call:
          logic_.end(header.call);
          break;
        default:
          die("corrupt message from the parent (unknown kind)");
      }
    } catch (const std::exception& e) {
      die(e.what());
    }
    channel.skip(whole);
    if (channel.out().size() >= flush_threshold) channel.flush();
  }
}

}  // namespace

void exit_worker(int status) {
  std::fflush(stdout);  // what the task printed, not what the parent had buffered
  std::fflush(stderr);
  ::_exit(status);
}

void run_worker(int fd, WorkerLogic& logic, const WorkerContext& context) {
  if (context.slot) context.slot->ready.store(1, std::memory_order_release);
  WorkerLoop(fd, logic, context).run();
}

}  // namespace procpool::detail
