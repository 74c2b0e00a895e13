// The socket between the parent and a local worker, both ends in one place.
// Each message is a FrameHeader (protocol.hpp) and its payload, unless the
// payload travels through an arena. The two ends mirror each other: what one
// queues the other parses; both gather many messages per system call.
#pragma once

#include <cstddef>
#include <cstdint>
#include <cstring>
#include <deque>
#include <span>
#include <vector>

#include "procpool/detail/buffer.hpp"
#include "procpool/detail/protocol.hpp"

namespace procpool::detail {

/// The parent's end: a non-blocking socket, an outbox that poll() drains and
/// an inbox that holds partial replies.
class ParentChannel {
 public:
  /// Bytes asked for per recv(); larger replies come through the reply arena.
  static constexpr std::size_t receive_size = 64 * 1024;

  explicit ParentChannel(int fd) noexcept : fd_(fd) {}
  ~ParentChannel();
  ParentChannel(const ParentChannel&) = delete;
  ParentChannel& operator=(const ParentChannel&) = delete;

  int fd() const noexcept { return fd_; }

  /// Queues a header whose `size` bytes of payload travel elsewhere (or follow).
  void queue_header(FrameKind kind, std::uint64_t call, std::uint64_t first, std::uint64_t count,
                    std::uint64_t size, std::uint16_t flags);
  void queue_frame(FrameKind kind, std::uint64_t call, std::uint64_t first, std::uint64_t count,
                   const Buffer& payload, std::uint16_t flags = 0);
  /// Queues an attach frame carrying `fds` (taken over: closed once sent),
  /// for the next frame queued; `file_offset` as FrameKind::attach says.
  void queue_attachment(std::vector<int> fds, std::uint64_t file_offset);
  /// Queues memory files (owned here from now on) in a FrameKind::spare frame.
  void queue_spares(std::vector<int> fds);
  bool has_unsent() const noexcept { return out_pos_ < outbox_.size(); }
  /// Whether descriptors the worker sent did not fit (MSG_CTRUNC): this
  /// process is at its limit of open files.
  bool descriptors_lost() const noexcept { return fds_lost_; }

  /// Sends what it can without blocking; false if the worker is gone.
  [[nodiscard]] bool flush();
  /// Sends the rest of the outbox, blocking, and tells the worker that no more
  /// messages come: it exits once it has answered them.
  void send_rest_and_end() noexcept;
  /// Reads and drops what is left until the worker `pid` closed its end, or
  /// has exited: a process its task forked may hold a copy of the socket
  /// for as long as it lives.
  void drain(pid_t pid) noexcept;

  enum class Received {
    drained,     // nothing more to read now
    stopped,     // the frame handler said stop
    closed,      // end of file or an error: the worker is gone
    bad_header,  // a header that cannot be trusted
  };

  /// Parses every complete reply that has arrived, calling
  /// `on_frame(header, payload, whole_inbox)` for each; `whole_inbox` means
  /// the frame alone fills the inbox and take_inbox() may take it over.
  /// `arena_allowed`: the worker has a reply arena.
  template <class OnFrame>
  Received receive(bool arena_allowed, OnFrame&& on_frame);

  /// The inbox, handed over whole (see receive); the channel starts a new one.
  Buffer take_inbox() noexcept;
  bool mid_message() const noexcept { return in_pos_ != inbox_.size(); }

  /// The memory files attached to the frame being handed to on_frame (see
  /// FrameKind::attach), taken over by the caller; empty if none came.
  struct Attached {
    std::vector<int> fds;
    std::uint64_t file_offset = 0;
  };
  Attached take_attached() noexcept { return std::exchange(attached_, {}); }

 private:
  /// recv() into the inbox; >0 bytes, 0 at EOF, <0 when nothing is there (or on error: errno).
  long read_some();
  /// Moves the descriptors an attach frame announces from those received to
  /// attached_; false if they did not arrive.
  bool take_attachment(const FrameHeader& header);
  /// Keeps the memory files a worker gave back in a spare frame (input
  /// files it decoded) as this process's spares; false if they did not arrive.
  bool keep_spares(const FrameHeader& header);
  /// Moves the `count` descriptors `header` announces from those received
  /// to `into`, in order; false if they did not arrive.
  bool take_received(const FrameHeader& header, std::vector<int>& into);
  /// Sends what it can (MSG_DONTWAIT in `flags`: without blocking), with
  /// each attachment's descriptors on the bytes of its header.
  [[nodiscard]] bool send_outbox(int flags);

  struct OutgoingAttachment {
    std::size_t at = 0;  // where its attach header starts in the outbox
    std::vector<int> fds;
  };

