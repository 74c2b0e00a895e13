// A hostile machine: workers killed from outside in a storm, workers that die
// as they start. Deaths cost the tasks that were running, never the run.
#include <gtest/gtest.h>
#include <procpool/procpool.hpp>

#include <atomic>
#include <chrono>
#include <csignal>
#include <cstdlib>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include "helpers.hpp"

namespace {

std::vector<std::string> storm_inputs() {
  std::vector<std::string> in(20000);
  for (std::size_t i = 0; i < in.size(); ++i)
    in[i] = "item" + std::to_string(i);
  return in;
}

// Every 50th result is 200 KB, so some replies take the shared arena and
// take long enough to write that kills land in the middle of them.
std::string storm_task(const std::string& s) {
  const std::size_t n = std::stoul(s.substr(4));
  return n % 50 == 0 ? std::string(200000, static_cast<char>('a' + n % 26)) : s + "!";
}

/// Kills a random one of `pids()` with SIGKILL every 10 ms until destroyed.
template <class Pids>
class KillStorm {
 public:
  explicit KillStorm(Pids pids)
      : thread_([this, pids] {
          std::mt19937 random(12345);
          while (!stop_) {
            std::this_thread::sleep_for(std::chrono::milliseconds(10));
            const std::vector<pid_t> targets = pids();
            if (targets.empty()) continue;
            if (::kill(targets[random() % targets.size()], SIGKILL) == 0) ++kills_;
          }
        }) {}
  ~KillStorm() {
    stop_ = true;
    thread_.join();
  }
  int kills() const { return kills_; }

 private:
  std::atomic<bool> stop_{false};
  std::atomic<int> kills_{0};
  std::thread thread_;
};

void expect_storm_results(const std::vector<std::string>& in, const std::vector<std::string>& out) {
  ASSERT_EQ(out.size(), in.size());
  std::size_t wrong = 0;
  for (std::size_t i = 0; i < in.size(); ++i)
    wrong += out[i] == storm_task(in[i]) ? 0 : 1;
  EXPECT_EQ(wrong, 0u);
}

std::vector<pid_t> live_children() {
  std::vector<pid_t> pids;
  for (const auto& child : test_helpers::children()) {
    if (child.state != 'Z') pids.push_back(child.pid);
  }
  return pids;
}

TEST(KillStorm, ForkPerCallMapLosesNothing) {
  // The reproduction: a kill every 10 ms used to end the call within
  // seconds with "workers keep dying before they finish any task".
  const std::vector<std::string> in = storm_inputs();
  std::vector<std::string> out;
  int kills = 0;
  {
    KillStorm storm(&live_children);
    out = procpool::map(&storm_task, in, {.processes = 2, .retries = 50});
    kills = storm.kills();
  }
  expect_storm_results(in, out);
  EXPECT_GT(kills, 0) << "the storm never hit a worker: the test proves nothing";
}

TEST(KillStorm, PoolLosesNothing) {
  const std::vector<std::string> in = storm_inputs();
  procpool::Pool pool({.processes = 2, .retries = 50});
  std::vector<std::string> out;
  int kills = 0;
  {
    KillStorm storm([&pool] { return pool.worker_pids(); });
    out = pool.map(&storm_task, in);
    kills = storm.kills();
  }
  expect_storm_results(in, out);
  EXPECT_GT(kills, 0) << "the storm never hit a worker: the test proves nothing";
  // And the pool is still whole afterwards.
  EXPECT_EQ(pool.map([](int x) { return x + 1; }, std::vector<int>{1, 2, 3}),
            (std::vector<int>{2, 3, 4}));
}

int dies_while_starting() {
  std::_Exit(3);  // as an initializer that crashes would
}

TEST(StartUp, WorkersThatDieWhileStartingEndTheCallWithAClearError) {
  procpool::Pool pool({.processes = 2}, &dies_while_starting);
  const auto start = std::chrono::steady_clock::now();
  try {
    (void)pool.map([](int&, int x) { return x; }, std::vector<int>{1, 2, 3});
    FAIL() << "no error";
  } catch (const procpool::Error& e) {
    const std::string what = e.what();
    EXPECT_NE(what.find("new workers in a row died while starting"), std::string::npos) << what;
    EXPECT_NE(what.find("exited with status 3"), std::string::npos) << what;
    EXPECT_NE(what.find("check the pool's initializer"), std::string::npos) << what;
  }
  EXPECT_LT(std::chrono::steady_clock::now() - start, std::chrono::seconds(10));
}

}  // namespace
