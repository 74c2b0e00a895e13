// What the scenarios of mode differential (differential_1..3.cpp) share, and
// what the mode is.
#pragma once

#include "peers.hpp"

namespace peers {

// ---- mode differential -------------------------------------------------------------
//
// Each case runs one scenario on a procpool::Pool (on the root) and on a
// procpool::mpi::Pool (over every rank), checks both against what the
// scenario must give, and the two against each other where the semantics are
// the library's choice (what happens after join(), after terminate()): an
// mpi::Pool must behave like procpool::Pool. The scenarios are templates
// over the pool type; every error of the mpi::Pool is an OnNode<E>, which is
// an E, so the same catch clauses serve both.

/// The kind of an error, most derived first ("TaskError", "PoolClosed", ...).
inline std::string error_kind(const std::exception_ptr& error) {
  try {
    std::rethrow_exception(error);
  } catch (const procpool::TaskError&) {
    return "TaskError";
  } catch (const procpool::WorkerCrashed&) {
    return "WorkerCrashed";
  } catch (const procpool::TaskTimeout&) {
    return "TaskTimeout";
  } catch (const procpool::PoolClosed&) {
    return "PoolClosed";
  } catch (const procpool::Error& e) {
    return std::string("Error(") + e.what() + ")";
  } catch (const std::exception& e) {
    return std::string("std::exception(") + e.what() + ")";
  } catch (...) {
    return "unknown";
  }
}

/// What `f()` did: "value V" for a value, else the error's kind.
template <class F>
std::string outcome_of(F&& f) {
  try {
    return "value " + std::to_string(f());
  } catch (...) {
    return error_kind(std::current_exception());
  }
}

inline std::string joined(const std::vector<std::string>& parts) {
  std::string s;
  for (const std::string& p : parts)
    s += (s.empty() ? "" : ", ") + p;
  return "[" + s + "]";
}

/// Polls `done()` (a counter, a file) until it holds or `limit` passes.
template <class Pred>
bool eventually(Pred done, Clock::duration limit = seconds(5)) {
  const auto give_up = Clock::now() + limit;
  while (!done()) {
    if (Clock::now() >= give_up) return false;
    std::this_thread::sleep_for(milliseconds(2));
  }
  return true;
}

/// The pool's name in failure messages.
template <class P>
constexpr const char* pool_name() {
  return std::is_same_v<P, procpool::Pool> ? "procpool::Pool" : "mpi::Pool";
}

/// Every worker's crashes over the pool's life (an mpi::Pool: every node's).
inline unsigned crashes_of(const procpool::Insights& in) {
  unsigned n = 0;
  for (const auto& w : in.workers)
    n += w.crashes;
  return n;
}
inline unsigned crashes_of(const procpool::mpi::Insights& in) {
  unsigned n = 0;
  for (const auto& node : in.per_node)
    n += crashes_of(node.pool);
  return n;
}

inline int square_plus(int x) {
  return x * x + 1;
}
/// Fails every input x with x % 5 == 3.
inline int square_unless_3_mod_5(int x) {
  if (x % 5 == 3) throw std::invalid_argument("three mod five: " + std::to_string(x));
  return x * x + 1;
}
/// Every input x with x % 3 == 1 kills its worker (_exit(7)) the first time
/// it runs: its marker file under `dir` (created atomically, O_EXCL) says it
/// has. Any later attempt, on any rank of this one-host job, returns.
inline int crash_once(int x, const std::string& dir) {
  if (x % 3 == 1) {
    const std::string marker = dir + "/" + std::to_string(x);
    const int fd = ::open(marker.c_str(), O_CREAT | O_EXCL | O_WRONLY, 0600);
    if (fd >= 0) {
      ::close(fd);
      ::_exit(7);
    }
  }
  return x * 10 + 1;
}
/// Input `slow` sleeps 10 s (its task_timeout kills it first); others 1 ms.
inline int slow_at(int x, int slow) {
  std::this_thread::sleep_for(x == slow ? milliseconds(10000) : milliseconds(1));
  return x * 3;
}

/// A fresh directory under /tmp for one scenario's marker files, removed
/// with everything in it at the end.
struct MarkerDir {
  test_helpers::TempDir dir{"procpool-differential-" + std::to_string(::getpid())};
  const std::string& path = dir.path();
  std::size_t count() const {
    std::size_t n = 0;
    for ([[maybe_unused]] const auto& entry : std::filesystem::directory_iterator(path))
      ++n;
    return n;
  }
};

/// What the range throws (CPython's SayWhenError).
struct SayWhenError : std::runtime_error {
  using std::runtime_error::runtime_error;
};

/// CPython's exception_throwing_generator(total, when): a single-pass range
/// of 0, 1, ..., total - 1 that throws SayWhenError when input `when` is
/// asked for: as the iterator moves on to it (a generator that raised; the
/// range is at its end then), or as it is read (a views::transform whose
/// function throws; the range could go on after it). It counts the inputs
/// read.
class SayWhen {
 public:
  enum class Throws { on_increment, on_read };
  SayWhen(int total, int when, Throws throws) : total_(total), when_(when), throws_(throws) {}
  SayWhen(const SayWhen&) = delete;
  SayWhen& operator=(const SayWhen&) = delete;

