#include "procpool/detail/buffer.hpp"

#include <fcntl.h>
#include <pthread.h>
#include <sys/mman.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <bit>
#include <cstdint>
#include <mutex>
#include <new>
#include <system_error>
#include <thread>
#include <vector>

namespace procpool::detail {
namespace {

constexpr std::size_t page_bytes = std::size_t{4} << 10;
constexpr std::size_t huge_page_bytes = std::size_t{2} << 20;
#if defined(__SANITIZE_ADDRESS__)
constexpr std::size_t cache_limit_bytes = 0;  // ASan must see every use after free
#elif defined(__has_feature)
#if __has_feature(address_sanitizer)
constexpr std::size_t cache_limit_bytes = 0;  // ASan must see every use after free
#else
constexpr std::size_t cache_limit_bytes = std::size_t{64} << 20;
#endif
#else
constexpr std::size_t cache_limit_bytes = std::size_t{64} << 20;
#endif
constexpr std::size_t cache_limit_blocks = 64;
/// Beyond cache_limit_bytes, large blocks are kept as lazily freed memory
/// (MADV_FREE): the kernel takes their pages back only when it needs memory,
/// and until then the next large message reuses them without the page faults
/// and zeroing of fresh memory. A root that receives 16 MiB results spent a
/// third of its time zeroing fresh receive buffers (perf); at most this much:
constexpr std::size_t lazy_limit_bytes = cache_limit_bytes == 0 ? 0 : std::size_t{256} << 20;
constexpr std::size_t lazy_limit_blocks = 16;

std::size_t round_up(std::size_t n, std::size_t unit) {
  return (n + unit - 1) / unit * unit;
}

/// Blocks are not inherited by forked workers (MADV_DONTFORK): a worker never
/// touches the parent's buffers, and without it every fork would turn the
/// parent's warm buffers copy-on-write, so that its next write to each page
/// faults and copies it. It also leaves less for fork to copy.
///
/// No transparent huge pages are asked for: on a VM whose host takes back
/// the guest's free memory (free page reporting reports free blocks of 2 MiB
/// and more), a new huge page is often one the host must back again, and
/// touching 1 GiB of them took 2.6 s where 4 KiB pages took 0.5-0.7 s. 64 x
/// 16 MiB results over MPI went from 0.33-0.99 GB/s (median 0.55) with them
/// to 0.79-0.91 (median 0.88) without (6 alternating runs, README); a
/// block reused from the cache is mapped already either way.
std::byte* map_block(std::size_t capacity) {
  void* p = ::mmap(nullptr, capacity, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  if (p == MAP_FAILED) throw std::bad_alloc();
  ::madvise(p, capacity, MADV_DONTFORK);
  return static_cast<std::byte*>(p);
}

void unmap_block(Block block) noexcept {
  ::munmap(block.data, block.capacity);
}

/// Freed blocks kept warm for reuse, most recently freed last.
class BlockCache {
 public:
  static BlockCache& instance() {
    static auto* cache = new BlockCache();  // never destroyed: buffers may outlive statics
    return *cache;
  }

  /// A cached block of at least `n` bytes (and not wastefully more), if any:
  /// a warm one first, else a lazily freed one.
  Block take(std::size_t n) {
    std::lock_guard lock(mutex_);
    if (Block b = take_from(blocks_, cached_bytes_, n, 2 * n); b.data) return b;
    // Any lazily freed block that fits: pages it has beyond `n` stay untouched.
    return take_from(lazy_, lazy_bytes_, n, SIZE_MAX);
  }

  /// Keeps `block` if there is room; otherwise hands it back to the system.
  void give(Block block) noexcept {
    {
      std::lock_guard lock(mutex_);
      if (cached_bytes_ + block.capacity <= cache_limit_bytes &&
          blocks_.size() < cache_limit_blocks) {
        blocks_.push_back(block);  // reserved: never allocates
        cached_bytes_ += block.capacity;
        return;
      }
      if (block.capacity >= huge_page_bytes && lazy_bytes_ + block.capacity <= lazy_limit_bytes &&
          lazy_.size() < lazy_limit_blocks &&
          ::madvise(block.data, block.capacity, MADV_FREE) == 0) {
        lazy_.push_back(block);  // reserved: never allocates
        lazy_bytes_ += block.capacity;
        return;
      }
    }
    unmap_block(block);
  }

 private:
  /// The most recently freed of `blocks` of at least `n` and at most `most` bytes.
  static Block take_from(std::vector<Block>& blocks, std::size_t& bytes, std::size_t n,
                         std::size_t most) {
    for (auto it = blocks.rbegin(); it != blocks.rend(); ++it) {
      if (it->capacity >= n && it->capacity <= most) {
        const Block block = *it;
        blocks.erase(std::next(it).base());
        bytes -= block.capacity;
        return block;
      }
    }
    return {};
  }

  BlockCache() {
    blocks_.reserve(cache_limit_blocks);
    lazy_.reserve(lazy_limit_blocks);
    // A fork while another thread holds the lock would leave it locked forever in the child.
    ::pthread_atfork([] { instance().mutex_.lock(); }, [] { instance().mutex_.unlock(); },
                     [] { instance().forget_after_fork(); });
  }
  /// In a new child: the cached blocks were not inherited (MADV_DONTFORK).
  void forget_after_fork() {
    blocks_.clear();
    cached_bytes_ = 0;
    lazy_.clear();
    lazy_bytes_ = 0;
    mutex_.unlock();
  }
  std::mutex mutex_;
  std::vector<Block> blocks_;
  std::size_t cached_bytes_ = 0;
  std::vector<Block> lazy_;  // given back with MADV_FREE
  std::size_t lazy_bytes_ = 0;
};

/// Made as the library loads, not at first use: its constructor registers
/// fork handlers, and pthread_atfork waits for a fork in progress. A thread
/// making it then while another forked a worker left the worker a guard
/// of this static that never opens: it hung the first time it needed it
/// (four threads making their first map at once: 12 of 100 runs).
[[maybe_unused]] const BlockCache& block_cache_made_as_the_library_loads = BlockCache::instance();

}  // namespace

Block allocate_block(std::size_t at_least) {
  if (at_least < page_bytes) return {new std::byte[at_least], at_least};
  // Powers of two below 2 MiB: few distinct sizes, so that a freed block fits
  // the next request and the cache does not collect blocks nobody reuses.
  const std::size_t capacity =
      at_least < huge_page_bytes ? std::bit_ceil(at_least) : round_up(at_least, huge_page_bytes);
  if (Block cached = BlockCache::instance().take(capacity); cached.data) return cached;
  return {map_block(capacity), capacity};
}

Block allocate_shared_block(std::size_t at_least) {
  const auto [spare, spare_size] = take_spare_memory_file(at_least);
  const std::size_t capacity = spare >= 0 ? spare_size : round_up(at_least, page_bytes);
  const int fd = spare >= 0 ? spare : create_memory_file(capacity);
  try {
    std::byte* data = map_memory_file(fd, capacity, true);
    ::madvise(data, capacity, MADV_DONTFORK);  // as map_block: a new worker has no use for it
    return {data, capacity, fd};
  } catch (...) {
    ::close(fd);
    throw;
  }
}

void free_block(Block block) noexcept {
  if (block.fd >= 0) {
    unmap_memory_file(block.data, block.capacity);
    ::close(block.fd);
    return;
  }
  if (block.data == nullptr) return;
  if (block.capacity < page_bytes) {
    delete[] block.data;
  } else {
    BlockCache::instance().give(block);
  }
}

namespace {

/// The whole pages inside a range.
struct PageRange {
  std::uintptr_t begin = 0, end = 0;
  bool empty() const noexcept { return end <= begin; }
  std::size_t size() const noexcept { return end - begin; }
};

/// The whole pages inside [p, p + n); none below 64 KiB, where faults are
/// cheap enough.
PageRange pages_worth_prefaulting(void* p, std::size_t n) noexcept {
  constexpr std::size_t worth_it = std::size_t{64} << 10;
  if (n < worth_it) return {};
  const auto at = reinterpret_cast<std::uintptr_t>(p);
  return {(at + page_bytes - 1) & ~(page_bytes - 1), (at + n) & ~(page_bytes - 1)};
}

void populate_for_writing(PageRange pages) noexcept {
#ifdef MADV_POPULATE_WRITE
  if (!pages.empty())
    ::madvise(reinterpret_cast<void*>(pages.begin), pages.size(), MADV_POPULATE_WRITE);
#else
  (void)pages;
#endif
}

/// Whether a page of [begin, end) is mapped by another process too: present
/// but not exclusively mapped, in /proc/self/pagemap (bits 63 and 56).
bool shares_a_page(std::uintptr_t begin, std::uintptr_t end) noexcept {
  return any_pagemap_entry(begin, end,
                           [](std::uint64_t entry) {
                             constexpr std::uint64_t present = std::uint64_t{1} << 63,
                                                     exclusive = std::uint64_t{1} << 56;
                             return (entry & present) != 0 && (entry & exclusive) == 0;
                           })
      .value_or(false);
}

}  // namespace

void prefault_heap_for_writing(void* p, std::size_t n) noexcept {
  const PageRange pages = pages_worth_prefaulting(p, n);
  if (pages.empty()) return;
  if (shares_a_page(pages.begin, pages.end)) {
    ::madvise(reinterpret_cast<void*>(pages.begin), pages.size(), MADV_DONTNEED);
  }
  populate_for_writing(pages);
}

void prefault_for_writing(void* p, std::size_t n) noexcept {
  populate_for_writing(pages_worth_prefaulting(p, n));
}

struct PrefaultAhead::Helper {
  std::byte* at = nullptr;
  std::size_t n = 0;
  bool heap = false;
  std::atomic<std::size_t> mapped{0};
  std::atomic<std::size_t> wanted{0};  // the filler's progress; SIZE_MAX: stop
  std::thread thread;

