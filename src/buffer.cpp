#include "procpool/detail/buffer.hpp"

#include <sys/mman.h>

#include <new>

namespace procpool::detail {
namespace {

constexpr std::size_t mmap_threshold = std::size_t{2} << 20;

}  // namespace

std::byte* allocate_bytes(std::size_t n) {
  if (n < mmap_threshold) return new std::byte[n];
  void* p = ::mmap(nullptr, n, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  if (p == MAP_FAILED) throw std::bad_alloc();
  ::madvise(p, n, MADV_HUGEPAGE);  // a hint: harmless where THP is off
  return static_cast<std::byte*>(p);
}

void free_bytes(std::byte* p, std::size_t n) noexcept {
  if (p == nullptr) return;
  if (n < mmap_threshold) {
    delete[] p;
  } else {
    ::munmap(p, n);
  }
}

}  // namespace procpool::detail