  class iterator {
   public:
    using value_type = int;
    using difference_type = std::ptrdiff_t;
    iterator() = default;
    explicit iterator(SayWhen* range) : range_(range) {}
    int operator*() const {
      if (range_->throws_ == Throws::on_read && range_->at_ == range_->when_)
        throw SayWhenError("somebody said when: reading " + std::to_string(range_->at_));
      ++range_->reads_;
      return range_->at_;
    }
    iterator& operator++() {
      if (range_->throws_ == Throws::on_increment && range_->at_ + 1 == range_->when_) {
        range_->raised_ = true;
        throw SayWhenError("somebody said when: moving to " + std::to_string(range_->when_));
      }
      ++range_->at_;
      return *this;
    }
    void operator++(int) { ++*this; }
    friend bool operator==(const iterator& it, std::default_sentinel_t) { return it.at_end(); }

   private:
    bool at_end() const { return range_->raised_ || range_->at_ >= range_->total_; }
    SayWhen* range_ = nullptr;
  };
  iterator begin() { return iterator(this); }
  std::default_sentinel_t end() const noexcept { return {}; }
  int reads() const noexcept { return reads_; }

 private:
  int total_;
  int when_;
  Throws throws_;
  int at_ = 0;
  int reads_ = 0;
  bool raised_ = false;
};
static_assert(std::ranges::input_range<SayWhen&>);

/// Runs `walk` (which must not throw) on a thread of its own; if it has not
/// returned after `limit`, prints `hung_message` and calls `unblock`, which
/// should make it return. Whether it returned in time.
template <class Walk, class Unblock>
bool returned_within(Walk walk, Unblock unblock, Clock::duration limit,
                     const std::string& hung_message) {
  std::atomic<bool> done{false};
  std::thread walker([&] {
    walk();
    done = true;
  });
  const bool in_time = eventually([&] { return done.load(); }, limit);
  if (!in_time) {
    std::fprintf(stderr, "  %s\n", hung_message.c_str());
    std::fflush(stderr);
    unblock();
  }
  walker.join();  // if unblock() did not end it, run_mpi.sh's bound does, with the stacks
  return in_time;
}

inline const char* stage_name(procpool::TaskError::Stage s) {
  switch (s) {
    case procpool::TaskError::Stage::task:
      return "task";
    case procpool::TaskError::Stage::serialize_input:
      return "serialize_input";
    case procpool::TaskError::Stage::deserialize_input:
      return "deserialize_input";
    case procpool::TaskError::Stage::serialize_result:
      return "serialize_result";
    case procpool::TaskError::Stage::deserialize_result:
      return "deserialize_result";
  }
  return "?";
}

struct CrashRun {
  std::vector<std::string> lines;
  std::vector<unsigned> crashes;  // insights() after each pool's calls
};

inline std::string crash_counts(const CrashRun& run) {
  std::vector<std::string> s;
  for (unsigned c : run.crashes)
    s.push_back(std::to_string(c));
  return joined(s);
}

enum class Via { imap, imap_unordered, imap_outcomes };
inline const char* via_name(Via d) {
  return d == Via::imap ? "imap" : d == Via::imap_unordered ? "imap_unordered" : "imap_outcomes";
}

}  // namespace peers