  /// Waits until mapping up to `end` keeps within `lead` of the filler: the
  /// bytes it fills often come from pages given back as it goes (a result
  /// decoded from a memory file), so mapping far ahead would hold both.
  bool may_map_up_to(std::size_t end) noexcept {
    for (std::size_t now = wanted.load(std::memory_order_acquire);;
         now = wanted.load(std::memory_order_acquire)) {
      if (now == stopped) return false;
      if (end <= now + lead) return true;
      wanted.wait(now, std::memory_order_acquire);
    }
  }

  void run() noexcept {
    for (std::size_t done = 0; done < n;) {
      const std::size_t step = std::min(piece, n - done);
      if (!may_map_up_to(done + step)) break;
      if (heap) {
        prefault_heap_for_writing(at + done, step);
      } else {
        prefault_for_writing(at + done, step);
      }
      done += step;
      mapped.store(done, std::memory_order_release);
      mapped.notify_all();
    }
    mapped.store(n, std::memory_order_release);  // done, or stopped: nobody waits any more
    mapped.notify_all();
  }

  static constexpr std::size_t stopped = SIZE_MAX;
};

PrefaultAhead::PrefaultAhead(std::byte* at, std::size_t n, bool heap) {
  if (n < worth_a_thread) return;
  auto helper = std::make_unique<Helper>();
  helper->at = at;
  helper->n = n;
  helper->heap = heap;
  try {
    helper->thread = std::thread([h = helper.get()] { h->run(); });
  } catch (const std::system_error&) {
    return;  // no thread to be had: the copy takes the page faults
  }
  helper_ = std::move(helper);
}

PrefaultAhead::~PrefaultAhead() {
  if (!helper_) return;
  helper_->wanted.store(Helper::stopped, std::memory_order_release);
  helper_->wanted.notify_all();
  helper_->thread.join();
}

void PrefaultAhead::wait_until_mapped(std::size_t bytes) noexcept {
  if (!helper_) return;
  if (bytes > helper_->wanted.load(std::memory_order_relaxed)) {
    helper_->wanted.store(bytes, std::memory_order_release);
    helper_->wanted.notify_all();
  }
  for (std::size_t now = helper_->mapped.load(std::memory_order_acquire); now < bytes;
       now = helper_->mapped.load(std::memory_order_acquire)) {
    helper_->mapped.wait(now, std::memory_order_acquire);
  }
}

void copy_to_fresh(std::byte* to, const void* from, std::size_t n, FreshCopy where) {
  PrefaultAhead ahead(to, n, false);
  const auto* source = static_cast<const std::byte*>(from);
  const bool to_memory_file = where != FreshCopy::heap;
  for (std::size_t done = 0; done < n;) {
    const std::size_t step = std::min(PrefaultAhead::piece, n - done);
    ahead.wait_until_mapped(done + step);
    // Below PrefaultAhead::worth_a_thread nothing maps ahead: one call for
    // the piece costs less than a fault per page.
    if (to_memory_file && n < PrefaultAhead::worth_a_thread) prefault_for_writing(to + done, step);
    std::memcpy(to + done, source + done, step);
    if (where == FreshCopy::memory_file_unmapped) unmap_memory_file_pages(to + done, step);
    done += step;
  }
}

}  // namespace procpool::detail