  int fd_;
  Buffer outbox_;
  std::size_t out_pos_ = 0;
  std::deque<OutgoingAttachment> outgoing_;
  Buffer inbox_;
  std::size_t in_pos_ = 0;
  std::vector<int> received_fds_;  // arrived, not yet claimed by an attach frame, in order
  bool fds_lost_ = false;          // some did not fit: every later attachment is suspect
  Attached attached_;
};

/// The largest payload length a reply may announce: no honest one exceeds
/// physical memory, so a bigger one is garbage, never an allocation.
std::size_t max_reply_payload() noexcept;

template <class OnFrame>
ParentChannel::Received ParentChannel::receive(bool arena_allowed, OnFrame&& on_frame) {
  static const std::size_t max_payload = max_reply_payload();
  for (;;) {
    while (inbox_.size() - in_pos_ >= sizeof(FrameHeader)) {
      FrameHeader header;
      std::memcpy(&header, inbox_.data() + in_pos_, sizeof header);
      if (!valid_reply_header(header, max_payload) ||
          ((header.flags & flag_in_arena) != 0 && !arena_allowed) ||
          ((header.flags & flag_in_file) != 0 && attached_.fds.empty())) {
        return Received::bad_header;
      }
      const std::size_t whole = frame_bytes_on_socket(header);
      if (inbox_.size() - in_pos_ < whole) {
        if (in_pos_ != 0) {
          inbox_.consume(in_pos_);
          in_pos_ = 0;
        }
        inbox_.reserve(whole);
        break;
      }
      if (header.kind == FrameKind::attach || header.kind == FrameKind::spare) {
        const bool taken =
            header.kind == FrameKind::attach ? take_attachment(header) : keep_spares(header);
        if (!taken) return Received::bad_header;
        in_pos_ += whole;
        continue;
      }
      const std::byte* payload = inbox_.data() + in_pos_ + sizeof header;
      // A big reply usually fills the inbox alone: hand the buffer over instead of copying it.
      const bool whole_inbox = in_pos_ == 0 && whole == inbox_.size() && whole > receive_size;
      in_pos_ += whole;
      if (!on_frame(header, payload, whole_inbox)) return Received::stopped;
    }
    if (in_pos_ == inbox_.size()) {
      inbox_.clear();
      in_pos_ = 0;
    }
    const long n = read_some();
    if (n > 0) continue;
    if (n < 0) return Received::drained;
    return Received::closed;
  }
}

/// The worker's end: blocking reads into a buffer that holds many messages,
/// and replies collected and sent in few system calls. Its traffic is counted
/// in `slot` (null: not counted).
class WorkerChannel {
 public:
  WorkerChannel(int fd, WorkerSlot* slot) noexcept : fd_(fd), slot_(slot), link_(fd, slot) {
    // A large reply is then handed over in its memory file.
    out_.share_when_large(WrittenPages::kept_mapped);
  }

  std::size_t available() const noexcept { return in_.size() - pos_; }
  const std::byte* head() const noexcept { return in_.data() + pos_; }
  void skip(std::size_t n) noexcept { pos_ += n; }
  Buffer& out() noexcept { return out_; }

  /// Blocks until at least `wanted` bytes are available; false at EOF.
  [[nodiscard]] bool read_more(std::size_t wanted);
  /// Sends the first `n` bytes of out() now (whole replies queued before the
  /// one being built), leaving them in place so that nothing moves.
  void send_front(std::size_t n);
  void flush();

  /// Sends the first `queued` bytes of out(), then attach frames carrying
  /// `fds` (the receiver gets its own copies) for the frame that follows;
  /// `file_offset` as FrameKind::attach says.
  void send_attached(std::size_t queued, std::span<const int> fds, std::uint64_t file_offset);
  /// Sends memory files (the receiver gets its own copies) in a spare frame,
  /// now: between two whole frames, as nothing of out() is sent before it is whole.
  void send_spares(std::span<const int> fds);
  /// Sends `header` alone, now, after the first `queued` bytes of out(), and
  /// gives out() new memory: its memory file now belongs to the parent.
  void send_header_and_renew_out(std::size_t queued, const FrameHeader& header);

  /// Takes the descriptors an attach frame announces, in the order they
  /// arrived; false if they did not all arrive.
  [[nodiscard]] bool take_fds(std::size_t n, std::vector<int>& into);

  /// Whether tasks left the link's descriptor alone (see LinkWatch).
  LinkWatch& link() noexcept { return link_; }

 private:
  void send_range(std::size_t from, std::size_t to);

  int fd_;
  WorkerSlot* slot_;
  Buffer in_;
  std::size_t pos_ = 0;
  Buffer out_;
  std::size_t sent_ = 0;  // bytes at the front of out_ already sent
  std::vector<int> received_fds_;
  bool fds_lost_ = false;
  LinkWatch link_;
};

}  // namespace procpool::detail
