#include "procpool/huge_pages.hpp"

#include <sys/mman.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <fstream>
#include <sstream>
#include <string>
#include <vector>

namespace procpool {
namespace {

// Not in glibc 2.36's <sys/mman.h>; the value is Linux's ABI (since 6.1).
#ifdef MADV_COLLAPSE
constexpr int madv_collapse = MADV_COLLAPSE;
#else
constexpr int madv_collapse = 25;
#endif

constexpr std::uintptr_t huge_page = std::uintptr_t{2} << 20;
constexpr std::size_t small_pages_per_huge = huge_page / 4096;
// A block is moved only when at least 7/8 of it is in use: moving fills the
// rest with zeroes, so resident memory grows by at most 1/8 of what moves.
constexpr std::size_t min_used_pages = small_pages_per_huge * 7 / 8;
// mincore() is asked about this much at a time, to bound its result vector.
constexpr std::uintptr_t residency_window = 64 * huge_page;

struct Range {
  std::uintptr_t begin = 0, end = 0;
  std::size_t size() const { return end - begin; }
};

Range aligned_inward(std::uintptr_t begin, std::uintptr_t end) {
  const std::uintptr_t b = (begin + huge_page - 1) & ~(huge_page - 1);
  const std::uintptr_t e = end & ~(huge_page - 1);
  return e > b ? Range{b, e} : Range{};
}

// One mapping of /proc/self/smaps, with what decides whether workers inherit
// it as private anonymous memory worth moving.
struct Mapping {
  Range range;
  std::string perms, path, vm_flags;
  unsigned long inode = 0;
  std::size_t rss_bytes = 0;
};

bool has_vm_flag(const std::string& flags, const char* flag) {
  std::istringstream words(flags);
  for (std::string word; words >> word;)
    if (word == flag) return true;
  return false;
}

// Private anonymous memory a forked worker inherits, and dense enough that
// moving it can pay off (at least 1/8 resident: not a stack or a sanitizer's
// shadow, which reserve much and use little).
bool worth_moving(const Mapping& m) {
  const bool anonymous =
      m.inode == 0 && (m.path.empty() || m.path == "[heap]" || m.path.starts_with("[anon:"));
  const bool inherited = !has_vm_flag(m.vm_flags, "dc");  // dc: MADV_DONTFORK
  const bool allowed = !has_vm_flag(m.vm_flags, "nh");    // nh: MADV_NOHUGEPAGE
  const std::size_t size = m.range.end - m.range.begin;
  return m.perms == "rw-p" && anonymous && inherited && allowed && m.rss_bytes >= huge_page &&
         m.rss_bytes * 8 >= size;
}

std::vector<Mapping> read_smaps() {
  std::vector<Mapping> out;
  std::ifstream smaps("/proc/self/smaps");
  for (std::string line; std::getline(smaps, line);) {
    std::istringstream fields(line);
    std::string first;
    fields >> first;
    if (first.empty()) continue;
    if (first.back() != ':') {  // a mapping's header: "begin-end perms offset dev inode path"
      Mapping m;
      std::string offset, device;
      fields >> m.perms >> offset >> device >> m.inode;
      std::getline(fields >> std::ws, m.path);
      const auto dash = first.find('-');
      m.range.begin = std::stoull(first.substr(0, dash), nullptr, 16);
      m.range.end = std::stoull(first.substr(dash + 1), nullptr, 16);
      out.push_back(std::move(m));
    } else if (!out.empty() && first == "Rss:") {
      std::size_t kb = 0;
      fields >> kb;
      out.back().rss_bytes = kb * 1024;
    } else if (!out.empty() && first == "VmFlags:") {
      std::getline(fields >> std::ws, out.back().vm_flags);
    }
  }
  return out;
}

// The 2 MiB blocks of `range` with enough pages in use, merged into runs.
std::vector<Range> dense_runs(Range range, HugePageReport& report) {
  std::vector<Range> runs;
  std::vector<unsigned char> resident;
  for (std::uintptr_t window = range.begin; window < range.end; window += residency_window) {
    const std::uintptr_t window_end = std::min(range.end, window + residency_window);
    resident.assign((window_end - window) / 4096, 0);
    if (::mincore(reinterpret_cast<void*>(window), window_end - window, resident.data()) != 0) {
      report.sparse_bytes += window_end - window;  // unmapped under us: leave it
      continue;
    }
    for (std::uintptr_t block = window; block < window_end; block += huge_page) {
      const auto first = resident.begin() + static_cast<long>((block - window) / 4096);
      std::size_t used = 0;
      for (auto page = first; page != first + small_pages_per_huge; ++page)
        used += *page & 1u;
      if (used < min_used_pages) {
        report.sparse_bytes += huge_page;
      } else if (!runs.empty() && runs.back().end == block) {
        runs.back().end += huge_page;
      } else {
        runs.push_back({block, block + huge_page});
      }
    }
  }
  return runs;
}

std::string advice_for(int error) {
  switch (error) {
    case EINVAL:
      return "this kernel cannot move memory to huge pages on request (MADV_COLLAPSE needs "
             "Linux 6.1), or huge pages are off for this process (prctl PR_SET_THP_DISABLE, "
             "transparent_hugepage=never); start the program with "
             "GLIBC_TUNABLES=glibc.malloc.hugetlb=1 instead";
    case ENOMEM:
      return "no free 2 MiB pages (memory is full or fragmented); call it earlier, or start the "
             "program with GLIBC_TUNABLES=glibc.malloc.hugetlb=1";
    default:
      return "the memory stays on 4 KiB pages and works as before";
  }
}

// Moves one run; a transient refusal (EAGAIN: a page was busy) is retried once.
void move_run(Range run, HugePageReport& report) {
  int rc = ::madvise(reinterpret_cast<void*>(run.begin), run.size(), madv_collapse);
  if (rc != 0 && errno == EAGAIN)
    rc = ::madvise(reinterpret_cast<void*>(run.begin), run.size(), madv_collapse);
  if (rc == 0) {
    report.huge_bytes += run.size();
    return;
  }
  const int error = errno;
  report.refused_bytes += run.size();
  if (report.error == 0) {
    report.error = error;
    char where[96];
    std::snprintf(where, sizeof where,
                  "the kernel refused to move %zu KiB at %#jx: ", run.size() / 1024,
                  static_cast<std::uintmax_t>(run.begin));
    report.problem = where + std::string(std::strerror(error)) + "; " + advice_for(error);
  }
}

double seconds_since(std::chrono::steady_clock::time_point start) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
}

}  // namespace

