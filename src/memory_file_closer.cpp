// Closing a memory file whose last reference this is frees its pages there
// and then (shmem_evict_inode): about 1.3 ms per 16 MiB on the 2-core VM,
// which was 40 % of what dropping 64 arrived SharedBuffers cost the caller
// (bench/RESULTS.md). A thread of its own closes them instead, so that the
// caller goes on at once; bounded, so that what waits to be freed never grows
// past a fixed amount of memory or descriptors. The same thread drops the
// spare memory files a while after the last pool or call has ended.
#include <pthread.h>
#include <sys/resource.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <array>
#include <chrono>
#include <condition_variable>
#include <cstddef>
#include <cstdint>
#include <mutex>
#include <new>
#include <optional>
#include <system_error>
#include <thread>

#include "procpool/detail/memory_file.hpp"
#include "worker.hpp"

namespace procpool::detail {
namespace {

/// At most this many bytes of dropped files wait to be freed: a GiB, or a
/// sixteenth of the machine's memory where that is less.
std::size_t pending_bytes_limit() noexcept {
  constexpr std::size_t most = std::size_t{1} << 30;
  const long pages = ::sysconf(_SC_PHYS_PAGES), page = ::sysconf(_SC_PAGESIZE);
  if (pages <= 0 || page <= 0) return most;
  return std::min(most, static_cast<std::size_t>(pages) / 16 * static_cast<std::size_t>(page));
}

/// Below this a close costs less than handing the file over.
constexpr std::size_t worth_closing_aside = std::size_t{1} << 20;

/// At most an eighth of the descriptors this process may open wait to be
/// closed: what remains must do for the program's own files.
bool descriptors_to_spare(std::size_t waiting) noexcept {
  rlimit limit{};
  if (::getrlimit(RLIMIT_NOFILE, &limit) != 0 || limit.rlim_cur == RLIM_INFINITY) return true;
  return waiting < limit.rlim_cur / 8;
}

using Clock = std::chrono::steady_clock;

class MemoryFileCloser {
 public:
  static MemoryFileCloser& instance() noexcept {
    static MemoryFileCloser* const made = [] {
      auto* closer = new MemoryFileCloser;  // never destroyed: its thread may outlive main
      // Locked across a fork, so that the child sees the queue whole and can
      // close what it inherited of it.
      ::pthread_atfork([] { instance().mutex_.lock(); }, [] { instance().mutex_.unlock(); },
                       [] { instance().forget_in_child(); });
      return closer;
    }();
    return *made;
  }

  /// Queues `fd` (of `bytes` bytes); false if it must be closed here: the
  /// queue is full, or no thread can be had.
  bool queue(int fd, std::size_t bytes) noexcept {
    std::lock_guard lock(mutex_);
    if (count_ == ring_.size() || pending_bytes_ + bytes > bytes_limit_ ||
        !descriptors_to_spare(count_)) {
      return false;
    }
    if (!thread_running_ && !start_thread()) return false;
    ring_[(head_ + count_) % ring_.size()] = {fd, bytes};
    ++count_;
    pending_bytes_ += bytes;
    work_.notify_one();
    return true;
  }

  /// Drops the spare memory files at `when`, unless cancelled first; false
  /// if no thread can (then the caller drops them).
  bool drop_spares_at(Clock::time_point when) noexcept {
    std::lock_guard lock(mutex_);
    if (!thread_running_ && !start_thread()) return false;
    drop_spares_at_ = when;
    work_.notify_one();
    return true;
  }
  void cancel_spare_drop() noexcept {
    std::lock_guard lock(mutex_);
    drop_spares_at_.reset();
  }

  void wait_until_idle() noexcept {
    std::unique_lock lock(mutex_);
    idle_.wait(lock, [&] { return pending_bytes_ == 0 || !thread_running_; });
  }

  void hold() noexcept {
    std::lock_guard lock(mutex_);
    ++holds_;
  }
  void release() noexcept {
    std::lock_guard lock(mutex_);
    if (holds_ > 0) --holds_;
    work_.notify_one();
  }

  std::size_t queued() noexcept {
    std::lock_guard lock(mutex_);
    return count_;
  }

 private:
  struct Entry {
    int fd = -1;
    std::size_t bytes = 0;
  };

  /// The file being closed, out of the lock: a child forked meanwhile
  /// inherits it if its close had not begun, and closes it, if that
  /// descriptor is still this file (its number may have been reused since).
  struct InFlight {
    int fd = -1;
    dev_t device = 0;
    ino_t inode = 0;
    static InFlight of(int fd) noexcept {
      struct stat st {};
      if (::fstat(fd, &st) != 0) return {};
      return {fd, st.st_dev, st.st_ino};
    }
    void close_if_still_here() const noexcept {
      struct stat st {};
      if (fd >= 0 && ::fstat(fd, &st) == 0 && st.st_dev == device && st.st_ino == inode)
        ::close(fd);
    }
  };

