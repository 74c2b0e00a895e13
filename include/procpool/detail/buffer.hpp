// Growable byte buffer, writer and bounds-checked reader: the bytes every
// message between the parent and a worker is made of.
#pragma once

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <memory>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

#include "procpool/detail/memory_file.hpp"
#include "procpool/errors.hpp"

namespace procpool::detail {

/// A block of memory for a Buffer.
struct Block {
  std::byte* data = nullptr;
  std::size_t capacity = 0;
  /// The memory file the block maps (see allocate_shared_block), or -1.
  int fd = -1;
};

/// Blocks of 4 KiB and more are recycled through a process-wide cache (up to
/// 64 MiB): a first touch of a fresh page costs ~2 us per 4 KiB on many VMs,
/// which for small tasks costs more than the work, so a buffer freed by one
/// chunk or call is handed warm to the next. Large blocks come straight from
/// mmap, in 4 KiB pages (see map_block for why not huge ones). Blocks of 4 KiB
/// and more are not inherited by forked children (see map_block). `at_least`
/// may be rounded up.
Block allocate_block(std::size_t at_least);
/// A block in a memory file of its own (memory_file.hpp), mapped shared, so
/// that its bytes can be handed to another process as a descriptor instead of
/// being copied. Never cached: once handed over, its pages are the reader's.
Block allocate_shared_block(std::size_t at_least);
void free_block(Block block) noexcept;

/// Maps the pages of fresh memory about to be written, in one system call
/// (MADV_POPULATE_WRITE, Linux >= 5.14) instead of one page fault per 4 KiB:
/// a large result vector otherwise spends more time faulting than copying.
/// Only whole pages inside [p, p + n) are touched; a hint, errors are ignored.
void prefault_for_writing(void* p, std::size_t n) noexcept;

/// The same for memory from the caller's heap that is about to be overwritten
/// whole (a result vector's reserved capacity): if a forked worker still maps
/// any of its pages, the parent's writes would copy each one first, so such
/// pages are first replaced by fresh ones (MADV_DONTNEED). Whether a page is
/// shared comes from /proc/self/pagemap, so unshared memory keeps its pages.
void prefault_heap_for_writing(void* p, std::size_t n) noexcept;

/// Maps the pages of [at, at + n) (fresh memory about to be filled in order,
/// front to back) on a helper thread, at most `lead` bytes ahead of the thread
/// that fills them, which waits (wait_until_mapped) only if it catches up: mapping
/// a page costs about as much as filling it, so the two halve the time of a
/// large copy. Below `worth_a_thread` it maps nothing (the page faults are
/// cheaper than a thread). `heap`: the memory is the caller's heap (see
/// prefault_heap_for_writing).
class PrefaultAhead {
 public:
  static constexpr std::size_t worth_a_thread = std::size_t{64} << 20;
  static constexpr std::size_t piece = std::size_t{8} << 20;
  /// How far the helper maps ahead of what the filler asked for: enough to
  /// keep it busy, little enough that memory freed behind the copy (a decoded
  /// memory file) is not held twice.
  static constexpr std::size_t lead = 4 * piece;

  PrefaultAhead(std::byte* at, std::size_t n, bool heap);
  ~PrefaultAhead();
  PrefaultAhead(const PrefaultAhead&) = delete;
  PrefaultAhead& operator=(const PrefaultAhead&) = delete;

  /// Waits until the first `bytes` are mapped (or the helper gave up).
  void wait_until_mapped(std::size_t bytes) noexcept;

