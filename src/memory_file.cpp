#include "procpool/detail/memory_file.hpp"

#include <fcntl.h>
#include <pthread.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <array>
#include <cerrno>
#include <cstring>
#include <mutex>
#include <optional>
#include <string>
#include <system_error>

namespace procpool::detail {
namespace {

constexpr int write_seals = F_SEAL_WRITE | F_SEAL_SHRINK | F_SEAL_GROW;

[[noreturn]] void throw_errno(const std::string& what, int error = errno) {
  throw std::system_error(error, std::generic_category(), "procpool: " + what);
}

std::uintptr_t page_size() noexcept {
  static const auto page = static_cast<std::uintptr_t>(::sysconf(_SC_PAGESIZE));
  return page;
}

}  // namespace

int create_memory_file(std::size_t size) {
  const int fd =
      above_standard_streams(::memfd_create("procpool", MFD_CLOEXEC | MFD_ALLOW_SEALING));
  if (fd < 0) throw_errno("cannot create a memory file (memfd_create)");
  if (::ftruncate(fd, static_cast<off_t>(size)) != 0) {
    const int error = errno;
    ::close(fd);
    throw_errno("cannot size a memory file of " + std::to_string(size) + " bytes", error);
  }
  return fd;
}

std::byte* map_memory_file(int fd, std::size_t size, bool writable) {
  if (size == 0) return nullptr;
  const int protection = writable ? PROT_READ | PROT_WRITE : PROT_READ;
  void* at = ::mmap(nullptr, size, protection, MAP_SHARED, fd, 0);
  if (at == MAP_FAILED)
    throw_errno("cannot map a memory file of " + std::to_string(size) + " bytes");
  return static_cast<std::byte*>(at);
}

void unmap_memory_file(void* at, std::size_t size) noexcept {
  if (at != nullptr && size != 0) ::munmap(at, size);
}

bool freeze_memory_file(int fd, std::byte* at, std::size_t size) noexcept {
  // The same pages, now private: the shared writable mapping that would keep
  // the seal from being set is gone, and this process may still write.
  if (size != 0 &&
      ::mmap(at, size, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_FIXED, fd, 0) == MAP_FAILED) {
    return false;
  }
  return ::fcntl(fd, F_ADD_SEALS, write_seals) == 0;
}

std::optional<bool> any_pagemap_entry(std::uintptr_t begin, std::uintptr_t end,
                                      bool (*matches)(std::uint64_t entry)) noexcept {
  // Opened each time: a descriptor kept open would, after a fork, go on
  // describing the process that opened it.
  const int fd = ::open("/proc/self/pagemap", O_RDONLY | O_CLOEXEC);
  if (fd < 0) return std::nullopt;
  const std::uintptr_t page = page_size();
  std::uint64_t entries[512];
  std::optional<bool> found = false;
  for (std::uintptr_t p = begin & ~(page - 1); p < end && !*found;) {
    const std::size_t n = std::min<std::size_t>(512, (end - p + page - 1) / page);
    const auto offset = static_cast<off_t>(p / page * sizeof(std::uint64_t));
    const ssize_t got = ::pread(fd, entries, n * sizeof(std::uint64_t), offset);
    if (got <= 0) {
      found = std::nullopt;
      break;
    }
    const std::size_t read = static_cast<std::size_t>(got) / sizeof(std::uint64_t);
    for (std::size_t i = 0; i < read && !*found; ++i)
      found = matches(entries[i]);
    p += read * page;
  }
  ::close(fd);
  return found;
}

bool written_since_frozen(const std::byte* at, std::size_t size) noexcept {
  if (size == 0) return false;
  // A page present but not the file's (bit 61 clear), or swapped out (bit
  // 62: only anonymous pages are), was copied on a write. Unknown: copy.
  const auto begin = reinterpret_cast<std::uintptr_t>(at);
  return any_pagemap_entry(begin, begin + size,
                           [](std::uint64_t entry) {
                             constexpr std::uint64_t present = std::uint64_t{1} << 63,
                                                     swapped = std::uint64_t{1} << 62,
                                                     file_page = std::uint64_t{1} << 61;
                             return (entry & swapped) != 0 ||
                                    ((entry & present) != 0 && (entry & file_page) == 0);
                           })
      .value_or(true);
}

long long sealed_memory_file_size(int fd) noexcept {
  const int seals = ::fcntl(fd, F_GET_SEALS);
  if (seals < 0 || (seals & write_seals) != write_seals) return -1;
  struct stat st {};
  if (::fstat(fd, &st) != 0) return -1;
  return static_cast<long long>(st.st_size);
}

std::byte* map_sealed_memory_file(int fd, std::size_t size) {
  if (size == 0) return nullptr;
  void* at = ::mmap(nullptr, size, PROT_READ | PROT_WRITE, MAP_PRIVATE, fd, 0);
  if (at == MAP_FAILED)
    throw_errno("cannot map a shared buffer of " + std::to_string(size) + " bytes");
  return static_cast<std::byte*>(at);
}

namespace {

/// The spare memory files of this process (a worker's replies', a
/// caller's inputs'), see
/// keep_spare_memory_file. A child forked from here (a worker's own pool)
/// starts with none: the files are its parent's to write.
class SpareFiles {
 public:
  static SpareFiles& instance() noexcept {
    static SpareFiles* const made = [] {
      auto* spares = new SpareFiles;  // never destroyed: a worker ends with _exit
      // Locked across a fork, so that the child sees the list whole.
      ::pthread_atfork([] { instance().mutex_->lock(); }, [] { instance().mutex_->unlock(); },
                       [] { instance().forget_in_child(); });
      return spares;
    }();
    return *made;
  }

