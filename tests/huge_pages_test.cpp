// share_with_huge_pages: which memory moves to 2 MiB pages, what stays, and
// that workers forked afterwards still read it and cannot change it.
#include <sys/mman.h>

#include <algorithm>
#include <cerrno>
#include <cstdint>
#include <fstream>
#include <numeric>
#include <sstream>
#include <string>
#include <vector>

#include <gtest/gtest.h>

#include "procpool/procpool.hpp"

namespace {

constexpr std::size_t MiB = std::size_t{1} << 20;

struct MappingSizes {
  std::size_t rss_kb = 0, huge_kb = 0;
};

// Rss and AnonHugePages of the mapping that contains `address`, from smaps.
MappingSizes sizes_of_mapping_at(const void* address) {
  const auto where = reinterpret_cast<std::uintptr_t>(address);
  std::ifstream smaps("/proc/self/smaps");
  bool inside = false;
  MappingSizes sizes;
  for (std::string line; std::getline(smaps, line);) {
    std::istringstream fields(line);
    std::string first;
    fields >> first;
    if (first.empty()) continue;
    if (first.back() != ':') {
      if (inside) break;
      const auto dash = first.find('-');
      inside = std::stoull(first.substr(0, dash), nullptr, 16) <= where &&
               where < std::stoull(first.substr(dash + 1), nullptr, 16);
    } else if (inside && first == "Rss:") {
      fields >> sizes.rss_kb;
    } else if (inside && first == "AnonHugePages:") {
      fields >> sizes.huge_kb;
    }
  }
  return sizes;
}

// Anonymous read-write memory with an inaccessible page on each side, so that
// the kernel cannot merge it with a neighbour and smaps describes it alone.
class GuardedMemory {
 public:
  explicit GuardedMemory(std::size_t bytes) : bytes_(bytes) {
    base_ = ::mmap(nullptr, bytes + 2 * guard, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (base_ == MAP_FAILED) throw std::runtime_error("mmap failed");
    ::mprotect(data(), bytes, PROT_READ | PROT_WRITE);
  }
  ~GuardedMemory() { ::munmap(base_, bytes_ + 2 * guard); }
  GuardedMemory(const GuardedMemory&) = delete;
  GuardedMemory& operator=(const GuardedMemory&) = delete;

  char* data() const { return static_cast<char*>(base_) + guard; }

 private:
  static constexpr std::size_t guard = 4096;
  void* base_ = nullptr;
  std::size_t bytes_;
};

bool kernel_cannot_move(const procpool::HugePageReport& report) {
  return report.error == EINVAL;
}

TEST(HugePages, ARangeMovesAndForkedWorkersReadItButCannotChangeIt) {
  GuardedMemory memory(8 * MiB);
  auto* values = reinterpret_cast<std::uint64_t*>(memory.data());
  const std::size_t count = 8 * MiB / sizeof(std::uint64_t);
  std::iota(values, values + count, std::uint64_t{7});

  const auto report = procpool::share_with_huge_pages(values, 8 * MiB);
  if (kernel_cannot_move(report)) GTEST_SKIP() << report.to_string();
  ASSERT_EQ(report.error, 0) << report.to_string();
  EXPECT_GE(report.examined_bytes, 6 * MiB);  // the 2 MiB-aligned part of an 8 MiB range
  EXPECT_EQ(report.huge_bytes, report.examined_bytes);
  EXPECT_GE(sizes_of_mapping_at(values).huge_kb * 1024, report.huge_bytes);

  // Each worker overwrites the value it reads; the caller's copy must not change.
  std::vector<std::size_t> indices;
  for (std::size_t i = 0; i < count; i += 4099)
    indices.push_back(i);
  const auto seen = procpool::map(
      [values](std::size_t i) {
        const std::uint64_t before = values[i];
        values[i] = 0;
        return before;
      },
      indices, {.processes = 2});
  for (std::size_t k = 0; k < indices.size(); ++k) {
    EXPECT_EQ(seen[k], indices[k] + 7) << "index " << indices[k];
    EXPECT_EQ(values[indices[k]], indices[k] + 7) << "index " << indices[k];
  }
}

TEST(HugePages, TheWholeProcessCallMovesABigHeapBlock) {
  std::vector<std::uint64_t> table(32 * MiB / sizeof(std::uint64_t));
  std::iota(table.begin(), table.end(), std::uint64_t{1});
  const auto report = procpool::share_with_huge_pages();
  if (kernel_cannot_move(report)) GTEST_SKIP() << report.to_string();
  EXPECT_GE(report.huge_bytes, 28 * MiB) << report.to_string();
  EXPECT_GE(sizes_of_mapping_at(table.data()).huge_kb * 1024, 28 * MiB) << report.to_string();

  const auto sums = procpool::map(
      [&table](std::size_t part) {
        const std::size_t step = table.size() / 4;
        return std::accumulate(table.begin() + static_cast<long>(part * step),
                               table.begin() + static_cast<long>((part + 1) * step),
                               std::uint64_t{0});
      },
      std::vector<std::size_t>{0, 1, 2, 3}, {.processes = 2});
  EXPECT_EQ(sums[0] + sums[1] + sums[2] + sums[3],
            std::accumulate(table.begin(), table.end(), std::uint64_t{0}));
}

TEST(HugePages, SparselyUsedMemoryStaysOnSmallPagesAndDoesNotGrow) {
  GuardedMemory memory(16 * MiB);
  // 300 of the 512 pages of every 2 MiB block: over 1/8 of the mapping (so it
  // is examined) but under the 7/8 a block needs to be moved.
  for (std::size_t block = 0; block < 16 * MiB; block += 2 * MiB)
    for (std::size_t page = 0; page < 300; ++page)
      memory.data()[block + page * 4096] = 1;
  const auto before = sizes_of_mapping_at(memory.data());

  const auto report = procpool::share_with_huge_pages();
  EXPECT_GE(report.sparse_bytes, 14 * MiB) << report.to_string();
  const auto after = sizes_of_mapping_at(memory.data());
  EXPECT_EQ(after.huge_kb, 0u);
  EXPECT_EQ(after.rss_kb, before.rss_kb);
}

TEST(HugePages, MemoryWorkersDoNotInheritIsLeftAlone) {
  GuardedMemory memory(8 * MiB);
  ASSERT_EQ(::madvise(memory.data(), 8 * MiB, MADV_DONTFORK), 0);
  std::fill(memory.data(), memory.data() + 8 * MiB, 'x');

  procpool::share_with_huge_pages();
  EXPECT_EQ(sizes_of_mapping_at(memory.data()).huge_kb, 0u);
}

TEST(HugePages, AnEmptyRangeExaminesNothing) {
  const auto report = procpool::share_with_huge_pages(nullptr, 0);
  EXPECT_EQ(report.examined_bytes, 0u);
  EXPECT_EQ(report.huge_bytes, 0u);
  EXPECT_TRUE(report.problem.empty());
  EXPECT_NE(report.to_string().find("0 MiB of 0 MiB"), std::string::npos);
}

}  // namespace
