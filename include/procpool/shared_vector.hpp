// procpool/shared_vector.hpp - a typed array that changes hands without a copy.
//
// SharedVector<T> is a SharedBuffer seen as `size()` values of a trivially
// copyable T: a task fills it and returns it, and the caller maps the very
// pages the task wrote (no byte copied, however large); a caller's one goes
// to a Pool's workers the same way. Its size is fixed when it is made (the
// memory file cannot grow), like a std::vector that is never resized.
//
//     auto rows = procpool::map(
//         [](int row) {
//           procpool::SharedVector<float> out(1 << 28);   // 1 GiB, zero-filled
//           fill_row(out.span(), row);
//           return out;
//         },
//         row_ids);
//     float first = rows[0][0];
//
// Everything SharedBuffer promises holds: once arrived it is the caller's
// alone (the worker may write again, die or be recycled), the caller may
// write to it (copy on write, page by page), and where no descriptor can
// travel (Start::in_process, across MPI ranks) its bytes are copied.
#pragma once

#include <algorithm>
#include <concepts>
#include <cstddef>
#include <cstring>
#include <initializer_list>
#include <limits>
#include <span>
#include <stdexcept>
#include <string>
#include <type_traits>
#include <utility>

#include <cereal/cereal.hpp>

#include "procpool/errors.hpp"
#include "procpool/serialize.hpp"
#include "procpool/shared_buffer.hpp"

namespace procpool {

template <class T>
class SharedVector {
  static_assert(detail::is_raw_v<T> && !std::is_const_v<T> && !std::is_volatile_v<T>,
                "procpool::SharedVector<T>: T must be a trivially copyable, non-const type and "
                "not a pointer (its bytes are handed between processes as they are, and an "
                "address means nothing in another process); for other types return a "
                "std::vector<T>");
  static_assert(alignof(T) <= 4096,
                "procpool::SharedVector<T>: its values start on a page boundary (4096 bytes); "
                "a T aligned beyond that would be misaligned");

 public:
  using value_type = T;
  using size_type = std::size_t;
  using difference_type = std::ptrdiff_t;
  using reference = T&;
  using const_reference = const T&;
  using pointer = T*;
  using const_pointer = const T*;
  using iterator = T*;
  using const_iterator = const T*;

  SharedVector() noexcept = default;
  /// `count` values, every byte zero (for arithmetic types: zeros). Pages
  /// appear as they are written. Throws std::length_error if `count` values
  /// do not fit in memory's address range, std::system_error if the memory
  /// file cannot be made.
  explicit SharedVector(std::size_t count) : bytes_(bytes_for(count)) {}
  SharedVector(std::size_t count, const T& value) : SharedVector(count) {
    std::fill(begin(), end(), value);
  }
  SharedVector(std::initializer_list<T> values)
      : SharedVector(std::span(values.begin(), values.size())) {}
  /// A copy of `values`.
  explicit SharedVector(std::span<const T> values) : SharedVector(values.size()) {
    if (!values.empty())
      std::memcpy(static_cast<void*>(data()), values.data(), values.size_bytes());
  }
  /// Takes over `bytes` as values of T. Throws std::invalid_argument if its
  /// size is not a multiple of sizeof(T) (and leaves `bytes` as it was).
  explicit SharedVector(SharedBuffer&& bytes) {
    if (bytes.size() % sizeof(T) != 0) {
      throw std::invalid_argument("procpool::SharedVector: a buffer of " +
                                  std::to_string(bytes.size()) +
                                  " bytes does not hold a whole number of values of " +
                                  std::to_string(sizeof(T)) + " bytes");
    }
    bytes_ = std::move(bytes);
  }

  /// A copy of the values in a vector of its own.
  [[nodiscard]] SharedVector clone() const {
    SharedVector copy;
    copy.bytes_ = bytes_.clone();
    return copy;
  }

  std::size_t size() const noexcept { return bytes_.size() / sizeof(T); }
  bool empty() const noexcept { return size() == 0; }
  std::size_t size_bytes() const noexcept { return bytes_.size(); }

  T* data() noexcept { return reinterpret_cast<T*>(bytes_.data()); }
  const T* data() const noexcept { return reinterpret_cast<const T*>(bytes_.data()); }
  T& operator[](std::size_t i) noexcept { return data()[i]; }
  const T& operator[](std::size_t i) const noexcept { return data()[i]; }
  /// operator[] that throws std::out_of_range past the end.
  T& at(std::size_t i) { return data()[checked(i)]; }
  const T& at(std::size_t i) const { return data()[checked(i)]; }
  T& front() noexcept { return data()[0]; }
  const T& front() const noexcept { return data()[0]; }
  T& back() noexcept { return data()[size() - 1]; }
  const T& back() const noexcept { return data()[size() - 1]; }

  iterator begin() noexcept { return data(); }
  iterator end() noexcept { return data() + size(); }
  const_iterator begin() const noexcept { return data(); }
  const_iterator end() const noexcept { return data() + size(); }
  const_iterator cbegin() const noexcept { return begin(); }
  const_iterator cend() const noexcept { return end(); }

  /// (A SharedVector is a contiguous range: std::span<T> takes it as it is.)
  std::span<T> span() noexcept { return {data(), size()}; }
  std::span<const T> span() const noexcept { return {data(), size()}; }

  /// The bytes underneath (e.g. to hand them to code that takes a SharedBuffer).
  const SharedBuffer& buffer() const noexcept { return bytes_; }
  /// Gives the bytes up as a SharedBuffer; this vector is empty after.
  SharedBuffer release() noexcept { return std::move(bytes_); }

  void swap(SharedVector& other) noexcept { bytes_.swap(other.bytes_); }

  friend bool operator==(const SharedVector& a,
                         const SharedVector& b) requires std::equality_comparable<T> {
    return std::ranges::equal(a.span(), b.span());
  }

  /// cereal (inside your own types): as the buffer's bytes.
  template <class Archive>
  void save(Archive& archive) const {
    bytes_.save(archive);
  }
  template <class Archive>
  void load(Archive& archive) {
    SharedBuffer bytes;
    bytes.load(archive);
    *this = SharedVector(std::move(bytes));
  }

 private:
  static std::size_t bytes_for(std::size_t count) {
    if (count > std::numeric_limits<std::size_t>::max() / sizeof(T)) {
      throw std::length_error("procpool::SharedVector: " + std::to_string(count) + " values of " +
                              std::to_string(sizeof(T)) + " bytes do not fit in memory");
    }
    return count * sizeof(T);
  }
  std::size_t checked(std::size_t i) const {
    if (i >= size()) {
      throw std::out_of_range("procpool::SharedVector::at(" + std::to_string(i) +
                              "): the vector holds " + std::to_string(size()) + " values");
    }
    return i;
  }

  SharedBuffer bytes_;
};

namespace detail {

template <class E>
void save_shared_vector(Writer& out, const SharedVector<E>& values) {
  save_shared_buffer(out, values.buffer());
}

template <class E>
void load_shared_vector(Reader& in, SharedVector<E>& values) {
  SharedBuffer bytes;
  load_shared_buffer(in, bytes);
  if (bytes.size() % sizeof(E) != 0) {
    throw ProtocolError("procpool: corrupt message: a SharedVector of " +
                        std::to_string(bytes.size()) + " bytes for values of " +
                        std::to_string(sizeof(E)) + " bytes");
  }
  values = SharedVector<E>(std::move(bytes));
}

}  // namespace detail
}  // namespace procpool