 private:
  struct Helper;
  std::unique_ptr<Helper> helper_;
};

/// Where copy_to_fresh writes: the heap, or a shared memory-file mapping
/// whose bytes are for another process (each piece mapped in one call before
/// it is written), its pages left mapped here or unmapped once written (the
/// file keeps them).
enum class FreshCopy { heap, memory_file_kept_mapped, memory_file_unmapped };

/// Copies `n` bytes to fresh memory at `to`, its pages mapped ahead of the
/// copy (PrefaultAhead) when it is large.
void copy_to_fresh(std::byte* to, const void* from, std::size_t n,
                   FreshCopy where = FreshCopy::heap);

/// What a Buffer that shares its bytes when large (share_when_large) does with
/// the pages of its memory file once written: the caller's inputs are
/// unmapped, so that the caller never counts an input twice in its RSS (the
/// worker frees them as it decodes); a worker's replies stay mapped until
/// sent, where unmapping them only hid them from its RSS and cost 4-11 % of
/// the throughput of large results (`procpool_bench payload_out`).
enum class WrittenPages { unmapped, kept_mapped };

/// Like std::vector<std::byte>, but growing leaves new bytes uninitialised:
/// results of hundreds of MiB must not be zero-filled before they are written.
class Buffer {
 public:
  Buffer() = default;
  explicit Buffer(std::size_t size) { resize(size); }
  Buffer(Buffer&& other) noexcept { swap(other); }
  Buffer& operator=(Buffer&& other) noexcept {
    Buffer moved(std::move(other));
    swap(moved);
    return *this;
  }
  Buffer(const Buffer&) = delete;
  Buffer& operator=(const Buffer&) = delete;
  ~Buffer() {
    if (owned_) free_block({data_, capacity_, fd_});
  }

  /// A buffer that writes into `capacity` bytes it does not own (a shared
  /// reply region) until it must grow past them: then it moves to memory of
  /// its own, and borrowed() turns false.
  static Buffer over(std::byte* data, std::size_t capacity) noexcept {
    Buffer b;
    b.data_ = data;
    b.capacity_ = capacity;
    b.owned_ = false;
    return b;
  }
  bool borrowed() const noexcept { return !owned_; }

  /// From now on, growing to memory_file_threshold or more puts the bytes in
  /// a memory file (allocate_shared_block) that shared_fd() names, so that a
  /// large message can be handed to another process instead of copied.
  void share_when_large(WrittenPages written = WrittenPages::unmapped) noexcept {
    share_when_large_ = true;
    written_ = written;
  }
  /// How copy_to_fresh writes into this buffer's memory file.
  FreshCopy memory_file_copy() const noexcept {
    return written_ == WrittenPages::unmapped ? FreshCopy::memory_file_unmapped
                                              : FreshCopy::memory_file_kept_mapped;
  }
  /// The memory file holding the bytes, or -1.
  int shared_fd() const noexcept { return owned_ ? fd_ : -1; }

  std::byte* data() noexcept { return data_; }
  const std::byte* data() const noexcept { return data_; }
  std::size_t size() const noexcept { return size_; }
  std::size_t capacity() const noexcept { return capacity_; }
  bool empty() const noexcept { return size_ == 0; }
  void clear() noexcept { size_ = 0; }

  void reserve(std::size_t capacity) {
    if (capacity <= capacity_) return;
    const Block grown = share_when_large_ && capacity >= memory_file_threshold
                            ? allocate_shared_block(capacity)
                            : allocate_block(capacity);
    if (size_ != 0) std::memcpy(grown.data, data_, size_);
    if (owned_) free_block({data_, capacity_, fd_});
    data_ = grown.data;
    capacity_ = grown.capacity;
    fd_ = grown.fd;
    owned_ = true;
  }
  void resize(std::size_t size) {
    if (size > capacity_) reserve(std::max(size, capacity_ + capacity_ / 2));
    size_ = size;
  }
  /// Makes room for `n` more bytes and maps their pages now, in one system
  /// call, rather than taking a fault per page as they are written. Borrowed
  /// memory is left to its owner, who knows what is mapped.
  void prepare_for(std::size_t n) {
    if (size_ + n > capacity_) reserve(size_ + n);
    if (owned_) prefault_for_writing(data_ + size_, n);
  }
  /// Appends `n` uninitialised bytes and returns where they start.
  std::byte* grow(std::size_t n) {
    std::size_t old = size_;
    resize(size_ + n);
    return data_ + old;
  }
  void append(const void* bytes, std::size_t n) {
    if (n != 0) std::memcpy(grow(n), bytes, n);
  }
  /// Drops the first `n` bytes.
  void consume(std::size_t n) {
    if (n >= size_) {
      size_ = 0;
      return;
    }
    std::memmove(data_, data_ + n, size_ - n);
    size_ -= n;
  }
  void swap(Buffer& other) noexcept {
    std::swap(data_, other.data_);
    std::swap(size_, other.size_);
    std::swap(capacity_, other.capacity_);
    std::swap(owned_, other.owned_);
    std::swap(fd_, other.fd_);
    std::swap(share_when_large_, other.share_when_large_);
    std::swap(written_, other.written_);
  }