std::string HugePageReport::to_string() const {
  char line[160];
  std::snprintf(line, sizeof line, "huge pages: %zu MiB of %zu MiB now on 2 MiB pages (%.2f s)",
                huge_bytes >> 20, examined_bytes >> 20, seconds);
  std::string out = line;
  if (sparse_bytes != 0) out += "; " + std::to_string(sparse_bytes >> 20) + " MiB too sparse";
  if (!problem.empty()) out += "; " + problem;
  return out;
}

HugePageReport share_with_huge_pages() {
  const auto start = std::chrono::steady_clock::now();
  HugePageReport report;
  for (const Mapping& m : read_smaps()) {
    if (!worth_moving(m)) continue;
    const Range range = aligned_inward(m.range.begin, m.range.end);
    report.examined_bytes += range.size();
    for (const Range& run : dense_runs(range, report))
      move_run(run, report);
  }
  report.seconds = seconds_since(start);
  return report;
}

HugePageReport share_with_huge_pages(const void* data, std::size_t bytes) {
  const auto start = std::chrono::steady_clock::now();
  HugePageReport report;
  const auto begin = reinterpret_cast<std::uintptr_t>(data);
  const Range range = aligned_inward(begin, begin + bytes);
  report.examined_bytes = range.size();
  if (range.size() != 0) move_run(range, report);
  report.seconds = seconds_since(start);
  return report;
}

}  // namespace procpool
