// The inside of a fork-per-call map: the call that forks its workers, runs
// the inputs and delivers the results, and the input views it accepts.
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

namespace procpool::detail {

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
                StopMode::kill_workers, Engine::SetupScope::every_worker, &interrupt_from_start_),
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
  /// Begun before the workers are forked, so that a Ctrl-C while they start
  /// stops the call too (the driver's watch counts from here); it went
  /// unheard, and the call ran to its end.
  InterruptWatch interrupt_from_start_;
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

}  // namespace procpool::detail
