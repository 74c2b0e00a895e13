#include "channel.hpp"

#include <fcntl.h>
#include <poll.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>

#include "procpool/detail/memory_file.hpp"
#include "worker.hpp"

namespace procpool::detail {

void ParentChannel::queue_header(FrameKind kind, std::uint64_t call, std::uint64_t first,
                                 std::uint64_t count, std::uint64_t size, std::uint16_t flags) {
  FrameHeader header;
  header.kind = kind;
  header.flags = flags;
  header.call = call;
  header.first = first;
  header.count = count;
  header.size = size;
  outbox_.append(&header, sizeof header);
}

void ParentChannel::queue_frame(FrameKind kind, std::uint64_t call, std::uint64_t first,
                                std::uint64_t count, const Buffer& payload, std::uint16_t flags) {
  queue_header(kind, call, first, count, payload.size(), flags);
  outbox_.append(payload.data(), payload.size());
}

ParentChannel::~ParentChannel() {
  close_all(received_fds_);
  close_all(attached_.fds);
  for (OutgoingAttachment& attachment : outgoing_)
    close_all(attachment.fds);
}

void ParentChannel::queue_attachment(std::vector<int> fds, std::uint64_t file_offset) {
  outgoing_.push_back({outbox_.size(), std::move(fds)});
  queue_header(FrameKind::attach, 0, file_offset, outgoing_.back().fds.size(), 0, 0);
}

void ParentChannel::queue_spares(std::vector<int> fds) {
  outgoing_.push_back({outbox_.size(), std::move(fds)});
  queue_header(FrameKind::spare, 0, 0, outgoing_.back().fds.size(), 0, 0);
}

bool ParentChannel::send_outbox(int flags) {
  while (out_pos_ < outbox_.size()) {
    // Up to the next attachment's header, or from it with its descriptors.
    const bool attaching = !outgoing_.empty() && outgoing_.front().at == out_pos_;
    std::size_t until = outbox_.size();
    for (const OutgoingAttachment& attachment : outgoing_) {
      if (attachment.at > out_pos_) {
        until = attachment.at;
        break;
      }
    }
    const std::span<const int> fds =
        attaching ? std::span<const int>(outgoing_.front().fds) : std::span<const int>{};
    const long n = send_some_with_fds(fd_, outbox_.data() + out_pos_, until - out_pos_, fds, flags);
    if (n > 0) {
      out_pos_ += static_cast<std::size_t>(n);
      if (attaching) {  // the receiver has its own copies now
        close_all(outgoing_.front().fds);
        outgoing_.pop_front();
      }
    } else if (n < 0 && errno == EINTR) {
      continue;
    } else if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) {
      return true;
    } else {
      return false;  // EPIPE / ECONNRESET: the worker is gone
    }
  }
  outbox_.clear();
  out_pos_ = 0;
  return true;
}

bool ParentChannel::flush() {
  return send_outbox(MSG_DONTWAIT);
}

void ParentChannel::send_rest_and_end() noexcept {
  ::fcntl(fd_, F_SETFL, 0);  // blocking
  [[maybe_unused]] const bool sent = send_outbox(0);
  // shutdown() reaches the worker even if another process holds a copy of our socket.
  ::shutdown(fd_, SHUT_WR);
}

bool ParentChannel::take_received(const FrameHeader& header, std::vector<int>& into) {
  const auto count = static_cast<std::size_t>(header.count);
  if (fds_lost_ || received_fds_.size() < count) return false;
  const auto end = received_fds_.begin() + static_cast<std::ptrdiff_t>(count);
  into.insert(into.end(), received_fds_.begin(), end);
  received_fds_.erase(received_fds_.begin(), end);
  return true;
}

bool ParentChannel::take_attachment(const FrameHeader& header) {
  if (!take_received(header, attached_.fds)) return false;
  attached_.file_offset = header.first;
  return true;
}

bool ParentChannel::keep_spares(const FrameHeader& header) {
  std::vector<int> spares;
  if (!take_received(header, spares)) return false;
  for (int fd : spares)
    keep_spare_memory_file(fd);
  return true;
}

