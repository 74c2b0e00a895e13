// Results must never be silently wrong: a value that fails to encode or
// decode, an input range that throws, a progress callback that throws. Each
// costs what it touches and says so; its neighbours stay right.
#include <gtest/gtest.h>
#include <procpool/procpool.hpp>

#include <sys/mman.h>
#include <unistd.h>

#include <atomic>
#include <chrono>
#include <csignal>
#include <list>
#include <numeric>
#include <ranges>
#include <set>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

#include "helpers.hpp"

namespace {

using Stage = procpool::TaskError::Stage;

/// Writes a, b; its load() reads a, then refuses a == 2 before reading b, and
/// for a == 5 reads a alone (so it reads fewer bytes than were written).
struct In {
  int a = 0;
  int b = 0;
  std::string unsent;  // not trivially copyable: the value travels through save() and load()
  template <class Archive>
  void save(Archive& ar) const {
    ar(a, b);
  }
  template <class Archive>
  void load(Archive& ar) {
    ar(a);
    if (a == 2) throw std::runtime_error("In::load refuses 2");
    if (a == 5) return;
    ar(b);
  }
};

long weigh(const In& x) {
  return x.a * 100000L + x.b;
}

std::vector<In> make_inputs(int n) {
  std::vector<In> v;
  for (int i = 0; i < n; ++i)
    v.push_back(In{i, 1000 + i, {}});
  return v;
}

/// What weigh() gives for input i when every input is decoded from its own bytes.
long expected_weight(int i) {
  return i == 5 ? 500000L : i * 100000L + 1000 + i;
}

const char* const decode_input_2 =
    "procpool: decoding input 2 in the worker failed: std::runtime_error: In::load refuses 2; the "
    "task did not run. Check that the input type's load() reads what its save() writes";

template <class Outcomes>
void expect_only_input_2_failed(const Outcomes& outcomes) {
  ASSERT_EQ(outcomes.size(), 8u);
  for (int i = 0; i < 8; ++i) {
    const auto& o = outcomes[static_cast<std::size_t>(i)];
    EXPECT_EQ(o.index, static_cast<std::size_t>(i));
    if (i == 2) {
      ASSERT_FALSE(o.ok());
      EXPECT_EQ(o.what(), decode_input_2);
      try {
        std::rethrow_exception(o.error);
      } catch (const procpool::TaskError& e) {
        EXPECT_EQ(e.index(), 2u);
        EXPECT_EQ(e.stage(), Stage::deserialize_input);
        EXPECT_EQ(e.type_name(), "std::runtime_error");
        EXPECT_EQ(e.remote_what(), "In::load refuses 2");
      }
    } else {
      ASSERT_TRUE(o.ok()) << i << ": " << o.what();
      EXPECT_EQ(*o.value, expected_weight(i)) << "input " << i;
    }
  }
}

TEST(InputDecoding, AFailureInAChunkCostsThatInputAloneInAPool) {
  procpool::Pool pool({.processes = 2, .chunksize = 4});
  expect_only_input_2_failed(pool.map_outcomes(weigh, make_inputs(8)));
}

TEST(InputDecoding, AFailureInAChunkCostsThatInputAloneForkPerCall) {
  const std::vector<In> v = make_inputs(8);
  std::list<In> inputs(v.begin(), v.end());  // not random access: the inputs are serialised
  expect_only_input_2_failed(
      procpool::map_outcomes(weigh, inputs, {.processes = 2, .chunksize = 4}));
}

TEST(InputDecoding, MapThrowsNamingTheInputAndTheStage) {
  procpool::Pool pool({.processes = 2, .chunksize = 4});
  try {
    pool.map(weigh, make_inputs(8));
    FAIL() << "no exception";
  } catch (const procpool::TaskError& e) {
    EXPECT_EQ(e.index(), 2u);
    EXPECT_EQ(e.stage(), Stage::deserialize_input);
    EXPECT_STREQ(e.what(), decode_input_2);
  }
}

/// A flag that the parent and every worker share, to crash a worker only once.
struct Shared {
  Shared() {
    void* p = ::mmap(nullptr, sizeof(std::atomic<bool>), PROT_READ | PROT_WRITE,
                     MAP_SHARED | MAP_ANONYMOUS, -1, 0);
    flag = new (p) std::atomic<bool>(false);
  }
  ~Shared() { ::munmap(flag, sizeof(std::atomic<bool>)); }
  std::atomic<bool>* flag;
};

TEST(InputDecoding, RetriedChunksAreSplitAtInputBoundaries) {
  // A crash makes the engine split the chunk by offsets and rerun the rest:
  // the framed inputs must still be read one by one.
  Shared crashed;
  const std::vector<In> v = make_inputs(8);
  std::list<In> inputs(v.begin(), v.end());
  auto outcomes = procpool::map_outcomes(
      [&](const In& x) {
        if (x.a == 6 && !crashed.flag->exchange(true)) ::_exit(3);
        return weigh(x);
      },
      inputs, {.processes = 2, .chunksize = 8, .retries = 1});
  expect_only_input_2_failed(outcomes);
}

/// A result whose save() refuses 1 and whose load() refuses 2 (anything but
/// ProtocolError), and reads only `v` for 5.
struct Res {
  int v = 0;
  int w = 0;
  std::string unsent;  // not trivially copyable: the value travels through save() and load()
  template <class Archive>
  void save(Archive& ar) const {
    if (v == 1) throw std::runtime_error("Res::save refuses 1");
    ar(v, w);
  }
  template <class Archive>
  void load(Archive& ar) {
    ar(v);
    if (v == 2) throw std::logic_error("Res::load refuses 2");
    if (v == 5) return;
    ar(w);
  }
};

Res make_res(int i) {
  return Res{i, 10 * i, {}};
}

const char* const serialize_result_1 =
    "procpool: task 1 returned, but serialising its result in the worker failed: "
    "std::runtime_error: Res::save refuses 1. Check the result type's save()";
const char* const deserialize_result_2 =
    "procpool: task 2 returned, but decoding its result in the caller failed: std::logic_error: "
    "Res::load refuses 2. Check that the result type's load() reads what its save() writes";

template <class Outcomes>
void expect_results_1_and_2_failed(const Outcomes& outcomes) {
  ASSERT_EQ(outcomes.size(), 8u);
  for (int i = 0; i < 8; ++i) {
    const auto& o = outcomes[static_cast<std::size_t>(i)];
    EXPECT_EQ(o.index, static_cast<std::size_t>(i));
    if (i == 1 || i == 2) {
      ASSERT_FALSE(o.ok()) << i;
      EXPECT_EQ(o.what(), i == 1 ? serialize_result_1 : deserialize_result_2);
      try {
        std::rethrow_exception(o.error);
      } catch (const procpool::TaskError& e) {
        EXPECT_EQ(e.index(), static_cast<std::size_t>(i));
        EXPECT_EQ(e.stage(), i == 1 ? Stage::serialize_result : Stage::deserialize_result);
      }
    } else {
      ASSERT_TRUE(o.ok()) << i << ": " << o.what();
      EXPECT_EQ(o.value->v, i);
      EXPECT_EQ(o.value->w, i == 5 ? 0 : 10 * i) << "result " << i;
    }
  }
}

TEST(ResultSerialisation, FailuresCostThatResultAloneForkPerCall) {
  expect_results_1_and_2_failed(procpool::map_outcomes(
      make_res, std::vector<int>{0, 1, 2, 3, 4, 5, 6, 7}, {.processes = 2, .chunksize = 4}));
}

TEST(ResultSerialisation, FailuresCostThatResultAloneInAPool) {
  procpool::Pool pool({.processes = 2, .chunksize = 4});
  expect_results_1_and_2_failed(
      pool.map_outcomes(make_res, std::vector<int>{0, 1, 2, 3, 4, 5, 6, 7}));
}

TEST(ResultSerialisation, FailuresCostThatResultAloneInProcess) {
  expect_results_1_and_2_failed(procpool::map_outcomes(
      make_res, std::vector<int>{0, 1, 2, 3, 4, 5, 6, 7},
      {.processes = 2, .chunksize = 4, .start = procpool::Start::in_process}));
}

TEST(ResultSerialisation, MapSaysWhichStageFailed) {
  for (int failing : {1, 2}) {
    std::vector<int> inputs{0, failing, 3};
    try {
      procpool::map(make_res, inputs, {.processes = 2, .chunksize = 3});
      FAIL() << "no exception";
    } catch (const procpool::TaskError& e) {
      EXPECT_EQ(e.index(), 1u);
      EXPECT_EQ(e.stage(), failing == 1 ? Stage::serialize_result : Stage::deserialize_result);
      const std::string what = e.what();
      EXPECT_EQ(what, failing == 1 ? std::string(serialize_result_1)
                                   : std::string(deserialize_result_2).replace(15, 1, "1"));
    }
  }
}

// ---- a progress callback that throws ----

int slow_square(int x) {
  std::this_thread::sleep_for(std::chrono::milliseconds(20));
  return x * x;
}

std::vector<int> iota_vector(int n) {
  std::vector<int> v(static_cast<std::size_t>(n));
  std::iota(v.begin(), v.end(), 0);
  return v;
}

TEST(ProgressCallback, ThrowingMidCallReachesTheCallerAfterTheWorkersStopped) {
  int calls = 0;
  try {
    procpool::map(slow_square, iota_vector(200),
                  {.processes = 2, .chunksize = 1, .progress = [&](const procpool::ProgressInfo&) {
                     ++calls;
                     throw std::runtime_error("progress callback failed");
                   }});
    FAIL() << "no exception";
  } catch (const std::runtime_error& e) {
    EXPECT_STREQ(e.what(), "progress callback failed");
  }
  EXPECT_EQ(calls, 1);  // not called again while the call was cleaned up
  EXPECT_TRUE(test_helpers::children().empty()) << "workers left behind";
}

TEST(ProgressCallback, ThrowingOnTheFinalCallReachesTheCaller) {
  int calls = 0;
  std::vector<bool> finished;
  try {
    procpool::map([](int x) { return x; }, iota_vector(10),
                  {.processes = 2, .progress = [&](const procpool::ProgressInfo& info) {
                     ++calls;
                     finished.push_back(info.finished);
                     throw std::runtime_error("progress callback failed at the end");
                   }});
    FAIL() << "no exception";
  } catch (const std::runtime_error& e) {
    EXPECT_STREQ(e.what(), "progress callback failed at the end");
  }
  EXPECT_EQ(calls, 1);
  EXPECT_EQ(finished, std::vector<bool>{true});
}

TEST(ProgressCallback, ThrowingInAPoolStopsThatCallAndThePoolGoesOn) {
  int calls = 0;
  bool thrown = false;
  procpool::Pool pool(
      {.processes = 2, .chunksize = 1, .progress = [&](const procpool::ProgressInfo&) {
         ++calls;
         if (!thrown) {
           thrown = true;
           throw std::runtime_error("progress callback failed");
         }
       }});
  try {
    pool.map(slow_square, iota_vector(200));
    FAIL() << "no exception";
  } catch (const std::runtime_error& e) {
    EXPECT_STREQ(e.what(), "progress callback failed");
  }
  EXPECT_EQ(calls, 1);
  EXPECT_EQ(pool.map([](int x) { return x + 1; }, std::vector<int>{1, 2, 3}),
            (std::vector<int>{2, 3, 4}));
  EXPECT_GE(calls, 2);
}

// ---- an input range that throws (CPython's test_*_handle_iterable_exception) ----

struct SayWhenError : std::runtime_error {
  using std::runtime_error::runtime_error;
};

/// 0, 1, ... n-1 that throws SayWhenError when it reaches `when`; not random
/// access, so fork per call must read and send it like a Pool does.
auto throwing_range(int n, int when) {
  return std::views::iota(0, n) | std::views::filter([](int) { return true; }) |
         std::views::transform([when](int i) {
           if (i == when) throw SayWhenError("the input range failed at " + std::to_string(i));
           return i;
         });
}

/// The same, for inputs that are serialised one by one rather than copied raw.
auto throwing_strings(int n, int when) {
  return throwing_range(n, when) | std::views::transform([](int i) { return std::to_string(i); });
}

int square(int x) {
  return x * x;
}
int square_text(const std::string& s) {
  return std::stoi(s) * std::stoi(s);
}

/// Takes results from `results` until it throws; returns them, and expects SayWhenError.
template <class Results>
std::vector<int> take_until_throw(Results&& results, const std::string& message) {
  std::vector<int> got;
  try {
    for (auto value : results) {
      if constexpr (std::is_same_v<decltype(value), int>) {
        got.push_back(value);
      } else {
        got.push_back(value.value);
      }
    }
    ADD_FAILURE() << "no exception";
  } catch (const SayWhenError& e) {
    EXPECT_EQ(e.what(), message);
  }
  return got;
}

TEST(ThrowingInputRange, ImapYieldsEveryResultBeforeTheFailureThenThrowsForkPerCall) {
  const procpool::Options options{.processes = 2, .chunksize = 1};
  EXPECT_EQ(take_until_throw(procpool::imap(square, throwing_range(10, 3), options),
                             "the input range failed at 3"),
            (std::vector<int>{0, 1, 4}));
  EXPECT_EQ(take_until_throw(procpool::imap(square_text, throwing_strings(10, 3), options),
                             "the input range failed at 3"),
            (std::vector<int>{0, 1, 4}));
  // Larger chunks: every input read before the failure still gets its result.
  EXPECT_EQ(take_until_throw(
                procpool::imap(square, throwing_range(20, 7), {.processes = 2, .chunksize = 2}),
                "the input range failed at 7"),
            (std::vector<int>{0, 1, 4, 9, 16, 25, 36}));
  EXPECT_TRUE(test_helpers::children().empty());
}

TEST(ThrowingInputRange, ImapYieldsEveryResultBeforeTheFailureThenThrowsInAPool) {
  procpool::Pool pool({.processes = 2, .chunksize = 1});
  EXPECT_EQ(
      take_until_throw(pool.imap(square, throwing_range(10, 3)), "the input range failed at 3"),
      (std::vector<int>{0, 1, 4}));
  EXPECT_EQ(take_until_throw(pool.imap(square_text, throwing_strings(10, 3)),
                             "the input range failed at 3"),
            (std::vector<int>{0, 1, 4}));
  procpool::Pool pairs({.processes = 2, .chunksize = 3});
  EXPECT_EQ(
      take_until_throw(pairs.imap(square, throwing_range(20, 7)), "the input range failed at 7"),
      (std::vector<int>{0, 1, 4, 9, 16, 25, 36}));
}

TEST(ThrowingInputRange, ImapUnorderedYieldsEveryResultBeforeTheFailure) {
  auto sorted = [](std::vector<int> v) {
    std::sort(v.begin(), v.end());
    return v;
  };
  EXPECT_EQ(sorted(take_until_throw(procpool::imap_unordered(square, throwing_range(10, 3),
                                                             {.processes = 2, .chunksize = 1}),
                                    "the input range failed at 3")),
            (std::vector<int>{0, 1, 4}));
  procpool::Pool pool({.processes = 2, .chunksize = 1});
  EXPECT_EQ(sorted(take_until_throw(pool.imap_unordered(square, throwing_range(10, 3)),
                                    "the input range failed at 3")),
            (std::vector<int>{0, 1, 4}));
}

TEST(ThrowingInputRange, MapThrowsTheRangesExceptionAndThePoolStaysUsable) {
  for (int when : {0, 3}) {
    EXPECT_THROW(procpool::map(square, throwing_range(10, when), {.processes = 2, .chunksize = 1}),
                 SayWhenError);
    EXPECT_THROW((void)procpool::map_outcomes(square, throwing_range(10, when), {.processes = 2}),
                 SayWhenError);
  }
  procpool::Pool pool({.processes = 2, .chunksize = 1});
  for (int again = 0; again < 2; ++again) {  // reentrant, as CPython checks
    EXPECT_THROW(pool.map(square, throwing_range(1, 0)), SayWhenError);
    EXPECT_THROW(pool.map(square, throwing_range(10, 3)), SayWhenError);
  }
  EXPECT_EQ(pool.map(square, std::vector<int>{1, 2, 3}), (std::vector<int>{1, 4, 9}));
}

/// An input whose save() refuses 3 (CPython's test_map_unplicklable).
struct Unsendable {
  int a = 0;
  std::string unsent;  // not trivially copyable: the value travels through save() and load()
  template <class Archive>
  void save(Archive& ar) const {
    if (a == 3) throw std::runtime_error("Unsendable::save refuses 3");
    ar(a);
  }
  template <class Archive>
  void load(Archive& ar) {
    ar(a);
  }
};

int unwrap(const Unsendable& u) {
  return u.a * 10;
}

const char* const serialize_input_3 =
    "procpool: serialising input 3 in the caller failed: std::runtime_error: Unsendable::save "
    "refuses 3; the task did not run. Check the input type's save()";

std::list<Unsendable> unsendables(int n) {
  std::list<Unsendable> v;
  for (int i = 0; i < n; ++i)
    v.push_back(Unsendable{i, {}});
  return v;
}

template <class Results>
std::vector<int> take_until_task_error(Results&& results) {
  std::vector<int> got;
  try {
    for (int value : results)
      got.push_back(value);
    ADD_FAILURE() << "no exception";
  } catch (const procpool::TaskError& e) {
    EXPECT_EQ(e.index(), 3u);
    EXPECT_EQ(e.stage(), Stage::serialize_input);
    EXPECT_STREQ(e.what(), serialize_input_3);
  }
  return got;
}

template <class Outcomes>
void expect_only_input_3_unsent(const Outcomes& outcomes) {
  ASSERT_EQ(outcomes.size(), 8u);
  for (int i = 0; i < 8; ++i) {
    const auto& o = outcomes[static_cast<std::size_t>(i)];
    EXPECT_EQ(o.index, static_cast<std::size_t>(i));
    if (i == 3) {
      EXPECT_EQ(o.what(), serialize_input_3);
    } else {
      ASSERT_TRUE(o.ok()) << o.what();
      EXPECT_EQ(*o.value, 10 * i);
    }
  }
}

TEST(InputSerialisation, ImapYieldsTheResultsBeforeThenThrowsForkPerCall) {
  auto inputs = unsendables(8);
  EXPECT_EQ(take_until_task_error(procpool::imap(unwrap, inputs, {.processes = 2, .chunksize = 1})),
            (std::vector<int>{0, 10, 20}));
  expect_only_input_3_unsent(
      procpool::map_outcomes(unwrap, inputs, {.processes = 2, .chunksize = 4}));
  EXPECT_TRUE(test_helpers::children().empty());
}

TEST(InputSerialisation, ImapYieldsTheResultsBeforeThenThrowsInAPool) {
  procpool::Pool pool({.processes = 2, .chunksize = 1});
  EXPECT_EQ(take_until_task_error(pool.imap(unwrap, unsendables(8))),
            (std::vector<int>{0, 10, 20}));
  procpool::Pool fours({.processes = 2, .chunksize = 4});
  expect_only_input_3_unsent(fours.map_outcomes(unwrap, unsendables(8)));
  // Nothing can be sent: an error, not a hang.
  std::vector<Unsendable> all(10, Unsendable{3, {}});
  try {
    fours.map(unwrap, all);
    FAIL() << "no exception";
  } catch (const procpool::TaskError& e) {
    EXPECT_EQ(e.index(), 0u);
    EXPECT_EQ(e.stage(), Stage::serialize_input);
  }
  EXPECT_EQ(fours.map(unwrap, unsendables(3)), (std::vector<int>{0, 10, 20}));
}

// An extra argument is decoded once in each worker, before the call's first
// task there (loky's crash_cases pass such objects as the argument). One
// whose load() kills or hangs its worker fails the call, not input after
// input: each input used to cost its worker (and its retries' workers) in
// turn, and a hang was never timed out, since no task was running.

/// Set, for how == 3, to a flag shared with the workers.
std::atomic<bool>* killed_once = nullptr;

/// Its load() does, in the worker that decodes it: 0 nothing, 1 _exit(3),
/// 2 hang, 3 SIGKILL its worker the first time (as a kill storm would).
struct WorkerBomb {
  int how = 0;
  std::string unsent;  // not trivially copyable: the value travels through save() and load()
  template <class Archive>
  void save(Archive& ar) const {
    ar(how);
  }
  template <class Archive>
  void load(Archive& ar) {
    ar(how);
    if (how == 1) ::_exit(3);
    while (how == 2)
      ::pause();
    if (how == 3 && !killed_once->exchange(true)) ::raise(SIGKILL);
  }
};

int plus_bomb(int x, const WorkerBomb& bomb) {
  return x + bomb.how;
}

unsigned crashes_in(const procpool::Insights& insights) {
  unsigned n = 0;
  for (const procpool::WorkerInsights& w : insights.workers)
    n += w.crashes;
  return n;
}

/// Every outcome a WorkerCrashed whose call's setup killed `fewest` to
/// `most` workers (each death after the first that fails the call counts too).
template <class Outcomes>
void expect_all_died_in_setup(const Outcomes& outcomes, std::size_t n, unsigned fewest,
                              unsigned most) {
  ASSERT_EQ(outcomes.size(), n);
  for (std::size_t i = 0; i < n; ++i) {
    ASSERT_FALSE(outcomes[i].ok()) << i;
    try {
      std::rethrow_exception(outcomes[i].error);
    } catch (const procpool::WorkerCrashed& e) {
      EXPECT_EQ(e.index(), i);
      EXPECT_EQ(e.exit_status(), 3);
      const std::string said = " died decoding the call's extra arguments";
      const std::string& seen = e.observed();
      const unsigned deaths = static_cast<unsigned>(std::atoi(seen.c_str()));
      EXPECT_TRUE(deaths >= fewest && deaths <= most) << seen;
      EXPECT_EQ(seen, std::to_string(deaths) + (deaths == 1 ? " worker" : " workers") + said);
      EXPECT_NE(std::string(e.what()).find("task " + std::to_string(i) + " never ran"),
                std::string::npos)
          << e.what();
    } catch (const std::exception& e) {
      ADD_FAILURE() << i << ": " << e.what();
    }
  }
}

TEST(ExtraArguments, OneWhoseLoadKillsItsWorkerCostsTheCallOneDeathPerWorkerNotOnePerInput) {
  procpool::Pool pool({.processes = 2, .chunksize = 1});
  const std::vector<int> inputs(200, 1);
  expect_all_died_in_setup(pool.map_outcomes(plus_bomb, inputs, WorkerBomb{1, {}}), inputs.size(),
                           1, 2);
  // Both workers had the setup before the first died; no new one gets it.
  EXPECT_LE(crashes_in(pool.insights()), 2u);
  EXPECT_EQ(pool.map(plus_bomb, std::vector{1, 2, 3}, WorkerBomb{0, {}}), (std::vector{1, 2, 3}));
  try {
    (void)pool.submit(plus_bomb, 7, WorkerBomb{1, {}}).get();
    FAIL() << "no exception";
  } catch (const procpool::WorkerCrashed& e) {
    EXPECT_EQ(e.index(), 0u);
    EXPECT_EQ(e.exit_status(), 3);
  }
  EXPECT_EQ(pool.submit(plus_bomb, 7, WorkerBomb{0, {}}).get(), 7);
}

TEST(ExtraArguments, RetriesGiveTheSetupThatManyMoreWorkers) {
  procpool::Pool pool({.processes = 1, .chunksize = 3, .retries = 2});
  expect_all_died_in_setup(pool.map_outcomes(plus_bomb, std::vector<int>(10, 1), WorkerBomb{1, {}}),
                           10, 3, 3);
  EXPECT_EQ(crashes_in(pool.insights()), 3u);
  EXPECT_EQ(pool.map(plus_bomb, std::vector{4, 5}, WorkerBomb{0, {}}), (std::vector{4, 5}));
}

TEST(ExtraArguments, OneWhoseLoadHangsIsStoppedByTheTaskTimeout) {
  procpool::Pool pool({.processes = 2, .task_timeout = std::chrono::milliseconds(300)});
  const auto outcomes = pool.map_outcomes(plus_bomb, std::vector<int>(20, 1), WorkerBomb{2, {}});
  ASSERT_EQ(outcomes.size(), 20u);
  for (std::size_t i = 0; i < outcomes.size(); ++i) {
    ASSERT_FALSE(outcomes[i].ok()) << i;
    try {
      std::rethrow_exception(outcomes[i].error);
    } catch (const procpool::TaskTimeout& e) {
      EXPECT_EQ(e.index(), i);
      EXPECT_NE(std::string(e.what()).find("task " + std::to_string(i) +
                                           " never ran: a worker decoding the call's extra "
                                           "arguments ran longer than the task limit of 300 ms"),
                std::string::npos)
          << e.what();
    } catch (...) {
      ADD_FAILURE() << i << ": " << outcomes[i].what();
    }
  }
  EXPECT_EQ(pool.map(plus_bomb, std::vector{6}, WorkerBomb{0, {}}), (std::vector{6}));
}

TEST(ExtraArguments, AWorkerKilledFromOutsideWhileDecodingThemCostsNothing) {
  Shared shared;
  killed_once = shared.flag;
  procpool::Pool pool({.processes = 1});
  EXPECT_EQ(pool.map(plus_bomb, std::vector{1, 2, 3}, WorkerBomb{3, {}}), (std::vector{4, 5, 6}));
  EXPECT_TRUE(shared.flag->load());
  EXPECT_EQ(crashes_in(pool.insights()), 1u);
  killed_once = nullptr;
}

// helper-40's case: a worker at its quota, still running another call's
// task, was sent the new call's setup; it decoded (and hung in) it after
// its last reply, and its recycling waited for it with the pool's lock held:
// the pool hung, task_timeout or not.
TEST(ExtraArguments, AHangingDecodeNeverReachesAWorkerDueForRecycling) {
  // The 200 ms task must not reach the limit in a fresh worker of a slow build.
  const auto limit = std::chrono::milliseconds(test_helpers::under_sanitizer ? 1000 : 300);
  procpool::Pool pool({.processes = 1, .task_timeout = limit, .max_tasks_per_child = 1});
  auto slow = pool.submit(
      [](int x) {
        std::this_thread::sleep_for(std::chrono::milliseconds(200));
        return x;
      },
      5);
  const auto outcomes = pool.map_outcomes(plus_bomb, std::vector<int>(4, 1), WorkerBomb{2, {}});
  EXPECT_EQ(slow.get(), 5);
  ASSERT_EQ(outcomes.size(), 4u);
  for (const auto& o : outcomes)
    EXPECT_FALSE(o.ok());
  EXPECT_EQ(pool.map(plus_bomb, std::vector{8}, WorkerBomb{0, {}}), (std::vector{8}));
}

}  // namespace
