// What every mode of mpi_peers shares: the harness, the checks that fail one
// case, and the tasks and values the cases send (see mpi_peers.cpp).
#pragma once

#include <procpool/mpi.hpp>
#include <procpool/pool.hpp>

#include "../../helpers.hpp"

#include <fcntl.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <csignal>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <functional>
#include <limits>
#include <map>
#include <mutex>
#include <numeric>
#include <optional>
#include <ranges>
#include <set>
#include <sstream>
#include <stdexcept>
#include <string>
#include <string_view>
#include <system_error>
#include <thread>
#include <tuple>
#include <type_traits>
#include <utility>
#include <variant>
#include <vector>

namespace peers {

using Clock = std::chrono::steady_clock;
using std::chrono::milliseconds;
using std::chrono::seconds;

// GCC 12's sanitizer allocators take no lock around fork(): a worker forked
// while another thread of its rank refilled its allocator cache waits for
// that lock forever (seen under ASan with gdb: the child blocks in
// SizeClassAllocator64::GetFromAllocator, in its first operator new of that
// size). LLVM 18 (ASan) and 19 (TSan) fixed it; glibc's malloc, which real
// builds use, is locked around fork(). An ASan build of these programs links
// tests/support/asan_fork_gate.cpp, which locks the allocator around fork() as
// LLVM 18 does; TSan has no such gate. The lifecycle cases fork while dozens
// of threads allocate (a node runs a thread per chunk in flight, and a
// service thread per pool): under TSan they start their workers by exec
// instead. The root and the nodes still run instrumented; only the workers'
// birth differs, and fork_worker is covered by the one-machine suite.
inline procpool::Options on_busy_ranks(procpool::Options options) {
#if defined(__SANITIZE_THREAD__)
  options.start = procpool::Start::spawn;
#endif
  return options;
}

using test_helpers::segfault;

// ---- checks that fail one case, not the program -----------------------------

struct CaseFailed : std::runtime_error {
  using std::runtime_error::runtime_error;
};

#define PEER_CHECK(cond)                                                                     \
  do {                                                                                       \
    if (!(cond))                                                                             \
      throw CaseFailed(std::string(__FILE__) + ":" + std::to_string(__LINE__) + ": " #cond); \
  } while (0)
#define PEER_CHECK_MSG(cond, msg)                                                                 \
  do {                                                                                            \
    if (!(cond))                                                                                  \
      throw CaseFailed(std::string(__FILE__) + ":" + std::to_string(__LINE__) + ": " #cond ": " + \
                       std::string(msg));                                                         \
  } while (0)

/// Errors the checks hand out by reference: kept alive (never sliced) to the end.
inline std::vector<std::exception_ptr> kept_errors;

/// Runs `f`, which must throw E; returns the error (its full dynamic type).
template <class E, class F>
const E& expect_throw(F&& f, int line) {
  try {
    f();
  } catch (const E& e) {
    kept_errors.push_back(std::current_exception());
    return e;
  } catch (const std::exception& e) {
    throw CaseFailed("line " + std::to_string(line) + ": wrong exception: " + e.what());
  }
  throw CaseFailed("line " + std::to_string(line) + ": no exception");
}
#define EXPECT_THROW_AS(E, ...) expect_throw<E>([&] { __VA_ARGS__; }, __LINE__)

/// Prints how long the step since the last lap took (where a slow case spends it).
inline void lap(const char* step) {
  static thread_local Clock::time_point last = Clock::now();
  const auto now = Clock::now();
  std::fprintf(stderr, "  %s: %.2f s\n", step, std::chrono::duration<double>(now - last).count());
  last = now;
}

inline bool contains(const std::string& s, const std::string& part) {
  return s.find(part) != std::string::npos;
}

/// The error of a failed Outcome, as E (fails the case if it is not one).
template <class E, class T>
const E& error_as(const procpool::Outcome<T>& o) {
  PEER_CHECK_MSG(!o.ok(), "input " + std::to_string(o.index) + " succeeded");
  try {
    std::rethrow_exception(o.error);
  } catch (const E& e) {
    kept_errors.push_back(std::current_exception());
    return e;
  } catch (const std::exception& e) {
    throw CaseFailed("input " + std::to_string(o.index) + ": wrong error: " + e.what());
  }
}

inline void check_located(const std::exception& e) {
  PEER_CHECK_MSG(dynamic_cast<const procpool::mpi::ErrorLocation*>(&e) != nullptr,
                 std::string("no node named on: ") + e.what());
  PEER_CHECK_MSG(contains(e.what(), "(on node "), e.what());
}

inline std::vector<int> range(int first, int last) {
  std::vector<int> v;
  for (int i = first; i < last; ++i)
    v.push_back(i);
  return v;
}
inline std::vector<int> range(int n) {
  return range(0, n);
}

// ---- the tasks (mpi4py's mul, pow, divmod, abs, time.sleep, sleep_and_raise) ----

inline long mul(long x, long y) {
  return x * y;
}
inline long ipow(long base, long exponent) {
  long r = 1;
  for (long i = 0; i < exponent; ++i)
    r *= base;
  return r;
}
inline long absolute(long x) {
  return x < 0 ? -x : x;
}
/// Python's divmod on ints, ZeroDivisionError included.
inline std::pair<long, long> divmod(long a, long b) {
  if (b == 0) throw std::domain_error("integer division or modulo by zero");
  long q = a / b;
  long r = a % b;
  if (r != 0 && ((r < 0) != (b < 0))) {
    --q;
    r += b;
  }
  return {q, r};
}
inline void sleep_for_ms(int ms) {
  std::this_thread::sleep_for(milliseconds(ms));
}
inline int sleep_then_return(int ms) {
  std::this_thread::sleep_for(milliseconds(ms));
  return ms;
}
inline int sleep_and_raise(int ms) {
  std::this_thread::sleep_for(milliseconds(ms));
  throw std::runtime_error("this is an exception");
}
inline int raise_on_odd(int x) {
  if (x % 2 != 0) throw std::invalid_argument("odd " + std::to_string(x));
  return x;
}
inline int exit_with(int status) {
  std::exit(status);
}

inline std::string label_with(int x, const std::string& prefix) {
  return prefix + std::to_string(x);
}
/// Inputs the root's input ranges have produced (transform views count them).
inline std::size_t inputs_taken = 0;
inline int counted(int x) {
  ++inputs_taken;
  return x;
}
inline int throwing_input(int x) {
  if (x == 50) throw std::runtime_error("the input range broke at 50");
  return x;
}

// ---- values that are not plain (mpi4py's GoodPickle/BadPickle/BadUnpickle) ----

/// A cereal type whose save() or load() can be told to throw. The string
/// member keeps it off the trivially-copyable fast path.
struct Picky {
  int value = 0;
  std::string name;
  bool fail_save = false;
  bool fail_load = false;
  template <class Archive>
  void save(Archive& ar) const {
    if (fail_save) throw std::runtime_error("Picky cannot be saved");
    ar(value, name, fail_load);
  }
  template <class Archive>
  void load(Archive& ar) {
    ar(value, name, fail_load);
    if (fail_load) throw std::runtime_error("Picky cannot be loaded");
  }
};
inline Picky inout(Picky p) {
  p.value += 1;
  return p;
}
/// 0: a good Picky; 1: one whose save() throws (in the worker); 2: one whose
/// load() throws (on the root).
inline Picky make_picky(int how) {
  Picky p;
  p.value = 77;
  p.name = "made";
  p.fail_save = how == 1;
  p.fail_load = how == 2;
  return p;
}

/// A cereal type slow to save, which the root does as it encodes a call's
/// inputs: it does so without the hub's lock, and what ending the pool
/// meanwhile does is what fixed_bugs E and F are about. (The string keeps
/// it off the fast path of trivially copyable types, which skips save().)
inline std::atomic<int> saves_begun{0};
struct SlowToSave {
  int value = 0;
  int save_ms = 0;
  std::string note;
  template <class Archive>
  void save(Archive& ar) const {
    ++saves_begun;
    std::this_thread::sleep_for(milliseconds(save_ms));
    ar(value, save_ms, note);
  }
  template <class Archive>
  void load(Archive& ar) {
    ar(value, save_ms, note);
  }
};
inline int value_of(const SlowToSave& s) {
  return s.value;
}

/// `pool.submit(&value_of, SlowToSave{value, 300})` on a thread of its own,
/// returned once the root is in its save(): the call was accepted and its
/// input is being encoded (without the hub's lock).
struct SlowSubmit {
  std::optional<procpool::Future<int>> future;
  std::exception_ptr refused;  // submit() itself threw this
  std::thread thread;

  SlowSubmit(procpool::mpi::Pool& pool, int value) {
    const int before = saves_begun.load();
    thread = std::thread([this, &pool, value] {
      try {
        future.emplace(pool.submit(&value_of, SlowToSave{value, 300, {}}));
      } catch (...) {
        refused = std::current_exception();
      }
    });
    const auto give_up = Clock::now() + seconds(20);
    while (saves_begun.load() == before && Clock::now() < give_up)
      std::this_thread::sleep_for(milliseconds(1));
  }
  SlowSubmit(const SlowSubmit&) = delete;
  SlowSubmit& operator=(const SlowSubmit&) = delete;
  ~SlowSubmit() { join(); }
  void join() {
    if (thread.joinable()) thread.join();
  }
};

/// Nested standard types and a cereal struct holding them.
struct Record {
  std::string key;
  std::map<std::string, std::vector<int>> table;
  std::tuple<int, std::string, double> tag;
  std::optional<std::vector<std::string>> notes;
  std::variant<int, std::string> either;
  template <class Archive>
  void serialize(Archive& ar) {
    ar(key, table, tag, notes, either);
  }
  bool operator==(const Record&) const = default;
};
inline Record make_record(int i) {
  Record r;
  r.key = "key-" + std::to_string(i);
  for (int k = 0; k < i % 5; ++k)
    r.table["row" + std::to_string(k)] = range(k, k + i % 7);
  r.tag = {i, std::string(static_cast<std::size_t>(i % 11), 'x'), i * 0.5};
  if (i % 3 == 0) r.notes = std::vector<std::string>{"a", "", std::to_string(i)};
  if (i % 2 == 0) {
    r.either = i;
  } else {
    r.either = std::string("odd");
  }
  return r;
}
/// Rebuilds the record from its parts, in the worker: every part crossed.
inline Record echo_record(const Record& in) {
  Record out;
  out.key = in.key;
  for (const auto& [k, v] : in.table)
    out.table[k] = v;
  out.tag = in.tag;
  out.notes = in.notes;
  out.either = in.either;
  return out;
}
inline std::map<std::string, std::vector<int>> word_lengths(const std::vector<std::string>& words) {
  std::map<std::string, std::vector<int>> out;
  for (const std::string& w : words)
    out[w.substr(0, 1)].push_back(static_cast<int>(w.size()));
  return out;
}
inline std::tuple<int, std::string, std::vector<double>> split_tuple(
    const std::tuple<int, std::string>& in) {
  return {std::get<0>(in) * 2, std::get<1>(in) + "!", {std::get<0>(in) * 0.25, -1.0}};
}

// ---- MiB payloads -------------------------------------------------------------

inline std::uint64_t checksum(const std::string& s) {
  std::uint64_t h = 1469598103934665603ull;
  for (char c : s)
    h = (h ^ static_cast<unsigned char>(c)) * 1099511628211ull;
  return h;
}
inline std::string pattern(std::size_t bytes, int seed) {
  std::string s(bytes, '\0');
  for (std::size_t i = 0; i < bytes; ++i)
    s[i] = static_cast<char>((i * 131 + static_cast<std::size_t>(seed) * 7) % 251);
  return s;
}
/// A big argument in, its checksum and size out.
inline std::pair<std::uint64_t, std::size_t> digest(const std::string& s) {
  return {checksum(s), s.size()};
}
/// A few MiB out.
inline std::string big_result(int seed) {
  return pattern(std::size_t{3} << 20, seed);
}
/// A big extra argument (sent once per node) with a small input: its size and
/// a byte that depends on the input.
inline std::uint64_t digest_with(int i, const std::string& extra) {
  const auto at = static_cast<std::size_t>(i) * 8191 % extra.size();
  return (extra.size() << 8) + static_cast<unsigned char>(extra[at]);
}
inline std::vector<double> reversed_doubles(const std::vector<double>& v) {
  return std::vector<double>(v.rbegin(), v.rend());
}

// ---- state and initializers ----------------------------------------------------

struct Model {
  std::string name;
  int scale = 0;
};
inline Model make_model() {
  return Model{"model", 3};
}
inline int use_model(Model& m, int x) {
  return m.scale * x;
}
inline std::string tagged(std::string& tag, int x) {
  return tag + std::to_string(x);
}
inline std::string make_tag() {
  return "tag:";
}
inline Model failing_init() {
  throw std::runtime_error("no model file at /nonexistent/model.bin");
}

/// Leaves a marker file that says input `i` ran (tasks of dropped Futures
/// have no other way to tell).
inline std::string marker(int root_pid, int i) {
  return "/tmp/procpool-peers-" + std::to_string(root_pid) + "-" + std::to_string(i);
}
inline int touch_marker(int root_pid, int i) {
  std::this_thread::sleep_for(milliseconds(20));
  std::FILE* f = std::fopen(marker(root_pid, i).c_str(), "w");
  if (f != nullptr) std::fclose(f);
  return i;
}
/// How many of inputs 0..n-1 left their marker (and removes them).
inline int markers_left(int n) {
  int found = 0;
  for (int i = 0; i < n; ++i) {
    const std::string m = marker(static_cast<int>(::getpid()), i);
    if (std::FILE* f = std::fopen(m.c_str(), "r")) {
      std::fclose(f);
      ++found;
      std::remove(m.c_str());
    }
  }
  return found;
}

// ---- the harness ---------------------------------------------------------------

struct Case {
  const char* name;
  const char* from;  // the mpi4py test (or issue) it translates
  std::function<void()> run;
};

/// Each mode's cases (a file each: they compile in parallel).
std::vector<Case> calls_cases(int nodes);
std::vector<Case> recycling_cases();
std::vector<Case> errors_cases();
std::vector<Case> lifecycle_cases(int nodes);
std::vector<Case> init_throws_cases();
std::vector<Case> fixed_bugs_cases();
std::vector<Case> differential_cases_1();
std::vector<Case> differential_cases_2();
std::vector<Case> differential_cases_3();

}  // namespace peers
