// Buffer memory: blocks cached warm, prefaulting that keeps data, and pages
// that forked children neither inherit nor get copied for.
#include <gtest/gtest.h>
#include <procpool/procpool.hpp>

#include <sys/mman.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cerrno>
#include <cstddef>
#include <cstring>
#include <vector>

namespace {

using procpool::detail::Buffer;

TEST(BufferBlocks, AFreedBlockIsHandedOutAgainWarm) {
#if defined(__SANITIZE_ADDRESS__)
  GTEST_SKIP() << "the cache is off under ASan, so that it sees every use after free";
#endif
  const auto first = procpool::detail::allocate_block(1 << 20);
  std::memset(first.data, 1, first.capacity);
  procpool::detail::free_block(first);
  const auto second = procpool::detail::allocate_block(1 << 20);
  EXPECT_EQ(second.data, first.data);
  EXPECT_GE(second.capacity, std::size_t{1} << 20);
  procpool::detail::free_block(second);
}

TEST(BufferBlocks, PrefaultingForWritingKeepsWhatIsAlreadyThere) {
  // Result vectors are prefaulted after reserve(); memory already holding data
  // (a reused heap block) must come through unchanged.
  std::vector<char> data(1 << 20);
  for (std::size_t i = 0; i < data.size(); ++i)
    data[i] = static_cast<char>(i * 13 + 1);
  procpool::detail::prefault_for_writing(data.data() + 5, data.size() - 5);
  for (std::size_t i = 0; i < data.size(); ++i)
    ASSERT_EQ(data[i], static_cast<char>(i * 13 + 1)) << i;
}

TEST(BufferBlocks, HeapPrefaultKeepsPagesNoOtherProcessShares) {
  std::vector<char> data(1 << 20);
  for (std::size_t i = 0; i < data.size(); ++i)
    data[i] = static_cast<char>(i * 7 + 3);
  procpool::detail::prefault_heap_for_writing(data.data(), data.size());
  for (std::size_t i = 0; i < data.size(); ++i)
    ASSERT_EQ(data[i], static_cast<char>(i * 7 + 3)) << i;
}

TEST(BufferBlocks, HeapPrefaultGivesFreshPagesWhereAChildStillSharesThem) {
  // Memory about to be overwritten whole: copying what a forked child still
  // maps would be wasted work, so the parent takes fresh (zeroed) pages and
  // the child keeps its own view.
  std::vector<char> data(1 << 20, 'a');
  int to_child[2], to_parent[2];
  ASSERT_EQ(::pipe(to_child), 0);
  ASSERT_EQ(::pipe(to_parent), 0);
  const pid_t pid = ::fork();
  if (pid == 0) {
    char go = 0;
    const bool ready = ::write(to_parent[1], "r", 1) == 1 && ::read(to_child[0], &go, 1) == 1;
    _exit(ready && data[4096 * 3] == 'a' && data[data.size() / 2] == 'a' ? 0 : 1);
  }
  char ready = 0;
  ASSERT_EQ(::read(to_parent[0], &ready, 1), 1);  // the child maps the pages now
  procpool::detail::prefault_heap_for_writing(data.data(), data.size());
  const char middle = data[data.size() / 2];
  ASSERT_EQ(::write(to_child[1], "g", 1), 1);
  int status = 0;
  ASSERT_EQ(::waitpid(pid, &status, 0), pid);
  for (int fd : {to_child[0], to_child[1], to_parent[0], to_parent[1]})
    ::close(fd);
  EXPECT_EQ(middle, '\0') << "a page the child shared was copied, not replaced";
  EXPECT_TRUE(WIFEXITED(status) && WEXITSTATUS(status) == 0) << "the child's view changed";
}

TEST(BufferBlocks, ForkedChildrenDoNotInheritThem) {
  // Otherwise every fork would make the parent's next write to each page a copy.
  Buffer buffer(64 << 10);
  std::memset(buffer.data(), 7, buffer.size());
  const pid_t pid = ::fork();
  if (pid == 0) {
    unsigned char resident = 0;
    const bool unmapped = ::mincore(buffer.data(), 4096, &resident) == -1 && errno == ENOMEM;
    ::_exit(unmapped ? 0 : 1);
  }
  int status = 0;
  ASSERT_EQ(::waitpid(pid, &status, 0), pid);
  EXPECT_TRUE(WIFEXITED(status) && WEXITSTATUS(status) == 0) << "the child could see the buffer";
  EXPECT_EQ(buffer.data()[100], std::byte{7});
}

}  // namespace
