#include "procpool/shared_buffer.hpp"

#include <fcntl.h>
#include <sys/resource.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <string>
#include <utility>

#include "procpool/detail/memory_file.hpp"
#include "procpool/errors.hpp"
#include "procpool/serialize.hpp"

namespace procpool {
namespace {

/// Descriptors kept by buffers that arrived from another process, so that
/// each can be sent on as its memory file, not copied.
std::atomic<long long> files_kept_by_arrivals{0};

/// How many of those a process keeps: a quarter of the descriptors it may
/// open, and 512 at most. A map that returns thousands of buffers must not
/// run it out of them, nor push its descriptor numbers past select()'s 1024
/// where the limit is high; beyond this, a buffer that arrives lets its file
/// go (its mapping keeps the pages) and is copied if it is sent on.
long long arrival_file_budget() noexcept {
  constexpr long long most = 512;
  rlimit limit{};
  if (::getrlimit(RLIMIT_NOFILE, &limit) != 0 || limit.rlim_cur == RLIM_INFINITY) return most;
  return std::min(most, static_cast<long long>(limit.rlim_cur / 4));
}

}  // namespace

SharedBuffer::SharedBuffer(std::size_t size) : size_(size) {
  if (size == 0) return;
  fd_ = detail::create_memory_file(size);
  try {
    data_ = detail::map_memory_file(fd_, size, true);
  } catch (...) {
    ::close(fd_);
    throw;
  }
}

SharedBuffer::~SharedBuffer() {
  detail::unmap_memory_file(data_, size_);
  // Its last close frees the pages: not on the caller's time.
  detail::close_memory_file_aside(fd_, size_);
  if (counts_file_) files_kept_by_arrivals.fetch_sub(1, std::memory_order_relaxed);
}

SharedBuffer SharedBuffer::clone() const {
  SharedBuffer copy(size_);
  if (size_ != 0) std::memcpy(copy.data_, data_, size_);
  return copy;
}

/// The encoding's first byte: how the bytes travel.
enum class SharedBufferForm : std::uint8_t { bytes = 0, file = 1 };

struct SharedBufferAccess {
  /// Seals the buffer's file and adds a descriptor of it to the message's
  /// files; its index there, or -1 if it must be copied instead.
  static long long attach(const SharedBuffer& buffer, std::vector<int>& files) {
    if (buffer.fd_ < 0 || buffer.frozen_failed_) return -1;
    // Once handed over, this mapping is private: a page written here since
    // is no longer the file's, and then the bytes must travel instead. An
    // input sent to call after call, never written, goes as its file each time.
    if (buffer.handed_over_ && detail::written_since_frozen(buffer.data_, buffer.size_)) return -1;
    const int fd = ::fcntl(buffer.fd_, F_DUPFD_CLOEXEC, 0);
    if (fd < 0) return -1;
    if (!buffer.handed_over_) {
      buffer.handed_over_ = true;
      if (!detail::freeze_memory_file(buffer.fd_, buffer.data_, buffer.size_)) {
        buffer.frozen_failed_ = true;
        ::close(fd);
        return -1;
      }
    }
    files.push_back(fd);
    return static_cast<long long>(files.size() - 1);
  }

  static void save(detail::Writer& out, const SharedBuffer& buffer) {
    std::vector<int>* files = detail::files_to_attach();
    const long long index = files ? attach(buffer, *files) : -1;
    if (index >= 0) {
      out.put(SharedBufferForm::file);
      out.put(static_cast<std::uint64_t>(index));
      out.put(static_cast<std::uint64_t>(buffer.size_));
      return;
    }
    out.put(SharedBufferForm::bytes);
    out.put(static_cast<std::uint64_t>(buffer.size_));
    // The buffer's own memory, so it may be lent (to another MPI rank).
    out.write_lasting_block(buffer.data_, buffer.size_);
  }

  static SharedBuffer load(detail::Reader& in) {
    const auto form = in.get<SharedBufferForm>();
    if (form == SharedBufferForm::bytes) {
      const std::size_t size = detail::load_count(in, 1);
      SharedBuffer buffer(size);
      in.read(buffer.data_, size);
      keep_file(buffer, std::exchange(buffer.fd_, -1));
      return buffer;
    }
    if (form != SharedBufferForm::file) {
      throw ProtocolError("procpool: corrupt message: unknown SharedBuffer form " +
                          std::to_string(static_cast<unsigned>(form)));
    }
    const auto index = in.get<std::uint64_t>();
    const auto size = in.get<std::uint64_t>();
    detail::AttachedFiles* files = detail::files_being_decoded();
    const int fd = files ? files->at(index) : -1;
    if (fd < 0) {
      throw ProtocolError("procpool: corrupt message: a SharedBuffer refers to memory file #" +
                          std::to_string(index) + ", which did not come with the reply");
    }
    SharedBuffer buffer = adopt(fd, size);
    // Sealed already, and mapped privately: sent on, it goes as this file
    // as long as no page of it was written here (see attach).
    buffer.handed_over_ = true;
    keep_file(buffer, files->take(index));
    return buffer;
  }

  /// A buffer that arrived keeps its memory file `fd`, so that it can be
  /// sent on without a copy, within arrival_file_budget(); else the file is
  /// closed (the mapping keeps its pages).
  static void keep_file(SharedBuffer& buffer, int fd) noexcept {
    if (fd < 0) return;
    if (files_kept_by_arrivals.fetch_add(1, std::memory_order_relaxed) < arrival_file_budget()) {
      buffer.fd_ = fd;
      buffer.counts_file_ = true;
      return;
    }
    files_kept_by_arrivals.fetch_sub(1, std::memory_order_relaxed);
    ::close(fd);
  }

  /// Maps memory file `fd` as a buffer of `size` bytes, if nobody can change
  /// it any more. Throws (leaving `fd` open) if not.
  static SharedBuffer adopt(int fd, std::uint64_t size) {
    const long long sealed = detail::sealed_memory_file_size(fd);
    if (sealed < 0 || static_cast<std::uint64_t>(sealed) < size) {
      throw ProtocolError(
          "procpool: a SharedBuffer arrived in a memory file that is not sealed or is smaller "
          "than announced (" +
          std::to_string(size) + " bytes); refused, since it could change under you");
    }
    SharedBuffer buffer;
    buffer.data_ = detail::map_sealed_memory_file(fd, static_cast<std::size_t>(size));
    buffer.size_ = static_cast<std::size_t>(size);
    return buffer;
  }
};

namespace detail {

void save_shared_buffer(Writer& out, const SharedBuffer& buffer) {
  SharedBufferAccess::save(out, buffer);
}

void load_shared_buffer(Reader& in, SharedBuffer& buffer) {
  SharedBuffer loaded = SharedBufferAccess::load(in);
  buffer.swap(loaded);
}

}  // namespace detail
}  // namespace procpool
