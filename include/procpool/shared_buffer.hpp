// procpool/shared_buffer.hpp - a result that changes hands without a copy.
//
// A SharedBuffer is a block of bytes in a memory file of its own. A task
// that returns one hands the file to the caller (over the worker's socket):
// the caller maps the very pages the task wrote, so no byte is copied however
// large it is. Once it has arrived it is the caller's alone: the file is
// sealed before it leaves the worker, so nothing the worker does afterwards
// (write to its own copy, die, be recycled) can change it.
//
//     auto blocks = procpool::map(
//         [](int seed) {
//           procpool::SharedBuffer block(std::size_t{1} << 30);
//           fill(block.data(), block.size(), seed);
//           return block;
//         },
//         seeds);
//
// A buffer that arrived can be sent on (to a Pool's workers) as the same
// file, still without a copy. Where no descriptor can travel
// (Start::in_process, across MPI ranks, or a buffer written to again after
// it was handed over), its bytes are copied instead: slower, same result. It
// also serialises as plain bytes with cereal, inside your own types.
// Move-only: copy it with clone(). procpool::SharedVector<T> is the typed one.
#pragma once

#include <cstddef>
#include <cstring>
#include <span>
#include <type_traits>
#include <utility>

#include <cereal/cereal.hpp>

namespace procpool {

class SharedBuffer {
 public:
  SharedBuffer() noexcept = default;
  /// `size` bytes of shared memory, zero-filled (pages appear as they are
  /// written). Throws std::system_error if the memory file cannot be made.
  explicit SharedBuffer(std::size_t size);
  SharedBuffer(SharedBuffer&& other) noexcept { swap(other); }
  SharedBuffer& operator=(SharedBuffer&& other) noexcept {
    SharedBuffer moved(std::move(other));
    swap(moved);
    return *this;
  }
  SharedBuffer(const SharedBuffer&) = delete;
  SharedBuffer& operator=(const SharedBuffer&) = delete;
  ~SharedBuffer();

  /// A copy of the bytes in a buffer of its own.
  [[nodiscard]] SharedBuffer clone() const;

  std::byte* data() noexcept { return data_; }
  const std::byte* data() const noexcept { return data_; }
  std::size_t size() const noexcept { return size_; }
  bool empty() const noexcept { return size_ == 0; }
  std::span<std::byte> bytes() noexcept { return {data_, size_}; }
  std::span<const std::byte> bytes() const noexcept { return {data_, size_}; }

  /// The bytes as values of a trivially copyable T (size() / sizeof(T) of them).
  template <class T>
  requires std::is_trivially_copyable_v<T> std::span<T> as()
  noexcept { return {reinterpret_cast<T*>(data_), size_ / sizeof(T)}; }
  template <class T>
  requires std::is_trivially_copyable_v<T> std::span<const T> as()
  const noexcept { return {reinterpret_cast<const T*>(data_), size_ / sizeof(T)}; }

  void swap(SharedBuffer& other) noexcept {
    std::swap(data_, other.data_);
    std::swap(size_, other.size_);
    std::swap(fd_, other.fd_);
    std::swap(handed_over_, other.handed_over_);
    std::swap(frozen_failed_, other.frozen_failed_);
    std::swap(counts_file_, other.counts_file_);
  }

  /// cereal: as plain bytes (inside your own types, and where no descriptor travels).
  template <class Archive>
  void save(Archive& archive) const {
    archive(cereal::make_size_tag(static_cast<cereal::size_type>(size_)));
    archive(cereal::binary_data(data_, size_));
  }
  template <class Archive>
  void load(Archive& archive) {
    cereal::size_type size = 0;
    archive(cereal::make_size_tag(size));
    SharedBuffer fresh(static_cast<std::size_t>(size));
    archive(cereal::binary_data(fresh.data_, fresh.size_));
    swap(fresh);
  }

 private:
  friend struct SharedBufferAccess;

  std::byte* data_ = nullptr;
  std::size_t size_ = 0;
  /// The memory file, while this buffer may still hand it over: -1 for one
  /// that arrived beyond the descriptor budget (SharedBufferAccess::keep_file),
  /// whose mapping alone keeps its pages.
  int fd_ = -1;
  /// Sent once already: its file is sealed and this mapping private, so a
  /// page this process wrote since is not in the file; sent again as the
  /// file only while no page was (detail::written_since_frozen).
  mutable bool handed_over_ = false;
  /// Its file could not be sealed: always copied.
  mutable bool frozen_failed_ = false;
  /// `fd_` counts against the descriptors that buffers which arrived may
  /// keep (see SharedBufferAccess::keep_file).
  bool counts_file_ = false;
};

}  // namespace procpool
