// mpi_peers mode differential, scenarios of part 1 (see differential.hpp).
#include "differential.hpp"

namespace peers {

namespace {

// 1. imap_unordered and imap_outcomes over max_inflight x chunksize.

template <class P>
void grid_scenario(std::size_t max_inflight, std::size_t chunksize) {
  const std::string where = std::string(pool_name<P>()) + " max_inflight " +
                            std::to_string(max_inflight) + " chunksize " +
                            std::to_string(chunksize) + ": ";
  constexpr int n = 30;
  const std::vector<int> xs = range(n);
  P pool(on_busy_ranks({.processes = 2, .chunksize = chunksize, .max_inflight = max_inflight}));
  std::atomic<std::size_t> taken{0};
  auto counted_view = [&] {
    return xs | std::views::transform([&taken](int x) {
             ++taken;
             return x;
           });
  };
  {
    std::vector<int> seen(n, 0);
    std::size_t handed = 0;
    for (const auto& [index, value] : pool.imap_unordered(&square_plus, counted_view())) {
      ++handed;
      PEER_CHECK_MSG(index < static_cast<std::size_t>(n), where + "index " + std::to_string(index));
      PEER_CHECK_MSG(value == square_plus(static_cast<int>(index)),
                     where + "index " + std::to_string(index) + " value " + std::to_string(value));
      ++seen[index];
      // Options::max_inflight: inputs taken and not yet handed back
      PEER_CHECK_MSG(taken.load() <= handed + max_inflight,
                     where + "taken " + std::to_string(taken.load()) + " with " +
                         std::to_string(handed) + " handed back");
    }
    PEER_CHECK_MSG(handed == static_cast<std::size_t>(n), where + std::to_string(handed));
    for (int i = 0; i < n; ++i)
      PEER_CHECK_MSG(seen[static_cast<std::size_t>(i)] == 1,
                     where + "index " + std::to_string(i) + " seen " +
                         std::to_string(seen[static_cast<std::size_t>(i)]) + " times");
    PEER_CHECK(taken.load() == static_cast<std::size_t>(n));
  }
  taken = 0;
  {
    std::size_t handed = 0;
    for (auto& o : pool.imap_outcomes(&square_unless_3_mod_5, counted_view())) {
      const int i = static_cast<int>(handed);
      ++handed;
      PEER_CHECK_MSG(o.index == static_cast<std::size_t>(i),
                     where + "outcome " + std::to_string(o.index) + " at " + std::to_string(i));
      if (i % 5 == 3) {
        const auto& e = error_as<procpool::TaskError>(o);
        PEER_CHECK_MSG(e.index() == o.index && e.type_name() == "std::invalid_argument" &&
                           e.remote_what() == "three mod five: " + std::to_string(i),
                       where + e.what());
      } else {
        PEER_CHECK_MSG(o.ok() && o.value && *o.value == square_plus(i), where + o.what());
      }
      PEER_CHECK_MSG(taken.load() <= handed + max_inflight,
                     where + "taken " + std::to_string(taken.load()) + " with " +
                         std::to_string(handed) + " handed back");
    }
    PEER_CHECK_MSG(handed == static_cast<std::size_t>(n), where + std::to_string(handed));
  }
}

// 2. imap_unordered with retries: inputs that crash their worker once.

template <class P>
unsigned crash_once_scenario(std::size_t chunksize) {
  const std::string where =
      std::string(pool_name<P>()) + " chunksize " + std::to_string(chunksize) + ": ";
  constexpr int n = 24;
  MarkerDir dir;
  P pool(on_busy_ranks({.processes = 2, .chunksize = chunksize, .retries = 2}));
  std::vector<int> seen(n, 0);
  for (const auto& [index, value] : pool.imap_unordered(&crash_once, range(n), dir.path)) {
    PEER_CHECK_MSG(index < static_cast<std::size_t>(n), where + "index " + std::to_string(index));
    PEER_CHECK_MSG(value == static_cast<int>(index) * 10 + 1,
                   where + "index " + std::to_string(index) + " value " + std::to_string(value));
    ++seen[index];
  }
  for (int i = 0; i < n; ++i)
    PEER_CHECK_MSG(seen[static_cast<std::size_t>(i)] == 1,
                   where + "index " + std::to_string(i) + " seen " +
                       std::to_string(seen[static_cast<std::size_t>(i)]) + " times");
  // Every crashing input did crash once (8 of them: 1, 4, ..., 22).
  PEER_CHECK_MSG(dir.count() == 8, where + std::to_string(dir.count()) + " markers");
  const unsigned crashes = crashes_of(pool.insights());
  PEER_CHECK_MSG(crashes == 8, where + std::to_string(crashes) + " crashes in insights()\n" +
                                   pool.insights().to_string());
  return crashes;
}

// 3. imap_unordered abandoned at a TaskTimeout, then the pool reused.

template <class P>
void timeout_abandon_scenario(std::size_t chunksize) {
  const std::string where =
      std::string(pool_name<P>()) + " chunksize " + std::to_string(chunksize) + ": ";
  constexpr int n = 40;
  constexpr int slow = 5;
  P pool(
      on_busy_ranks({.processes = 2, .chunksize = chunksize, .task_timeout = milliseconds(400)}));
  std::set<std::size_t> seen;
  bool timed_out = false;
  const auto start = Clock::now();
  {
    auto results = pool.imap_unordered(&slow_at, range(n), slow);
    try {
      for (const auto& [index, value] : results) {
        PEER_CHECK_MSG(index != slow, where + "the slow input returned");
        PEER_CHECK_MSG(value == 3 * static_cast<int>(index), where + std::to_string(index));
        PEER_CHECK_MSG(seen.insert(index).second, where + "twice: " + std::to_string(index));
      }
    } catch (const procpool::TaskTimeout& e) {
      timed_out = true;
      PEER_CHECK_MSG(e.index() == slow, where + e.what());
      PEER_CHECK_MSG(e.limit() == milliseconds(400), where + e.what());
    }
  }  // abandoned here, with inputs left
  PEER_CHECK_MSG(timed_out, where + "no TaskTimeout; " + std::to_string(seen.size()) + " results");
  PEER_CHECK_MSG(Clock::now() - start < seconds(5), where + "the timeout took too long");
  // Reuse: no stale result of the abandoned call shows up.
  auto got = pool.map(&square_plus, range(100));
  PEER_CHECK_MSG(got.size() == 100, where + std::to_string(got.size()));
  for (int i = 0; i < 100; ++i)
    PEER_CHECK_MSG(got[static_cast<std::size_t>(i)] == square_plus(i),
                   where + "map after the abandoned call, at " + std::to_string(i));
  std::vector<int> again(n, 0);
  for (const auto& [index, value] : pool.imap_unordered(&slow_at, range(n), -1)) {
    PEER_CHECK_MSG(value == 3 * static_cast<int>(index), where + std::to_string(index));
    ++again[index];
  }
  PEER_CHECK_MSG(std::ranges::all_of(again, [](int c) { return c == 1; }),
                 where + "imap_unordered after the abandoned call");
}

// 4. Failing futures dropped, then terminate(): the errors nobody will get.

struct Unobserved {
  std::uint64_t settled_before_terminate = 0;  // insights().unobserved_errors
  std::uint64_t settled_after_terminate = 0;
  std::vector<std::string> settled_kinds;  // what the handler saw
  std::uint64_t raced = 0;                 // dropped while running, then terminate()
  std::vector<std::string> raced_kinds;
};

template <class P>
Unobserved unobserved_scenario() {
  const std::string where = std::string(pool_name<P>()) + ": ";
  constexpr int n = 6;
  Unobserved out;
  {
    // Settled: every dropped task has failed (the handler counted it) before terminate().
    std::mutex m;
    std::vector<std::string> kinds;
    P pool(on_busy_ranks({.processes = 2}));
    pool.set_error_handler([&](std::exception_ptr e) {
      std::lock_guard lock(m);
      kinds.push_back(error_kind(e));
    });
    for (int i = 0; i < n; ++i)
      (void)pool.submit(&raise_on_odd, 2 * i + 1);  // dropped at once
    PEER_CHECK_MSG(eventually([&] {
                     std::lock_guard lock(m);
                     return kinds.size() == n;
                   }),
                   where + "the handler saw " + std::to_string(kinds.size()) + " of 6");
    const auto before = pool.insights();
    out.settled_before_terminate = before.unobserved_errors;
    PEER_CHECK_MSG(before.unobserved_error_messages.size() == n, where + before.to_string());
    for (const std::string& message : before.unobserved_error_messages)
      PEER_CHECK_MSG(contains(message, "odd "), where + message);
    pool.terminate();
    out.settled_after_terminate = pool.insights().unobserved_errors;
    std::lock_guard lock(m);
    out.settled_kinds = kinds;
  }
  {
    // Raced: dropped before they finish (they would fail after 1.5 s), then
    // terminate(): each still ends, and its end (PoolClosed in
    // procpool::Pool) is an error nobody gets: the handler and
    // insights().unobserved_errors count it. Both pools have the same API
    // here (set_error_handler, Insights::unobserved_errors): compared as is.
    auto kinds = std::make_shared<std::vector<std::string>>();
    auto m = std::make_shared<std::mutex>();
    P pool(on_busy_ranks({.processes = 2}));
    pool.set_error_handler([kinds, m](std::exception_ptr e) {
      std::lock_guard lock(*m);
      kinds->push_back(error_kind(e));
    });
    for (int i = 0; i < n; ++i)
      (void)pool.submit(&sleep_and_raise, 1500);
    pool.terminate();
    (void)eventually([&] {
      std::lock_guard lock(*m);
      return kinds->size() == n;
    });
    out.raced = pool.insights().unobserved_errors;
    std::lock_guard lock(*m);
    out.raced_kinds = *kinds;
    std::ranges::sort(out.raced_kinds);
  }
  return out;
}

// 5. An imap that lives across close() and join().

struct AcrossJoin {
  std::size_t values_after_join = 0;
  std::string end_after_join;         // "end" or the error's kind
  std::size_t taken_before_join = 0;  // inputs the call had taken (3 handed back, 1 held)
  std::size_t taken_at_join = 0;
  std::size_t taken_at_end = 0;     // after consuming it
  std::string message;              // the PoolClosed's
  std::uint64_t tasks_at_join = 0;  // insights().tasks: what the workers ran
};

template <class P>
AcrossJoin across_close_scenario() {
  const std::string where = std::string(pool_name<P>()) + ": ";
  constexpr int n = 60;
  {
    // Consumed after close(), before join(): every result.
    P pool(on_busy_ranks({.processes = 2, .chunksize = 1, .max_inflight = 4}));
    auto results = pool.imap(&square_plus, range(n));
    auto it = results.begin();
    for (int i = 0; i < 3; ++i, ++it)
      PEER_CHECK_MSG(*it == square_plus(i), where + std::to_string(i));
    pool.close();
    int i = 3;
    for (; it != std::default_sentinel; ++it, ++i)
      PEER_CHECK_MSG(*it == square_plus(i), where + "after close(), at " + std::to_string(i));
    PEER_CHECK_MSG(i == n, where + "after close(): " + std::to_string(i) + " results");
    pool.join();
  }
  AcrossJoin out;
  {
    // join() while it is unfinished: what consuming it then gives.
    // (Failed when written: mpi::Pool throws PoolClosed before the results
    // of the inputs it had taken and join() had waited for; next_run() in
    // src/mpi/hub.cpp tops up, which throws once the pool has ended, before
    // it hands over what is ready. procpool::Pool hands them over first.)
    P pool(on_busy_ranks({.processes = 2, .chunksize = 1, .max_inflight = 4}));
    const std::vector<int> xs = range(n);
    std::atomic<std::size_t> taken{0};
    auto results = pool.imap(&square_plus, xs | std::views::transform([&taken](int x) {
                                             ++taken;
                                             return x;
                                           }));
    auto it = results.begin();
    for (int i = 0; i < 3; ++i, ++it)
      PEER_CHECK_MSG(*it == square_plus(i), where + std::to_string(i));
    pool.close();
    out.taken_before_join = taken.load();
    const auto start = Clock::now();
    pool.join();
    out.taken_at_join = taken.load();
    out.tasks_at_join = pool.insights().tasks;
    PEER_CHECK_MSG(Clock::now() - start < seconds(5), where + "join() took too long");
    int i = 3;
    try {
      for (; it != std::default_sentinel; ++it, ++i) {
        PEER_CHECK_MSG(*it == square_plus(i), where + "after join(), at " + std::to_string(i));
        ++out.values_after_join;
      }
      out.end_after_join = "end";
    } catch (const CaseFailed&) {
      throw;
    } catch (const procpool::PoolClosed& e) {
      out.end_after_join = "PoolClosed";
      out.message = e.what();
    } catch (...) {
      out.end_after_join = error_kind(std::current_exception());
    }
    out.taken_at_end = taken.load();
  }
  return out;
}

// 6. A failed task's Future::get() after join() and after terminate().

template <class P>
std::vector<std::string> get_after_end_scenario() {
  const std::string where = std::string(pool_name<P>()) + ": ";
  std::vector<std::string> out;
  {
    P pool(on_busy_ranks({.processes = 2}));
    auto bad = pool.submit(&raise_on_odd, 3);
    auto good = pool.submit(&raise_on_odd, 4);
    pool.close();
    pool.join();
    PEER_CHECK_MSG(good.get() == 4, where + "a good Future after join()");
    try {
      (void)bad.get();
      out.push_back("value");
    } catch (const procpool::TaskError& e) {
      PEER_CHECK_MSG(e.type_name() == "std::invalid_argument" && e.remote_what() == "odd 3",
                     where + e.what());
      out.push_back("TaskError");
    } catch (...) {
      out.push_back(error_kind(std::current_exception()));
    }
  }
  {
    // Finished before terminate(): its error was in.
    P pool(on_busy_ranks({.processes = 2}));
    auto bad = pool.submit(&raise_on_odd, 5);
    auto good = pool.submit(&raise_on_odd, 6);
    PEER_CHECK_MSG(bad.wait_for(seconds(5)) == std::future_status::ready, where + "not ready");
    PEER_CHECK_MSG(good.wait_for(seconds(5)) == std::future_status::ready, where + "not ready");
    pool.terminate();
    out.push_back(outcome_of([&] { return bad.get(); }));
    out.push_back(outcome_of([&] { return good.get(); }));
  }
  {
    // Still running at terminate(): it would fail after 3 s.
    P pool(on_busy_ranks({.processes = 2}));
    auto running = pool.submit(&sleep_and_raise, 3000);
    const auto start = Clock::now();
    pool.terminate();
    out.push_back(outcome_of([&] { return running.get(); }));
    PEER_CHECK_MSG(Clock::now() - start < seconds(2), where + "get() after terminate() waited");
  }
  return out;
}

// 7. Early close() with max_tasks_per_child = 1 and tasks that fail.

template <class P>
std::vector<std::string> early_close_recycling_scenario() {
  const std::string where = std::string(pool_name<P>()) + ": ";
  constexpr int n = 12;
  std::vector<std::string> out;
  P pool({.processes = 2, .chunksize = 1, .max_tasks_per_child = 1});
  std::vector<procpool::Future<int>> fs;
  for (int i = 0; i < n; ++i)
    fs.push_back(pool.submit(&raise_on_odd, i));
  auto outcomes = pool.imap_outcomes(&raise_on_odd, range(n));
  pool.close();  // at once: nothing has been waited for
  const auto start = Clock::now();
  for (auto& f : fs)
    out.push_back(outcome_of([&] { return f.get(); }));
  int i = 0;
  for (auto& o : outcomes) {
    PEER_CHECK_MSG(o.index == static_cast<std::size_t>(i), where + std::to_string(o.index));
    out.push_back(o.ok() ? "value " + std::to_string(*o.value) : error_kind(o.error));
    ++i;
  }
  PEER_CHECK_MSG(i == n, where + std::to_string(i) + " outcomes");
  pool.join();
  PEER_CHECK_MSG(Clock::now() - start < seconds(10), where + "too slow");
  return out;
}

// 8. An endless imap_outcomes, terminate() after its first outcome.

struct AcrossTerminate {
  std::size_t outcomes = 0;  // outcomes after terminate(), at most 1000 counted
  std::string end;           // "end", "none" (1000 reached) or the error's kind
  std::string message;       // the PoolClosed's
  std::size_t taken_at_terminate = 0;
  std::size_t taken_at_end = 0;
};

template <class P>
AcrossTerminate endless_after_terminate_scenario() {
  P pool(on_busy_ranks({.processes = 2, .chunksize = 1, .max_inflight = 4}));
  std::atomic<std::size_t> taken{0};
  auto outcomes =
      pool.imap_outcomes(&square_plus, std::views::iota(0) | std::views::transform([&taken](int x) {
                                         ++taken;
                                         return x;
                                       }));
  auto it = outcomes.begin();
  PEER_CHECK_MSG(it->ok(), std::string(pool_name<P>()) + ": the first outcome");
  pool.terminate();
  AcrossTerminate out;
  out.taken_at_terminate = taken.load();
  out.end = "none";
  try {
    for (++it; it != std::default_sentinel && out.outcomes < 1000; ++it)
      ++out.outcomes;
    if (it == std::default_sentinel) out.end = "end";
  } catch (const procpool::PoolClosed& e) {
    out.end = "PoolClosed";
    out.message = e.what();
  } catch (...) {
    out.end = error_kind(std::current_exception());
  }
  out.taken_at_end = taken.load();
  return out;
}

// 9. An input range that throws midway: what comes out, then which error,
// and how much of the range was read.

/// One call over a SayWhen: what it handed over ("3" for input 3's right
/// value, "3:KIND" for its error outcome, "3?" for a wrong value), how it
/// ended, and how many inputs it read.
struct SayWhenRun {
  std::vector<std::string> handed;
  std::string end;
  int reads = 0;
  std::string text() const {
    return joined(handed) + " then " + end + ", " + std::to_string(reads) + " read";
  }
};

template <class P>
SayWhenRun say_when_run(P& pool, Via delivery, SayWhen::Throws throws, int total, int when) {
  SayWhen inputs(total, when, throws);
  SayWhenRun run;
  auto note = [&run](std::size_t index, bool right) {
    run.handed.push_back(std::to_string(index) + (right ? "" : "?"));
  };
  try {
    if (delivery == Via::imap) {
      std::size_t i = 0;
      for (int v : pool.imap(&square_plus, inputs)) {
        note(i, v == square_plus(static_cast<int>(i)));
        ++i;
      }
    } else if (delivery == Via::imap_unordered) {
      for (const auto& [index, value] : pool.imap_unordered(&square_plus, inputs))
        note(index, value == square_plus(static_cast<int>(index)));
    } else {
      for (auto& o : pool.imap_outcomes(&square_plus, inputs)) {
        if (o.ok()) {
          note(o.index, *o.value == square_plus(static_cast<int>(o.index)));
        } else {
          run.handed.push_back(std::to_string(o.index) + ":" + error_kind(o.error));
        }
      }
    }
    run.end = "end";
  } catch (const SayWhenError& e) {
    run.end = std::string("SayWhenError(") + e.what() + ")";
  } catch (...) {
    run.end = error_kind(std::current_exception());
  }
  run.reads = inputs.reads();
  if (delivery == Via::imap_unordered)
    std::ranges::sort(run.handed, [](const std::string& a, const std::string& b) {
      return std::stoul(a) < std::stoul(b);
    });
  return run;
}

/// Every (delivery, chunksize, where it throws) of one pool type, each
/// against what the README promises: "If the input range itself throws,
/// every result of the inputs it yielded before is delivered first (imap,
/// imap_unordered, map_outcomes), then its own exception is rethrown, as
/// CPython does"; and the pool goes on. Returns a line per run. (mpi::Pool
/// failed every run when this was written: thrown on ++, it lost the results
/// of the 7 inputs read before; thrown on *, it made a serialize_input
/// TaskError of it and read the rest of the range.)
template <class P>
std::vector<std::string> say_when_scenario(std::vector<std::string>& failures) {
  constexpr int total = 30;
  constexpr int when = 7;
  std::vector<std::string> lines;
  for (const std::size_t chunksize : {std::size_t{1}, std::size_t{3}, std::size_t{0}}) {
    P pool(on_busy_ranks({.processes = 2, .chunksize = chunksize}));
    for (const auto throws : {SayWhen::Throws::on_increment, SayWhen::Throws::on_read}) {
      for (const auto delivery : {Via::imap, Via::imap_unordered, Via::imap_outcomes}) {
        const SayWhenRun run = say_when_run(pool, delivery, throws, total, when);
        const std::string line =
            std::string(pool_name<P>()) + " " + via_name(delivery) + " chunksize " +
            std::to_string(chunksize) +
            (throws == SayWhen::Throws::on_increment ? " throws on ++: " : " throws on *: ") +
            run.text();
        lines.push_back(line);
        std::vector<std::string> want;
        for (int i = 0; i < when; ++i)
          want.push_back(std::to_string(i));
        const std::string said =
            throws == SayWhen::Throws::on_increment ? "moving to 7" : "reading 7";
        if (run.handed != want || run.end != "SayWhenError(somebody said when: " + said + ")" ||
            run.reads != when)
          failures.push_back(line);
      }
      // The pool goes on, with no stale result of the call that threw.
      const auto got = pool.map(&square_plus, range(40));
      for (int i = 0; i < 40; ++i)
        if (got[static_cast<std::size_t>(i)] != square_plus(i))
          failures.push_back(std::string(pool_name<P>()) + ": map after the range threw, at " +
                             std::to_string(i));
    }
  }
  return lines;
}

// 10. Inputs and results whose serialisation throws, among good ones.

/// Picky through a task: value + 1, same name; the result's save() (in the
/// worker) or load() (in the caller) throws when the input's name says so.
Picky relabel(const Picky& p) {
  Picky out;
  out.value = p.value + 1;
  out.name = p.name;
  out.fail_save = p.name == "result save fails";
  out.fail_load = p.name == "result load fails";
  return out;
}
/// Input i of 16: 3 cannot be saved (in the caller), 6 cannot be loaded (in
/// the worker), 9's result cannot be saved (in the worker), 12's cannot be
/// loaded (in the caller); the rest are good.
Picky picky_input(int i) {
  Picky p;
  p.value = i;
  p.name = i == 9 ? "result save fails" : i == 12 ? "result load fails" : "n";
  p.fail_save = i == 3;
  p.fail_load = i == 6;
  return p;
}
/// "I:STAGE" for a TaskError of input I that names Picky's save() or load(),
/// else the error's kind with its index.
std::string picky_error(const std::exception_ptr& error, std::size_t at) {
  try {
    std::rethrow_exception(error);
  } catch (const procpool::TaskError& e) {
    const bool named = e.type_name() == "std::runtime_error" &&
                       (contains(e.remote_what(), "Picky cannot be saved") ||
                        contains(e.remote_what(), "Picky cannot be loaded"));
    return std::to_string(e.index()) + ":" + stage_name(e.stage()) +
           (named && e.index() == at ? "" : "?(" + std::string(e.what()) + ")");
  } catch (...) {
    return std::to_string(at) + ":" + error_kind(std::current_exception());
  }
}
/// What map_outcomes must give for input i (see picky_input).
std::string picky_want(int i) {
  switch (i) {
    case 3:
      return "3:serialize_input";
    case 6:
      return "6:deserialize_input";
    case 9:
      return "9:serialize_result";
    case 12:
      return "12:deserialize_result";
    default:
      return std::to_string(i);
  }
}

template <class P, class Inputs>
std::vector<std::string> unencodable_calls(P& pool, Inputs&& make_inputs, const std::string& where,
                                           std::vector<std::string>& failures) {
  constexpr int n = 16;
  std::vector<std::string> lines;
  // map_outcomes: each bad input costs itself alone, at its stage.
  std::vector<std::string> got, want;
  for (int i = 0; i < n; ++i)
    want.push_back(picky_want(i));
  auto outcomes = pool.map_outcomes(&relabel, make_inputs());
  for (std::size_t i = 0; i < outcomes.size(); ++i) {
    const auto& o = outcomes[i];
    if (o.ok()) {
      const bool right = o.index == i && o.value->value == static_cast<int>(i) + 1 &&
                         o.value->name == picky_input(static_cast<int>(i)).name;
      got.push_back(std::to_string(o.index) + (right ? "" : "?"));
    } else {
      got.push_back(picky_error(o.error, i));
    }
  }
  lines.push_back(where + "map_outcomes " + joined(got));
  if (got != want) failures.push_back(lines.back());
  // imap: the good values before the first bad input (3), then its error.
  got.clear();
  std::string end = "end";
  try {
    std::size_t i = 0;
    for (const Picky& p : pool.imap(&relabel, make_inputs())) {
      got.push_back(std::to_string(i) + (p.value == static_cast<int>(i) + 1 ? "" : "?"));
      ++i;
    }
  } catch (...) {
    end = picky_error(std::current_exception(), got.size());
  }
  lines.push_back(where + "imap " + joined(got) + " then " + end);
  if (got != std::vector<std::string>{"0", "1", "2"} || end != "3:serialize_input")
    failures.push_back(lines.back());
  // imap_unordered: good values (any order), then one bad input's error.
  got.clear();
  end = "end";
  bool right = true;
  try {
    for (const auto& [index, p] : pool.imap_unordered(&relabel, make_inputs())) {
      got.push_back(std::to_string(index));
      right = right && picky_want(static_cast<int>(index)) == std::to_string(index) &&
              p.value == static_cast<int>(index) + 1;
    }
  } catch (const procpool::TaskError& e) {
    end = picky_error(std::current_exception(), e.index());
  } catch (...) {
    end = error_kind(std::current_exception());
  }
  lines.push_back(where + "imap_unordered " + joined(got) + " then " + end);
  const std::set<std::string> bad{picky_want(3), picky_want(6), picky_want(9), picky_want(12)};
  if (!right || !bad.contains(end)) failures.push_back(lines.back());
  // and the pool goes on
  const auto again = pool.map(&relabel, std::vector<Picky>{picky_input(0), picky_input(1)});
  if (again.size() != 2 || again[0].value != 1 || again[1].value != 2)
    failures.push_back(where + "map after the failures");
  return lines;
}

template <class P>
std::vector<std::string> unencodable_scenario(std::vector<std::string>& failures) {
  std::vector<std::string> lines;
  for (const std::size_t chunksize : {std::size_t{1}, std::size_t{4}, std::size_t{0}}) {
    P pool(on_busy_ranks({.processes = 2, .chunksize = chunksize}));
    const std::string where =
        std::string(pool_name<P>()) + " chunksize " + std::to_string(chunksize) + ", ";
    std::vector<Picky> kept;
    for (int i = 0; i < 16; ++i)
      kept.push_back(picky_input(i));
    // A container that keeps its inputs (re-readable, lent as they are) and
    // a view that makes each as it is read: two ways in on both pools.
    for (const std::string& line : unencodable_calls(
             pool, [&]() -> const std::vector<Picky>& { return kept; },
             where + "vector: ", failures))
      lines.push_back(line);
    for (const std::string& line : unencodable_calls(
             pool, [] { return std::views::iota(0, 16) | std::views::transform(&picky_input); },
             where + "transform view: ", failures))
      lines.push_back(line);
  }
  return lines;
}

// 11. map_outcomes over tasks that end their worker: exit(3) and SIGSEGV.

/// Input 4 ends its worker with exit(3), input 9 with SIGSEGV; others return.
int dies_at_4_and_9(int x) {
  if (x == 4) std::exit(3);
  if (x == 9) segfault();
  return x * 10 + 1;
}
/// "I:exit S" or "I:signal S" for a WorkerCrashed of input I, else its kind.
std::string crash_text(const std::exception_ptr& error, std::size_t at) {
  try {
    std::rethrow_exception(error);
  } catch (const procpool::WorkerCrashed& e) {
    return std::to_string(e.index()) + (e.signal() != 0
                                            ? ":signal " + std::to_string(e.signal())
                                            : ":exit " + std::to_string(e.exit_status()));
  } catch (...) {
    return std::to_string(at) + ":" + error_kind(std::current_exception());
  }
}

/// How input 9's SIGSEGV ends its worker.
std::string segv_text() {
  return "9:signal " + std::to_string(SIGSEGV);
}

template <class P>
CrashRun crash_scenario(std::vector<std::string>& failures) {
  constexpr int n = 16;
  CrashRun out;
  std::vector<std::string> want;
  for (int i = 0; i < n; ++i)
    want.push_back(i == 4 ? "4:exit 3" : i == 9 ? segv_text() : std::to_string(i));
  for (const unsigned retries : {0u, 1u}) {
    for (const std::size_t chunksize : {std::size_t{1}, std::size_t{4}, std::size_t{0}}) {
      P pool(on_busy_ranks({.processes = 2, .chunksize = chunksize, .retries = retries}));
      const std::string where = std::string(pool_name<P>()) + " retries " +
                                std::to_string(retries) + " chunksize " +
                                std::to_string(chunksize) + ": ";
      std::vector<std::string> got;
      auto outcomes = pool.map_outcomes(&dies_at_4_and_9, range(n));
      for (std::size_t i = 0; i < outcomes.size(); ++i) {
        const auto& o = outcomes[i];
        if (o.ok()) {
          got.push_back(std::to_string(o.index) +
                        (o.index == i && *o.value == static_cast<int>(i) * 10 + 1 ? "" : "?"));
        } else {
          got.push_back(crash_text(o.error, i));
        }
      }
      // Every attempt of the two inputs killed its worker: 1 + retries each.
      const unsigned crashes = crashes_of(pool.insights());
      out.crashes.push_back(crashes);
      out.lines.push_back(where + "map_outcomes " + joined(got) + ", crashes " +
                          std::to_string(crashes));
      if (got != want || crashes != 2 * (1 + retries)) failures.push_back(out.lines.back());
      // imap: inputs 0-3, then input 4's crash.
      got.clear();
      std::string end = "end";
      try {
        for (int v : pool.imap(&dies_at_4_and_9, range(n))) {
          got.push_back(std::to_string(got.size()) +
                        (v == static_cast<int>(got.size()) * 10 + 1 ? "" : "?"));
        }
      } catch (...) {
        end = crash_text(std::current_exception(), got.size());
      }
      out.lines.push_back(where + "imap " + joined(got) + " then " + end);
      if (got != std::vector<std::string>{"0", "1", "2", "3"} || end != "4:exit 3")
        failures.push_back(out.lines.back());
      const auto again = pool.map(&square_plus, range(20));
      for (int i = 0; i < 20; ++i)
        if (again[static_cast<std::size_t>(i)] != square_plus(i))
          failures.push_back(where + "map after the crashes, at " + std::to_string(i));
    }
  }
  return out;
}

// 12. task_timeout with retries: one input always too slow, one only once.

/// Input 3 always outlasts its task_timeout; input 8 only the first time it
/// runs (its marker under `dir` says it has run); the rest take 1 ms.
int slow_3_always_8_once(int x, const std::string& dir) {
  bool slow = x == 3;
  if (x == 8) {
    const std::string marker = dir + "/8";
    const int fd = ::open(marker.c_str(), O_CREAT | O_EXCL | O_WRONLY, 0600);
    if (fd >= 0) ::close(fd);
    slow = fd >= 0;
  }
  std::this_thread::sleep_for(slow ? milliseconds(10000) : milliseconds(1));
  return x * 3;
}
/// "I:TaskTimeout L" for a TaskTimeout of input I (limit L ms), else its kind.
std::string timeout_text(const std::exception_ptr& error, std::size_t at) {
  try {
    std::rethrow_exception(error);
  } catch (const procpool::TaskTimeout& e) {
    return std::to_string(e.index()) + ":TaskTimeout " + std::to_string(e.limit().count());
  } catch (...) {
    return std::to_string(at) + ":" + error_kind(std::current_exception());
  }
}

template <class P>
CrashRun timeout_retry_scenario(std::vector<std::string>& failures) {
  constexpr int n = 12;
  CrashRun out;
  std::vector<std::string> want;
  for (int i = 0; i < n; ++i)
    want.push_back(i == 3 ? "3:TaskTimeout 300" : std::to_string(i));
  for (const std::size_t chunksize : {std::size_t{1}, std::size_t{0}}) {
    P pool(on_busy_ranks(
        {.processes = 2, .chunksize = chunksize, .retries = 1, .task_timeout = milliseconds(300)}));
    const std::string where =
        std::string(pool_name<P>()) + " chunksize " + std::to_string(chunksize) + ": ";
    {
      MarkerDir dir;
      const auto start = Clock::now();
      auto outcomes = pool.map_outcomes(&slow_3_always_8_once, range(n), dir.path);
      const auto took = Clock::now() - start;
      // Workers stopped by a timeout: each pool's count of them (3 attempts
      // timed out), compared in the case.
      out.crashes.push_back(crashes_of(pool.insights()));
      std::vector<std::string> got;
      for (std::size_t i = 0; i < outcomes.size(); ++i) {
        const auto& o = outcomes[i];
        if (o.ok()) {
          got.push_back(std::to_string(o.index) +
                        (o.index == i && *o.value == static_cast<int>(i) * 3 ? "" : "?"));
        } else {
          got.push_back(timeout_text(o.error, i));
        }
      }
      out.lines.push_back(where + "map_outcomes " + joined(got) + " in " +
                          std::to_string(std::chrono::duration<double>(took).count()) +
                          " s, markers " + std::to_string(dir.count()));
      // Input 3 ran twice (retries = 1), each stopped at 300 ms; input 8
      // timed out once, then returned.
      if (got != want || dir.count() != 1 || took < milliseconds(600) || took > seconds(5))
        failures.push_back(out.lines.back());
    }
    if (chunksize == 1) {
      MarkerDir dir;
      std::vector<std::string> got;
      std::string end = "end";
      try {
        for (int v : pool.imap(&slow_3_always_8_once, range(n), dir.path))
          got.push_back(std::to_string(got.size()) +
                        (v == static_cast<int>(got.size()) * 3 ? "" : "?"));
      } catch (...) {
        end = timeout_text(std::current_exception(), got.size());
      }
      out.lines.push_back(where + "imap " + joined(got) + " then " + end);
      if (got != std::vector<std::string>{"0", "1", "2"} || end != "3:TaskTimeout 300")
        failures.push_back(out.lines.back());
    }
    const auto again = pool.map(&square_plus, range(20));
    for (int i = 0; i < 20; ++i)
      if (again[static_cast<std::size_t>(i)] != square_plus(i))
        failures.push_back(where + "map after the timeouts, at " + std::to_string(i));
  }
  return out;
}

}  // namespace

std::vector<Case> differential_cases_1() {
  std::vector<Case> cases;
  cases.push_back(
      {"grid_inflight_chunksize",
       "test_futures.py ProcessPoolExecutorTest.test_map_chunksize + buffersize; "
       "_test_multiprocessing test_imap_unordered",
       [] {
         for (const std::size_t max_inflight : {std::size_t{1}, std::size_t{2}, std::size_t{7}})
           for (const std::size_t chunksize : {std::size_t{1}, std::size_t{3}, std::size_t{0}}) {
             grid_scenario<procpool::Pool>(max_inflight, chunksize);
             grid_scenario<procpool::mpi::Pool>(max_inflight, chunksize);
           }
       }});
  cases.push_back(
      {"retries_after_crash_once",
       "loky test_reusable_executor crash-then-retry; CPython test_pool_worker_lifetime", [] {
         for (const std::size_t chunksize : {std::size_t{1}, std::size_t{2}}) {
           const unsigned local = crash_once_scenario<procpool::Pool>(chunksize);
           const unsigned remote = crash_once_scenario<procpool::mpi::Pool>(chunksize);
           PEER_CHECK(local == remote);
         }
       }});
  cases.push_back({"timeout_abandons_imap_unordered_then_reuse",
                   "test_futures.py test_map_timeout; loky test_reusable_executor timeout", [] {
                     for (const std::size_t chunksize : {std::size_t{1}, std::size_t{0}}) {
                       timeout_abandon_scenario<procpool::Pool>(chunksize);
                       timeout_abandon_scenario<procpool::mpi::Pool>(chunksize);
                     }
                   }});
  cases.push_back(
      {"dropped_failures_then_terminate",
       "_test_multiprocessing test_unpickleable_result / error_callback; loky "
       "test_shutdown_with_pickle_error",
       [] {
         const Unobserved local = unobserved_scenario<procpool::Pool>();
         const Unobserved remote = unobserved_scenario<procpool::mpi::Pool>();
         const std::string both =
             "procpool::Pool: settled " + std::to_string(local.settled_before_terminate) + "/" +
             std::to_string(local.settled_after_terminate) + " " + joined(local.settled_kinds) +
             ", raced " + std::to_string(local.raced) + " " + joined(local.raced_kinds) +
             "; mpi::Pool: settled " + std::to_string(remote.settled_before_terminate) + "/" +
             std::to_string(remote.settled_after_terminate) + " " + joined(remote.settled_kinds) +
             ", raced " + std::to_string(remote.raced) + " " + joined(remote.raced_kinds);
         std::fprintf(stderr, "  %s\n", both.c_str());
         const std::vector<std::string> six_task_errors(6, "TaskError");
         const std::vector<std::string> six_closed(6, "PoolClosed");
         PEER_CHECK_MSG(local.settled_before_terminate == 6 && local.settled_after_terminate == 6 &&
                            local.settled_kinds == six_task_errors,
                        both);
         PEER_CHECK_MSG(local.raced == 6 && local.raced_kinds == six_closed, both);
         PEER_CHECK_MSG(remote.settled_before_terminate == local.settled_before_terminate &&
                            remote.settled_after_terminate == local.settled_after_terminate &&
                            remote.settled_kinds == local.settled_kinds,
                        both);
         PEER_CHECK_MSG(remote.raced == local.raced && remote.raced_kinds == local.raced_kinds,
                        both);
       }});
  cases.push_back(
      {"imap_across_close_and_join",
       "_test_multiprocessing test_imap (iterator after close), "
       "test_pool_worker_lifetime_early_close",
       [] {
         const AcrossJoin local = across_close_scenario<procpool::Pool>();
         const AcrossJoin remote = across_close_scenario<procpool::mpi::Pool>();
         const std::string both =
             "after join(): procpool::Pool " + std::to_string(local.values_after_join) +
             " values then " + local.end_after_join + " (inputs taken " +
             std::to_string(local.taken_before_join) + "/" + std::to_string(local.taken_at_join) +
             "/" + std::to_string(local.taken_at_end) + ", tasks run " +
             std::to_string(local.tasks_at_join) + "); mpi::Pool " +
             std::to_string(remote.values_after_join) + " values then " + remote.end_after_join +
             " (inputs taken " + std::to_string(remote.taken_before_join) + "/" +
             std::to_string(remote.taken_at_join) + "/" + std::to_string(remote.taken_at_end) +
             ", tasks run " + std::to_string(remote.tasks_at_join) + ")";
         std::fprintf(stderr, "  %s\n", both.c_str());
         // join() waits for the accepted work: every input the call had
         // taken (its result held by the iterator, 3, included) yields its
         // value after join(), then the call ends with PoolClosed (it
         // cannot take more inputs).
         for (const AcrossJoin* a : {&local, &remote}) {
           PEER_CHECK_MSG(a->taken_at_join == a->taken_before_join, both);
           PEER_CHECK_MSG(a->values_after_join + 3 == a->taken_at_join, both);
           PEER_CHECK_MSG(a->end_after_join == "PoolClosed", both);
           // ... and reads no input it can no longer run (procpool::Pool read
           // and failed max_inflight more: a stream lost them).
           PEER_CHECK_MSG(a->taken_at_end == a->taken_at_join, both);
           PEER_CHECK_MSG(a->message.find("left unread") != std::string::npos, a->message);
         }
         PEER_CHECK_MSG(remote.values_after_join == local.values_after_join, both);
       }});
  cases.push_back(
      {"endless_imap_outcomes_across_terminate",
       "_test_multiprocessing test_terminate with an imap running; loky test_shutdown", [] {
         const AcrossTerminate local = endless_after_terminate_scenario<procpool::Pool>();
         const AcrossTerminate remote = endless_after_terminate_scenario<procpool::mpi::Pool>();
         auto text = [](const AcrossTerminate& a) {
           return std::to_string(a.outcomes) + " outcomes then " + a.end + " (inputs taken " +
                  std::to_string(a.taken_at_terminate) + "/" + std::to_string(a.taken_at_end) + ")";
         };
         const std::string both =
             "after terminate(): procpool::Pool " + text(local) + "; mpi::Pool " + text(remote);
         std::fprintf(stderr, "  %s\n", both.c_str());
         // The outcomes of the inputs taken (values or PoolClosed), then
         // PoolClosed: no input is read once the pool cannot run it.
         for (const AcrossTerminate* a : {&local, &remote}) {
           PEER_CHECK_MSG(a->end == "PoolClosed", both);
           PEER_CHECK_MSG(a->outcomes + 1 == a->taken_at_terminate, both);
           PEER_CHECK_MSG(a->taken_at_end == a->taken_at_terminate, both);
           PEER_CHECK_MSG(a->message.find("left unread") != std::string::npos, a->message);
         }
       }});
  cases.push_back({"future_get_after_join_and_terminate",
                   "test_futures.py test_submit_exception after shutdown; _test_multiprocessing "
                   "test_terminate",
                   [] {
                     const auto local = get_after_end_scenario<procpool::Pool>();
                     const auto remote = get_after_end_scenario<procpool::mpi::Pool>();
                     const std::string both =
                         "procpool::Pool " + joined(local) + "; mpi::Pool " + joined(remote);
                     std::fprintf(stderr, "  %s\n", both.c_str());
                     PEER_CHECK_MSG(local.size() == 4 && local[0] == "TaskError" &&
                                        local[2] == "value 6" && local[3] == "PoolClosed",
                                    both);
                     PEER_CHECK_MSG(remote == local, both);
                   }});
#if defined(__SANITIZE_THREAD__)
  // Recycling forks from a busy rank: skipped under TSan, as the recycling
  // mode is (see there).
#else
  cases.push_back({"early_close_max_tasks_per_child_1",
                   "_test_multiprocessing test_pool_worker_lifetime_early_close", [] {
                     const auto local = early_close_recycling_scenario<procpool::Pool>();
                     const auto remote = early_close_recycling_scenario<procpool::mpi::Pool>();
                     std::vector<std::string> want;
                     for (int round = 0; round < 2; ++round)
                       for (int i = 0; i < 12; ++i)
                         want.push_back(i % 2 == 0 ? "value " + std::to_string(i) : "TaskError");
                     const std::string both =
                         "procpool::Pool " + joined(local) + "; mpi::Pool " + joined(remote);
                     PEER_CHECK_MSG(local == want, both);
                     PEER_CHECK_MSG(remote == local, both);
                   }});
#endif
  cases.push_back({"input_range_throws_midway",
                   "_test_multiprocessing test_imap_handle_iterable_exception, "
                   "test_imap_unordered_handle_iterable_exception",
                   [] {
                     std::vector<std::string> failures;
                     const auto local = say_when_scenario<procpool::Pool>(failures);
                     const auto remote = say_when_scenario<procpool::mpi::Pool>(failures);
                     for (const auto* lines : {&local, &remote})
                       for (const std::string& line : *lines)
                         std::fprintf(stderr, "  %s\n", line.c_str());
                     PEER_CHECK_MSG(failures.empty(),
                                    std::to_string(failures.size()) +
                                        " runs not as promised: " + joined(failures));
                   }});
  cases.push_back(
      {"unencodable_inputs_and_results",
       "_test_multiprocessing test_map_unplicklable, test_unpickleable_result; loky "
       "_test_process_executor crash during result encoding/decoding; mpi4py test_bad_pickle",
       [] {
         std::vector<std::string> failures;
         const auto local = unencodable_scenario<procpool::Pool>(failures);
         const auto remote = unencodable_scenario<procpool::mpi::Pool>(failures);
         for (const auto* lines : {&local, &remote})
           for (const std::string& line : *lines)
             std::fprintf(stderr, "  %s\n", line.c_str());
         PEER_CHECK_MSG(failures.empty(), joined(failures));
       }});
  cases.push_back(
      {"map_outcomes_exit_and_sigsegv",
       "loky _test_process_executor test_crash (exit, segfault in a task) and workers killed "
       "mid-map; _test_multiprocessing test_worker_exit (pool goes on)",
       [] {
         std::vector<std::string> failures;
         const CrashRun local = crash_scenario<procpool::Pool>(failures);
         const CrashRun remote = crash_scenario<procpool::mpi::Pool>(failures);
         for (const auto* run : {&local, &remote})
           for (const std::string& line : run->lines)
             std::fprintf(stderr, "  %s\n", line.c_str());
         const std::string both = "crashes in insights(): procpool::Pool " + crash_counts(local) +
                                  "; mpi::Pool " + crash_counts(remote);
         std::fprintf(stderr, "  %s\n", both.c_str());
         PEER_CHECK_MSG(failures.empty(), joined(failures));
         PEER_CHECK_MSG(remote.crashes == local.crashes, both);
       }});
  cases.push_back(
      {"task_timeout_with_retries",
       "_test_multiprocessing test_async_timeout; loky test_reusable_executor timeout then "
       "reuse; mpi4py test_map_timeout",
       [] {
         std::vector<std::string> failures;
         const CrashRun local = timeout_retry_scenario<procpool::Pool>(failures);
         const CrashRun remote = timeout_retry_scenario<procpool::mpi::Pool>(failures);
         for (const auto* run : {&local, &remote})
           for (const std::string& line : run->lines)
             std::fprintf(stderr, "  %s\n", line.c_str());
         const std::string both = "workers lost to timeouts in insights(): procpool::Pool " +
                                  crash_counts(local) + "; mpi::Pool " + crash_counts(remote);
         std::fprintf(stderr, "  %s\n", both.c_str());
         PEER_CHECK_MSG(failures.empty(), joined(failures));
         PEER_CHECK_MSG(remote.crashes == local.crashes, both);
       }});
  return cases;
}

}  // namespace peers
