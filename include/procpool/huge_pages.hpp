// procpool/huge_pages.hpp - make big read-only data cheap to share with forked workers.
#pragma once

#include <cstddef>
#include <string>

namespace procpool {

/// What share_with_huge_pages() did.
struct HugePageReport {
  std::size_t examined_bytes = 0;  // 2 MiB-aligned memory looked at
  std::size_t huge_bytes = 0;      // of which now backed by 2 MiB pages
  std::size_t sparse_bytes = 0;    // left on 4 KiB pages: too few of its pages in use
  std::size_t refused_bytes = 0;   // left on 4 KiB pages: the kernel said no (see problem)
  int error = 0;                   // errno of the kernel's first refusal; 0 if none
  std::string problem;             // that refusal in words, and what to do; empty if none
  double seconds = 0;

  /// One line, e.g. "huge pages: 342 MiB of 342 MiB now on 2 MiB pages (0.90 s)".
  std::string to_string() const;
};

/// Moves this process's big private memory (malloc's heap and its large
/// blocks) onto 2 MiB transparent huge pages, so that workers forked
/// afterwards share it cheaply. Call it once, after building the data the
/// workers will read and before starting them.
///
/// Why: fork copies one page-table entry per 4 KiB page, and a forked worker
/// pays again on its first touch of each page. For a 344 MB hash table that
/// is ~6 ms per fork and made 100k lookups in two workers 4x slower than in
/// the parent; on 2 MiB pages both costs shrink 512-fold (see the README,
/// Performance). The move itself copies the memory once (about 0.9 s for
/// 344 MB on the 2-core CI machine); setting
/// GLIBC_TUNABLES=glibc.malloc.hugetlb=1 in the environment of the program
/// gets the same pages from the start at no cost.
///
/// Only 2 MiB blocks with at least 7/8 of their pages in use are moved, so
/// resident memory grows by at most 1/8 of what was moved. Memory that workers
/// do not inherit (MADV_DONTFORK, shared mappings, files, stacks) is left
/// alone. Needs Linux 6.1 (MADV_COLLAPSE); where the kernel refuses, nothing
/// is lost: the report says why and the memory stays as it was.
///
///     build_big_table(table);
///     std::cerr << procpool::share_with_huge_pages().to_string() << '\n';
///     procpool::map([&table](const Key& k) { return table.at(k); }, keys);
HugePageReport share_with_huge_pages();

/// The same for one range the caller owns, such as a std::vector's data.
/// The 2 MiB-aligned part of [data, data + bytes) is moved whether its pages
/// are in use or not; what lies outside it is left alone.
HugePageReport share_with_huge_pages(const void* data, std::size_t bytes);

}  // namespace procpool
