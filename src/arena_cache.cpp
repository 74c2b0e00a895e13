#include "arena_cache.hpp"

#include <pthread.h>
#include <sys/mman.h>
#include <sys/resource.h>
#include <unistd.h>

#include <atomic>
#include <cstdio>
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

/// Made as the library loads, not at first use: its constructor registers
/// fork handlers, and pthread_atfork waits for a fork in progress. A thread
/// making it then while another forked a worker left the worker a guard
/// of this static that never opens: it hung the first time it needed it
/// (four threads making their first map at once: 12 of 100 runs).
[[maybe_unused]] const ArenaCache& arena_cache_made_as_the_library_loads = ArenaCache::instance();

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

namespace {

std::atomic<std::uint64_t> without_arenas{0};

/// The soft RLIMIT_AS in bytes, or 0 when there is none.
std::uint64_t address_space_limit() {
  rlimit limit{};
  if (::getrlimit(RLIMIT_AS, &limit) != 0 || limit.rlim_cur == RLIM_INFINITY) return 0;
  return static_cast<std::uint64_t>(limit.rlim_cur);
}

/// This process's mapped address space (VmSize), which RLIMIT_AS caps.
std::uint64_t address_space_in_use() {
  std::FILE* statm = std::fopen("/proc/self/statm", "re");
  if (!statm) return 0;
  unsigned long long pages = 0;
  const int got = std::fscanf(statm, "%llu", &pages);
  std::fclose(statm);
  return got == 1 ? pages * static_cast<std::uint64_t>(::sysconf(_SC_PAGESIZE)) : 0;
}

/// Whether one more worker's arenas leave at least half the limit to the
/// program: workers are forks of it and need the same room for their work.
bool arenas_fit_address_space() {
  const std::uint64_t limit = address_space_limit();
  if (limit == 0) return true;
  return address_space_in_use() + 2 * ReplyArena::mapped_bytes <= limit / 2;
}

}  // namespace

WorkerArenas map_worker_arenas() {
  WorkerArenas arenas;
  if (arenas_fit_address_space()) {
    arenas.replies = map_arena();
    arenas.inputs = map_arena();
  }
  if (!arenas.replies || !arenas.inputs) {
    arenas = {};
    without_arenas.fetch_add(1, std::memory_order_relaxed);
  }
  return arenas;
}

std::uint64_t workers_without_arenas() noexcept {
  return without_arenas.load(std::memory_order_relaxed);
}

std::string address_space_limit_note() {
  const std::uint64_t limit = address_space_limit();
  constexpr std::uint64_t mib = std::uint64_t{1} << 20;
  const std::string why = limit == 0
                              ? std::string("mapping them failed")
                              : "the address-space limit (ulimit -v, RLIMIT_AS) is " +
                                    std::to_string(limit / mib) + " MiB with " +
                                    std::to_string(address_space_in_use() / mib) + " MiB in use";
  return "workers run without shared memory for large messages (" +
         std::to_string(2 * ReplyArena::mapped_bytes / mib) +
         " MiB of address space each): " + why +
         "; inputs and results of 64 KiB or more go through the socket, slower but whole";
}

}  // namespace procpool::detail
