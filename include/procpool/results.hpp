// procpool/results.hpp - the lazy range that imap and imap_unordered return.
#pragma once

#include <cstddef>
#include <exception>
#include <iterator>
#include <memory>
#include <optional>
#include <string>
#include <utility>
#include <vector>

namespace procpool {

/// An element of `imap_unordered`: the input's index and its result.
///
///     for (auto [index, value] : procpool::imap_unordered(f, inputs)) out[index] = value;
template <class T>
struct Indexed {
  std::size_t index;
  T value;
};

/// One input's outcome from `map_outcomes` / `imap_outcomes`: its value, or
/// the error that stopped it (TaskError, WorkerCrashed, TaskTimeout, ...).
/// One bad input among a million costs that input only.
///
///     for (auto& o : procpool::map_outcomes(parse, lines))
///       if (!o.ok()) log(o.index, o.what());
template <class T>
struct Outcome {
  std::size_t index = 0;
  std::optional<T> value;    // set when the task succeeded
  std::exception_ptr error;  // set when it failed

  bool ok() const noexcept { return !error; }
  /// The value; rethrows the task's error if it failed.
  T& get() {
    if (error) std::rethrow_exception(error);
    return *value;
  }
  /// The error's message, or "" for a success.
  std::string what() const {
    if (!error) return {};
    try {
      std::rethrow_exception(error);
    } catch (const std::exception& e) {
      return e.what();
    } catch (...) {
      return "unknown error";
    }
  }
};

namespace detail {

/// How a call hands results to the caller.
enum class Delivery { ordered, unordered, outcomes };

/// Produces a call's results one at a time; throws the first failure.
template <class T>
class ResultSource {
 public:
  virtual ~ResultSource() = default;
  virtual std::optional<T> next() = 0;
  /// Appends every remaining result to `out` (map's way in: sources may do it in bulk).
  virtual void drain_into(std::vector<T>& out) {
    while (auto value = next())
      out.push_back(std::move(*value));
  }
};

template <class T>
class ResultsAccess;

}  // namespace detail

/// A lazy, single-pass range of results. Inputs are taken from the input range
/// only as results are consumed (a bounded number ahead), so an endless input
/// works. Destroying it early stops the call: fork-per-call workers are
/// killed and reaped, a Pool's workers drop the rest of the call.
///
///     for (const std::string& line : procpool::imap(render, records)) std::cout << line;
template <class T>
class Results {
 public:
  class iterator {
   public:
    using value_type = T;
    using difference_type = std::ptrdiff_t;

    iterator() = default;
    explicit iterator(detail::ResultSource<T>* source) : source_(source) { advance(); }
    T& operator*() const { return *current_; }
    T* operator->() const { return &*current_; }
    iterator& operator++() {
      advance();
      return *this;
    }
    void operator++(int) { advance(); }
    friend bool operator==(const iterator& it, std::default_sentinel_t) {
      return !it.current_.has_value();
    }

   private:
    void advance() {
      current_.reset();
      current_ = source_->next();
    }
    detail::ResultSource<T>* source_ = nullptr;
    mutable std::optional<T> current_;
  };

  explicit Results(std::unique_ptr<detail::ResultSource<T>> source) : source_(std::move(source)) {}

  /// Starts (or continues) the iteration; a Results can be walked once.
  iterator begin() { return iterator(source_.get()); }
  std::default_sentinel_t end() const noexcept { return {}; }

 private:
  friend class detail::ResultsAccess<T>;
  std::unique_ptr<detail::ResultSource<T>> source_;
};

namespace detail {

/// map's access to a Results it has not started iterating.
template <class T>
class ResultsAccess {
 public:
  static void drain_into(Results<T>& results, std::vector<T>& out) {
    results.source_->drain_into(out);
  }
};

}  // namespace detail
}  // namespace procpool