  void keep(int fd) noexcept {
    const std::size_t size = memory_file_size(fd);
    std::lock_guard lock(*mutex_);
    if (size == 0 || bytes_ + size > spare_files_limit) {
      ::close(fd);
      return;
    }
    try {
      files_.emplace_back(fd, size);
    } catch (...) {  // no memory for the list: the file is only a spare
      ::close(fd);
      return;
    }
    bytes_ += size;
  }

  std::pair<int, std::size_t> take(std::size_t at_least) noexcept {
    std::lock_guard lock(*mutex_);
    auto best = files_.end();
    for (auto it = files_.begin(); it != files_.end(); ++it) {
      if (it->second >= at_least && (best == files_.end() || it->second < best->second)) best = it;
    }
    if (best == files_.end()) return {-1, 0};
    const std::pair<int, std::size_t> file = *best;
    files_.erase(best);
    bytes_ -= file.second;
    ++taken_;
    return file;
  }

  void drop() noexcept {
    // Their pages are freed aside. Out of the lock: no thread may wait for
    // the closer's while it holds this one, as a fork takes both. A few at a
    // time, with nothing allocated or freed: this runs on the closer's thread.
    for (;;) {
      std::array<std::pair<int, std::size_t>, 16> dropped;
      std::size_t count = 0;
      {
        std::lock_guard lock(*mutex_);
        count = std::min(dropped.size(), files_.size());
        const auto end = files_.end(), begin = end - static_cast<std::ptrdiff_t>(count);
        std::copy(begin, end, dropped.begin());
        files_.erase(begin, end);  // keeps the capacity
        for (std::size_t i = 0; i < count; ++i)
          bytes_ -= dropped[i].second;
      }
      if (count == 0) return;
      for (std::size_t i = 0; i < count; ++i)
        close_memory_file_aside(dropped[i].first, dropped[i].second);
    }
  }

  SpareFilesState state() noexcept {
    std::lock_guard lock(*mutex_);
    return {files_.size(), bytes_, taken_};
  }

 private:
  void forget_in_child() noexcept {
    for (const auto& file : files_)
      ::close(file.first);
    files_.clear();
    bytes_ = 0;
    mutex_->unlock();  // taken by the prepare handler, in the thread that forked
  }

