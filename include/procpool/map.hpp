// procpool/map.hpp - fork per call: map, imap, imap_unordered, starmap.
//
// Workers are forked when the call starts and reaped when it ends, so the
// function may capture anything by reference: the workers see the caller's
// memory as it is at the call, shared copy-on-write, never copied.
//
//     std::unordered_map<std::string, int> vocab = load_vocab();  // 2 GB, shared
//     auto ids = procpool::map([&](const std::string& w) { return vocab.at(w); }, words);
#pragma once

#include <concepts>
#include <memory>
#include <mutex>
#include <ranges>
#include <type_traits>
#include <utility>
#include <vector>

#include "procpool/cpu_count.hpp"
#include "procpool/detail/call.hpp"
#include "procpool/detail/engine.hpp"
#include "procpool/detail/runners.hpp"
#include "procpool/options.hpp"
#include "procpool/results.hpp"

namespace procpool {
namespace detail {

/// Random-access sized inputs are read by the workers from inherited memory.
template <class View>
inline constexpr bool read_from_memory_v =
    std::ranges::random_access_range<View>&& std::ranges::sized_range<View>;

template <class F, class View>
struct fork_call_types {
  using Item = std::ranges::range_value_t<View>;
  using Arg =
      std::conditional_t<read_from_memory_v<View>, std::ranges::range_reference_t<View>, Item&&>;
  static_assert(std::is_invocable_v<F&, Arg>,
                "procpool: the function cannot be called with an element of the input range");
  using Result = std::invoke_result_t<F&, Arg>;
  static_assert(!std::is_void_v<Result>,
                "procpool::map/imap: the function returns void, but these calls hand back one "
                "result per input. Return a value (e.g. bool), or use Pool::submit.");
  using Out = std::decay_t<Result>;
  static_assert(type_cannot_cross_processes<Out>::value);
};

/// One fork-per-call run: owns the function, the input view, the workers.
template <class F, class View, Delivery D>
class ForkCall final : public ResultSource<delivered_t<D, typename fork_call_types<F, View>::Out>> {
  using Types = fork_call_types<F, View>;
  using Out = typename Types::Out;
  using Value = delivered_t<D, Out>;
  static constexpr bool from_memory = read_from_memory_v<View>;
  using Runner = std::conditional_t<from_memory, IndexRunner<F, View, Out>,
                                    StreamRunner<F, typename Types::Item, Out>>;
  using Feed =
      std::conditional_t<from_memory, IndexFeed<View>, StreamFeed<View, typename Types::Item>>;

 public:
  ForkCall(F f, View view, const Options& options)
      : f_(std::move(f)),
        view_(std::move(view)),
        runner_(make_runner()),
        engine_(engine_config(options, plan_processes(options, input_count()), false),
                [this] { return std::make_unique<SingleCallLogic>(runner_); }),
        driver_(engine_, mutex_, Buffer{}, Feed(view_), options, D != Delivery::unordered,
                StopMode::kill_workers),
        insights_(options.insights) {}

  ~ForkCall() override {
    if (!insights_) return;
    std::lock_guard lock(mutex_);
    *insights_ = engine_.insights(
        std::chrono::duration<double>(std::chrono::steady_clock::now() - started_).count());
  }

  std::optional<Value> next() override { return deliver<D, Out>(driver_); }
  void drain_into(std::vector<Value>& out) override { drain<D, Out>(driver_, out); }

 private:
  Runner make_runner() {
    if constexpr (from_memory) {
      return Runner(f_, view_);
    } else {
      return Runner(f_);
    }
  }
  std::optional<std::size_t> input_count() {
    if constexpr (std::ranges::sized_range<View>) {
      return static_cast<std::size_t>(std::ranges::size(view_));
    } else {
      return std::nullopt;
    }
  }