namespace {

/// Whether child `pid` has exited (it is left to be reaped).
bool has_exited(pid_t pid) noexcept {
  siginfo_t info{};
  const int r = ::waitid(P_PID, static_cast<id_t>(pid), &info, WEXITED | WNOHANG | WNOWAIT);
  return r != 0 || info.si_pid == pid;  // an error: nothing to wait for either
}

}  // namespace

void ParentChannel::drain(pid_t pid) noexcept {
  std::byte sink[4096];
  for (;;) {
    pollfd readable{fd_, POLLIN, 0};
    const int ready = ::poll(&readable, 1, 50);
    if (ready < 0 && errno != EINTR) return;
    if (ready > 0) {
      const ssize_t n = ::recv(fd_, sink, sizeof sink, MSG_DONTWAIT);
      if (n == 0) return;
      if (n < 0 && errno != EINTR && errno != EAGAIN && errno != EWOULDBLOCK) return;
    } else if (ready == 0 && has_exited(pid)) {
      // Quiet, and the worker is gone: whoever still holds its end (a
      // process its task forked) sends nothing of the worker's.
      return;
    }
  }
}

Buffer ParentChannel::take_inbox() noexcept {
  in_pos_ = 0;
  return std::move(inbox_);
}

long ParentChannel::read_some() {
  for (;;) {
    const std::size_t room = std::max(receive_size, inbox_.capacity() - inbox_.size());
    std::byte* at = inbox_.grow(room);
    const long n = receive_with_fds(fd_, at, room, MSG_DONTWAIT, received_fds_, fds_lost_);
    inbox_.resize(inbox_.size() - room + (n > 0 ? static_cast<std::size_t>(n) : 0));
    if (n > 0) return static_cast<long>(n);
    if (n < 0 && errno == EINTR) continue;
    if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) return -1;
    return 0;  // EOF or reset
  }
}

std::size_t max_reply_payload() noexcept {
  const long pages = ::sysconf(_SC_PHYS_PAGES);
  const long page = ::sysconf(_SC_PAGESIZE);
  return pages > 0 && page > 0 ? static_cast<std::size_t>(pages) * static_cast<std::size_t>(page)
                               : (std::size_t{1} << 40);
}

namespace {
constexpr std::size_t worker_read_size = 256 * 1024;
}  // namespace

LinkWatch::LinkWatch(int fd, WorkerSlot* slot) noexcept : fd_(fd), slot_(slot) {
  struct stat st {};
  if (::fstat(fd, &st) == 0) {
    device_ = static_cast<std::uint64_t>(st.st_dev);
    inode_ = static_cast<std::uint64_t>(st.st_ino);
  }
}

bool LinkWatch::intact() const noexcept {
  struct stat st {};
  if (::fstat(fd_, &st) != 0) return errno == EINTR;  // EBADF: closed
  return static_cast<std::uint64_t>(st.st_dev) == device_ &&
         static_cast<std::uint64_t>(st.st_ino) == inode_;
}

void LinkWatch::check() noexcept {
  if (!intact()) report_closed();
  forget_tasks();
}

void LinkWatch::lost() noexcept {
  if (unchecked_ != 0 && !intact()) report_closed();
  // The parent is gone or closed us: nobody wants the results. The end is
  // shut down both ways first, so that the parent sees it close now even
  // while a process a task forked (without exec) holds a copy of it.
  ::shutdown(fd_, SHUT_RDWR);
  exit_worker(0);
}

void LinkWatch::report_closed() noexcept {
  if (slot_) {
    // One task ran since the link was last whole: it took it. Of several,
    // none is named; the parent runs their chunk again in smaller ones.
    slot_->call.store(call_, std::memory_order_relaxed);
    slot_->index.store(unchecked_ == 1 ? index_ : first_, std::memory_order_relaxed);
    slot_->link_closed_in_chunk.store(earlier_chunks_ == 0 ? 1 : 0, std::memory_order_relaxed);
    slot_->link_closed.store(fd_ + 1, std::memory_order_relaxed);
    slot_->running.store(unchecked_ == 1 ? WorkerSlot::running_task : 0, std::memory_order_release);
  }
  exit_worker(link_closed_status);
}

