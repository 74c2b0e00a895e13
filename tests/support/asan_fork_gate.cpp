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
//
// What it leaves (LLVM 18's handler locks these too): a thread that starts
// or ends while another forks takes the sanitizer's thread registry lock,
// and one that ends returns its allocator cache, outside any entry point
// (pthread_create is not gated: ASan's waits for the new thread, whose start
// may allocate, which would wait for the fork); and a prepare handler
// registered before this one (by a shared library's constructor: procpool
// builds static) runs after the gate is closed, so one that locks a mutex a
// thread holds while allocating would wait for ever. glibc's own fork locks
// (stdio's list, NSS) are taken after every handler; none is held while
// allocating in procpool's code.

#include <dlfcn.h>
#include <pthread.h>
#include <sched.h>
#include <unistd.h>

#include <array>
#include <atomic>
#include <cstddef>
#include <cstdio>
#include <cstdlib>
#include <new>

extern "C" {
void* __interceptor_malloc(std::size_t size);
void* __interceptor_calloc(std::size_t count, std::size_t size);
void* __interceptor_realloc(void* p, std::size_t size);
void* __interceptor_reallocarray(void* p, std::size_t count, std::size_t size);
void* __interceptor_memalign(std::size_t alignment, std::size_t size);
void* __interceptor___libc_memalign(std::size_t alignment, std::size_t size);
void* __interceptor_aligned_alloc(std::size_t alignment, std::size_t size);
int __interceptor_posix_memalign(void** out, std::size_t alignment, std::size_t size);
void* __interceptor_valloc(std::size_t size);
void* __interceptor_pvalloc(std::size_t size);
void __interceptor_free(void* p);
void __interceptor_cfree(void* p);
// These allocate with the sanitizer's allocator directly, not through malloc.
char* __interceptor_strdup(const char* s);
char* __interceptor___strdup(const char* s);
char* __interceptor_strndup(const char* s, std::size_t n);
char* __interceptor_realpath(const char* path, char* resolved);
}