  std::chrono::steady_clock::time_point started_ = std::chrono::steady_clock::now();
  F f_;
  View view_;
  Runner runner_;
  std::mutex mutex_;
  Engine engine_;  // forks the workers: everything above is in their memory
  CallDriver<Out, Feed> driver_;
  Insights* insights_;
};

template <Delivery D, class F, class R>
auto make_fork_results(F&& f, R&& inputs, const Options& options) {
  using View = std::views::all_t<R>;
  using Call = ForkCall<std::decay_t<F>, View, D>;
  using Value = delivered_t<D, typename fork_call_types<std::decay_t<F>, View>::Out>;
  return Results<Value>(std::make_unique<Call>(std::forward<F>(f),
                                               std::views::all(std::forward<R>(inputs)), options));
}

template <class T, class R>
std::vector<T> collect(Results<T> results, const R& inputs) {
  std::vector<T> out;
  if constexpr (std::ranges::sized_range<const R>) {
    out.reserve(static_cast<std::size_t>(std::ranges::size(inputs)));
  }
  ResultsAccess<T>::drain_into(results, out);
  return out;
}

}  // namespace detail

/// Lazily applies `f` to each input in worker processes and yields the results
/// in input order. Works on endless inputs: only a bounded number are taken ahead.
///
///     for (int sq : procpool::imap([](int x) { return x * x; }, std::views::iota(0)))
///       if (sq > 1000) break;  // the workers are stopped and reaped here
template <class F, std::ranges::input_range R>
auto imap(F&& f, R&& inputs, const Options& options = {}) {
  return detail::make_fork_results<detail::Delivery::ordered>(std::forward<F>(f),
                                                              std::forward<R>(inputs), options);
}

/// Like imap, but yields `Indexed{index, value}` as soon as each result is done.
///
///     for (auto [index, value] : procpool::imap_unordered(f, inputs)) out[index] = value;
template <class F, std::ranges::input_range R>
auto imap_unordered(F&& f, R&& inputs, const Options& options = {}) {
  return detail::make_fork_results<detail::Delivery::unordered>(std::forward<F>(f),
                                                                std::forward<R>(inputs), options);
}

/// Applies `f` to every input in worker processes; results in input order.
/// The first failure stops the call, reaps its workers and is thrown
/// (TaskError, WorkerCrashed, ...).
///
///     std::vector<int> lengths = procpool::map([](const std::string& s) { return int(s.size()); },
///     words);
template <class F, std::ranges::input_range R>
auto map(F&& f, R&& inputs, const Options& options = {}) {
  return detail::collect(imap(std::forward<F>(f), inputs, options), inputs);
}

/// Like imap, but never throws for a failed input: yields every input's
/// Outcome (value or error) in input order, and the call goes on after failures.
template <class F, std::ranges::input_range R>
auto imap_outcomes(F&& f, R&& inputs, const Options& options = {}) {
  return detail::make_fork_results<detail::Delivery::outcomes>(std::forward<F>(f),
                                                               std::forward<R>(inputs), options);
}

/// Every input's Outcome, in input order: one bad input loses nothing else.
///
///     auto outcomes = procpool::map_outcomes(parse, lines, {.retries = 2});
///     for (auto& o : outcomes) if (!o.ok()) std::cerr << o.what() << '\n';
template <class F, std::ranges::input_range R>
auto map_outcomes(F&& f, R&& inputs, const Options& options = {}) {
  return detail::collect(imap_outcomes(std::forward<F>(f), inputs, options), inputs);
}

/// map for functions of several arguments: each input is a tuple (or pair) unpacked into `f`.
///
///     std::vector<std::pair<int, int>> args{{1, 2}, {3, 4}};
///     auto sums = procpool::starmap([](int a, int b) { return a + b; }, args);  // {3, 7}
template <class F, std::ranges::input_range R>
auto starmap(F&& f, R&& tuples, const Options& options = {}) {
  return map(detail::StarApply<std::decay_t<F>>{std::forward<F>(f)}, std::forward<R>(tuples),
             options);
}

}  // namespace procpool
