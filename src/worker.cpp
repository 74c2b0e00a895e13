#include "worker.hpp"

#include <malloc.h>
#include <stdio_ext.h>
#include <sys/prctl.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <chrono>
#include <csignal>
#include <cstdio>
#include <cstring>
#include <iterator>
#include <string>

namespace procpool::detail {
namespace {

constexpr std::size_t read_size = 256 * 1024;
constexpr std::size_t flush_threshold = 1024 * 1024;

[[noreturn]] void exit_worker(int status) {
  std::fflush(stdout);  // what the task printed, not what the parent had buffered
  std::fflush(stderr);
  ::_exit(status);
}

[[noreturn]] void die(const char* what) {
  std::fprintf(stderr, "procpool worker %d: %s\n", static_cast<int>(::getpid()), what);
  exit_worker(70);
}

/// The worker's end of its socket: blocking reads into a buffer that holds
/// many messages, and replies collected and sent in few system calls.
class Channel {
 public:
  explicit Channel(int fd) : fd_(fd) {}

  std::size_t available() const noexcept { return in_.size() - pos_; }
  const std::byte* head() const noexcept { return in_.data() + pos_; }
  void skip(std::size_t n) noexcept { pos_ += n; }
  Buffer& out() noexcept { return out_; }

  /// Blocks until more bytes arrive so that at least `wanted` are available; false at EOF.
  bool read_more(std::size_t wanted) {
    flush();  // the parent may be waiting for these replies before it sends more
    if (pos_ != 0) {
      in_.consume(pos_);
      pos_ = 0;
    }
    in_.reserve(std::max(wanted, in_.size() + read_size));
    for (;;) {
      const std::size_t room = std::max(wanted, in_.size() + read_size) - in_.size();
      std::byte* at = in_.grow(room);
      const std::int64_t waiting_since = steady_now_ns();
      ssize_t n = ::recv(fd_, at, room, 0);
      if (current_worker_slot) {
        WorkerSlot::add(current_worker_slot->wait_ns,
                        static_cast<std::uint64_t>(steady_now_ns() - waiting_since));
        if (n > 0) WorkerSlot::add(current_worker_slot->bytes_in, static_cast<std::uint64_t>(n));
      }
      in_.resize(in_.size() - room + (n > 0 ? static_cast<std::size_t>(n) : 0));
      if (n > 0) return true;
      if (n == 0) return false;
      if (errno != EINTR) return false;
    }
  }

  /// Sends the first `n` bytes of out() now (whole replies queued before the
  /// one being built), leaving them in place so that nothing moves.
  void send_front(std::size_t n) {
    send_range(sent_, n);
    sent_ = n;
  }

  void flush() {
    if (current_worker_slot && !out_.empty()) {
      WorkerSlot::add(current_worker_slot->bytes_out, out_.size());
      rusage usage{};
      ::getrusage(RUSAGE_SELF, &usage);
      current_worker_slot->peak_rss_kb.store(static_cast<std::uint64_t>(usage.ru_maxrss),
                                             std::memory_order_relaxed);
    }
    send_range(sent_, out_.size());
    out_.clear();
    sent_ = 0;
  }

 private:
  void send_range(std::size_t from, std::size_t to) {
    while (from < to) {
      ssize_t n = ::send(fd_, out_.data() + from, to - from, MSG_NOSIGNAL);
      if (n > 0) {
        from += static_cast<std::size_t>(n);
      } else if (n < 0 && errno != EINTR) {
        exit_worker(0);  // the parent is gone or closed us: nobody wants the results
      }
    }
  }