namespace {

std::atomic<int> threads_inside{0};
std::atomic<bool> fork_pending{false};
// Static TLS of the executable: reading them allocates nothing.
thread_local bool this_thread_forks = false;
thread_local int depth = 0;  // entry points this thread is inside (one calls another)

void enter_allocator() {
  for (;;) {
    while (fork_pending.load())
      sched_yield();
    threads_inside.fetch_add(1);
    if (!fork_pending.load()) return;  // seq_cst on both sides: the fork handler sees this count
    threads_inside.fetch_sub(1);
  }
}

/// Holds the allocator open for one call of an entry point: the outermost
/// one of this thread (a nested one, as dlsym's calloc in operator new,
/// never waits), unless this thread is forking.
class Inside {
 public:
  Inside() : counted_(depth == 0 && !this_thread_forks) {
    ++depth;
    if (counted_) enter_allocator();
  }
  ~Inside() {
    if (counted_) threads_inside.fetch_sub(1);
    --depth;
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

void open_allocator_in_parent() {
  this_thread_forks = false;
  fork_pending.store(false);
}

void open_allocator_in_child() {
  // A thread of the parent may have counted itself just as the child was
  // made (it then backs off, in the parent only): the child has none.
  threads_inside.store(0);
  open_allocator_in_parent();
}

/// The sanitizer's operators new and delete, found by name (they keep its
/// new/delete mismatch checks): resolved before main() below, or by the first
/// call that comes earlier (two threads resolving one at once is harmless;
/// a function-local static would leave its guard held in a child forked
/// meanwhile).
enum Op : std::size_t {
  new_1,
  new_array_1,
  new_nothrow,
  new_array_nothrow,
  new_aligned,
  new_array_aligned,
  new_aligned_nothrow,
  new_array_aligned_nothrow,
  delete_1,
  delete_array_1,
  delete_sized,
  delete_array_sized,
  delete_nothrow,
  delete_array_nothrow,
  delete_aligned,
  delete_array_aligned,
  delete_sized_aligned,
  delete_array_sized_aligned,
  delete_aligned_nothrow,
  delete_array_aligned_nothrow,
  op_count
};
constexpr std::array<const char*, op_count> op_names{"_Znwm",
                                                     "_Znam",
                                                     "_ZnwmRKSt9nothrow_t",
                                                     "_ZnamRKSt9nothrow_t",
                                                     "_ZnwmSt11align_val_t",
                                                     "_ZnamSt11align_val_t",
                                                     "_ZnwmSt11align_val_tRKSt9nothrow_t",
                                                     "_ZnamSt11align_val_tRKSt9nothrow_t",
                                                     "_ZdlPv",
                                                     "_ZdaPv",
                                                     "_ZdlPvm",
                                                     "_ZdaPvm",
                                                     "_ZdlPvRKSt9nothrow_t",
                                                     "_ZdaPvRKSt9nothrow_t",
                                                     "_ZdlPvSt11align_val_t",
                                                     "_ZdaPvSt11align_val_t",
                                                     "_ZdlPvmSt11align_val_t",
                                                     "_ZdaPvmSt11align_val_t",
                                                     "_ZdlPvSt11align_val_tRKSt9nothrow_t",
                                                     "_ZdaPvSt11align_val_tRKSt9nothrow_t"};
std::array<std::atomic<void*>, op_count> ops{};

void* resolve(Op op) {
  void* fn = dlsym(RTLD_NEXT, op_names[op]);
  if (fn == nullptr) {
    std::fprintf(stderr, "asan_fork_gate: no %s after this program (is it an ASan build?)\n",
                 op_names[op]);
    std::abort();
  }
  ops[op].store(fn);
  return fn;
}

template <class Fn>
Fn sanitizers(Op op) {
  void* fn = ops[op].load();
  return reinterpret_cast<Fn>(fn != nullptr ? fn : resolve(op));
}

/// Registered before any other fork handler of the program (priority 101:
/// before its static initializers), so that its prepare handler runs last.
[[gnu::constructor(101)]] void install() {
  for (std::size_t op = 0; op < op_count; ++op)
    if (ops[op].load() == nullptr) resolve(static_cast<Op>(op));
  ::pthread_atfork(close_allocator_for_fork, open_allocator_in_parent, open_allocator_in_child);
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
void* __libc_memalign(std::size_t alignment, std::size_t size) noexcept {
  Inside inside;
  return __interceptor___libc_memalign(alignment, size);
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
void cfree(void* p) noexcept {
  Inside inside;
  __interceptor_cfree(p);
}
char* strdup(const char* s) noexcept {
  Inside inside;
  return __interceptor_strdup(s);
}
char* __strdup(const char* s) noexcept {
  Inside inside;
  return __interceptor___strdup(s);
}
char* strndup(const char* s, std::size_t n) noexcept {
  Inside inside;
  return __interceptor_strndup(s, n);
}
char* realpath(const char* path, char* resolved) noexcept {
  Inside inside;
  return __interceptor_realpath(path, resolved);
}
}  // extern "C"

void* operator new(std::size_t n) {
  Inside inside;
  return sanitizers<void* (*)(std::size_t)>(new_1)(n);
}
void* operator new[](std::size_t n) {
  Inside inside;
  return sanitizers<void* (*)(std::size_t)>(new_array_1)(n);
}
void* operator new(std::size_t n, const std::nothrow_t& t) noexcept {
  Inside inside;
  return sanitizers<void* (*)(std::size_t, const std::nothrow_t&)>(new_nothrow)(n, t);
}
void* operator new[](std::size_t n, const std::nothrow_t& t) noexcept {
  Inside inside;
  return sanitizers<void* (*)(std::size_t, const std::nothrow_t&)>(new_array_nothrow)(n, t);
}
void* operator new(std::size_t n, std::align_val_t a) {
  Inside inside;
  return sanitizers<void* (*)(std::size_t, std::align_val_t)>(new_aligned)(n, a);
}
void* operator new[](std::size_t n, std::align_val_t a) {
  Inside inside;
  return sanitizers<void* (*)(std::size_t, std::align_val_t)>(new_array_aligned)(n, a);
}
void* operator new(std::size_t n, std::align_val_t a, const std::nothrow_t& t) noexcept {
  Inside inside;
  using Fn = void* (*)(std::size_t, std::align_val_t, const std::nothrow_t&);
  return sanitizers<Fn>(new_aligned_nothrow)(n, a, t);
}
void* operator new[](std::size_t n, std::align_val_t a, const std::nothrow_t& t) noexcept {
  Inside inside;
  using Fn = void* (*)(std::size_t, std::align_val_t, const std::nothrow_t&);
  return sanitizers<Fn>(new_array_aligned_nothrow)(n, a, t);
}
void operator delete(void* p) noexcept {
  Inside inside;
  sanitizers<void (*)(void*)>(delete_1)(p);
}
void operator delete[](void* p) noexcept {
  Inside inside;
  sanitizers<void (*)(void*)>(delete_array_1)(p);
}
void operator delete(void* p, std::size_t n) noexcept {
  Inside inside;
  sanitizers<void (*)(void*, std::size_t)>(delete_sized)(p, n);
}
void operator delete[](void* p, std::size_t n) noexcept {
  Inside inside;
  sanitizers<void (*)(void*, std::size_t)>(delete_array_sized)(p, n);
}
void operator delete(void* p, const std::nothrow_t& t) noexcept {
  Inside inside;
  sanitizers<void (*)(void*, const std::nothrow_t&)>(delete_nothrow)(p, t);
}
void operator delete[](void* p, const std::nothrow_t& t) noexcept {
  Inside inside;
  sanitizers<void (*)(void*, const std::nothrow_t&)>(delete_array_nothrow)(p, t);
}
void operator delete(void* p, std::align_val_t a) noexcept {
  Inside inside;
  sanitizers<void (*)(void*, std::align_val_t)>(delete_aligned)(p, a);
}
void operator delete[](void* p, std::align_val_t a) noexcept {
  Inside inside;
  sanitizers<void (*)(void*, std::align_val_t)>(delete_array_aligned)(p, a);
}
void operator delete(void* p, std::size_t n, std::align_val_t a) noexcept {
  Inside inside;
  sanitizers<void (*)(void*, std::size_t, std::align_val_t)>(delete_sized_aligned)(p, n, a);
}
void operator delete[](void* p, std::size_t n, std::align_val_t a) noexcept {
  Inside inside;
  sanitizers<void (*)(void*, std::size_t, std::align_val_t)>(delete_array_sized_aligned)(p, n, a);
}
void operator delete(void* p, std::align_val_t a, const std::nothrow_t& t) noexcept {
  Inside inside;
  using Fn = void (*)(void*, std::align_val_t, const std::nothrow_t&);
  sanitizers<Fn>(delete_aligned_nothrow)(p, a, t);
}
void operator delete[](void* p, std::align_val_t a, const std::nothrow_t& t) noexcept {
  Inside inside;
  using Fn = void (*)(void*, std::align_val_t, const std::nothrow_t&);
  sanitizers<Fn>(delete_array_aligned_nothrow)(p, a, t);
}
