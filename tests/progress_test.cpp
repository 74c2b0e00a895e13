// Progress: the log-file form, the callback form, and no cost when off.
#include <gtest/gtest.h>
#include <procpool/procpool.hpp>

#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

#include "helpers.hpp"

namespace {

int sleepy(int x) {
  std::this_thread::sleep_for(std::chrono::milliseconds(5));
  return x;
}

TEST(Progress, LogFormHasPlainLinesPerTenPercentAndAFinalLine) {
  std::string log = test_helpers::output_of(STDERR_FILENO, [] {
    procpool::map(sleepy, std::vector<int>(200),
                  {.processes = 2, .chunksize = 1, .progress = procpool::Progress::on});
  });
  EXPECT_EQ(log.find('\r'), std::string::npos) << "carriage returns in a log";
  EXPECT_EQ(log.find('\x1b'), std::string::npos) << "escape codes in a log";
  std::istringstream lines(log);
  int count = 0;
  std::string line, last;
  while (std::getline(lines, line)) {
    EXPECT_EQ(line.rfind("procpool: ", 0), 0u) << line;
    ++count;
    last = line;
  }
  EXPECT_GE(count, 5) << log;   // one per 10 % of a ~0.5 s run, at least several
  EXPECT_LE(count, 12) << log;  // never one per task
  EXPECT_NE(last.find("200/200 tasks (100%)"), std::string::npos) << last;
  EXPECT_NE(last.find("done"), std::string::npos) << last;
}

TEST(Progress, AutomaticIsSilentWhenStderrIsNotATerminal) {
  std::string log = test_helpers::output_of(STDERR_FILENO, [] {
    procpool::map(sleepy, std::vector<int>(20), {.progress = procpool::Progress::automatic});
  });
  EXPECT_EQ(log, "");
}

TEST(Progress, CallbackSeesCountsRateAndAFinalCall) {
  std::vector<procpool::ProgressInfo> seen;
  procpool::map(sleepy, std::vector<int>(100),
                {.processes = 2,
                 .chunksize = 1,
                 .progress = [&seen](const procpool::ProgressInfo& p) { seen.push_back(p); }});
  ASSERT_GE(seen.size(), 2u);
  EXPECT_LE(seen.size(), 20u) << "redrawn more than ~10 times a second";
  const auto& last = seen.back();
  EXPECT_TRUE(last.finished);
  EXPECT_EQ(last.done, 100u);
  EXPECT_EQ(last.total, std::optional<std::size_t>(100));
  EXPECT_GT(last.rate, 50.0);
  for (std::size_t i = 1; i < seen.size(); ++i)
    EXPECT_GE(seen[i].done, seen[i - 1].done);
}

TEST(Progress, UnknownTotalForAnEndlessInput) {
  std::vector<procpool::ProgressInfo> seen;
  int n = 0;
  for (int v : procpool::imap(
           [](int x) { return x; }, std::views::iota(0),
           {.processes = 2,
           .progress = [&seen](const procpool::ProgressInfo& p) { seen.push_back(p); }})) {
    (void)v;
    if (++n == 1000) break;
  }
  ASSERT_FALSE(seen.empty());
  EXPECT_FALSE(seen.back().total.has_value());
  EXPECT_TRUE(seen.back().finished);
}

TEST(Progress, PoolCallsShowProgressToo) {
  std::string log = test_helpers::output_of(STDERR_FILENO, [] {
    procpool::Pool pool({.processes = 2, .progress = procpool::Progress::on});
    pool.map(sleepy, std::vector<int>(40));
  });
  EXPECT_NE(log.find("40/40 tasks (100%)"), std::string::npos) << log;
}

TEST(Progress, AFailedCallEndsItsLine) {
  std::string log = test_helpers::output_of(STDERR_FILENO, [] {
    try {
      procpool::map([](int x) -> int { throw std::runtime_error(std::to_string(x)); },
                    std::vector<int>(10), {.processes = 1, .progress = procpool::Progress::on});
    } catch (const procpool::TaskError&) {
    }
  });
  EXPECT_NE(log.find("failed"), std::string::npos) << log;
  EXPECT_EQ(log.back(), '\n');
}

}  // namespace