 private:
  std::byte* data_ = nullptr;
  std::size_t size_ = 0;
  std::size_t capacity_ = 0;
  bool owned_ = true;
  int fd_ = -1;
  bool share_when_large_ = false;
  WrittenPages written_ = WrittenPages::unmapped;
};

/// A block that a Writer left where it was rather than copy it (see
/// Writer::lend_blocks): its bytes belong in the message at `at`, an offset
/// into the Writer's buffer.
struct LentBlock {
  std::size_t at = 0;
  const std::byte* data = nullptr;
  std::size_t size = 0;
};

/// Appends values to a Buffer.
class Writer {
 public:
  explicit Writer(Buffer& buffer) : buffer_(buffer) {}
  /// From now on, blocks of `at_least` bytes given to write_lasting_block()
  /// are not copied but listed in `to`; size() still counts them. For a
  /// message sent in parts (the root's chunks over MPI) whose large inputs
  /// live until it is sent.
  void lend_blocks(std::vector<LentBlock>& to, std::size_t at_least) noexcept {
    lent_ = &to;
    lend_at_least_ = at_least;
  }
  /// write_block() for bytes that outlive the message (an input in the
  /// caller's range): lent rather than copied when the Writer lends blocks.
  void write_lasting_block(const void* bytes, std::size_t n) {
    if (lent_ == nullptr || n < lend_at_least_) {
      write_block(bytes, n);
      return;
    }
    lent_->push_back(LentBlock{buffer_.size(), static_cast<const std::byte*>(bytes), n});
    lent_bytes_ += n;
  }
  void write(const void* bytes, std::size_t n) { buffer_.append(bytes, n); }
  /// write() for a block that may be large: its pages are mapped ahead of the
  /// copy rather than faulted in one by one.
  void write_block(const void* bytes, std::size_t n) {
    if (n >= PrefaultAhead::piece && n < PrefaultAhead::worth_a_thread) {
      // Into a memory file (its bytes are for the process it is handed
      // to), piece by piece: see copy_to_fresh.
      buffer_.reserve(buffer_.size() + n);
      if (buffer_.shared_fd() >= 0) {
        copy_to_fresh(buffer_.grow(n), bytes, n, buffer_.memory_file_copy());
        return;
      }
    }
    if (n < PrefaultAhead::worth_a_thread) {
      buffer_.prepare_for(n);
      buffer_.append(bytes, n);
      return;
    }
    std::byte* at = buffer_.grow(n);
    if (buffer_.borrowed()) {
      std::memcpy(at, bytes, n);  // its owner maps it
    } else {
      // A memory file's bytes are for the process it is handed to.
      copy_to_fresh(at, bytes, n,
                    buffer_.shared_fd() >= 0 ? buffer_.memory_file_copy() : FreshCopy::heap);
    }
  }
  /// See Buffer::prepare_for.
  void prepare_for(std::size_t n) { buffer_.prepare_for(n); }
  template <class T>
  requires std::is_trivially_copyable_v<T>
  void put(const T& value) { write(&value, sizeof value); }
  /// What was written, lent blocks included.
  std::size_t size() const noexcept { return buffer_.size() + lent_bytes_; }
  /// Forgets everything written after `size` (used to replace a half-written
  /// result by an error); `size` is one that size() returned.
  void truncate(std::size_t size) {
    while (lent_ != nullptr && !lent_->empty() && lent_->back().at + lent_bytes_ > size) {
      lent_bytes_ -= lent_->back().size;
      lent_->pop_back();
    }
    buffer_.resize(size - lent_bytes_);
  }
  /// Writes over bytes already written at `at` (a size() of before), as a
  /// length put ahead of what it measures.
  void overwrite(std::size_t at, const void* bytes, std::size_t n) noexcept {
    std::size_t lent_before = 0;
    if (lent_ != nullptr) {
      for (const LentBlock& block : *lent_) {
        if (block.at + lent_before >= at) break;
        lent_before += block.size;
      }
    }
    std::memcpy(buffer_.data() + (at - lent_before), bytes, n);
  }
  Buffer& buffer() noexcept { return buffer_; }

