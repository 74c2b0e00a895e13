// SharedVector<T>: typed values handed between processes as memory files,
// without a copy, with everything SharedBuffer promises.
#include <gtest/gtest.h>
#include <procpool/procpool.hpp>

#include <cstring>
#include <numeric>
#include <ranges>
#include <span>
#include <stdexcept>
#include <string>
#include <tuple>
#include <vector>

#include "helpers.hpp"

using procpool::SharedBuffer;
using procpool::SharedVector;
using procpool::Start;
using test_helpers::mapped_from_memory_file;

namespace {

/// More than one 4 KiB page, and not a whole number of them.
constexpr std::size_t values_per_row = 300'001;

/// Row `row`: value i is row * 1e6 + i, and the last value the maker's pid.
SharedVector<double> make_row(int row) {
  SharedVector<double> out(values_per_row);
  for (std::size_t i = 0; i < out.size(); ++i)
    out[i] = row * 1e6 + static_cast<double>(i);
  out.back() = ::getpid();
  return out;
}

bool holds_row(std::span<const double> values, int row) {
  if (values.size() != values_per_row) return false;
  for (std::size_t i = 0; i + 1 < values.size(); ++i)
    if (values[i] != row * 1e6 + static_cast<double>(i)) return false;
  return true;
}

pid_t maker_of(const SharedVector<double>& values) {
  return static_cast<pid_t>(values.back());
}

}  // namespace

TEST(SharedVector, ContainerBasics) {
  SharedVector<int> zeros(5);
  EXPECT_EQ(zeros.size(), 5u);
  EXPECT_EQ(zeros.size_bytes(), 5 * sizeof(int));
  EXPECT_TRUE(std::ranges::all_of(zeros, [](int v) { return v == 0; }));
  SharedVector<int> sevens(4, 7);
  EXPECT_EQ(std::accumulate(sevens.begin(), sevens.end(), 0), 28);
  SharedVector<int> listed{1, 2, 3};
  EXPECT_EQ(listed.front(), 1);
  EXPECT_EQ(listed.back(), 3);
  EXPECT_EQ(listed.at(1), 2);
  EXPECT_THROW((void)listed.at(3), std::out_of_range);
  const std::vector<int> source{4, 5, 6};
  EXPECT_TRUE(std::ranges::equal(SharedVector<int>(std::span(source)), source));

  // clone() is independent of the original; release() hands the bytes over.
  SharedVector<int> copy = listed.clone();
  copy[0] = 100;
  EXPECT_EQ(listed[0], 1);
  EXPECT_FALSE(copy == listed);
  copy[0] = 1;
  EXPECT_TRUE(copy == listed);
  SharedBuffer bytes = copy.release();
  EXPECT_TRUE(copy.empty());
  EXPECT_EQ(bytes.size(), 3 * sizeof(int));
  EXPECT_EQ(SharedVector<int>(std::move(bytes)), listed);

  // Bytes that are not whole values are refused, and stay where they were.
  SharedBuffer odd(10);
  EXPECT_THROW(SharedVector<int>{std::move(odd)}, std::invalid_argument);
  EXPECT_EQ(odd.size(), 10u);
  EXPECT_THROW(SharedVector<double>(std::size_t{1} << 62), std::length_error);
  EXPECT_TRUE(SharedVector<char>().empty());
}

TEST(SharedVector, MapHandsTypedResultsOverWithoutCopying) {
  const auto rows = procpool::map(make_row, std::views::iota(0, 5), {.processes = 2});
  ASSERT_EQ(rows.size(), 5u);
  for (int r = 0; r < 5; ++r) {
    const SharedVector<double>& row = rows[static_cast<std::size_t>(r)];
    EXPECT_TRUE(holds_row(row, r)) << r;
    EXPECT_NE(maker_of(row), ::getpid());
    EXPECT_TRUE(mapped_from_memory_file(row.data())) << r;
  }
  // The caller's to write: its pages turn its own.
  SharedVector<double> mine =
      std::move(procpool::map(make_row, std::vector{9}, {.processes = 1})[0]);
  mine[10] = -1.0;
  EXPECT_EQ(mine[10], -1.0);
  EXPECT_EQ(mine[11], 9e6 + 11);
}

