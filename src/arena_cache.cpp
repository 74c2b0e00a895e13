#include "arena_cache.hpp"

#include <pthread.h>
#include <sys/mman.h>

#include <mutex>
#include <new>
#include <vector>

namespace procpool::detail {
namespace {

/// Arenas of workers that are gone (reaped), kept mapped for the next
/// workers: their pages stay allocated and mapped in this process, so the
/// next Pool or call does not pay a page fault per 4 KiB to fill them again.
class ArenaCache {
 public:
  static ArenaCache& instance() {
    static auto* cache = new ArenaCache();  // never destroyed: arenas may outlive statics
    return *cache;
  }

  ReplyArena* take() {
    std::lock_guard lock(mutex_);
    if (arenas_.empty()) return nullptr;
    ReplyArena* arena = arenas_.back();
    arenas_.pop_back();
    return arena;
  }

  /// Called once no process can write to `arena` any more (its worker was reaped).
  void give(ReplyArena* arena) noexcept {
    // Keep the first MiB of each region warm; give the rest of a large reply's pages back.
    for (std::size_t region = 0; region < ReplyArena::regions; ++region) {
      if (arena->written[region].load(std::memory_order_relaxed) <= kept_per_region) continue;
      ::madvise(arena->data(region) + kept_per_region, ReplyArena::capacity - kept_per_region,
                MADV_REMOVE);
    }
    new (arena) ReplyArena();  // every region free again
    {
      std::lock_guard lock(mutex_);
      if (arenas_.size() < max_arenas) {
        arenas_.push_back(arena);
        return;
      }
    }
    ::munmap(arena, ReplyArena::mapped_bytes);
  }

 private:
  static constexpr std::size_t max_arenas = 8;
  static constexpr std::size_t kept_per_region = std::size_t{1} << 20;

  ArenaCache() {
    arenas_.reserve(max_arenas);
    // A new child must not hand out arenas it shares with this process.
    ::pthread_atfork([] { instance().mutex_.lock(); }, [] { instance().mutex_.unlock(); },
                     [] { instance().forget_after_fork(); });
  }
  void forget_after_fork() {
    for (ReplyArena* arena : arenas_)
      ::munmap(arena, ReplyArena::mapped_bytes);
    arenas_.clear();
    mutex_.unlock();
  }

  std::mutex mutex_;
  std::vector<ReplyArena*> arenas_;
};

}  // namespace

std::shared_ptr<ReplyArena> map_arena() {
  ReplyArena* arena = ArenaCache::instance().take();
  if (!arena) {
    void* pages = ::mmap(nullptr, ReplyArena::mapped_bytes, PROT_READ | PROT_WRITE,
                         MAP_SHARED | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    if (pages == MAP_FAILED) return nullptr;
    arena = new (pages) ReplyArena();
  }
  return std::shared_ptr<ReplyArena>(arena, [](ReplyArena* a) { ArenaCache::instance().give(a); });
}

}  // namespace procpool::detail