  int fd_;
  Buffer in_;
  std::size_t pos_ = 0;
  Buffer out_;
  std::size_t sent_ = 0;  // bytes at the front of out_ already sent
};

/// How long a worker waits for its parent to free a reply region before
/// sending a large reply through the socket instead.
constexpr std::chrono::milliseconds arena_patience{50};

/// Average task time of the previous chunk: decides whether each task is timed.
double last_chunk_nanos_per_task = 1e9;

/// Whether the previous reply went (or would have gone) through the arena:
/// then the next one is written straight into a free region, saving a copy.
bool last_reply_was_large = false;

/// Bytes at the start of each reply region that this process has mapped.
/// The regions' pages exist (the parent keeps them warm across workers), but
/// a new worker's page tables lack them: each first write to a 4 KiB page
/// would be a fault, an exception that costs ~1 us on a VM. Mapping the
/// range about to be written in one call is cheaper.
std::size_t reply_region_mapped[ReplyArena::regions] = {};

/// Reply bytes per task of the previous chunk: the guess for the size of a
/// reply written straight into a region (exact for fixed-size results).
double last_reply_bytes_per_task = 0;

void map_reply_region(ReplyArena& arena, std::size_t region, std::size_t bytes) {
  bytes = std::min(bytes, ReplyArena::capacity);
  std::size_t& mapped = reply_region_mapped[region];
  if (bytes <= mapped) return;
  // Counted as written: the parent's arena cache then knows these pages exist
  // and gives them back when the region is cached, even if this worker dies.
  arena.note_written(region, bytes);
  prefault_for_writing(arena.data(region) + mapped, bytes - mapped);
  mapped = bytes;
}

/// Puts a reply already written to `out` (after its header slot at `at`)
/// into a free arena region, waiting a little for one; false if none freed up.
bool move_into_arena(Channel& channel, std::size_t at, FrameHeader& reply) {
  ReplyArena* arena = current_reply_arena;
  if (!arena || !ReplyArena::fits(reply.size)) return false;
  // Replies already queued go first: the parent frees regions as it decodes them.
  channel.send_front(at);
  // Bounded: the parent may be stuck on another call's consumer, and a reply
  // through the socket is slower but never waits for anyone.
  const int region = arena->claim_waiting(arena_patience);
  if (region < 0) return false;
  Buffer& out = channel.out();
  map_reply_region(*arena, static_cast<std::size_t>(region), reply.size);
  std::memcpy(arena->data(static_cast<std::size_t>(region)), out.data() + at + sizeof(FrameHeader),
              reply.size);
  out.resize(at + sizeof(FrameHeader));
  reply.flags =
      static_cast<std::uint16_t>(reply.flags | arena_flags(static_cast<std::size_t>(region)));
  return true;
}

void run_task_frame(WorkerLogic& logic, const FrameHeader& header, Reader& payload,
                    Channel& channel) {
  Buffer& out = channel.out();
  const std::size_t at = out.size();
  out.grow(sizeof(FrameHeader));
  ReplyArena* arena = current_reply_arena;
  const int region = arena && last_reply_was_large ? arena->claim() : -1;
  Buffer direct = region >= 0 ? Buffer::over(arena->data(static_cast<std::size_t>(region)),
                                             ReplyArena::capacity)
                              : Buffer{};
  if (region >= 0) {
    const double expected = last_reply_bytes_per_task * static_cast<double>(header.count);
    map_reply_region(*arena, static_cast<std::size_t>(region),
                     static_cast<std::size_t>(std::min(expected, double{ReplyArena::capacity})));
  }
  Writer writer(region >= 0 ? direct : out);
  if (current_worker_slot) {
    current_worker_slot->call.store(header.call, std::memory_order_relaxed);
    current_worker_slot->chunk_slowest_ns.store(0, std::memory_order_relaxed);
  }
  const auto start = std::chrono::steady_clock::now();
  current_task_start_ns =
      std::chrono::duration_cast<std::chrono::nanoseconds>(start.time_since_epoch()).count();
  time_each_task = worker_has_task_timeout || last_chunk_nanos_per_task >= 2000;
  chunk_reply_dense = false;
  logic.run(header.call, header.first, header.count, payload, writer);
  const auto nanos = std::chrono::duration_cast<std::chrono::nanoseconds>(
      std::chrono::steady_clock::now() - start);
  FrameHeader reply;
  reply.kind = FrameKind::result;
  reply.call = header.call;
  reply.first = header.first;
  reply.count = header.count;
  reply.nanos = static_cast<std::uint64_t>(nanos.count());
  if (chunk_reply_dense) reply.flags = flag_dense;
  if (header.count != 0) {
    last_chunk_nanos_per_task =
        static_cast<double>(reply.nanos) / static_cast<double>(header.count);
  }
  if (current_worker_slot) {
    reply.slowest_index = current_worker_slot->chunk_slowest_index.load(std::memory_order_relaxed);
    reply.slowest_nanos = current_worker_slot->chunk_slowest_ns.load(std::memory_order_relaxed);
  }
  if (region >= 0) {  // written up to its end if the reply outgrew it
    arena->note_written(static_cast<std::size_t>(region),
                        direct.borrowed() ? direct.size() : ReplyArena::capacity);
  }
  if (region >= 0 && direct.borrowed()) {
    reply.size = direct.size();  // already in the region, whatever its size
    reply.flags =
        static_cast<std::uint16_t>(reply.flags | arena_flags(static_cast<std::size_t>(region)));
  } else {
    if (region >= 0) {  // it outgrew the region: send it the ordinary way
      arena->release(static_cast<std::size_t>(region));
      out.append(direct.data(), direct.size());
    }
    reply.size = out.size() - at - sizeof(FrameHeader);
    move_into_arena(channel, at, reply);
  }
  last_reply_was_large = ReplyArena::fits(reply.size);
  if (header.count != 0) {
    last_reply_bytes_per_task = static_cast<double>(reply.size) / static_cast<double>(header.count);
  }
  std::memcpy(out.data() + at, &reply, sizeof reply);
}

}  // namespace

WorkerSlot* current_worker_slot = nullptr;
ReplyArena* current_reply_arena = nullptr;
ReplyArena* current_input_arena = nullptr;
std::int64_t current_task_start_ns = 0;
bool time_each_task = true;
bool worker_has_task_timeout = false;

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

void prepare_worker_process(pid_t parent, unsigned inner_threads) {
  ::prctl(PR_SET_PDEATHSIG, SIGKILL);
  if (::getppid() != parent) ::_exit(0);  // the parent died before prctl took effect
  std::signal(SIGINT, SIG_IGN);
  __fpurge(stdout);
  __fpurge(stderr);
  give_back_inherited_free_heap();
  if (inner_threads == 0) return;
  const std::string value = std::to_string(inner_threads);
  for (const char* name : inner_thread_variables) {
    ::setenv(name, value.c_str(), 0);  // 0: what the caller set stays
  }
}

void run_worker(int fd, WorkerLogic& logic) {
  // What a worker that forked this one had mapped is not mapped here.
  std::fill(std::begin(reply_region_mapped), std::end(reply_region_mapped), std::size_t{0});
  last_reply_bytes_per_task = 0;
  Channel channel(fd);
  for (;;) {
    if (channel.available() < sizeof(FrameHeader)) {
      if (!channel.read_more(sizeof(FrameHeader))) exit_worker(0);
      continue;
    }
    FrameHeader header;
    std::memcpy(&header, channel.head(), sizeof header);
    if (header.magic != frame_magic) die("corrupt message from the parent (bad magic)");
    const bool in_arena = (header.flags & flag_in_arena) != 0;
    if (in_arena && (!current_input_arena || header.size > ReplyArena::capacity)) {
      die("corrupt message from the parent (bad input arena reference)");
    }
    const std::size_t whole = frame_bytes_on_socket(header);
    if (channel.available() < whole) {
      if (!channel.read_more(whole)) exit_worker(0);
      continue;
    }
    const std::size_t region = arena_region(header.flags);
    Reader payload(in_arena ? current_input_arena->data(region) : channel.head() + sizeof header,
                   header.size);
    try {
      switch (header.kind) {
        case FrameKind::task:
          run_task_frame(logic, header, payload, channel);
          // The inputs are decoded: the parent may fill this region again.
          if (in_arena) current_input_arena->busy[region].store(0, std::memory_order_release);
          if (header.flags & flag_end_call_after) logic.end(header.call);
          break;
        case FrameKind::setup:
          logic.setup(header.call, payload);
          break;
        case FrameKind::end_call:
          logic.end(header.call);
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

}  // namespace procpool::detail
