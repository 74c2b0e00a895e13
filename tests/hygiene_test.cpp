// Process hygiene: no zombies, no leaked descriptors, no doubled stdio or atexit.
#include <gtest/gtest.h>
#include <procpool/procpool.hpp>

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>
#include <cereal/types/string.hpp>
#include <cereal/types/vector.hpp>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <csignal>
#include <filesystem>
#include <list>
#include <memory>
#include <numeric>
#include <ranges>
#include <thread>
#include <utility>

#include <cerrno>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <sstream>
#include <string>
#include <vector>

#include "helpers.hpp"

namespace {

TEST(Hygiene, NoChildProcessAfterAnyKindOfCall) {
  std::vector<int> inputs{1, 2, 3, 4, 5};
  procpool::map([](int x) { return x; }, inputs, {.processes = 2});
  for (auto v : procpool::imap([](int x) { return x; }, inputs, {.processes = 2}))
    (void)v;
  for (auto v : procpool::imap_unordered([](int x) { return x; }, inputs, {.processes = 2}))
    (void)v;
  {
    procpool::Pool pool({.processes = 2});
    pool.map([](int x) { return x; }, inputs);
  }
  EXPECT_TRUE(test_helpers::children().empty());
}

// Bytes in memory of the shared regions this process keeps for later workers
// (shared anonymous mappings of 128 MiB and more), whether or not this process
// has them mapped: mincore() sees the pages of the shared object itself.
std::size_t resident_region_bytes() {
  std::ifstream maps("/proc/self/maps");
  std::size_t resident = 0;
  for (std::string line; std::getline(maps, line);) {
    std::istringstream fields(line);
    std::string range, perms;
    fields >> range >> perms;
    const auto dash = range.find('-');
    const auto begin = std::stoull(range.substr(0, dash), nullptr, 16);
    const auto end = std::stoull(range.substr(dash + 1), nullptr, 16);
    if (perms != "rw-s" || line.find("/dev/zero") == std::string::npos ||
        end - begin < (std::size_t{128} << 20)) {
      continue;
    }
    std::vector<unsigned char> pages((end - begin) / 4096);
    if (::mincore(reinterpret_cast<void*>(begin), end - begin, pages.data()) != 0) continue;
    for (unsigned char p : pages)
      resident += (p & 1u) * 4096;
  }
  return resident;
}

TEST(Hygiene, SharedRegionsKeepAtMostTheirFirstMiBBetweenCalls) {
  // Each worker's first reply (24 MiB) fills one region; the next, written
  // straight into another region, is mapped for 24 MiB but fills 100 KiB.
  // Once the workers are gone, the cached regions keep their first MiB only.
  std::vector<int> inputs{0, 1, 2, 3, 4, 5, 6, 7};
  const auto replies = procpool::map(
      [](int i) { return std::vector<char>(i < 2 ? std::size_t{24} << 20 : 100 << 10, 'x'); },
      inputs, {.processes = 2, .chunksize = 1});
  ASSERT_EQ(replies.size(), 8u);
  EXPECT_EQ(replies[1].size(), std::size_t{24} << 20);
  EXPECT_EQ(replies[7].size(), std::size_t{100} << 10);
  constexpr std::size_t cached_arenas = 8, regions = 4;
  EXPECT_LE(resident_region_bytes(), cached_arenas * regions * (std::size_t{1} << 20) + (1 << 20));
}

TEST(Hygiene, RepeatedCallsLeakNoDescriptors) {
  std::vector<int> inputs{1, 2, 3};
  procpool::map([](int x) { return x; }, inputs, {.processes = 2});  // warm up lazy statics
  const int before = test_helpers::open_fd_count();
  for (int i = 0; i < 100; ++i)
    procpool::map([](int x) { return x; }, inputs, {.processes = 2});
  for (int i = 0; i < 20; ++i) {
    procpool::Pool pool({.processes = 2});
    pool.map([](int x) { return x; }, inputs);
  }
  EXPECT_EQ(test_helpers::open_fd_count(), before);
  EXPECT_TRUE(test_helpers::children().empty());
}

std::size_t count(const std::string& haystack, const std::string& needle) {
  std::size_t n = 0;
  for (auto at = haystack.find(needle); at != std::string::npos; at = haystack.find(needle, at + 1))
    ++n;
  return n;
}

TEST(Hygiene, BufferedOutputBeforeACallIsPrintedOnce) {
  std::string out = test_helpers::output_of(
      STDOUT_FILENO,
      [] {
        std::printf("buffered-marker ");  // stdout is a pipe: fully buffered, not yet written
        procpool::map([](int x) { return x; }, std::vector{1, 2, 3, 4}, {.processes = 2});
        procpool::Pool pool({.processes = 2});
        pool.map([](int x) { return x; }, std::vector{1, 2});
      },
      true);
  EXPECT_EQ(count(out, "buffered-marker"), 1u) << out;
}

TEST(Hygiene, WorkersNeverRunTheParentsAtexitHandlers) {
  std::string out = test_helpers::output_of(
      STDOUT_FILENO,
      [] {
        std::atexit([] { std::printf("atexit-marker\n"); });
        procpool::map([](int x) { return x; }, std::vector{1, 2, 3, 4}, {.processes = 2});
        procpool::Pool pool({.processes = 2});
        pool.map([](int x) { return x; }, std::vector{1, 2});
      },
      true);
  EXPECT_EQ(count(out, "atexit-marker"), 1u) << out;
}

int print_then_exit(int status) {
  std::printf("task-printed-%d ", status);  // buffered: stdout is a pipe
  std::exit(status);
}

/// The exit status a call's task ended its worker with, or -1.
template <class Call>
int exit_status_of(Call call) {
  try {
    call();
  } catch (const procpool::WorkerCrashed& e) {
    return e.signal() == 0 ? e.exit_status() : -1;
  }
  return -1;
}

// A task that calls exit() ends its worker with that status, without running
// what the parent registered before the fork, and what it printed is printed.
TEST(Hygiene, ATaskCallingExitRunsNoneOfTheParentsAtexitHandlers) {
  std::string out = test_helpers::output_of(
      STDOUT_FILENO,
      [] {
        std::atexit([] { std::printf("atexit-marker\n"); });
        const int by_map = exit_status_of(
            [] { procpool::map(&print_then_exit, std::vector{3}, {.processes = 1}); });
        procpool::Pool pool({.processes = 1});
        const int by_pool = exit_status_of([&] { pool.submit(&print_then_exit, 4).get(); });
        std::printf("statuses %d %d\n", by_map, by_pool);
      },
      true);
  EXPECT_EQ(count(out, "statuses 3 4"), 1u) << out;
  EXPECT_EQ(count(out, "atexit-marker"), 1u) << out;
  EXPECT_EQ(count(out, "task-printed-3"), 1u) << out;
  EXPECT_EQ(count(out, "task-printed-4"), 1u) << out;
}

// procpool forks workers while its own threads (a Pool's service thread, an
// MPI rank's executors) allocate. A child forked while another thread held an
// allocator lock would wait for it for ever: glibc's malloc takes its locks
// around fork(); GCC 12's ASan does not, and an ASan build of the tests links
// tests/support/asan_fork_gate.cpp, which does. Three threads allocate sizes
// of many classes while this one forks 300 children that allocate at once.
// (Not under TSan: its GCC 12 allocator has the same hole and no gate.)
TEST(Hygiene, AChildForkedWhileOtherThreadsAllocateCanAllocate) {
#if defined(__SANITIZE_THREAD__)
  GTEST_SKIP() << "GCC 12's TSan allocator takes no lock around fork()";
#else
  std::atomic<bool> stop{false};
  std::vector<std::thread> allocators;
  for (int t = 0; t < 3; ++t) {
    allocators.emplace_back([&stop, t] {
      std::vector<std::vector<char>> held(64);
      std::vector<std::shared_ptr<std::string>> strings(64);  // other sizes, other classes
      for (std::size_t i = 0; !stop.load(std::memory_order_relaxed); ++i) {
        held[i % held.size()] =
            std::vector<char>(16 + (i * 7919 + static_cast<std::size_t>(t)) % 4000);
        strings[i % strings.size()] = std::make_shared<std::string>(i % 300, 'y');
      }
    });
  }
  int hung = 0, failed = 0;
  for (int child = 0; child < 300; ++child) {
    const pid_t pid = ::fork();
    if (pid < 0) {
      ADD_FAILURE() << "fork failed: " << std::strerror(errno);
      break;  // the allocating threads are still stopped and joined below
    }
    if (pid == 0) {
      std::vector<std::string> words;
      for (std::size_t n = 16; n < 8192; n *= 2)
        words.emplace_back(n, 'x');
      ::_exit(words.size() == 9 ? 0 : 1);
    }
    int status = 0;
    pid_t done = 0;
    const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(10);
    while ((done = ::waitpid(pid, &status, WNOHANG)) == 0 &&
           std::chrono::steady_clock::now() < deadline)
      std::this_thread::sleep_for(std::chrono::microseconds(200));
    if (done == 0) {
      ++hung;
      ::kill(pid, SIGKILL);
      ::waitpid(pid, &status, 0);
    } else if (!WIFEXITED(status) || WEXITSTATUS(status) != 0) {
      ++failed;
    }
  }
  stop = true;
  for (auto& t : allocators)
    t.join();
  EXPECT_EQ(hung, 0) << "children that never exited (blocked in the allocator)";
  EXPECT_EQ(failed, 0);
#endif
}

TEST(Hygiene, WhatATaskPrintsIsNotLost) {
  std::string out = test_helpers::output_of(
      STDOUT_FILENO,
      [] {
        procpool::map(
            [](int x) {
              std::printf("task-output-%d\n", x);
              return x;
            },
            std::vector{1, 2}, {.processes = 2});
      },
      true);
  EXPECT_EQ(count(out, "task-output-1"), 1u) << out;
  EXPECT_EQ(count(out, "task-output-2"), 1u) << out;
}

// Large inputs: the caller holds an input once. Its encoding goes into a
// memory file that is not kept mapped while it is written, and that the
// worker gives back as it decodes; a retry encodes the input again.

std::vector<char> block_of(std::size_t size, int seed) {
  std::vector<char> block(size);
  for (std::size_t i = 0; i < size; i += 4096)
    block[i] = static_cast<char>(seed + static_cast<int>(i / 4096));
  return block;
}

long checksum(const std::vector<char>& block) {
  long sum = static_cast<long>(block.size());
  for (std::size_t i = 0; i < block.size(); i += 4096)
    sum += static_cast<unsigned char>(block[i]) * static_cast<long>(i / 4096 % 13 + 1);
  return sum;
}

long peak_rss_kib() {
  rusage usage{};
  ::getrusage(RUSAGE_SELF, &usage);
  return usage.ru_maxrss;
}

/// Bytes the system holds for this process's open procpool memory file of at
/// least `size` bytes (the one an input came in), or -1 if there is none.
long long held_by_memory_file_of(std::size_t size) {
  namespace fs = std::filesystem;
  for (const auto& entry : fs::directory_iterator("/proc/self/fd")) {
    std::error_code ignored;
    if (fs::read_symlink(entry.path(), ignored).string().rfind("/memfd:procpool", 0) != 0) continue;
    struct stat st {};
    if (::stat(entry.path().c_str(), &st) == 0 && static_cast<std::size_t>(st.st_size) >= size) {
      return static_cast<long long>(st.st_blocks) * 512;
    }
  }
  return -1;
}

constexpr std::size_t large_input = std::size_t{128} << 20;

std::pair<long, long long> sum_and_file_held(const std::vector<char>& block) {
  return {checksum(block), held_by_memory_file_of(block.size())};
}

void expect_held_once(const std::pair<long, long long>& seen, const std::vector<char>& input,
                      long rss_growth_kib, long bound_kib = 64 * 1024) {
  EXPECT_EQ(seen.first, checksum(input));
  if (input.size() <= procpool::detail::spare_files_limit) {
    // Decoded, the file went back to the caller whole, before the task ran.
    EXPECT_EQ(seen.second, -1) << "the worker still held the input's memory file in its task";
  } else {
    // Too large to be kept as a spare: its pages were given back as decoded.
    EXPECT_GE(seen.second, 0) << "the input should have come in a memory file";
    EXPECT_LT(seen.second, 16 << 20) << "the worker kept the memory file's pages while it decoded";
  }
  // Without the hand-over the caller's peak grew by the whole encoding. (A
  // process's peak: ctest runs each test in a process of its own.) A
  // sanitizer's shadow of the file's mapping adds to it, whatever is unmapped.
  if (!test_helpers::under_sanitizer) {
    EXPECT_LT(rss_growth_kib, bound_kib) << "the caller held the input twice";
  }
}

/// One input of `size` bytes sent to a Pool of one worker: what its task
/// saw, how much the caller's peak RSS grew, and how many spare memory files
/// the caller held once the call returned (the pool still open).
struct OneInputSeen {
  std::vector<char> input;
  std::pair<long, long long> seen;
  long peak_growth_kib = 0;
  std::size_t spares_after = 0;
};

OneInputSeen send_one_input_to_a_pool(std::size_t size, int seed) {
  OneInputSeen out;
  std::vector<std::vector<char>> inputs;
  inputs.push_back(block_of(size, seed));
  procpool::Pool pool({.processes = 1});
  const long before = peak_rss_kib();
  const auto seen = pool.map(sum_and_file_held, inputs);
  out.peak_growth_kib = peak_rss_kib() - before;
  out.spares_after = procpool::detail::spare_memory_files().files;
  EXPECT_EQ(seen.size(), 1u);
  if (!seen.empty()) out.seen = seen[0];
  out.input = std::move(inputs[0]);
  return out;
}

TEST(LargeInputs, APoolsInputIsHeldOnceByTheCallerAndGivenBackByTheWorker) {
  const OneInputSeen one = send_one_input_to_a_pool(large_input, 3);
  expect_held_once(one.seen, one.input, one.peak_growth_kib);
  EXPECT_EQ(one.spares_after, 1u) << "the file did not come back";
}

TEST(LargeInputs, AnInputBetweenTheMemoryFileAndThreadSizesIsHeldOnceToo) {
  // 48 MiB: in a memory file (32 MiB and more), written without a helper
  // thread (below 64 MiB).
  const OneInputSeen one = send_one_input_to_a_pool(std::size_t{48} << 20, 4);
  std::fprintf(stderr, "the caller's peak grew by %ld KiB\n", one.peak_growth_kib);
  expect_held_once(one.seen, one.input, one.peak_growth_kib, 24 * 1024);
}

TEST(LargeInputs, AnInputTooLargeToGoBackAsASpareIsGivenBackPageByPage) {
  const OneInputSeen one =
      send_one_input_to_a_pool(procpool::detail::spare_files_limit + (std::size_t{32} << 20), 6);
  expect_held_once(one.seen, one.input, one.peak_growth_kib);
  EXPECT_EQ(one.spares_after, 0u) << "it came back as a spare";
}

TEST(LargeInputs, AnInputFromAListIsHeldOnceByTheCaller) {
  std::list<std::vector<char>> inputs;
  inputs.push_back(block_of(large_input, 5));
  const long before = peak_rss_kib();
  const auto seen = procpool::map(sum_and_file_held, inputs, {.processes = 1});
  ASSERT_EQ(seen.size(), 1u);
  expect_held_once(seen[0], inputs.front(), peak_rss_kib() - before);
}

/// Where a task notes that it crashed its worker once (inherited by the workers).
std::string crash_marker;

/// Kills its worker the first time it sees the input whose first byte is 1.
long crash_once_on_input_1(const std::pair<procpool::SharedBuffer, std::vector<char>>& input) {
  if (input.second[0] == 1 && ::access(crash_marker.c_str(), F_OK) != 0) {
    std::ofstream(crash_marker) << "crashed";
    ::raise(SIGKILL);
  }
  const auto* tag = reinterpret_cast<const unsigned char*>(input.first.data());
  return checksum(input.second) * 1000 + tag[0] + tag[input.first.size() - 1];
}

std::vector<std::pair<procpool::SharedBuffer, std::vector<char>>> tagged_blocks(int n) {
  std::vector<std::pair<procpool::SharedBuffer, std::vector<char>>> inputs;
  for (int i = 0; i < n; ++i) {
    procpool::SharedBuffer tag(4096);
    std::memset(tag.data(), 10 + i, tag.size());
    inputs.emplace_back(std::move(tag), block_of(std::size_t{40} << 20, i));
  }
  return inputs;
}

long expected_for(int i) {
  return checksum(block_of(std::size_t{40} << 20, i)) * 1000 + 2 * (10 + i);
}

/// Points crash_marker into a fresh directory, removed at the end of the test.
struct FreshCrashMarker {
  test_helpers::TempDir dir{"procpool-crash"};
  FreshCrashMarker() { crash_marker = dir.path() + "/crashed"; }
};

TEST(LargeInputs, AHandedOverInputIsEncodedAgainForItsRetry) {
  const FreshCrashMarker fresh_marker;
  const auto inputs = tagged_blocks(3);
  procpool::Pool pool({.processes = 1, .retries = 1});
  const auto sums = pool.map(crash_once_on_input_1, inputs);
  EXPECT_EQ(::access(crash_marker.c_str(), F_OK), 0) << "input 1 never crashed its worker";
  ASSERT_EQ(sums.size(), 3u);
  for (int i = 0; i < 3; ++i)
    EXPECT_EQ(sums[static_cast<std::size_t>(i)], expected_for(i)) << i;
}

TEST(LargeInputs, InputsQueuedBehindACrashAreEncodedAgain) {
  const FreshCrashMarker fresh_marker;
  const auto inputs = tagged_blocks(4);
  procpool::Pool pool({.processes = 1});
  const auto outcomes = pool.map_outcomes(crash_once_on_input_1, inputs);
  ASSERT_EQ(outcomes.size(), 4u);
  EXPECT_FALSE(outcomes[1].ok());
  EXPECT_NE(outcomes[1].what().find("task 1"), std::string::npos) << outcomes[1].what();
  for (int i : {0, 2, 3}) {
    ASSERT_TRUE(outcomes[static_cast<std::size_t>(i)].ok())
        << outcomes[static_cast<std::size_t>(i)].what();
    EXPECT_EQ(*outcomes[static_cast<std::size_t>(i)].value, expected_for(i)) << i;
  }
}

/// A cereal type whose save() works once per object: its retry cannot be encoded.
struct SavedOnce {
  std::vector<char> body;
  mutable int saves = 0;
  template <class Archive>
  void save(Archive& archive) const {
    if (++saves > 1) throw std::runtime_error("this document was already saved");
    archive(body);
  }
  template <class Archive>
  void load(Archive& archive) {
    archive(body);
  }
};

long crash_once_on_document_1(const SavedOnce& document) {
  if (document.body[0] == 1 && ::access(crash_marker.c_str(), F_OK) != 0) {
    std::ofstream(crash_marker) << "crashed";
    ::raise(SIGKILL);
  }
  return checksum(document.body);
}

TEST(LargeInputs, AnInputThatCannotBeEncodedAgainFailsItsRetryWithTheReason) {
  const FreshCrashMarker fresh_marker;
  std::vector<SavedOnce> inputs(2);
  for (int i = 0; i < 2; ++i)
    inputs[static_cast<std::size_t>(i)].body = block_of(std::size_t{40} << 20, i);
  procpool::Pool pool({.processes = 1, .retries = 1});
  const auto outcomes = pool.map_outcomes(crash_once_on_document_1, inputs);
  ASSERT_EQ(outcomes.size(), 2u);
  ASSERT_TRUE(outcomes[0].ok()) << outcomes[0].what();
  EXPECT_EQ(*outcomes[0].value, checksum(inputs[0].body));
  ASSERT_FALSE(outcomes[1].ok());
  try {
    std::rethrow_exception(outcomes[1].error);
  } catch (const procpool::TaskError& e) {
    EXPECT_EQ(e.index(), 1u);
    EXPECT_EQ(e.stage(), procpool::TaskError::Stage::serialize_input);
    EXPECT_NE(e.remote_what().find("already saved"), std::string::npos) << e.what();
  } catch (const std::exception& e) {
    ADD_FAILURE() << "not a TaskError: " << e.what();
  }
}

long crash_once_on_block_0(const std::vector<char>& block) {
  if (block[0] == 0 && ::access(crash_marker.c_str(), F_OK) != 0) {
    std::ofstream(crash_marker) << "crashed";
    ::raise(SIGKILL);
  }
  return checksum(block);
}

TEST(LargeInputs, AViewOfAReusedBufferKeepsWhatItSentForTheRetry) {
  // Each element is the same buffer, refilled: encoding it again for the
  // retry would send the last input loaded instead of the first.
  const FreshCrashMarker fresh_marker;
  const std::vector<int> keys{0, 1, 2};
  std::vector<char> buffer;
  auto loaded = keys | std::views::transform([&buffer](int key) -> const std::vector<char>& {
                  buffer = block_of(std::size_t{40} << 20, key);
                  return buffer;
                });
  procpool::Pool pool({.processes = 1, .retries = 1});
  const auto outcomes = pool.map_outcomes(crash_once_on_block_0, loaded);
  EXPECT_EQ(::access(crash_marker.c_str(), F_OK), 0) << "input 0 never crashed its worker";
  ASSERT_EQ(outcomes.size(), 3u);
  for (std::size_t i = 0; i < 3; ++i) {
    ASSERT_TRUE(outcomes[i].ok()) << outcomes[i].what();
    EXPECT_EQ(*outcomes[i].value, checksum(block_of(std::size_t{40} << 20, static_cast<int>(i))))
        << i;
  }
}

/// A cereal result whose load() fails the first time it reads a large body,
/// after the body's pages were read (and given back).
struct LoadsOnce {
  std::vector<char> body;
  template <class Archive>
  void save(Archive& archive) const {
    archive(body);
  }
  template <class Archive>
  void load(Archive& archive) {
    archive(body);
    static int large_loads = 0;  // in the caller: workers only save
    if (body.size() > (std::size_t{1} << 20) && ++large_loads == 1) {
      throw std::runtime_error("the first large body does not load");
    }
  }
};

LoadsOnce loads_once_of(int i) {
  return LoadsOnce{std::vector<char>(i == 0 ? 16 : std::size_t{40} << 20, 7)};
}

TEST(LargeResults, AResultWhoseLoadThrowsAfterReadingItsPagesFailsAndIsNotReadTwice) {
  // map takes a chunk's values in one go: a value that fails there was
  // decoded again, one by one, from pages already given back (zeros). A
  // 40 MiB reply's file now goes back to its worker, whole: its value was
  // then loaded a second time, and this load() let it through.
  procpool::Pool pool({.processes = 1, .chunksize = 2});
  try {
    const auto values = pool.map(loads_once_of, std::vector<int>{0, 1});
    ADD_FAILURE() << "map returned a value of " << values.at(1).body.size() << " bytes, "
                  << std::count(values[1].body.begin(), values[1].body.end(), 0) << " of them 0";
  } catch (const procpool::TaskError& e) {
    EXPECT_EQ(e.index(), 1u);
    EXPECT_EQ(e.stage(), procpool::TaskError::Stage::deserialize_result);
    EXPECT_NE(e.remote_what().find("does not load"), std::string::npos) << e.what();
  }
}

}  // namespace

