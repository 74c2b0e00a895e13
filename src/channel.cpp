#include "channel.hpp"

#include <fcntl.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>

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

bool ParentChannel::flush() {
  while (out_pos_ < outbox_.size()) {
    const ssize_t n = ::send(fd_, outbox_.data() + out_pos_, outbox_.size() - out_pos_,
                             MSG_NOSIGNAL | MSG_DONTWAIT);
    if (n > 0) {
      out_pos_ += static_cast<std::size_t>(n);
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

void ParentChannel::send_rest_and_end() noexcept {
  ::fcntl(fd_, F_SETFL, 0);  // blocking
  if (has_unsent()) {
    [[maybe_unused]] const ssize_t sent =
        ::send(fd_, outbox_.data() + out_pos_, outbox_.size() - out_pos_, MSG_NOSIGNAL);
  }
  // shutdown() reaches the worker even if another process holds a copy of our socket.
  ::shutdown(fd_, SHUT_WR);
}

void ParentChannel::drain() noexcept {
  ::fcntl(fd_, F_SETFL, 0);  // blocking
  std::byte sink[4096];
  for (;;) {
    const ssize_t n = ::recv(fd_, sink, sizeof sink, 0);
    if (n == 0 || (n < 0 && errno != EINTR)) break;
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
    const ssize_t n = ::recv(fd_, at, room, MSG_DONTWAIT);
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
    const ssize_t n = ::recv(fd_, at, room, 0);
    if (slot_) {
      WorkerSlot::add(slot_->wait_ns, static_cast<std::uint64_t>(steady_now_ns() - waiting_since));
      if (n > 0) WorkerSlot::add(slot_->bytes_in, static_cast<std::uint64_t>(n));
    }
    in_.resize(in_.size() - room + (n > 0 ? static_cast<std::size_t>(n) : 0));
    if (n > 0) return true;
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

void WorkerChannel::send_range(std::size_t from, std::size_t to) {
  while (from < to) {
    const ssize_t n = ::send(fd_, out_.data() + from, to - from, MSG_NOSIGNAL);
    if (n > 0) {
      from += static_cast<std::size_t>(n);
    } else if (n < 0 && errno != EINTR) {
      exit_worker(0);  // the parent is gone or closed us: nobody wants the results
    }
  }
}

}  // namespace procpool::detail
