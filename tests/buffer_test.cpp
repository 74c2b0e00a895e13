// Buffer memory: blocks cached warm, prefaulting that keeps data, and pages
// that forked children neither inherit nor get copied for.
#include <gtest/gtest.h>
#include <procpool/procpool.hpp>

#include <sys/mman.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cereal/types/string.hpp>
#include <cereal/types/vector.hpp>

#include <cerrno>
#include <cstddef>
#include <cstring>
#include <optional>
#include <string>
#include <tuple>
#include <utility>
#include <vector>

namespace {

using procpool::detail::Buffer;

/// The share of the pages of [p, p + n) that are mapped now.
double resident_fraction(const std::byte* p, std::size_t n) {
  const std::size_t pages = n / 4096;
  std::vector<unsigned char> in(pages);
  if (::mincore(const_cast<std::byte*>(p), pages * 4096, in.data()) != 0) return -1;
  std::size_t resident = 0;
  for (unsigned char c : in)
    resident += c & 1;
  return static_cast<double>(resident) / static_cast<double>(pages);
}

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

TEST(BufferBlocks, LargeBlocksBeyondTheWarmCacheAreHandedOutAgainAndHoldWhatIsWritten) {
#if defined(__SANITIZE_ADDRESS__)
  GTEST_SKIP() << "the cache is off under ASan, so that it sees every use after free";
#endif
  // Six 32 MiB blocks (a root receiving big results): two fit the 64 MiB warm
  // cache, the rest are kept lazily freed (MADV_FREE). All six come back with
  // their pages still mapped (the kernel reclaims lazily freed pages only
  // when short of memory), where fresh ones would fault and be zeroed.
  constexpr std::size_t mib32 = std::size_t{32} << 20;
  std::vector<procpool::detail::Block> blocks;
  for (int i = 0; i < 6; ++i) {
    blocks.push_back(procpool::detail::allocate_block(mib32));
    std::memset(blocks.back().data, 1, blocks.back().capacity);
  }
  for (const auto& b : blocks)
    procpool::detail::free_block(b);
  blocks.clear();
  for (int i = 0; i < 6; ++i) {
    blocks.push_back(procpool::detail::allocate_block(mib32));
    const auto& b = blocks.back();
    EXPECT_GE(resident_fraction(b.data, b.capacity), 0.9) << "block " << i << " came back cold";
    // Written after MADV_FREE, a page is the writer's again: what is written stays.
    std::memset(b.data, 2 + i, b.capacity);
  }
  for (int i = 0; i < 6; ++i) {
    const auto& b = blocks[static_cast<std::size_t>(i)];
    for (std::size_t at = 0; at < b.capacity; at += 4096)
      ASSERT_EQ(b.data[at], static_cast<std::byte>(2 + i)) << "block " << i << " byte " << at;
    procpool::detail::free_block(b);
  }
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

/// Bytes of `size` that differ from page to page and from `seed` to seed.
std::vector<char> patterned(std::size_t size, int seed) {
  std::vector<char> v(size);
  for (std::size_t i = 0; i < size; i += 1021)
    v[i] = static_cast<char>(seed + static_cast<int>(i / 1021));
  return v;
}

/// A type that runs its own code to load (cereal), so it travels framed.
struct Tagged {
  std::string name;
  std::vector<char> bytes;
  template <class Archive>
  void serialize(Archive& archive) {
    archive(name, bytes);
  }
  bool operator==(const Tagged&) const = default;
};

/// What a worker's hand-over of an input's memory file does to the bytes
/// (its parent writes the next input over them): a hook that fired before
/// every byte was read shows in the value decoded.
struct Overwrite {
  procpool::detail::Buffer* bytes = nullptr;
  int calls = 0;
  static void run(void* self) {
    auto* hook = static_cast<Overwrite*>(self);
    ++hook->calls;
    std::memset(hook->bytes->data(), 0xEE, hook->bytes->size());
  }
};

template <class T>
void expect_handed_on_once_read(const T& value) {
  procpool::detail::Buffer bytes;
  procpool::detail::Writer out(bytes);
  procpool::detail::save_framed(out, value);
  Overwrite hook{&bytes};
  procpool::detail::Reader in(bytes);
  in.when_all_consumed(&Overwrite::run, &hook);
  const T got = procpool::detail::load_input<T>(in);
  EXPECT_EQ(hook.calls, 1);
  EXPECT_TRUE(got == value) << "the bytes were handed on before they were all read";
}

constexpr std::size_t big = std::size_t{20} << 20;  // read in pieces of 8 MiB

TEST(ReaderHandOver, TheHookRunsOnceAfterTheLastByteOfAnyValueIsRead) {
  {
    SCOPED_TRACE("vector");
    expect_handed_on_once_read(patterned(big, 1));
  }
  {
    SCOPED_TRACE("tuple of two vectors");
    expect_handed_on_once_read(std::make_tuple(patterned(big, 2), patterned(big, 3)));
  }
  {
    SCOPED_TRACE("vector of vectors");
    expect_handed_on_once_read(std::vector<std::vector<char>>{patterned(big, 4), patterned(9, 5)});
  }
  {
    SCOPED_TRACE("an empty vector last");
    expect_handed_on_once_read(std::make_pair(patterned(big, 6), std::vector<char>{}));
  }
  {
    SCOPED_TRACE("string");
    const std::vector<char> chars = patterned(big, 7);
    expect_handed_on_once_read(std::string(chars.begin(), chars.end()));
  }
  {
    SCOPED_TRACE("optional");
    expect_handed_on_once_read(std::optional<std::vector<char>>(patterned(big, 8)));
  }
  {
    SCOPED_TRACE("a type with its own load (framed)");
    expect_handed_on_once_read(Tagged{"t", patterned(big, 9)});
  }
}

TEST(ReaderHandOver, AnInputThatFailsToDecodeIsNotHandedOn) {
  procpool::detail::Buffer bytes;
  procpool::detail::Writer out(bytes);
  procpool::detail::save_framed(out, patterned(big, 1));
  Overwrite hook{&bytes};
  procpool::detail::Reader in(bytes.data(), bytes.size() - 1);  // truncated
  in.when_all_consumed(&Overwrite::run, &hook);
  EXPECT_ANY_THROW(procpool::detail::load_input<std::vector<char>>(in));
  EXPECT_EQ(hook.calls, 0);
}

TEST(ReaderHandOver, ACopyOfTheReaderDoesNotHandOn) {
  procpool::detail::Buffer bytes;
  procpool::detail::Writer out(bytes);
  procpool::detail::save_framed(out, patterned(big, 1));
  Overwrite hook{&bytes};
  procpool::detail::Reader in(bytes);
  in.when_all_consumed(&Overwrite::run, &hook);
  procpool::detail::Reader copy = in;
  EXPECT_EQ(procpool::detail::load_input<std::vector<char>>(copy), patterned(big, 1));
  EXPECT_EQ(hook.calls, 0);
  procpool::detail::Reader moved = std::move(in);
  EXPECT_EQ(procpool::detail::load_input<std::vector<char>>(moved), patterned(big, 1));
  EXPECT_EQ(hook.calls, 1);
}

}  // namespace