namespace {

/// A task that forks a process of its own (no exec) which outlives it by
/// far: it holds a copy of everything the worker had open, the worker's end
/// of its socket included. Returns that process's pid.
pid_t leave_a_lingering_child(int) {
  const pid_t child = ::fork();
  if (child == 0) {
    ::sleep(30);
    ::_exit(0);
  }
  return child;
}

void kill_all(const std::vector<pid_t>& pids) {
  for (pid_t p : pids)
    if (p > 0) ::kill(p, SIGKILL);
}

}  // namespace

TEST(Hygiene, AProcessATaskForkedDoesNotHoldUpTheWorkersRecycleOrThePoolsEnd) {
  // helper-63's case: the parent read a finished worker's socket until every
  // copy of it was closed, so a recycle, or the pool's end, waited for the
  // task's process to end (30 s here; under MPI a node's rank stopped
  // answering and the root gave up on it).
  std::vector<pid_t> lingering;
  const auto started = std::chrono::steady_clock::now();
  {
    procpool::Pool pool({.processes = 1, .max_tasks_per_child = 1});
    lingering = pool.map(leave_a_lingering_child, std::vector<int>(3));
  }
  const auto took = std::chrono::steady_clock::now() - started;
  kill_all(lingering);
  ASSERT_EQ(lingering.size(), 3u);
  for (pid_t p : lingering)
    EXPECT_GT(p, 0);
  EXPECT_LT(took, std::chrono::seconds(10)) << "three recycles and the pool's end waited for the "
                                               "processes its tasks forked";
}