  std::mutex* mutex_ = new std::mutex;
  std::vector<std::pair<int, std::size_t>> files_;  // descriptor, size
  std::size_t bytes_ = 0;
  std::uint64_t taken_ = 0;
};

/// Made as the library loads, not at first use: its constructor registers
/// fork handlers, and pthread_atfork waits for a fork in progress. A thread
/// making it then while another forked a worker left the worker a guard
/// of this static that never opens: it hung the first time it needed it
/// (four threads making their first map at once: 12 of 100 runs).
[[maybe_unused]] const SpareFiles& spare_files_made_as_the_library_loads = SpareFiles::instance();

}  // namespace

void keep_spare_memory_file(int fd) noexcept {
  SpareFiles::instance().keep(fd);
}

std::pair<int, std::size_t> take_spare_memory_file(std::size_t at_least) noexcept {
  return SpareFiles::instance().take(at_least);
}

SpareFilesState spare_memory_files() noexcept {
  return SpareFiles::instance().state();
}

void drop_spare_memory_files() noexcept {
  SpareFiles::instance().drop();
}

std::size_t memory_file_size(int fd) noexcept {
  struct stat st {};
  return ::fstat(fd, &st) == 0 && st.st_size > 0 ? static_cast<std::size_t>(st.st_size) : 0;
}

void discard_memory_file_pages(std::byte* at, std::size_t n) noexcept {
  const std::uintptr_t page = page_size();
  const auto begin = (reinterpret_cast<std::uintptr_t>(at) + page - 1) & ~(page - 1);
  const auto end = (reinterpret_cast<std::uintptr_t>(at) + n) & ~(page - 1);
  if (end > begin) ::madvise(reinterpret_cast<void*>(begin), end - begin, MADV_REMOVE);
}

void unmap_memory_file_pages(std::byte* at, std::size_t n) noexcept {
  const std::uintptr_t page = page_size();
  const auto begin = (reinterpret_cast<std::uintptr_t>(at) + page - 1) & ~(page - 1);
  const auto end = (reinterpret_cast<std::uintptr_t>(at) + n) & ~(page - 1);
  // On a shared file mapping MADV_DONTNEED only drops the mappings: reading
  // the bytes again maps the file's pages back.
  if (end > begin) ::madvise(reinterpret_cast<void*>(begin), end - begin, MADV_DONTNEED);
}

long send_some_with_fds(int socket, const void* data, std::size_t n, std::span<const int> fds,
                        int flags) noexcept {
  alignas(cmsghdr) char control[CMSG_SPACE(sizeof(int) * max_fds_per_message)];
  const std::size_t count = std::min(fds.size(), max_fds_per_message);
  iovec io{const_cast<void*>(data), n};
  msghdr message{};
  message.msg_iov = &io;
  message.msg_iovlen = 1;
  if (count != 0) {
    message.msg_control = control;
    message.msg_controllen = CMSG_SPACE(sizeof(int) * count);
    cmsghdr* header = CMSG_FIRSTHDR(&message);
    header->cmsg_level = SOL_SOCKET;
    header->cmsg_type = SCM_RIGHTS;
    header->cmsg_len = CMSG_LEN(sizeof(int) * count);
    std::memcpy(CMSG_DATA(header), fds.data(), sizeof(int) * count);
  }
  return static_cast<long>(::sendmsg(socket, &message, flags | MSG_NOSIGNAL));
}

bool send_with_fds(int socket, const void* data, std::size_t n, std::span<const int> fds) noexcept {
  const auto* bytes = static_cast<const char*>(data);
  std::size_t sent = 0;
  while (sent < n) {
    // The descriptors go with the first bytes only.
    const long got = send_some_with_fds(socket, bytes + sent, n - sent,
                                        sent == 0 ? fds : std::span<const int>{}, 0);
    if (got < 0 && errno == EINTR) continue;
    if (got <= 0) return false;
    sent += static_cast<std::size_t>(got);
  }
  return true;
}

long receive_with_fds(int socket, void* data, std::size_t n, int flags, std::vector<int>& fds,
                      bool& truncated) noexcept {
  alignas(cmsghdr) char control[CMSG_SPACE(sizeof(int) * max_fds_per_message)];
  iovec io{data, n};
  msghdr message{};
  message.msg_iov = &io;
  message.msg_iovlen = 1;
  message.msg_control = control;
  message.msg_controllen = sizeof control;
  const ssize_t got = ::recvmsg(socket, &message, flags | MSG_CMSG_CLOEXEC);
  if (got < 0) return -1;
  if (message.msg_flags & MSG_CTRUNC) truncated = true;
  for (cmsghdr* header = CMSG_FIRSTHDR(&message); header != nullptr;
       header = CMSG_NXTHDR(&message, header)) {
    if (header->cmsg_level != SOL_SOCKET || header->cmsg_type != SCM_RIGHTS) continue;
    const std::size_t count = (header->cmsg_len - CMSG_LEN(0)) / sizeof(int);
    for (std::size_t i = 0; i < count; ++i) {
      int fd = -1;
      std::memcpy(&fd, CMSG_DATA(header) + i * sizeof(int), sizeof fd);
      fds.push_back(above_standard_streams(fd));
    }
  }
  return static_cast<long>(got);
}

int above_standard_streams(int fd) noexcept {
  if (fd < 0 || fd > STDERR_FILENO) return fd;
  const int flags = ::fcntl(fd, F_GETFD);
  const int moved = ::fcntl(fd, flags >= 0 && (flags & FD_CLOEXEC) ? F_DUPFD_CLOEXEC : F_DUPFD,
                            STDERR_FILENO + 1);
  if (moved < 0) return fd;
  ::close(fd);
  return moved;
}

void close_fd(int fd) noexcept {
  ::close(fd);
}

AttachedFiles*& files_being_decoded() noexcept {
  thread_local AttachedFiles* files = nullptr;
  return files;
}

std::vector<int>*& files_to_attach() noexcept {
  thread_local std::vector<int>* files = nullptr;
  return files;
}

std::vector<int> duplicate_files(const AttachedFiles* files) {
  std::vector<int> copies;
  if (files == nullptr) return copies;
  for (std::size_t i = 0; i < files->size(); ++i) {
    const int fd = files->at(i);
    const int copy = fd >= 0 ? ::fcntl(fd, F_DUPFD_CLOEXEC, 0) : -1;
    if (fd >= 0 && copy < 0) {
      const int error = errno;
      close_all(copies);
      throw_errno(
          "cannot duplicate the memory file of a SharedBuffer input to send it to a "
          "worker (out of file descriptors? raise `ulimit -n`, or pass fewer "
          "SharedBuffers per chunk with a smaller Options::chunksize)",
          error);
    }
    copies.push_back(copy);
  }
  return copies;
}

void close_all(std::vector<int>& fds) noexcept {
  for (int fd : fds)
    if (fd >= 0) ::close(fd);
  fds.clear();
}

}  // namespace procpool::detail
