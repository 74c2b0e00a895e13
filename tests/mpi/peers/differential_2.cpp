// mpi_peers mode differential, scenarios of part 2 (see differential.hpp).
#include "differential.hpp"

namespace peers {

namespace {

// 14. Empty inputs for every call, starmap over tuples, submit with no argument.

int forty_two() {
  return 42;
}
void nothing_at_all() {}

template <class P>
std::vector<std::string> empty_and_starmap_scenario(std::vector<std::string>& failures) {
  std::vector<std::string> lines;
  for (const std::size_t chunksize : {std::size_t{1}, std::size_t{0}}) {
    for (const std::size_t max_inflight : {std::size_t{0}, std::size_t{1}}) {
      P pool(on_busy_ranks({.processes = 2, .chunksize = chunksize, .max_inflight = max_inflight}));
      const std::string where = std::string(pool_name<P>()) + " chunksize " +
                                std::to_string(chunksize) + " max_inflight " +
                                std::to_string(max_inflight) + ": ";
      // Each call over an empty input, of four kinds: a vector, an empty
      // iota (sized, not a container), a filter that keeps nothing (unsized),
      // a single-pass range of none. "N" per call: what it gave.
      std::vector<std::string> got;
      auto every_call = [&](auto make) {
        std::size_t count = pool.map(&square_plus, make()).size();
        count += pool.map_outcomes(&square_plus, make()).size();
        for ([[maybe_unused]] int v : pool.imap(&square_plus, make()))
          ++count;
        for ([[maybe_unused]] const auto& r : pool.imap_unordered(&square_plus, make()))
          ++count;
        for ([[maybe_unused]] const auto& o : pool.imap_outcomes(&square_plus, make()))
          ++count;
        got.push_back(std::to_string(count));
      };
      const std::vector<int> none;
      const std::vector<int> five = range(5);
      SayWhen empty_stream(0, 100, SayWhen::Throws::on_read);
      try {
        every_call([&]() -> const std::vector<int>& { return none; });
        every_call([] { return std::views::iota(0, 0); });
        every_call([&] { return five | std::views::filter([](int x) { return x > 100; }); });
        every_call([&]() -> SayWhen& { return empty_stream; });
        got.push_back(
            std::to_string(pool.starmap(&mul, std::vector<std::tuple<long, long>>{}).size()));
      } catch (...) {
        got.push_back(error_kind(std::current_exception()));
      }
      lines.push_back(where + "empty inputs " + joined(got));
      if (got != std::vector<std::string>(5, "0")) failures.push_back(lines.back());
      // starmap over tuples: pow(a, a % 4), eagerly and from a lazy view;
      // a tuple of an int and a string; submit with no argument at all.
      std::vector<std::tuple<long, long>> pairs;
      std::vector<long> powers;
      for (long a = 0; a < 12; ++a) {
        pairs.emplace_back(a, a % 4);
        powers.push_back(ipow(a, a % 4));
      }
      std::vector<std::tuple<int, std::string>> labelled;
      std::vector<std::string> labels;
      for (int i = 0; i < 7; ++i) {
        labelled.emplace_back(i, std::string(static_cast<std::size_t>(i), 'x'));
        labels.push_back(label_with(i, std::string(static_cast<std::size_t>(i), 'x')));
      }
      std::string star;
      try {
        star += pool.starmap(&ipow, pairs) == powers ? "eager right" : "eager WRONG";
        auto lazy = pairs | std::views::filter([](const auto&) { return true; });
        star += pool.starmap(&ipow, lazy) == powers ? ", lazy right" : ", lazy WRONG";
        star +=
            pool.starmap(&label_with, labelled) == labels ? ", strings right" : ", strings WRONG";
        star += pool.submit(&forty_two).get() == 42 ? ", submit() right" : ", submit() WRONG";
        auto v = pool.submit(&nothing_at_all);
        v.get();
        star += ", submit() void right";
      } catch (...) {
        star += " then " + error_kind(std::current_exception());
      }
      lines.push_back(where + star);
      if (star != "eager right, lazy right, strings right, submit() right, submit() void right")
        failures.push_back(lines.back());
      // and the pool goes on
      const auto again = pool.map(&square_plus, range(20));
      for (int i = 0; i < 20; ++i)
        if (again[static_cast<std::size_t>(i)] != square_plus(i))
          failures.push_back(where + "map afterwards, at " + std::to_string(i));
    }
  }
  return lines;
}

// 14. terminate() from another thread while the consumer's thread encodes
// inputs (their save(), without any lock of the pool's): every input the
// call read still gets an outcome, then the call ends with PoolClosed.

/// An input whose save() counts itself, and which, when `slow`, signals that
/// it has begun and takes 300 ms (a terminate() lands meanwhile).
std::atomic<int> gated_saves{0};
std::atomic<bool> slow_save_begun{false};
struct GatedSave {
  int value = 0;
  bool slow = false;
  std::string note;  // off the trivially copyable path: save() runs
  template <class Archive>
  void save(Archive& ar) const {
    ++gated_saves;
    if (slow) {
      slow_save_begun = true;
      std::this_thread::sleep_for(milliseconds(300));
    }
    ar(value, slow, note);
  }
  template <class Archive>
  void load(Archive& ar) {
    ar(value, slow, note);
  }
};
int gated_value(const GatedSave& g) {
  std::this_thread::sleep_for(milliseconds(10));
  return g.value * 10 + 1;
}

template <class P>
std::vector<std::string> terminate_while_encoding_scenario(std::vector<std::string>& failures) {
  std::vector<std::string> lines;
  std::vector<GatedSave> inputs(40);
  for (int i = 0; i < 40; ++i)
    inputs[static_cast<std::size_t>(i)] = GatedSave{i, i == 6, {}};
  for (const std::size_t chunksize : {std::size_t{1}, std::size_t{3}}) {
    const std::string where =
        std::string(pool_name<P>()) + " chunksize " + std::to_string(chunksize) + ": ";
    P pool(on_busy_ranks({.processes = 1, .chunksize = chunksize}));
    gated_saves = 0;
    slow_save_begun = false;
    std::thread terminator([&] {
      const auto give_up = Clock::now() + seconds(10);
      while (!slow_save_begun && Clock::now() < give_up)
        std::this_thread::sleep_for(milliseconds(1));
      pool.terminate();
    });
    std::vector<std::string> got;
    std::string end = "end";
    std::size_t next = 0;
    bool in_order = true;
    try {
      // (Only the inputs from a vector: its std::views::all walks them lazily.)
      for (const auto& o : pool.imap_outcomes(&gated_value, std::views::all(inputs))) {
        in_order = in_order && o.index == next++;
        if (o.ok()) {
          if (*o.value != static_cast<int>(o.index) * 10 + 1) in_order = false;
          got.push_back(std::to_string(o.index));
        } else {
          got.push_back(std::to_string(o.index) + ":" + error_kind(o.error));
        }
      }
    } catch (...) {
      end = error_kind(std::current_exception());
    }
    terminator.join();
    const int read = gated_saves.load();
    lines.push_back(where + std::to_string(got.size()) + " outcomes " + joined(got) + " then " +
                    end + ", " + std::to_string(read) + " inputs read");
    std::fprintf(stderr, "  %s\n", lines.back().c_str());
    // Every input read (saved) has its outcome, in order; the slow one (6)
    // was read, so it is among them; the call ends with PoolClosed.
    if (!in_order || static_cast<int>(got.size()) != read || got.size() < 7 || end != "PoolClosed")
      failures.push_back(lines.back());
  }
  return lines;
}

// 15. A slow input range (a stream, a query per input) with quick tasks:
// results flow while it is read, not once the in-flight bound is full.

std::atomic<int> slow_reads{0};
int read_slowly(int i) {
  std::this_thread::sleep_for(milliseconds(20));
  ++slow_reads;
  return i;
}

template <class P>
std::string slow_range_scenario(std::vector<std::string>& failures, std::size_t chunksize) {
  P pool(on_busy_ranks({.processes = 2, .chunksize = chunksize}));
  slow_reads = 0;
  int read_at_first = -1, handed = 0;
  bool in_order = true;
  const std::vector<int> numbers = range(60);
  for (int v : pool.imap(&square_plus, numbers | std::views::transform(&read_slowly))) {
    if (read_at_first < 0) read_at_first = slow_reads.load();
    in_order = in_order && v == square_plus(handed++);
  }
  const std::string line = std::string(pool_name<P>()) + " chunksize " + std::to_string(chunksize) +
                           ": first of " + std::to_string(handed) + " results handed over after " +
                           std::to_string(read_at_first) + " of 60 inputs read (20 ms each)";
  std::fprintf(stderr, "  %s\n", line.c_str());
  // Before fill() and the root's top-up stopped after 10 ms of reading,
  // mpi::Pool read all 60 first (its bound is 1024 inputs or more), and
  // procpool::Pool 8-14, under ASan once 60. Now 2-8.
  if (handed != 60 || !in_order || read_at_first > 30) failures.push_back(line);
  return line;
}

// 16. An imap whose task throws, read again after it threw (README: "A call
// that threw ... throws the same error again").

int throws_at_5(int x) {
  if (x == 5) throw std::invalid_argument("input 5 is refused");
  return x * 10 + 1;
}

template <class P>
std::string read_again_scenario(std::vector<std::string>& failures,
                                procpool::detail::Delivery via) {
  P pool(on_busy_ranks({.processes = 2, .chunksize = 3}));
  const std::vector<int> inputs = range(20);
  std::string walks;
  auto walk = [&](auto& results) {
    for (int walk_no = 0; walk_no < 2; ++walk_no) {
      std::size_t n = 0;
      try {
        for (auto it = results.begin(); it != std::default_sentinel; ++it)
          ++n;
        walks += "[" + std::to_string(n) + " then end]";
      } catch (const procpool::TaskError& e) {
        walks += "[" + std::to_string(n) + " then TaskError " + std::to_string(e.index()) + "]";
      } catch (...) {
        walks += "[" + std::to_string(n) + " then " + error_kind(std::current_exception()) + "]";
      }
    }
  };
  if (via == procpool::detail::Delivery::ordered) {
    auto results = pool.imap(&throws_at_5, inputs);
    walk(results);
  } else {
    auto results = pool.imap_unordered(&throws_at_5, inputs);
    walk(results);
  }
  const std::string line =
      std::string(pool_name<P>()) +
      (via == procpool::detail::Delivery::ordered ? " imap: " : " imap_unordered: ") + walks;
  std::fprintf(stderr, "  %s\n", line.c_str());
  // The first walk ends with input 5's error (imap: after 0-4); the second
  // throws it again at once, handing over nothing more.
  const bool again = walks.ends_with("[0 then TaskError 5]");
  const bool first =
      via != procpool::detail::Delivery::ordered || walks.starts_with("[5 then TaskError 5]");
  if (!again || !first) failures.push_back(line);
  return line;
}

// 17. Odd chunk sizes and input counts: none, one, a chunk larger than the
// whole input (CPython passes sys.maxsize), counts not a multiple of it;
// errors keep their global index across chunks. (Failed when written:
// mpi::Pool with chunksize SIZE_MAX hangs in its first call of one input;
// CallState::inflight_bound_locked() in src/mpi/hub.cpp sums capacity x
// chunksize, which wraps, so send_new_chunks() finds the chunk larger than
// the in-flight bound and, max_inflight being automatic, waits for a
// consumer that waits for it; fixed with saturating sums, a chunk no larger
// than what is left of a sized range, and a chunk that goes when nothing is
// out. procpool::Pool takes every count.)

/// Fails every input x with x % 7 == 3.
int square_unless_3_mod_7(int x) {
  if (x % 7 == 3) throw std::invalid_argument("three mod seven: " + std::to_string(x));
  return x * x + 1;
}
/// "I" for a TaskError of input I from square_unless_3_mod_7 (index, type and
/// message right), else "I?(what)" or the error's kind.
std::string mod7_error(const std::exception_ptr& error, std::size_t at) {
  try {
    std::rethrow_exception(error);
  } catch (const procpool::TaskError& e) {
    const bool right = e.index() % 7 == 3 && e.type_name() == "std::invalid_argument" &&
                       e.remote_what() == "three mod seven: " + std::to_string(e.index());
    return std::to_string(e.index()) + (right ? "" : "?(" + std::string(e.what()) + ")");
  } catch (...) {
    return std::to_string(at) + ":" + error_kind(std::current_exception());
  }
}

template <class P>
std::vector<std::string> odd_chunks_scenario(std::vector<std::string>& failures) {
  std::vector<std::string> lines;
  const std::vector<int> counts{0, 1, 2, 5, 17, 54};
  for (const std::size_t chunksize :
       {std::size_t{2}, std::size_t{7}, std::size_t{53}, std::size_t{100000},
        std::numeric_limits<std::size_t>::max()}) {
    P pool(on_busy_ranks({.processes = 2, .chunksize = chunksize}));
    const std::string where =
        std::string(pool_name<P>()) + " chunksize " +
        (chunksize == std::numeric_limits<std::size_t>::max() ? std::string("SIZE_MAX")
                                                              : std::to_string(chunksize)) +
        ": ";
    std::vector<std::string> per_n;
    std::vector<std::string> failed_here;  // written by the walking thread only
    // On a thread of its own: a call that hangs fails the case (terminate()
    // ends it after 5 s) instead of holding up the mode.
    const bool returned = returned_within(
        [&] {
          for (const int n : counts) {
            const std::vector<int> xs = range(n);
            const std::string at = where + "n " + std::to_string(n) + ": ";
            std::string note = std::to_string(n) + "[";
            try {
              // map, imap (input order), imap_unordered (each index once), starmap.
              std::vector<int> want;
              for (int x : xs)
                want.push_back(square_plus(x));
              if (pool.map(&square_plus, xs) != want) failed_here.push_back(at + "map");
              std::vector<int> in_order;
              for (int v :
                   pool.imap(&square_plus, xs | std::views::transform([](int x) { return x; })))
                in_order.push_back(v);
              if (in_order != want) failed_here.push_back(at + "imap over a view");
              std::vector<int> seen(static_cast<std::size_t>(n), 0);
              bool right = true;
              for (const auto& [index, value] : pool.imap_unordered(&square_plus, xs)) {
                right = right && index < static_cast<std::size_t>(n) &&
                        value == square_plus(static_cast<int>(index));
                if (index < seen.size()) ++seen[index];
              }
              if (!right || !std::ranges::all_of(seen, [](int c) { return c == 1; }))
                failed_here.push_back(at + "imap_unordered");
              std::vector<std::tuple<long, long>> pairs;
              std::vector<long> products;
              for (long x = 0; x < n; ++x) {
                pairs.emplace_back(x, x + 1);
                products.push_back(x * (x + 1));
              }
              if (pool.starmap(&mul, pairs) != products) failed_here.push_back(at + "starmap");
              // map_outcomes: every x % 7 == 3 fails alone, with its global index.
              std::vector<std::string> got, want_outcomes;
              const auto outcomes = pool.map_outcomes(&square_unless_3_mod_7, xs);
              for (std::size_t i = 0; i < outcomes.size(); ++i) {
                const auto& o = outcomes[i];
                if (o.ok()) {
                  got.push_back(
                      std::to_string(o.index) +
                      (o.index == i && *o.value == square_plus(static_cast<int>(i)) ? "" : "?"));
                } else {
                  got.push_back(mod7_error(o.error, i) + "!");
                }
              }
              for (int i = 0; i < n; ++i)
                want_outcomes.push_back(std::to_string(i) + (i % 7 == 3 ? "!" : ""));
              if (got != want_outcomes) failed_here.push_back(at + "map_outcomes " + joined(got));
              // imap: the values before input 3, then input 3's error.
              std::size_t before = 0;
              std::string end = "end";
              try {
                for (int v : pool.imap(&square_unless_3_mod_7, xs)) {
                  if (v != square_plus(static_cast<int>(before))) end = "wrong value";
                  ++before;
                }
              } catch (...) {
                end = mod7_error(std::current_exception(), before);
              }
              note += "imap " + std::to_string(before) + "+" + end;
              if (n > 3 ? (before != 3 || end != "3")
                        : (before != static_cast<std::size_t>(n) || end != "end"))
                failed_here.push_back(at + "imap " + std::to_string(before) + " values then " +
                                      end);
              // map and imap_unordered: the error of one failing input (which one
              // is not promised: printed).
              for (const bool unordered : {false, true}) {
                end = "end";
                bool values_right = true;
                try {
                  if (unordered) {
                    for (const auto& [index, value] :
                         pool.imap_unordered(&square_unless_3_mod_7, xs))
                      values_right = values_right && index % 7 != 3 &&
                                     value == square_plus(static_cast<int>(index));
                  } else {
                    values_right = pool.map(&square_unless_3_mod_7, xs) == want;
                  }
                } catch (...) {
                  end = mod7_error(std::current_exception(), 0);
                }
                note += std::string(unordered ? " unordered " : " map ") + end;
                const bool right_end =
                    n > 3 ? end != "end" && end.find_first_not_of("0123456789") == std::string::npos
                          : end == "end";
                if (!values_right || !right_end)
                  failed_here.push_back(at + (unordered ? "imap_unordered" : "map") +
                                        " ended with " + end);
              }
            } catch (...) {
              note += " threw " + error_kind(std::current_exception());
              failed_here.push_back(at + note);
            }
            per_n.push_back(note + "]");
          }
        },
        [&] { pool.terminate(); }, seconds(5),
        where + "HUNG: its calls have not returned in 5 s; terminate() now");
    for (std::string& f : failed_here)
      failures.push_back(std::move(f));
    if (!returned)
      failures.push_back(
          where + "HUNG for 5 s, then terminate() ended it (the first n that says PoolClosed)");
    lines.push_back(where + "n " + joined(per_n));
    std::fprintf(stderr, "  %s\n", lines.back().c_str());
  }
  return lines;
}

// 17. Empty, tiny and 1 MiB results beside 1 MiB error messages in one chunk;
// then close() and join() after the failing map (CPython test_map_no_failfast:
// raise_large_valuerror made join() deadlock).

/// x % 4: 0 an empty string, 1 a 1 MiB pattern, 2 throws a runtime_error
/// whose what() is 1 MiB of 'e' then x, 3 a short string.
std::string mixed_sizes(int x) {
  switch (x % 4) {
    case 0:
      return {};
    case 1:
      return pattern(std::size_t{1} << 20, x);
    case 2:
      throw std::runtime_error(std::string(std::size_t{1} << 20, 'e') + std::to_string(x));
    default:
      return "short " + std::to_string(x);
  }
}
/// "I" if `s` is what mixed_sizes(I) returns, else "I?".
std::string mixed_text(const std::string& s, std::size_t i) {
  const int x = static_cast<int>(i);
  const bool right = x % 4 == 0   ? s.empty()
                     : x % 4 == 1 ? s.size() == (std::size_t{1} << 20) &&
                                        checksum(s) == checksum(pattern(std::size_t{1} << 20, x))
                     : x % 4 == 3 ? s == "short " + std::to_string(x)
                                  : false;
  return std::to_string(i) + (right ? "" : "?");
}
/// "I:big" for a TaskError of input I whose 1 MiB message arrived whole.
std::string big_error_text(const std::exception_ptr& error, std::size_t at) {
  try {
    std::rethrow_exception(error);
  } catch (const procpool::TaskError& e) {
    const std::string want = std::string(std::size_t{1} << 20, 'e') + std::to_string(e.index());
    const bool right = e.type_name() == "std::runtime_error" && e.remote_what() == want &&
                       e.stage() == procpool::TaskError::Stage::task;
    return std::to_string(e.index()) +
           (right ? ":big"
                  : ":wrong message of " + std::to_string(e.remote_what().size()) + " bytes");
  } catch (...) {
    return std::to_string(at) + ":" + error_kind(std::current_exception());
  }
}

template <class P>
std::vector<std::string> mixed_sizes_scenario(std::vector<std::string>& failures) {
  constexpr int n = 12;
  std::vector<std::string> lines;
  std::vector<std::string> want;
  for (int i = 0; i < n; ++i)
    want.push_back(std::to_string(i) + (i % 4 == 2 ? ":big" : ""));
  for (const std::size_t chunksize : {std::size_t{n}, std::size_t{1}, std::size_t{0}}) {
    P pool(on_busy_ranks({.processes = 2, .chunksize = chunksize}));
    const std::string where =
        std::string(pool_name<P>()) + " chunksize " + std::to_string(chunksize) + ": ";
    std::vector<std::string> got;
    const auto outcomes = pool.map_outcomes(&mixed_sizes, range(n));
    for (std::size_t i = 0; i < outcomes.size(); ++i) {
      const auto& o = outcomes[i];
      got.push_back(o.ok() ? (o.index == i ? mixed_text(*o.value, i) : std::to_string(i) + "?")
                           : big_error_text(o.error, i));
    }
    lines.push_back(where + "map_outcomes " + joined(got));
    if (got != want) failures.push_back(lines.back());
    // imap: 0 and 1, then input 2's error, its message whole.
    got.clear();
    std::string end = "end";
    try {
      for (const std::string& s : pool.imap(&mixed_sizes, range(n)))
        got.push_back(mixed_text(s, got.size()));
    } catch (...) {
      end = big_error_text(std::current_exception(), got.size());
    }
    lines.push_back(where + "imap " + joined(got) + " then " + end);
    if (got != std::vector<std::string>{"0", "1"} || end != "2:big")
      failures.push_back(lines.back());
    // test_map_no_failfast: a submitted slow task, a map that fails, then
    // close() and join(): bounded, and the slow task's value is there.
    auto slow = pool.submit(&sleep_then_return, 300);
    const auto start = Clock::now();
    end = "end";
    try {
      (void)pool.map(&mixed_sizes, range(n));
    } catch (...) {
      end = big_error_text(std::current_exception(), 0);
    }
    pool.close();
    pool.join();
    const double took = std::chrono::duration<double>(Clock::now() - start).count();
    const std::string slow_got = outcome_of([&] { return slow.get(); });
    lines.push_back(where + "map threw " + end + ", close()+join() after " +
                    std::to_string(took).substr(0, 4) + " s, the submitted task: " + slow_got);
    if (end.size() < 4 || end.substr(end.size() - 4) != ":big" || std::stoul(end) % 4 != 2 ||
        took > 5 || slow_got != "value 300")
      failures.push_back(lines.back());
    for (const std::string& line : lines)
      if (line.starts_with(where)) std::fprintf(stderr, "  %s\n", line.c_str());
  }
  return lines;
}

// 18. max_tasks_per_child with imap_unordered and tasks that crash their
// worker once (CPython test_pool_worker_lifetime; loky max_tasks with crashes).

/// x * 10 + 1 and the worker that ran it; every x % 5 == 2 kills its worker
/// (_exit(7)) the first time it runs (its marker under `dir` says it has).
std::pair<int, int> pid_after_crash_once(int x, const std::string& dir) {
  if (x % 5 == 2) {
    const std::string marker = dir + "/" + std::to_string(x);
    const int fd = ::open(marker.c_str(), O_CREAT | O_EXCL | O_WRONLY, 0600);
    if (fd >= 0) {
      ::close(fd);
      ::_exit(7);
    }
  }
  return {x * 10 + 1, static_cast<int>(::getpid())};
}

template <class P>
std::vector<std::string> recycling_crash_scenario(std::vector<std::string>& failures) {
  constexpr int n = 30;
  constexpr int per_child = 3;
  std::vector<std::string> lines;
  for (const std::size_t chunksize : {std::size_t{1}, std::size_t{4}}) {
    const std::string where =
        std::string(pool_name<P>()) + " chunksize " + std::to_string(chunksize) + ": ";
    MarkerDir dir;
    P pool({.processes = 2,
            .chunksize = chunksize,
            .retries = 1,
            .max_tasks_per_child = static_cast<std::size_t>(per_child)});
    std::map<int, int> per_pid;  // tasks returned by each worker process
    bool right = true;
    for (int round = 0; round < 2; ++round) {
      std::vector<int> seen(n, 0);
      try {
        for (const auto& [index, value] :
             pool.imap_unordered(&pid_after_crash_once, range(n), dir.path)) {
          right = right && index < static_cast<std::size_t>(n) &&
                  value.first == static_cast<int>(index) * 10 + 1;
          if (index < seen.size()) ++seen[index];
          ++per_pid[value.second];
        }
      } catch (...) {
        right = false;
        lines.push_back(where + "round " + std::to_string(round) + " threw " +
                        error_kind(std::current_exception()));
        failures.push_back(lines.back());
      }
      right = right && std::ranges::all_of(seen, [](int c) { return c == 1; });
    }
    int most = 0;
    for (const auto& [pid, tasks] : per_pid)
      most = std::max(most, tasks);
    const unsigned crashes = crashes_of(pool.insights());
    lines.push_back(where + "2 x " + std::to_string(n) + " results " + (right ? "right" : "WRONG") +
                    ", " + std::to_string(per_pid.size()) + " worker processes, at most " +
                    std::to_string(most) + " tasks each, " + std::to_string(dir.count()) +
                    " crashed once, crashes in insights " + std::to_string(crashes));
    std::fprintf(stderr, "  %s\n", lines.back().c_str());
    // Each input once, right; no worker ran more than max_tasks_per_child
    // tasks (counted per task, a chunk of 4 included); 60 tasks need 20
    // worker lives at least; 6 inputs crashed once each, and were retried.
    if (!right || most > per_child || per_pid.size() < 2 * n / per_child || dir.count() != 6 ||
        crashes != 6)
      failures.push_back(lines.back());
    const auto again = pool.map(&square_plus, range(20));
    for (int i = 0; i < 20; ++i)
      if (again[static_cast<std::size_t>(i)] != square_plus(i))
        failures.push_back(where + "map afterwards, at " + std::to_string(i));
  }
  return lines;
}

// 19. An endless imap_unordered with max_inflight, left after 40 results;
// then a burst of submits, some dropped, and close() + join() (mpi4py
// test_map_unordered, test_shutdown_wait; CPython test_imap_unordered).

/// 30 ms for every tenth input, 1 ms for the rest.
int uneven(int x) {
  std::this_thread::sleep_for(milliseconds(x % 10 == 0 ? 30 : 1));
  return x * x + 1;
}

template <class P>
std::vector<std::string> endless_then_submits_scenario(std::vector<std::string>& failures) {
  constexpr std::size_t max_inflight = 6;
  constexpr int wanted = 40, submits = 120, dropped = 30;
  std::vector<std::string> lines;
  for (const std::size_t chunksize : {std::size_t{1}, std::size_t{3}}) {
    const std::string where =
        std::string(pool_name<P>()) + " chunksize " + std::to_string(chunksize) + ": ";
    P pool(on_busy_ranks({.processes = 2, .chunksize = chunksize, .max_inflight = max_inflight}));
    std::atomic<std::size_t> taken{0};
    std::size_t handed = 0, most_ahead = 0, taken_at_break = 0;
    std::set<std::size_t> seen;
    bool right = true;
    const auto start = Clock::now();
    {
      auto results =
          pool.imap_unordered(&uneven, std::views::iota(0) | std::views::transform([&taken](int x) {
                                         ++taken;
                                         return x;
                                       }));
      for (const auto& [index, value] : results) {
        ++handed;
        right = right && value == square_plus(static_cast<int>(index)) && seen.insert(index).second;
        most_ahead = std::max(most_ahead, taken.load() - handed);
        if (handed == wanted) break;
      }
      taken_at_break = taken.load();
    }  // left here
    const double left_after = std::chrono::duration<double>(Clock::now() - start).count();
    const std::size_t taken_after = taken.load();
    // A burst of submits: every fifth fails; the dropped ones leave markers.
    const int root_pid = static_cast<int>(::getpid());
    std::vector<procpool::Future<int>> fs;
    for (int i = 0; i < submits; ++i)
      fs.push_back(pool.submit(&square_unless_3_mod_5, i));
    for (int i = 0; i < dropped; ++i)
      (void)pool.submit(&touch_marker, root_pid, i);
    pool.close();
    pool.join();
    const int markers = markers_left(dropped);
    int values = 0, errors = 0;
    for (int i = 0; i < submits; ++i) {
      try {
        values += fs[static_cast<std::size_t>(i)].get() == square_plus(i) && i % 5 != 3;
      } catch (const procpool::TaskError& e) {
        errors += i % 5 == 3 && e.remote_what() == "three mod five: " + std::to_string(i);
      } catch (...) {
      }
    }
    const double took = std::chrono::duration<double>(Clock::now() - start).count();
    lines.push_back(where + std::to_string(handed) + " results " + (right ? "right" : "WRONG") +
                    ", at most " + std::to_string(most_ahead) + " inputs ahead, taken " +
                    std::to_string(taken_at_break) + " then " + std::to_string(taken_after) +
                    " (left in " + std::to_string(left_after).substr(0, 4) +
                    " s); after join(): " + std::to_string(values) + " values + " +
                    std::to_string(errors) + " TaskErrors of " + std::to_string(submits) + ", " +
                    std::to_string(markers) + " of " + std::to_string(dropped) +
                    " dropped tasks ran, " + std::to_string(took).substr(0, 4) + " s");
    std::fprintf(stderr, "  %s\n", lines.back().c_str());
    // README: max_inflight bounds the inputs taken and not handed back; a
    // left call takes no more input; join() waits for accepted work (the
    // dropped Futures' tasks too), and every Future has its outcome.
    if (handed != wanted || !right || most_ahead > max_inflight || taken_after != taken_at_break ||
        values != submits - submits / 5 || errors != submits / 5 || markers != dropped || took > 8)
      failures.push_back(lines.back());
  }
  return lines;
}

// 20. A chunksize beyond any range (CPython's test_map_chunksize passes
// sys.maxsize) over an endless input, then a sized one: a chunk ends at a
// byte budget, so the call reads a bounded way ahead and its results flow.
// (Failed when written: mpi::Pool read iota(0) into its first chunk for ever,
// as a node chunk ended only at its count; procpool::Pool cuts a chunk at
// 256 KiB of inputs.)

/// x + 1 (any index of an endless range: no overflow before 2^31).
int next_int(int x) {
  return x + 1;
}

/// The lines compared: what each call handed over.
template <class P>
std::vector<std::string> endless_huge_chunks_scenario(std::vector<std::string>& failures) {
  constexpr int wanted = 30;
  // Chunks in flight are bounded: procpool::Pool read 196608 ints ahead,
  // mpi::Pool 262142 when this was written (a 1 MiB chunk; 3 nodes may hold a
  // few each).
  constexpr std::size_t most_ahead = std::size_t{8} << 20;
  std::vector<std::string> lines;
  P pool(on_busy_ranks({.processes = 2, .chunksize = std::numeric_limits<std::size_t>::max()}));
  const std::string where = std::string(pool_name<P>()) + " chunksize SIZE_MAX: ";
  for (const bool ordered : {true, false}) {
    std::atomic<std::size_t> taken{0};
    auto counted = std::views::iota(0) | std::views::transform([&taken](int x) {
                     ++taken;
                     return x;
                   });
    std::vector<std::string> got;
    const bool returned = returned_within(
        [&] {
          int handed = 0;
          auto note = [&](std::size_t index, int value) {
            const bool right = value == next_int(static_cast<int>(index));
            if (!right) got.push_back("wrong value at " + std::to_string(index));
            return ++handed == wanted;
          };
          if (ordered) {
            for (const int v : pool.imap(&next_int, counted))
              if (note(static_cast<std::size_t>(handed), v)) break;
          } else {
            for (const auto& [index, v] : pool.imap_unordered(&next_int, counted))
              if (note(index, v)) break;
          }
          got.push_back(std::to_string(handed) + " results");
        },
        [&] { pool.terminate(); }, seconds(60), where + "hung");
    const std::string call = ordered ? "imap" : "imap_unordered";
    lines.push_back(call + ": " + joined(got));
    std::fprintf(stderr, "  %s%s: %s, %zu inputs read\n", where.c_str(), call.c_str(),
                 joined(got).c_str(), taken.load());
    if (!returned || taken.load() > most_ahead)
      failures.push_back(where + call + ": " + joined(got) + ", " + std::to_string(taken.load()) +
                         " inputs read");
  }
  // Then a vector of a million ints (4 MB, copied a block at a time): the
  // same huge chunksize, every result.
  const std::vector<int> xs = range(1000000);
  const std::vector<int> all = pool.map(&next_int, xs);
  bool right = all.size() == xs.size();
  for (std::size_t i = 0; right && i < xs.size(); ++i)
    right = all[i] == next_int(xs[i]);
  lines.push_back(std::string("map of 1000000: ") + (right ? "right" : "WRONG"));
  if (!right) failures.push_back(where + lines.back());
  return lines;
}

// 21. A call stopped by an error, with a progress line (Progress::on,
// stderr a file: the plain log): the line's last word is "failed" as the
// error reaches the caller, who still holds the call, and no other follows
// when the call goes (README: the final line says done, failed, interrupted
// or stopped). (Failed when written: mpi::Pool printed no final line until
// the call's handle went, and then "stopped".)

/// Runs `body` with this process's stderr going to a file: what was written
/// by the time body() called mark(), and in all.
struct CapturedStderr {
  std::string at_mark;
  std::string all;
};
template <class Body>
CapturedStderr capture_stderr(Body body) {
  std::fflush(stderr);
  char path[] = "/tmp/procpool_peers_stderr_XXXXXX";
  const int file = ::mkstemp(path);
  if (file < 0) throw std::system_error(errno, std::generic_category(), "mkstemp");
  ::unlink(path);
  struct Redirected {  // stderr is the terminal's again however body() ends
    int saved = ::dup(STDERR_FILENO);
    explicit Redirected(int to) { ::dup2(to, STDERR_FILENO); }
    ~Redirected() {
      std::fflush(stderr);
      ::dup2(saved, STDERR_FILENO);
      ::close(saved);
    }
    Redirected(const Redirected&) = delete;
    Redirected& operator=(const Redirected&) = delete;
  };
  off_t marked = 0;
  {
    const Redirected redirected(file);
    body([&] {
      std::fflush(stderr);
      marked = ::lseek(STDERR_FILENO, 0, SEEK_CUR);
    });
  }
  std::string all(static_cast<std::size_t>(::lseek(file, 0, SEEK_END)), '\0');
  const ssize_t got = ::pread(file, all.data(), all.size(), 0);
  ::close(file);
  all.resize(got > 0 ? static_cast<std::size_t>(got) : 0);
  return {all.substr(0, static_cast<std::size_t>(marked)), all};
}

/// The last words of the progress log's final lines in `text` ("failed",
/// "stopped" ...), space-separated; "none" when no line is final.
std::string final_words(const std::string& text) {
  std::string words;
  std::istringstream lines(text);
  for (std::string line; std::getline(lines, line);) {
    if (!line.starts_with("procpool: ")) continue;
    for (const char* word : {"done", "failed", "interrupted", "stopped"})
      if (line.ends_with(std::string(", ") + word))
        words += (words.empty() ? "" : " ") + std::string(word);
  }
  return words.empty() ? "none" : words;
}

template <class P>
std::vector<std::string> failed_progress_scenario(std::vector<std::string>& failures) {
  std::vector<std::string> lines;
  P pool(on_busy_ranks({.processes = 2, .chunksize = 1, .progress = procpool::Progress::on}));
  for (const bool range_breaks : {false, true}) {
    const std::string what = range_breaks ? "the range throws at 6" : "task 3 throws";
    std::string thrown = "nothing";
    const CapturedStderr out = capture_stderr([&](auto mark) {
      const std::vector<int> xs = range(20);
      auto inputs = xs | std::views::transform([range_breaks](int x) {
                      if (range_breaks && x == 6) throw std::runtime_error("the range broke at 6");
                      return x;
                    });
      auto results = pool.imap(range_breaks ? &square_plus : &square_unless_3_mod_5, inputs);
      try {
        for (const int v : results)
          (void)v;
      } catch (...) {
        thrown = error_kind(std::current_exception());
      }
      mark();  // the call is still held here
    });
    lines.push_back(what + ": threw " + thrown + "; the line's last word as it threw: " +
                    final_words(out.at_mark) + ", in all: " + final_words(out.all));
    std::fprintf(stderr, "  %s %s\n", pool_name<P>(), lines.back().c_str());
    if (final_words(out.at_mark) != "failed" || final_words(out.all) != "failed")
      failures.push_back(std::string(pool_name<P>()) + " " + lines.back());
  }
  return lines;
}

}  // namespace

std::vector<Case> differential_cases_2() {
  std::vector<Case> cases;
  cases.push_back(
      {"empty_inputs_starmap_no_args",
       "_test_multiprocessing test_empty_iterable, test_starmap; mpi4py test_map (empty), "
       "test_starmap, test_submit (no arguments)",
       [] {
         std::vector<std::string> failures;
         const auto local = empty_and_starmap_scenario<procpool::Pool>(failures);
         const auto remote = empty_and_starmap_scenario<procpool::mpi::Pool>(failures);
         for (const auto* lines : {&local, &remote})
           for (const std::string& line : *lines)
             std::fprintf(stderr, "  %s\n", line.c_str());
         PEER_CHECK_MSG(failures.empty(), joined(failures));
       }});
  cases.push_back(
      {"terminate_while_inputs_are_encoded",
       "_test_multiprocessing test_terminate (work outstanding); loky test_shutdown while "
       "the call feeds its inputs",
       [] {
         std::vector<std::string> failures;
         (void)terminate_while_encoding_scenario<procpool::Pool>(failures);
         (void)terminate_while_encoding_scenario<procpool::mpi::Pool>(failures);
         PEER_CHECK_MSG(failures.empty(), joined(failures));
       }});
  cases.push_back({"slow_input_range_results_flow",
                   "_test_multiprocessing test_imap (lazy consumption); mpi4py test_map_lazy", [] {
                     std::vector<std::string> failures;
                     for (const std::size_t chunksize : {std::size_t{1}, std::size_t{0}}) {
                       (void)slow_range_scenario<procpool::Pool>(failures, chunksize);
                       (void)slow_range_scenario<procpool::mpi::Pool>(failures, chunksize);
                     }
                     PEER_CHECK_MSG(failures.empty(), joined(failures));
                   }});
  cases.push_back({"task_error_then_read_again",
                   "_test_multiprocessing test_imap (an error, then next() again)", [] {
                     std::vector<std::string> failures;
                     for (const auto via : {procpool::detail::Delivery::ordered,
                                            procpool::detail::Delivery::unordered}) {
                       (void)read_again_scenario<procpool::Pool>(failures, via);
                       (void)read_again_scenario<procpool::mpi::Pool>(failures, via);
                     }
                     PEER_CHECK_MSG(failures.empty(), joined(failures));
                   }});
  cases.push_back({"odd_chunksizes_and_input_counts",
                   "_test_multiprocessing test_map_chunksize (sys.maxsize), test_imap, "
                   "test_imap_unordered (chunksize 53); mpi4py test_map_chunksize, "
                   "test_map_unordered",
                   [] {
                     std::vector<std::string> failures;
                     (void)odd_chunks_scenario<procpool::Pool>(failures);
                     (void)odd_chunks_scenario<procpool::mpi::Pool>(failures);
                     PEER_CHECK_MSG(failures.empty(), joined(failures));
                   }});
  cases.push_back({"mixed_result_sizes_big_errors_no_failfast",
                   "_test_multiprocessing test_map_no_failfast (raise_large_valuerror), "
                   "test_wrapped_exception; loky large results",
                   [] {
                     std::vector<std::string> failures;
                     (void)mixed_sizes_scenario<procpool::Pool>(failures);
                     (void)mixed_sizes_scenario<procpool::mpi::Pool>(failures);
                     PEER_CHECK_MSG(failures.empty(), joined(failures));
                   }});
#if !defined(__SANITIZE_THREAD__)
  // Recycling forks from a busy rank: skipped under TSan (see recycling).
  cases.push_back({"max_tasks_per_child_imap_unordered_crashes",
                   "_test_multiprocessing test_pool_worker_lifetime; loky "
                   "test_reusable_executor max_tasks_per_child with crashes",
                   [] {
                     std::vector<std::string> failures;
                     (void)recycling_crash_scenario<procpool::Pool>(failures);
                     (void)recycling_crash_scenario<procpool::mpi::Pool>(failures);
                     PEER_CHECK_MSG(failures.empty(), joined(failures));
                   }});
#endif
  cases.push_back({"endless_imap_unordered_left_then_submits_join",
                   "mpi4py test_map_unordered, test_shutdown_wait; _test_multiprocessing "
                   "test_imap_unordered, test_context",
                   [] {
                     std::vector<std::string> failures;
                     (void)endless_then_submits_scenario<procpool::Pool>(failures);
                     (void)endless_then_submits_scenario<procpool::mpi::Pool>(failures);
                     PEER_CHECK_MSG(failures.empty(), joined(failures));
                   }});
  cases.push_back({"huge_chunksize_over_an_endless_range",
                   "_test_multiprocessing test_map_chunksize (sys.maxsize), test_imap over "
                   "an endless iterator",
                   [] {
                     std::vector<std::string> failures;
                     const auto local = endless_huge_chunks_scenario<procpool::Pool>(failures);
                     const auto remote =
                         endless_huge_chunks_scenario<procpool::mpi::Pool>(failures);
                     PEER_CHECK_MSG(failures.empty(), joined(failures));
                     PEER_CHECK_MSG(remote == local, joined(local) + " | " + joined(remote));
                   }});
  cases.push_back({"failed_call_ends_its_progress_line_failed",
                   "README (the progress line's final word); _test_multiprocessing "
                   "test_imap_handle_iterable_exception",
                   [] {
                     std::vector<std::string> failures;
                     const auto local = failed_progress_scenario<procpool::Pool>(failures);
                     const auto remote = failed_progress_scenario<procpool::mpi::Pool>(failures);
                     PEER_CHECK_MSG(failures.empty(), joined(failures));
                     PEER_CHECK_MSG(remote == local, joined(local) + " | " + joined(remote));
                   }});
  return cases;
}

}  // namespace peers