  bool start_thread() noexcept {
    try {
      std::thread([this] { serve(); }).detach();
    } catch (...) {
      return false;  // no thread to be had (a ulimit on processes): close in place
    }
    thread_running_ = true;
    return true;
  }

  /// The closing thread: nothing here allocates, so that a fork from another
  /// thread never finds malloc's lock held by it.
  void serve() noexcept {
    std::unique_lock lock(mutex_);
    for (;;) {
      if (drop_spares_at_ && Clock::now() >= *drop_spares_at_) {
        drop_spares_at_.reset();
        lock.unlock();
        drop_spare_memory_files();  // queues them here: not under the lock
        lock.lock();
        continue;
      }
      if (count_ == 0 || holds_ > 0) {
        // Woken by new work, a new deadline, or nothing (then it looks again).
        if (drop_spares_at_) {
          work_.wait_until(lock, *drop_spares_at_);
        } else {
          work_.wait(lock);
        }
        continue;
      }
      const Entry next = ring_[head_];
      head_ = (head_ + 1) % ring_.size();
      --count_;
      closing_ = InFlight::of(next.fd);
      lock.unlock();
      ::close(next.fd);
      lock.lock();
      closing_ = {};
      pending_bytes_ -= next.bytes;
      if (pending_bytes_ == 0) idle_.notify_all();
    }
  }

  /// In a new child, which has no closing thread and must not keep its
  /// parent's dropped files: it closes them (their numbers are the parent's,
  /// open there until closed from the queue, so open here too).
  void forget_in_child() noexcept {
    for (; count_ > 0; --count_, head_ = (head_ + 1) % ring_.size())
      ::close(ring_[head_].fd);
    closing_.close_if_still_here();
    closing_ = {};
    // Their waiters were the parent's closing thread, which is not here: a
    // glibc condition variable that counts one that never wakes can hang
    // its second notify. New ones (the old are left as they are, never
    // destroyed: destroying a waited-on one is undefined).
    new (&work_) std::condition_variable;
    new (&idle_) std::condition_variable;
    holds_ = 0;  // a hold belongs to a thread of the parent
    head_ = 0;
    pending_bytes_ = 0;
    drop_spares_at_.reset();  // the child's spares start empty
    thread_running_ = false;
    mutex_.unlock();  // taken by the prepare handler, in the thread that forked
  }

  std::mutex mutex_;
  std::condition_variable work_, idle_;
  std::array<Entry, 256> ring_{};
  std::size_t head_ = 0, count_ = 0;
  std::size_t pending_bytes_ = 0;  // queued or being closed
  InFlight closing_;
  const std::size_t bytes_limit_ = pending_bytes_limit();
  int holds_ = 0;
  bool thread_running_ = false;
  std::optional<Clock::time_point> drop_spares_at_;
};

/// Made as the library loads, not at first use: its constructor registers
/// fork handlers, and pthread_atfork waits for a fork in progress. A thread
/// making it then while another forked a worker left the worker a guard
/// of this static that never opens: it hung the first time it needed it
/// (four threads making their first map at once: 12 of 100 runs).
[[maybe_unused]] const MemoryFileCloser& memory_file_closer_made_as_the_library_loads =
    MemoryFileCloser::instance();

/// Where closing aside is not done: a worker (its own threads are counted,
/// and a fork server must have one), and under ThreadSanitizer, whose child
/// of a fork may hang if another thread was inside its interceptors.
bool closes_in_place() noexcept {
#if defined(__SANITIZE_THREAD__)
  return true;
#else
  return in_worker_process();
#endif
}

}  // namespace

void close_memory_file_aside(int fd, std::size_t bytes) noexcept {
  if (fd < 0) return;
  if (bytes < worth_closing_aside || closes_in_place() ||
      !MemoryFileCloser::instance().queue(fd, bytes)) {
    ::close(fd);
  }
}

void wait_for_memory_files_closed_aside() noexcept {
  MemoryFileCloser::instance().wait_until_idle();
}

std::size_t memory_files_waiting_to_close() noexcept {
  return MemoryFileCloser::instance().queued();
}

void drop_spare_memory_files_when_idle() noexcept {
  // None (the common case: no large input went through): no thread to start.
  if (spare_memory_files().files == 0) return;
  if (closes_in_place() ||
      !MemoryFileCloser::instance().drop_spares_at(Clock::now() + spare_files_idle)) {
    drop_spare_memory_files();
  }
}

void cancel_idle_spare_drop() noexcept {
  MemoryFileCloser::instance().cancel_spare_drop();
}

MemoryFileClosesHeld::MemoryFileClosesHeld() noexcept {
  MemoryFileCloser::instance().hold();
}

MemoryFileClosesHeld::~MemoryFileClosesHeld() {
  MemoryFileCloser::instance().release();
}

}  // namespace procpool::detail