TEST(SharedVector, PoolMapImapOutcomesAndSubmit) {
  procpool::Pool pool({.processes = 2});
  const auto rows = pool.map(make_row, std::vector{1, 2, 3});
  for (int r = 0; r < 3; ++r) {
    EXPECT_TRUE(holds_row(rows[static_cast<std::size_t>(r)], r + 1));
    EXPECT_TRUE(mapped_from_memory_file(rows[static_cast<std::size_t>(r)].data()));
  }
  int seen = 0;
  for (const SharedVector<double>& row : pool.imap(make_row, std::views::iota(0, 4)))
    EXPECT_TRUE(holds_row(row, seen++));
  EXPECT_EQ(seen, 4);

  const auto outcomes = pool.map_outcomes(
      [](int r) {
        if (r == 1) throw std::runtime_error("row 1 is missing");
        return make_row(r);
      },
      std::vector{0, 1, 2});
  EXPECT_TRUE(outcomes[0].ok() && holds_row(*outcomes[0].value, 0));
  EXPECT_FALSE(outcomes[1].ok());
  EXPECT_NE(outcomes[1].what().find("row 1 is missing"), std::string::npos);
  EXPECT_TRUE(outcomes[2].ok() && holds_row(*outcomes[2].value, 2));

  SharedVector<double> submitted = pool.submit(make_row, 6).get();
  EXPECT_TRUE(holds_row(submitted, 6));
  EXPECT_TRUE(mapped_from_memory_file(submitted.data()));
}

namespace {

/// What a worker saw of a SharedVector input: its sum, and whether it maps
/// the caller's memory file (no copy).
std::pair<long long, bool> sum_of(const SharedVector<int>& values) {
  return {std::accumulate(values.begin(), values.end(), 0LL),
          mapped_from_memory_file(values.data())};
}

}  // namespace

TEST(SharedVector, APoolsWorkersMapTheCallersVectors) {
  procpool::Pool pool({.processes = 2});  // forked before the vectors exist
  std::vector<SharedVector<int>> inputs;
  for (int i = 0; i < 4; ++i) {
    SharedVector<int> values(100'000);
    std::iota(values.begin(), values.end(), i);
    inputs.push_back(std::move(values));
  }
  const auto seen = pool.map(&sum_of, inputs);
  for (int i = 0; i < 4; ++i) {
    const long long expected = 100'000LL * i + 100'000LL * 99'999 / 2;
    EXPECT_EQ(seen[static_cast<std::size_t>(i)].first, expected) << i;
    EXPECT_TRUE(seen[static_cast<std::size_t>(i)].second) << "input " << i << " was copied";
  }
}

TEST(SharedVector, AResultSentOnToAPoolIsNotCopied) {
  procpool::Pool pool({.processes = 1});
  std::vector<SharedVector<int>> made = pool.map(
      [](int n) {
        SharedVector<int> values(static_cast<std::size_t>(n));
        std::iota(values.begin(), values.end(), 0);
        return values;
      },
      std::vector{50'000, 70'000});
  const auto seen = pool.map(&sum_of, made);
  EXPECT_EQ(seen[0], (std::pair<long long, bool>{50'000LL * 49'999 / 2, true}));
  EXPECT_EQ(seen[1], (std::pair<long long, bool>{70'000LL * 69'999 / 2, true}));
}

TEST(SharedVector, InProcessAndSpawnedWorkers) {
  const auto local = procpool::map(make_row, std::vector{3}, {.start = Start::in_process});
  EXPECT_TRUE(holds_row(local[0], 3));
  EXPECT_EQ(maker_of(local[0]), ::getpid());
  procpool::Pool spawned({.processes = 1, .start = Start::spawn});
  const SharedVector<double> row = spawned.submit(make_row, 4).get();
  EXPECT_TRUE(holds_row(row, 4));
  EXPECT_TRUE(mapped_from_memory_file(row.data()));
}

namespace {

struct Labelled {
  std::string label;
  SharedVector<float> values;
  template <class Archive>
  void serialize(Archive& archive) {
    archive(label, values);
  }
};

}  // namespace

TEST(SharedVector, InsideOtherResultsAndThroughCereal) {
  const auto pairs = procpool::map(
      [](int r) {
        return std::tuple{r, make_row(r)};
      },
      std::vector{1, 2}, {.processes = 2});
  EXPECT_TRUE(holds_row(std::get<1>(pairs[1]), 2));
  EXPECT_TRUE(mapped_from_memory_file(std::get<1>(pairs[1]).data()));
  const auto labelled = procpool::map(
      [](int n) {
        return Labelled{"n=" + std::to_string(n),
                        SharedVector<float>(static_cast<std::size_t>(n), 0.5f)};
      },
      std::vector{3}, {.processes = 1});
  EXPECT_EQ(labelled[0].label, "n=3");
  EXPECT_EQ(labelled[0].values, (SharedVector<float>{0.5f, 0.5f, 0.5f}));
}
