// Linked into every program of an ASan build (tests and examples), never into
// the library. GCC 12's AddressSanitizer takes no lock around fork(): a child
// forked while another thread of the parent was inside the sanitizer's
// allocator (refilling a size class, draining its quarantine, recording a
// stack) inherits that lock held by a thread it does not have, and waits for
// it for ever in its first operator new. procpool forks workers from
// processes whose other threads allocate all the while (a Pool's service
// thread, an MPI rank's executors, Open MPI's own), so an ASan build of the
// suite hung there now and then (CI, mpi.peers.errors task_exits: a worker
// blocked in SizeClassAllocator64::GetFromAllocator). LLVM 18 fixed it in the
// runtime (llvm-project#75290: lock the allocator around fork); this is that
// fix for the runtime Debian 12 has. glibc's own malloc is locked around
// fork(), so a program built without ASan never needed it.
//
// How: these definitions interpose the allocator's entry points (an
// executable's symbols come before libasan's) and count the threads inside
// it. A fork handler, the first registered and so the last to run before the
// child is made, waits until no thread is inside and keeps new ones out until
// the child exists. Running last, it closes the allocator only after every
// other prepare handler has taken its lock (procpool's caches lock a mutex
// there, and a thread holding one may be allocating). The thread that forks
// is never held up: the handlers it runs after fork() may allocate.

#include <dlfcn.h>
#include <pthread.h>
#include <sched.h>
#include <unistd.h>

#include <atomic>
#include <cstddef>
#include <new>

extern "C" {
void* __interceptor_malloc(std::size_t size);
void* __interceptor_calloc(std::size_t count, std::size_t size);
void* __interceptor_realloc(void* p, std::size_t size);
void* __interceptor_reallocarray(void* p, std::size_t count, std::size_t size);
void* __interceptor_memalign(std::size_t alignment, std::size_t size);
void* __interceptor_aligned_alloc(std::size_t alignment, std::size_t size);
int __interceptor_posix_memalign(void** out, std::size_t alignment, std::size_t size);
void* __interceptor_valloc(std::size_t size);
void* __interceptor_pvalloc(std::size_t size);
void __interceptor_free(void* p);
}

namespace {

std::atomic<int> threads_inside{0};
std::atomic<bool> fork_pending{false};
thread_local bool this_thread_forks = false;  // static TLS of the executable: no allocation

void enter_allocator() {
  for (;;) {
    while (fork_pending.load())
      sched_yield();
    threads_inside.fetch_add(1);
    if (!fork_pending.load()) return;  // seq_cst on both sides: the fork handler sees this count
    threads_inside.fetch_sub(1);
  }
}

/// Holds the allocator open for one call of it, unless this thread is forking.
class Inside {
 public:
  Inside() : counted_(!this_thread_forks) {
    if (counted_) enter_allocator();
  }
  ~Inside() {
    if (counted_) threads_inside.fetch_sub(1);
  }
  Inside(const Inside&) = delete;
  Inside& operator=(const Inside&) = delete;

 private:
  bool counted_;
};

void close_allocator_for_fork() {
  bool expected = false;
  while (!fork_pending.compare_exchange_weak(expected, true)) {  // one fork at a time
    expected = false;
    sched_yield();
  }
  while (threads_inside.load() != 0)
    sched_yield();
  this_thread_forks = true;
}

void open_allocator_after_fork() {
  this_thread_forks = false;
  fork_pending.store(false);
}

/// Registered before any other fork handler of the program (priority 101:
/// before its static initializers), so that its prepare handler runs last.
[[gnu::constructor(101)]] void register_fork_handlers() {
  ::pthread_atfork(close_allocator_for_fork, open_allocator_after_fork, open_allocator_after_fork);
}

/// The sanitizer's own definition of `name` (next after this executable).
template <class Fn>
Fn next_definition(const char* name) {
  return reinterpret_cast<Fn>(dlsym(RTLD_NEXT, name));
}

}  // namespace

extern "C" {

void* malloc(std::size_t size) noexcept {
  Inside inside;
  return __interceptor_malloc(size);
}
void* calloc(std::size_t count, std::size_t size) noexcept {
  Inside inside;
  return __interceptor_calloc(count, size);
}
void* realloc(void* p, std::size_t size) noexcept {
  Inside inside;
  return __interceptor_realloc(p, size);
}
void* reallocarray(void* p, std::size_t count, std::size_t size) noexcept {
  Inside inside;
  return __interceptor_reallocarray(p, count, size);
}
void* memalign(std::size_t alignment, std::size_t size) noexcept {
  Inside inside;
  return __interceptor_memalign(alignment, size);
}
void* aligned_alloc(std::size_t alignment, std::size_t size) noexcept {
  Inside inside;
  return __interceptor_aligned_alloc(alignment, size);
}
int posix_memalign(void** out, std::size_t alignment, std::size_t size) noexcept {
  Inside inside;
  return __interceptor_posix_memalign(out, alignment, size);
}
void* valloc(std::size_t size) noexcept {
  Inside inside;
  return __interceptor_valloc(size);
}
void* pvalloc(std::size_t size) noexcept {
  Inside inside;
  return __interceptor_pvalloc(size);
}
void free(void* p) noexcept {
  Inside inside;
  __interceptor_free(p);
}

}  // extern "C"

