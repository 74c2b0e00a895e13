// Memory files (memfd): shared memory that one process fills and hands to
// another as a file descriptor over a unix socket (SCM_RIGHTS), so that large
// messages and SharedBuffer results change hands without being copied.
#pragma once

#include <chrono>
#include <cstddef>
#include <cstdint>
#include <optional>
#include <span>
#include <utility>
#include <vector>

namespace procpool::detail {

/// Payloads at least this large travel in a memory file of their own rather
/// than through a worker's arena (whose regions are this size) or the socket.
inline constexpr std::size_t memory_file_threshold = std::size_t{32} << 20;

/// A new memory file of `size` bytes (sparse: pages appear as they are
/// written), that can be sealed. Throws std::system_error.
int create_memory_file(std::size_t size);

/// Maps `size` bytes of memory file `fd` shared (MAP_SHARED): what is
/// written there is in the file. Throws std::system_error.
std::byte* map_memory_file(int fd, std::size_t size, bool writable);

/// Unmaps what map_memory_file() or map_sealed_memory_file() mapped.
void unmap_memory_file(void* at, std::size_t size) noexcept;

/// Seals memory file `fd` (mapped writable at `at`, `size` bytes, by this
/// process alone) so that nobody can change it any more, while `at` stays
/// writable for this process: its pages turn private, copy-on-write (a later
/// write here copies the page it touches; the file keeps what it held).
/// False if the file cannot be sealed (another writable mapping of it
/// exists): it must then be copied.
bool freeze_memory_file(int fd, std::byte* at, std::size_t size) noexcept;

/// Whether an entry of /proc/self/pagemap for the pages of [begin, end)
/// `matches`; nullopt if the file cannot be read.
std::optional<bool> any_pagemap_entry(std::uintptr_t begin, std::uintptr_t end,
                                      bool (*matches)(std::uint64_t entry)) noexcept;

/// Whether this process wrote a page of [at, at + size) since
/// freeze_memory_file() made it private (such a page is no longer the
/// file's). True when it cannot tell (no /proc/self/pagemap).
bool written_since_frozen(const std::byte* at, std::size_t size) noexcept;

/// The size of a memory file that nobody can change any more, or -1 if it is
/// not sealed against writes and resizing (or is no memory file at all).
long long sealed_memory_file_size(int fd) noexcept;

/// Maps sealed memory file `fd` privately: reads see the file without a
/// copy, writes copy only the pages they touch. Throws std::system_error.
std::byte* map_sealed_memory_file(int fd, std::size_t size);

/// Memory files that held large messages this process sent and whose
/// receiver has read them, given back (FrameKind::spare) to write the next
/// ones in: their pages exist already, and on a VM filling a fresh page costs
/// several times more than copying into one (`first touch` in
/// bench/compare.py). A worker gets back the files of its replies, the
/// parent those of its inputs. A process keeps at most spare_files_limit
/// bytes of them; only files of at most that size are given back.
inline constexpr std::size_t spare_files_limit = std::size_t{256} << 20;
/// Keeps memory file `fd` (this process owns it) as a spare, or closes it
/// when that would pass spare_files_limit.
void keep_spare_memory_file(int fd) noexcept;
/// A spare memory file of at least `at_least` bytes, taken out of the spares
/// (the caller owns it), and its size; {-1, 0} if none is that large.
std::pair<int, std::size_t> take_spare_memory_file(std::size_t at_least) noexcept;
/// What the spares hold, and how many were taken since this process began
/// (for tests and insights).
struct SpareFilesState {
  std::size_t files = 0, bytes = 0;
  std::uint64_t taken = 0;
};
SpareFilesState spare_memory_files() noexcept;
/// Closes every spare memory file of this process (its last pool or call
/// has ended: nothing comes to use them soon).
void drop_spare_memory_files() noexcept;
/// How long the spares outlive the last pool or call: a program that calls
/// map in a loop writes each call's first large inputs into its previous
/// call's files (their pages exist already).
inline constexpr std::chrono::milliseconds spare_files_idle{1000};
/// drop_spare_memory_files() once spare_files_idle has passed, on the
/// thread that closes memory files aside, unless cancel_idle_spare_drop()
/// is called first (a pool or call has started). At once where that thread
/// does not run (see close_memory_file_aside).
void drop_spare_memory_files_when_idle() noexcept;
void cancel_idle_spare_drop() noexcept;
/// The size of memory file `fd`, or 0 if it cannot be told.
std::size_t memory_file_size(int fd) noexcept;

/// Closes memory file `fd` (`bytes` bytes) soon, on a thread of its own,
/// where it is large enough to matter: its last close frees its pages, which
/// takes the caller about 1.3 ms per 16 MiB. In place below 1 MiB, when too
/// many wait already (256 files, an eighth of RLIMIT_NOFILE, or a GiB of
/// them, a sixteenth of the memory at most), in a worker process, and under
/// ThreadSanitizer. A child forked meanwhile closes those its parent had
/// queued.
void close_memory_file_aside(int fd, std::size_t bytes) noexcept;
/// Returns once every file queued by close_memory_file_aside() is closed.
void wait_for_memory_files_closed_aside() noexcept;
/// How many files wait in that queue (for tests).
std::size_t memory_files_waiting_to_close() noexcept;
/// For tests: while one lives, the queue is not closed from (a file queued
/// meanwhile waits, as it would behind a large one).
struct MemoryFileClosesHeld {
  MemoryFileClosesHeld() noexcept;
  ~MemoryFileClosesHeld();
  MemoryFileClosesHeld(const MemoryFileClosesHeld&) = delete;
  MemoryFileClosesHeld& operator=(const MemoryFileClosesHeld&) = delete;
};

/// Gives the pages of [at, at + n) of a shared, writable memory-file mapping
/// back to the system (whole pages only): bytes already consumed. A hint.
void discard_memory_file_pages(std::byte* at, std::size_t n) noexcept;
/// Takes the pages of [at, at + n) of a shared memory-file mapping out of this
/// process's page tables (whole pages only), where the file keeps them: bytes
/// written for another process, which they now count against, not this one.
void unmap_memory_file_pages(std::byte* at, std::size_t n) noexcept;

/// The most descriptors one message carries (the kernel allows 253).
inline constexpr std::size_t max_fds_per_message = 64;

/// One sendmsg() of up to `n` bytes with `fds` attached (at most
/// max_fds_per_message); returns what sendmsg() returns.
long send_some_with_fds(int socket, const void* data, std::size_t n, std::span<const int> fds,
                        int flags) noexcept;

/// Sends `n` bytes at `data` on blocking socket `socket` with `fds` attached
/// to the first byte; the rest of the bytes, if the send was short, go
/// without. False if the peer is gone.
bool send_with_fds(int socket, const void* data, std::size_t n, std::span<const int> fds) noexcept;

/// recv() that also takes the descriptors that arrive (appended to `fds`).
/// `flags` as for recv(). Returns what recv() returns; sets `truncated` if
/// descriptors were lost (more than max_fds_per_message in one message).
long receive_with_fds(int socket, void* data, std::size_t n, int flags, std::vector<int>& fds,
                      bool& truncated) noexcept;

/// `fd`, or a copy of it above 2 (the original closed) if it landed on a
/// standard stream's number: a program that closed stdin, stdout or stderr
/// gets its next descriptors there, and what it (or a task) then prints
/// would go into the pool's socket or memory file. Close-on-exec is kept.
/// `fd` itself if it cannot be moved (or is negative).
int above_standard_streams(int fd) noexcept;

/// close(), for headers that do not include unistd.h.
void close_fd(int fd) noexcept;

/// Closes every descriptor of `fds` and empties it.
void close_all(std::vector<int>& fds) noexcept;

/// The memory files that came with one reply, in the order the values that
/// refer to them were written (SharedBuffer); closed unless taken.
class AttachedFiles {
 public:
  explicit AttachedFiles(std::vector<int> fds) noexcept : fds_(std::move(fds)) {}
  ~AttachedFiles() {
    for (int fd : fds_)
      if (fd >= 0) ::procpool::detail::close_fd(fd);
  }
  AttachedFiles(const AttachedFiles&) = delete;
  AttachedFiles& operator=(const AttachedFiles&) = delete;