bool WorkerChannel::read_more(std::size_t wanted) {
  flush();  // the parent may be waiting for these replies before it sends more
  if (pos_ != 0) {
    in_.consume(pos_);
    pos_ = 0;
  }
  in_.reserve(std::max(wanted, in_.size() + worker_read_size));
  for (;;) {
    const std::size_t room = std::max(wanted, in_.size() + worker_read_size) - in_.size();
    std::byte* at = in_.grow(room);
    const std::int64_t waiting_since = steady_now_ns();
    // Before it waits, a worker whose tasks may have taken the link checks
    // it: a socket of a task's own in its place would never answer.
    const bool may_wait_on_a_stranger = link_.tasks_unchecked();
    const long n = receive_with_fds(fd_, at, room, may_wait_on_a_stranger ? MSG_DONTWAIT : 0,
                                    received_fds_, fds_lost_);
    if (n < 0 && may_wait_on_a_stranger && (errno == EAGAIN || errno == EWOULDBLOCK)) {
      in_.resize(in_.size() - room);
      link_.check();
      continue;
    }
    if (slot_) {
      WorkerSlot::add(slot_->wait_ns, static_cast<std::uint64_t>(steady_now_ns() - waiting_since));
      if (n > 0) WorkerSlot::add(slot_->bytes_in, static_cast<std::uint64_t>(n));
    }
    in_.resize(in_.size() - room + (n > 0 ? static_cast<std::size_t>(n) : 0));
    if (n > 0) {
      link_.heard_from_parent();
      return true;
    }
    if (n == 0) return false;
    if (errno != EINTR) return false;
  }
}

void WorkerChannel::send_front(std::size_t n) {
  send_range(sent_, n);
  sent_ = n;
}

void WorkerChannel::flush() {
  if (slot_ && !out_.empty()) {
    WorkerSlot::add(slot_->bytes_out, out_.size());
    rusage usage{};
    ::getrusage(RUSAGE_SELF, &usage);
    slot_->peak_rss_kb.store(static_cast<std::uint64_t>(usage.ru_maxrss),
                             std::memory_order_relaxed);
  }
  send_range(sent_, out_.size());
  out_.clear();
  sent_ = 0;
}

void WorkerChannel::send_attached(std::size_t queued, std::span<const int> fds,
                                  std::uint64_t file_offset) {
  send_front(queued);
  for (std::size_t from = 0; from < fds.size(); from += max_fds_per_message) {
    const std::span<const int> group =
        fds.subspan(from, std::min(max_fds_per_message, fds.size() - from));
    FrameHeader header;
    header.kind = FrameKind::attach;
    header.count = group.size();
    header.first = file_offset;
    if (!send_with_fds(fd_, &header, sizeof header, group)) link_.lost();
  }
}

void WorkerChannel::send_spares(std::span<const int> fds) {
  FrameHeader header;
  header.kind = FrameKind::spare;
  header.count = fds.size();
  if (!send_with_fds(fd_, &header, sizeof header, fds)) link_.lost();
}

void WorkerChannel::send_header_and_renew_out(std::size_t queued, const FrameHeader& header) {
  send_front(queued);
  if (!send_with_fds(fd_, &header, sizeof header, {})) link_.lost();
  if (slot_) WorkerSlot::add(slot_->bytes_out, sizeof header + header.size);
  out_ = Buffer{};
  out_.share_when_large(WrittenPages::kept_mapped);
  sent_ = 0;
}

bool WorkerChannel::take_fds(std::size_t n, std::vector<int>& into) {
  if (fds_lost_ || received_fds_.size() < n) return false;
  into.insert(into.end(), received_fds_.begin(),
              received_fds_.begin() + static_cast<std::ptrdiff_t>(n));
  received_fds_.erase(received_fds_.begin(),
                      received_fds_.begin() + static_cast<std::ptrdiff_t>(n));
  return true;
}

void WorkerChannel::send_range(std::size_t from, std::size_t to) {
  while (from < to) {
    const ssize_t n = ::send(fd_, out_.data() + from, to - from, MSG_NOSIGNAL);
    if (n > 0) {
      from += static_cast<std::size_t>(n);
    } else if (n < 0 && errno != EINTR) {
      link_.lost();
    }
  }
}

}  // namespace procpool::detail