// operator new and delete go to the sanitizer's own (found by name), which
// keeps its new/delete mismatch checks.
#define PROCPOOL_GATED(result, mangled, signature, ...)                     \
  {                                                                         \
    static const auto next = next_definition<result(*) signature>(mangled); \
    Inside inside;                                                          \
    return next(__VA_ARGS__);                                               \
  }

void* operator new(std::size_t n) PROCPOOL_GATED(void*, "_Znwm", (std::size_t), n) void*
operator new[](std::size_t n) PROCPOOL_GATED(void*, "_Znam", (std::size_t), n) void*
operator new(std::size_t n, const std::nothrow_t& t) noexcept
    PROCPOOL_GATED(void*, "_ZnwmRKSt9nothrow_t", (std::size_t, const std::nothrow_t&), n, t) void*
    operator new[](std::size_t n, const std::nothrow_t& t) noexcept
    PROCPOOL_GATED(void*, "_ZnamRKSt9nothrow_t", (std::size_t, const std::nothrow_t&), n, t) void*
    operator new(std::size_t n, std::align_val_t a)
        PROCPOOL_GATED(void*, "_ZnwmSt11align_val_t", (std::size_t, std::align_val_t), n, a) void*
        operator new[](std::size_t n, std::align_val_t a)
            PROCPOOL_GATED(void*, "_ZnamSt11align_val_t", (std::size_t, std::align_val_t), n,
                           a) void*
            operator new(std::size_t n, std::align_val_t a, const std::nothrow_t& t) noexcept
    PROCPOOL_GATED(void*, "_ZnwmSt11align_val_tRKSt9nothrow_t",
                   (std::size_t, std::align_val_t, const std::nothrow_t&), n, a, t) void*
    operator new[](std::size_t n, std::align_val_t a, const std::nothrow_t& t) noexcept
    PROCPOOL_GATED(void*, "_ZnamSt11align_val_tRKSt9nothrow_t",
                   (std::size_t, std::align_val_t, const std::nothrow_t&), n, a, t)

        void
        operator delete(void* p) noexcept PROCPOOL_GATED(void, "_ZdlPv", (void*), p) void
        operator delete[](void* p) noexcept PROCPOOL_GATED(void, "_ZdaPv", (void*), p) void
        operator delete(void* p, std::size_t n) noexcept
    PROCPOOL_GATED(void, "_ZdlPvm", (void*, std::size_t), p, n) void
    operator delete[](void* p, std::size_t n) noexcept
    PROCPOOL_GATED(void, "_ZdaPvm", (void*, std::size_t), p, n) void
    operator delete(void* p, const std::nothrow_t& t) noexcept
    PROCPOOL_GATED(void, "_ZdlPvRKSt9nothrow_t", (void*, const std::nothrow_t&), p, t) void
    operator delete[](void* p, const std::nothrow_t& t) noexcept
    PROCPOOL_GATED(void, "_ZdaPvRKSt9nothrow_t", (void*, const std::nothrow_t&), p, t) void
    operator delete(void* p, std::align_val_t a) noexcept
    PROCPOOL_GATED(void, "_ZdlPvSt11align_val_t", (void*, std::align_val_t), p, a) void
    operator delete[](void* p, std::align_val_t a) noexcept
    PROCPOOL_GATED(void, "_ZdaPvSt11align_val_t", (void*, std::align_val_t), p, a) void
    operator delete(void* p, std::size_t n, std::align_val_t a) noexcept
    PROCPOOL_GATED(void, "_ZdlPvmSt11align_val_t", (void*, std::size_t, std::align_val_t), p, n,
                   a) void
    operator delete[](void* p, std::size_t n, std::align_val_t a) noexcept
    PROCPOOL_GATED(void, "_ZdaPvmSt11align_val_t", (void*, std::size_t, std::align_val_t), p, n,
                   a) void
    operator delete(void* p, std::align_val_t a, const std::nothrow_t& t) noexcept
    PROCPOOL_GATED(void, "_ZdlPvSt11align_val_tRKSt9nothrow_t",
                   (void*, std::align_val_t, const std::nothrow_t&), p, a, t) void
    operator delete[](void* p, std::align_val_t a, const std::nothrow_t& t) noexcept
    PROCPOOL_GATED(void, "_ZdaPvSt11align_val_tRKSt9nothrow_t",
                   (void*, std::align_val_t, const std::nothrow_t&), p, a, t)