  /// The `i`-th file's descriptor (still this object's); -1 if there is no
  /// such file or it was taken before.
  int at(std::uint64_t i) const noexcept {
    return i < fds_.size() ? fds_[static_cast<std::size_t>(i)] : -1;
  }
  std::size_t size() const noexcept { return fds_.size(); }
  /// Takes the `i`-th file's descriptor: it is the caller's to close now.
  int take(std::uint64_t i) noexcept {
    return i < fds_.size() ? std::exchange(fds_[static_cast<std::size_t>(i)], -1) : -1;
  }

 private:
  std::vector<int> fds_;
};

/// Duplicates of every descriptor of `files` (null: none), for one send.
/// Throws std::system_error.
std::vector<int> duplicate_files(const AttachedFiles* files);

/// Where values decoded on this thread find the files their message came
/// with (null: none came, or not decoding a reply).
AttachedFiles*& files_being_decoded() noexcept;
/// Where values encoded on this thread put the descriptors of files to hand
/// over with their message (null: this message cannot carry any, e.g. in the
/// caller's own process or across MPI ranks; then the bytes are copied).
/// Each descriptor put there is the message's: closed once sent.
std::vector<int>*& files_to_attach() noexcept;

/// Sets a thread's pointer for a scope, and restores it after.
template <class T>
class ScopedPointer {
 public:
  ScopedPointer(T*& where, T* value) noexcept : where_(where), before_(where) { where_ = value; }
  ~ScopedPointer() { where_ = before_; }
  ScopedPointer(const ScopedPointer&) = delete;
  ScopedPointer& operator=(const ScopedPointer&) = delete;

 private:
  T*& where_;
  T* before_;
};

}  // namespace procpool::detail