TEST(Hygiene, AProcessATaskForkedDoesNotHoldUpAForkPerCallMapsEnd) {
  const auto started = std::chrono::steady_clock::now();
  const std::vector<pid_t> lingering =
      procpool::map(leave_a_lingering_child, std::vector<int>(4), {.processes = 2});
  const auto took = std::chrono::steady_clock::now() - started;
  kill_all(lingering);
  EXPECT_LT(took, std::chrono::seconds(10)) << "the call's end waited for the processes its "
                                               "tasks forked";
}

// Tasks that close or replace descriptors they did not open: closefrom(),
// close_range(), daemon()-style loops. The worker's link to the pool goes
// with them; it used to look like "the parent is gone" (status 0), so the
// task was retried as if its result had been lost on the way, and its
// innocent neighbours were charged for the deaths until they failed with
// "something kills the workers from outside".
namespace {

enum class Takes { close_loop, close_range, dup2_dev_null, own_socket };

void take_descriptors(Takes how) {
  switch (how) {
    case Takes::close_loop:
      for (int fd = 3; fd < 1024; ++fd)
        ::close(fd);
      break;
    case Takes::close_range:
      ::close_range(3, ~0U, 0);
      break;
    case Takes::dup2_dev_null: {
      const int null = ::open("/dev/null", O_RDWR);
      for (int fd = 3; fd < 1024; ++fd) {
        if (fd != null) ::dup2(null, fd);
      }
      break;
    }
    case Takes::own_socket: {
      // Sockets of the task's own under the link's number (the first
      // sixteen are taken): writes to them succeed, so only a check of the
      // descriptor's identity tells.
      ::close_range(3, ~0U, 0);
      for (int i = 0; i < 8; ++i) {
        int pair[2];
        if (::socketpair(AF_UNIX, SOCK_STREAM, 0, pair) != 0) std::abort();
      }
      break;
    }
  }
}

struct LinkCase {
  Takes how;
  procpool::Start start;
  std::size_t chunksize;
  bool slow;  // each task takes 2 ms, long enough to be checked on its own
};

class LinkTaken : public ::testing::TestWithParam<LinkCase> {};

TEST_P(LinkTaken, OnlyTheTaskThatTookItFailsAndItsErrorSaysSo) {
  const LinkCase c = GetParam();
  std::vector<int> inputs(20);
  std::iota(inputs.begin(), inputs.end(), 0);
  const auto task = [c](int x) {
    if (x % 5 == 2) take_descriptors(c.how);
    if (c.slow) std::this_thread::sleep_for(std::chrono::milliseconds(2));
    return x * 3 + 1;
  };
  const auto started = std::chrono::steady_clock::now();
  const auto outcomes = procpool::map_outcomes(
      task, inputs, {.processes = 2, .chunksize = c.chunksize, .start = c.start});
  EXPECT_LT(std::chrono::steady_clock::now() - started, std::chrono::seconds(20));
  ASSERT_EQ(outcomes.size(), inputs.size());
  for (const auto& outcome : outcomes) {
    const int x = inputs[outcome.index];
    if (x % 5 != 2) {
      ASSERT_TRUE(outcome.ok()) << "task " << x << ": " << outcome.what();
      EXPECT_EQ(*outcome.value, x * 3 + 1);
      continue;
    }
    ASSERT_FALSE(outcome.ok()) << "task " << x << " took the link and still succeeded";
    try {
      std::rethrow_exception(outcome.error);
    } catch (const procpool::WorkerCrashed& e) {
      EXPECT_TRUE(e.closed_link()) << e.what();
      EXPECT_EQ(e.index(), static_cast<std::size_t>(x));
      EXPECT_NE(std::string(e.what()).find("task " + std::to_string(x) +
                                           " closed or replaced descriptor"),
                std::string::npos)
          << e.what();
    } catch (const std::exception& e) {
      ADD_FAILURE() << "task " << x << ": " << e.what();
    }
  }
  EXPECT_TRUE(test_helpers::children().empty());
}

INSTANTIATE_TEST_SUITE_P(
    Tasks, LinkTaken,
    ::testing::Values(LinkCase{Takes::close_loop, procpool::Start::fork, 1, false},
                      LinkCase{Takes::close_range, procpool::Start::fork, 4, false},
                      LinkCase{Takes::dup2_dev_null, procpool::Start::fork, 1, false},
                      LinkCase{Takes::dup2_dev_null, procpool::Start::fork_server, 4, false},
                      LinkCase{Takes::close_range, procpool::Start::fork, 4, true},
                      LinkCase{Takes::own_socket, procpool::Start::fork, 1, true},
                      LinkCase{Takes::own_socket, procpool::Start::fork_server, 3, true}));

TEST(LinkTakenInAPool, ThePoolGoesOnAndTheNextCallIsWhole) {
  procpool::Pool pool({.processes = 2});
  const auto outcomes = pool.map_outcomes(
      [](int x) {
        if (x == 3) ::close_range(3, ~0U, 0);
        return x + 1;
      },
      std::vector<int>{0, 1, 2, 3, 4, 5});
  ASSERT_EQ(outcomes.size(), 6u);
  for (const auto& outcome : outcomes)
    EXPECT_EQ(outcome.ok(), outcome.index != 3) << outcome.index << ": " << outcome.what();
  EXPECT_NE(outcomes[3].what().find("closed or replaced descriptor"), std::string::npos)
      << outcomes[3].what();
  EXPECT_EQ(pool.map([](int x) { return x * 2; }, std::vector<int>{1, 2, 3}),
            (std::vector<int>{2, 4, 6}));
}

}  // namespace

