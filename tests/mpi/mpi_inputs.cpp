// Large inputs over MPI. The root sends an input's large blocks to another
// rank from where they are in the caller's range (not copied into the
// message first), so the caller does not hold them twice; and a call does not
// end while its range's memory is still being sent, so the caller may change
// or free its inputs as soon as the call is over. Run as `mpirun -n 3 ...
// mpi_inputs` (one rank works too: nothing is lent then).
#include <procpool/mpi.hpp>
#include <procpool/pool.hpp>
#include <procpool/shared_buffer.hpp>

#include <sys/resource.h>

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <optional>
#include <ranges>
#include <string>
#include <tuple>
#include <vector>

#include "../helpers.hpp"
#include "mpi_check.hpp"

namespace {

constexpr std::size_t mib = std::size_t{1} << 20;

/// A block of `size` bytes that says which it is (`id`, in its first bytes)
/// and differs everywhere from the others.
std::vector<char> block_of(std::size_t size, std::uint64_t id) {
  // A page's pattern copied over the block: byte by byte, 24 MiB blocks
  // took most of the test's time under ThreadSanitizer.
  std::vector<char> page(4096);
  for (std::size_t i = 0; i < page.size(); ++i)
    page[i] = static_cast<char>((i * 131 + id * 7) % 251);
  std::vector<char> block(size);
  for (std::size_t at = 0; at < size; at += page.size())
    std::memcpy(block.data() + at, page.data(), std::min(page.size(), size - at));
  std::memcpy(block.data(), &id, std::min(sizeof id, size));
  return block;
}

std::uint64_t id_of(const std::vector<char>& block) {
  std::uint64_t id = 0;
  std::memcpy(&id, block.data(), sizeof id);
  return id;
}

long checksum(const std::vector<char>& block) {
  long sum = static_cast<long>(block.size());
  for (std::size_t i = 0; i < block.size(); i += 512)
    sum += static_cast<unsigned char>(block[i]) * static_cast<long>(i / 512 % 17 + 1);
  return sum;
}

long checksum_text(const std::string& text) {
  return checksum(std::vector<char>(text.begin(), text.end()));
}

long checksum_shared(const procpool::SharedBuffer& buffer) {
  const auto* bytes = reinterpret_cast<const char*>(buffer.data());
  return checksum(std::vector<char>(bytes, bytes + buffer.size()));
}

using Record = std::tuple<std::string, int, std::vector<double>, std::optional<std::vector<char>>>;

Record record_of(std::size_t i) {
  std::vector<char> text = block_of(2 * mib + i, i);
  std::optional<std::vector<char>> extra;
  if (i % 2 == 0) extra = block_of(mib + 3 * i, 100 + i);
  return {std::string(text.begin(), text.end()), static_cast<int>(i),
          std::vector<double>(300000 + i, 0.5 * static_cast<double>(i)), std::move(extra)};
}

long sum_record(const Record& r) {
  long sum = checksum_text(std::get<0>(r)) + std::get<1>(r);
  for (double d : std::get<2>(r))
    sum += static_cast<long>(d);
  sum += static_cast<long>(std::get<2>(r).size());
  if (std::get<3>(r)) sum += checksum(*std::get<3>(r)) + 1;
  return sum;
}

long sum_blocks(const std::vector<std::vector<char>>& blocks) {
  long sum = 0;
  for (const auto& b : blocks)
    sum = sum * 3 + checksum(b);
  return sum;
}

/// Notes in `dir` the checksum of the input it saw, under the input's id.
long note_what_arrived(const std::vector<char>& block, const std::string& dir) {
  const long sum = checksum(block);
  std::ofstream(dir + "/" + std::to_string(id_of(block))) << sum;
  return sum;
}

long peak_rss_kib() {
  rusage usage{};
  ::getrusage(RUSAGE_SELF, &usage);
  return usage.ru_maxrss;
}

void large_inputs_are_held_once(procpool::mpi::Pool& pool, int ranks) {
  // First of all, so that no earlier call's memory makes up the peak.
  std::vector<std::vector<char>> inputs;
  std::vector<long> want;
  for (std::uint64_t i = 0; i < 8; ++i) {
    inputs.push_back(block_of(24 * mib + i, i));
    want.push_back(checksum(inputs.back()));
  }
  const long before = peak_rss_kib();
  const auto got = pool.map(&checksum, inputs);
  const long grew_kib = peak_rss_kib() - before;
  MPI_CHECK(got == want);
  std::printf("8 inputs of 24 MiB over %d ranks: the root's peak grew by %ld KiB\n", ranks,
              grew_kib);
  // Copied into the chunks sent to the other ranks, they cost the root
  // 24 MiB for each chunk in flight (48 MiB here before they were lent).
  // A sanitizer's shadow memory adds to the peak beyond measure.
  if (ranks > 1 && !test_helpers::under_sanitizer)
    MPI_CHECK_MSG(grew_kib < 16 * 1024, std::to_string(grew_kib));
}

void every_shape_arrives_whole(procpool::mpi::Pool& pool, procpool::Pool& local) {
  // Lent blocks at every place in a message: first, last, side by side,
  // between small fields, in nested containers.
  std::vector<Record> records;
  for (std::size_t i = 0; i < 6; ++i)
    records.push_back(record_of(i));
  MPI_CHECK(pool.map(&sum_record, records) == local.map(&sum_record, records));
  std::vector<std::vector<std::vector<char>>> nested(4);
  for (std::size_t i = 0; i < nested.size(); ++i) {
    for (std::size_t j = 0; j <= i; ++j)
      nested[i].push_back(block_of(mib + 5 * j, 10 * i + j));
  }
  MPI_CHECK(pool.map(&sum_blocks, nested) == local.map(&sum_blocks, nested));
  // SharedBuffer and SharedVector inputs go to another rank as bytes: lent.
  std::vector<procpool::SharedBuffer> shared;
  for (std::size_t i = 0; i < 3; ++i) {
    const std::vector<char> block = block_of(2 * mib + i, 20 + i);
    shared.emplace_back(block.size());
    std::memcpy(shared.back().data(), block.data(), block.size());
  }
  MPI_CHECK(pool.map(&checksum_shared, shared) == local.map(&checksum_shared, shared));
  // Blocks just below and at the size that is lent.
  std::vector<std::vector<char>> edges{block_of(mib - 1, 1), block_of(mib, 2),
                                       block_of(mib + 1, 3)};
  MPI_CHECK(pool.map(&checksum, edges) == local.map(&checksum, edges));
}

void inputs_that_are_not_kept_arrive_whole(procpool::mpi::Pool& pool) {
  std::vector<std::vector<char>> inputs;
  for (std::uint64_t i = 0; i < 6; ++i)
    inputs.push_back(block_of(3 * mib + i, i));
  std::vector<long> want;
  for (const auto& b : inputs)
    want.push_back(checksum(b));
  // Made by the range as it is read (temporaries: never lent).
  const auto copies = inputs | std::views::transform([](const auto& b) { return b; });
  MPI_CHECK(pool.map(&checksum, copies) == want);
  // References to one object the view refills for each input (found by
  // review: lent, every chunk's parts pointed at that one string).
  const auto refilled = std::views::iota(std::size_t{0}, inputs.size()) |
                        std::views::transform([&inputs](std::size_t i) -> const std::vector<char>& {
                          thread_local std::vector<char> one;
                          one = inputs[i];
                          return one;
                        });
  MPI_CHECK(pool.map(&checksum, refilled) == want);
  // A range the call owns (moved in): lent from the call's own copy.
  auto moved = inputs;
  MPI_CHECK(pool.map(&checksum, std::move(moved)) == want);
  // One at a time, each from a range that ends with its call.
  for (std::size_t i = 0; i < inputs.size(); ++i) {
    auto f = pool.submit(&checksum, block_of(3 * mib + i, i));
    MPI_CHECK(f.get() == want[i]);
  }
}

void the_caller_may_change_its_inputs_once_a_call_ends(procpool::mpi::Pool& pool) {
  const std::filesystem::path dir = std::filesystem::temp_directory_path() /
                                    ("procpool-mpi-inputs-" + std::to_string(::getpid()));
  std::filesystem::remove_all(dir);
  std::filesystem::create_directories(dir);
  std::vector<std::vector<char>> inputs;
  std::vector<long> want;
  for (std::uint64_t i = 0; i < 12; ++i) {
    inputs.push_back(block_of(16 * mib + i, i));
    want.push_back(checksum(inputs.back()));
  }
  {
    // Stopped at the first result: chunks to other ranks may still be on
    // their way. The call must not end before MPI is done with their bytes.
    for (long sum : pool.imap(&note_what_arrived, inputs, dir.string())) {
      MPI_CHECK(sum == want[0]);
      break;
    }
  }
  for (auto& block : inputs)
    std::memset(block.data() + sizeof(std::uint64_t), 'Z', block.size() - sizeof(std::uint64_t));
  pool.close();
  pool.join();
  std::size_t arrived = 0;
  for (const auto& entry : std::filesystem::directory_iterator(dir)) {
    const std::uint64_t id = std::stoull(entry.path().filename().string());
    MPI_CHECK(id < want.size());
    long seen = 0;
    std::ifstream(entry.path()) >> seen;
    MPI_CHECK_MSG(seen == want[id], "input " + std::to_string(id) + " arrived changed");
    ++arrived;
  }
  MPI_CHECK(arrived >= 1);
  std::printf("after an imap stopped early, %zu inputs had arrived, each as it was\n", arrived);
  std::filesystem::remove_all(dir);
}

}  // namespace

int main(int argc, char** argv) {
  procpool::mpi::Session session(argc, argv);
  const int ranks = session.size();
  {
    procpool::mpi::Pool pool({.processes = 1});
    large_inputs_are_held_once(pool, ranks);
    procpool::Pool local({.processes = 1});
    every_shape_arrives_whole(pool, local);
    inputs_that_are_not_kept_arrive_whole(pool);
  }
  {
    procpool::mpi::Pool pool({.processes = 1});
    the_caller_may_change_its_inputs_once_a_call_ends(pool);
  }
  std::printf("mpi_inputs: all passed\n");
  return 0;
}