 private:
  Buffer& buffer_;
  std::vector<LentBlock>* lent_ = nullptr;
  std::size_t lend_at_least_ = 0;
  std::size_t lent_bytes_ = 0;  // of the blocks in *lent_
};

/// Reads values from a byte range; reading past its end throws ProtocolError
/// instead of reading garbage, so a truncated or corrupt message cannot crash the reader.
class Reader {
 public:
  Reader(const std::byte* data, std::size_t size) : pos_(data), left_(size) {}
  explicit Reader(const Buffer& buffer) : Reader(buffer.data(), buffer.size()) {}
  /// A copy reads the same bytes, but without the when_all_consumed hook:
  /// only the reader it was set on may hand the memory on.
  Reader(const Reader& other) noexcept
      : pos_(other.pos_), left_(other.left_), give_back_(other.give_back_) {}
  Reader& operator=(const Reader& other) noexcept {
    pos_ = other.pos_;
    left_ = other.left_;
    give_back_ = other.give_back_;
    all_consumed_ = nullptr;
    return *this;
  }
  /// A moved reader takes the hook with it.
  Reader(Reader&& other) noexcept
      : pos_(other.pos_),
        left_(other.left_),
        give_back_(other.give_back_),
        all_consumed_(std::exchange(other.all_consumed_, nullptr)),
        arg_(other.arg_),
        end_(other.end_) {}
  Reader& operator=(Reader&& other) noexcept {
    pos_ = other.pos_;
    left_ = other.left_;
    give_back_ = other.give_back_;
    all_consumed_ = std::exchange(other.all_consumed_, nullptr);
    arg_ = other.arg_;
    end_ = other.end_;
    return *this;
  }

  /// Returns a pointer to the next `n` bytes and skips them.
  const std::byte* take(std::size_t n) {
    if (n > left_) throw_truncated(n);
    const std::byte* at = pos_;
    pos_ += n;
    left_ -= n;
    return at;
  }
  void read(void* out, std::size_t n) {
    if (n != 0) std::memcpy(out, take(n), n);
  }
  /// read() for a block that may be large: copied in pieces, each given back
  /// once copied (see allow_giving_back), so that it is never held twice.
  void read_block(void* out, std::size_t n) {
    const std::byte* from = take(n);
    constexpr std::size_t piece = std::size_t{8} << 20;
    for (std::size_t done = 0; done < n; done += piece) {
      const std::size_t step = std::min(piece, n - done);
      std::memcpy(static_cast<std::byte*>(out) + done, from + done, step);
      consumed(from + done, step);
    }
  }
  /// The next `n` bytes as a Reader of their own, which gives back what it
  /// reads if this one does; skipped here.
  Reader take_reader(std::size_t n) {
    Reader part(take(n), n);
    part.give_back_ = give_back_;
    return part;
  }
  template <class T>
  T get() requires std::is_trivially_copyable_v<T> {
    T value;
    read(&value, sizeof value);
    return value;
  }
  std::size_t remaining() const noexcept { return left_; }
  const std::byte* position() const noexcept { return pos_; }

  /// The bytes read are in a shared memory-file mapping of their own that
  /// nobody reads twice: what has been decoded may be given back (see
  /// consumed()), so a result of N bytes costs N, not 2N, while decoding.
  void allow_giving_back() noexcept { give_back_ = true; }
  bool gives_back() const noexcept { return give_back_; }
  /// Says that the `n` bytes at `at`, already taken, will not be read again.
  void consumed(const std::byte* at, std::size_t n) noexcept {
    if (give_back_) discard_memory_file_pages(const_cast<std::byte*>(at), n);
    // Bytes are consumed front to back: a range that ends at the end is the last.
    if (all_consumed_ != nullptr && at + n == end_) std::exchange(all_consumed_, nullptr)(arg_);
  }
  /// Calls `done(arg)` once, when the bytes up to this reader's end are
  /// consumed (see consumed()): its memory may then be handed on whole, as a
  /// worker gives an input's memory file back to the parent.
  void when_all_consumed(void (*done)(void*), void* arg) noexcept {
    all_consumed_ = done;
    arg_ = arg;
    end_ = pos_ + left_;
  }

 private:
  [[noreturn]] void throw_truncated(std::size_t wanted) const {
    throw ProtocolError("procpool: truncated message: needed " + std::to_string(wanted) +
                        " more bytes but only " + std::to_string(left_) + " remain");
  }
  const std::byte* pos_;
  std::size_t left_;
  bool give_back_ = false;
  void (*all_consumed_)(void*) = nullptr;
  void* arg_ = nullptr;
  const std::byte* end_ = nullptr;
};

}  // namespace procpool::detail