// A program that closed its standard streams gets its next descriptors on
// 0, 1 and 2: the pool's sockets and memory files used to land there, so
// what the program or its tasks printed went into them (helper-66: under
// fork_server every task failed with "sent a corrupt message"; the
// program's own printf replaced spawned workers or broke the next map).
namespace {

int run_without_standard_streams(procpool::Start start) {
  ::close(STDIN_FILENO);
  ::close(STDOUT_FILENO);
  ::close(STDERR_FILENO);
  try {
    procpool::Pool pool({.processes = 2, .start = start});
    const auto prints = [](int x) {
      std::printf("task %d prints to stdout\n", x);
      std::fflush(stdout);
      std::fprintf(stderr, "task %d prints to stderr\n", x);
      return x * 2;
    };
    std::vector<int> inputs(40);
    std::iota(inputs.begin(), inputs.end(), 0);
    for (int round = 0; round < 3; ++round) {
      std::printf("the program prints between calls\n");
      std::fflush(stdout);
      std::fprintf(stderr, "and to stderr\n");
      const std::vector<int> doubled = pool.map(prints, inputs);
      for (int x : inputs) {
        if (doubled[static_cast<std::size_t>(x)] != x * 2) return 1;
      }
      // Large results travel in memory files, which must not land there either.
      const auto large = pool.map(
          [](int x) { return std::vector<char>(std::size_t{40} << 20, static_cast<char>(x)); },
          std::vector<int>{1, 2});
      if (large.size() != 2 || large[1].back() != 2) return 1;
    }
    for (const auto& row : pool.insights().workers) {
      if (row.crashes != 0) return 4;  // a worker was replaced: its socket got garbage
    }
  } catch (...) {
    return 3;
  }
  return 0;
}

class WithoutStandardStreams : public ::testing::TestWithParam<procpool::Start> {};

TEST_P(WithoutStandardStreams, NothingPrintedReachesThePoolsDescriptors) {
  std::fflush(nullptr);
  const pid_t child = ::fork();
  ASSERT_GE(child, 0);
  if (child == 0) ::_exit(run_without_standard_streams(GetParam()));
  int status = 0;
  const auto started = std::chrono::steady_clock::now();
  pid_t done = 0;
  while ((done = ::waitpid(child, &status, WNOHANG)) == 0 &&
         std::chrono::steady_clock::now() - started < std::chrono::seconds(60))
    std::this_thread::sleep_for(std::chrono::milliseconds(5));
  if (done == 0) {
    ::kill(child, SIGKILL);
    ::waitpid(child, &status, 0);
    FAIL() << "the program without standard streams did not end within 60 s";
  }
  ASSERT_TRUE(WIFEXITED(status)) << status;
  EXPECT_EQ(WEXITSTATUS(status), 0)
      << "1: wrong results; 3: a call threw; 4: a worker was replaced";
}

INSTANTIATE_TEST_SUITE_P(Starts, WithoutStandardStreams,
                         ::testing::Values(procpool::Start::fork, procpool::Start::fork_server,
                                           procpool::Start::spawn));

}  // namespace
