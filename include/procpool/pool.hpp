// procpool/pool.hpp - a persistent pool of worker processes with per-worker state.
#pragma once

#include <chrono>
#include <concepts>
#include <condition_variable>
#include <cstdint>
#include <functional>
#include <future>
#include <memory>
#include <mutex>
#include <ranges>
#include <string>
#include <thread>
#include <tuple>
#include <type_traits>
#include <typeinfo>
#include <utility>
#include <vector>

#include "procpool/cpu_count.hpp"
#include "procpool/detail/call.hpp"
#include "procpool/detail/code_identity.hpp"
#include "procpool/detail/engine.hpp"
#include "procpool/detail/pool_core.hpp"
#include "procpool/detail/pool_traits.hpp"
#include "procpool/detail/pool_worker.hpp"
#include "procpool/detail/runners.hpp"
#include "procpool/errors.hpp"
#include "procpool/options.hpp"
#include "procpool/results.hpp"

namespace procpool {

template <class R>
class Future;

namespace detail {

struct PoolAccess;

/// What a Future waits on: its task's one result, from a local Pool or from
/// the nodes of an MPI job (procpool::mpi::Pool).
template <class Stored>
struct FutureSource : ResultSource<Stored> {
  virtual bool wait_until(std::chrono::steady_clock::time_point deadline) = 0;
  /// Gives the task to whoever runs it, to be finished without the Future.
  virtual void detach() noexcept = 0;
};

/// A Pool's submitted call as a FutureSource: dropped, it goes to the pool's
/// service thread, which finishes it and reports its error.
template <class Stored, class Call>
struct PoolFutureSource final : FutureSource<Stored> {
  explicit PoolFutureSource(std::unique_ptr<Call> c) : call(std::move(c)) {}
  std::optional<Stored> next() override { return call->next(); }
  bool wait_until(std::chrono::steady_clock::time_point d) override { return call->wait_until(d); }
  void detach() noexcept override {
    std::shared_ptr<PoolCore> core = call->core();
    core->adopt(std::move(call));
  }
  std::unique_ptr<Call> call;
};

/// The one way to make a Future (Pool::submit, mpi::Pool::submit).
template <class R, class Source>
Future<R> make_future(std::unique_ptr<Source> source) {
  return Future<R>(std::move(source));
}

}  // namespace detail

/// The result of `Pool::submit` (and `mpi::Pool::submit`): like std::future. The task runs whether
/// or not anyone waits; dropping the Future without get() leaves the task running, and its error,
/// if any, goes to the pool's error handler.
///
///     auto answer = pool.submit(&compute, 42);
///     if (answer.wait_for(std::chrono::seconds(1)) == std::future_status::ready)
///     use(answer.get());
template <class R>
class Future {
  using Stored = detail::stored_t<R>;

 public:
  Future() = default;
  Future(Future&&) noexcept = default;
  Future& operator=(Future&& other) noexcept {
    if (this != &other) {
      hand_over();
      source_ = std::move(other.source_);
    }
    return *this;
  }
  ~Future() { hand_over(); }
  /// The task's result; throws its error (TaskError, WorkerCrashed, PoolClosed...).
  /// Can be called once.
  R get() {
    source();  // throws if there is nothing to get
    const std::unique_ptr<Waitable> taken = std::move(source_);
    auto value = taken->next();
    if constexpr (!std::is_void_v<R>) return std::move(*value);
  }
  void wait() { source().wait_until(std::chrono::steady_clock::time_point::max()); }
  template <class Rep, class Period>
  std::future_status wait_for(std::chrono::duration<Rep, Period> timeout) {
    const auto deadline = std::chrono::steady_clock::now() +
                          std::chrono::duration_cast<std::chrono::steady_clock::duration>(timeout);
    return source().wait_until(deadline) ? std::future_status::ready : std::future_status::timeout;
  }
  bool valid() const noexcept { return source_ != nullptr; }

 private:
  template <class R2, class Source>
  friend Future<R2> detail::make_future(std::unique_ptr<Source> source);
  using Waitable = detail::FutureSource<Stored>;
  /// A Future dropped before get(): its task still runs (fire and forget).
  void hand_over() noexcept {
    if (!source_) return;
    source_->detach();
    source_.reset();
  }
  explicit Future(std::unique_ptr<Waitable> source) : source_(std::move(source)) {}
  Waitable& source() {
    if (!source_) throw Error("procpool::Future: no result to wait for (get() was already called)");
    return *source_;
  }
  std::unique_ptr<Waitable> source_;
};

/// Worker processes started once and reused by many calls.
///
/// Because the workers were forked at construction, the functions given later
/// must not need the caller's memory: function pointers and capture-less
/// lambdas. Heavy per-worker data is built once in each worker by `init`, and
/// the function receives it as its first parameter. Extra arguments of one
/// call are sent once per worker, not per task.
///
///     procpool::Pool pool({.processes = 4}, [] { return Parser(load_grammar()); });
///     auto trees = pool.map([](Parser& p, const std::string& s) { return p.parse(s); }, lines);
class Pool {
 public:
  /// Starts `options.processes` workers (default: usable CPUs) with no state.
  explicit Pool(Options options = {});
  /// `Pool pool({})`: the default Options.
  explicit Pool(std::initializer_list<detail::DefaultOptions>) : Pool(Options{}) {}

  /// Starts the workers; each runs `init()` once and keeps its result as that
  /// worker's state. With Start::fork_server `init()` runs once in all, in the
  /// server the workers are forked from, and each worker starts with a
  /// copy-on-write copy of its result.
  template <class Init>
  Pool(Options options, Init init) requires std::invocable<Init&> {
    using State = std::decay_t<std::invoke_result_t<Init&>>;
    static_assert(!std::is_void_v<State>, "procpool::Pool: the initializer must return the state");
    const detail::SpawnInit spawn_init = detail::spawn_init_of<Init, State>(init);
    start(
        options, &typeid(State),
        [init = std::move(init)]() mutable -> std::shared_ptr<void> {
          return std::make_shared<State>(init());
        },
        spawn_init);
  }

  /// Finishes the work already accepted, then ends and reaps every worker.
  ~Pool();
  Pool(const Pool&) = delete;
  Pool& operator=(const Pool&) = delete;

  /// Results of `f(item, extra...)` (or `f(state, item, extra...)`) in input order.
  template <class F, std::ranges::input_range R, class... Extra>
  auto map(F f, R&& inputs, const Extra&... extra) {
    using Out = typename detail::pool_call_types<F, std::ranges::range_value_t<R>, Extra...>::Out;
    std::vector<Out> out;
    if constexpr (std::ranges::sized_range<R>) {
      out.reserve(static_cast<std::size_t>(std::ranges::size(inputs)));
    }
    auto results = imap(f, std::forward<R>(inputs), extra...);
    detail::ResultsAccess<Out>::drain_into(results, out);
    return out;
  }

  /// Lazy, in input order; the input range is consumed as results are taken.
  template <class F, std::ranges::input_range R, class... Extra>
  [[nodiscard]] auto imap(F f, R&& inputs, const Extra&... extra) {
    return make_results<detail::Delivery::ordered>(f, std::forward<R>(inputs), extra...);
  }

  /// Lazy, in completion order, as `Indexed{index, value}`.
  template <class F, std::ranges::input_range R, class... Extra>
  [[nodiscard]] auto imap_unordered(F f, R&& inputs, const Extra&... extra) {
    return make_results<detail::Delivery::unordered>(f, std::forward<R>(inputs), extra...);
  }

  /// Every input's Outcome in input order; failures do not stop the call.
  template <class F, std::ranges::input_range R, class... Extra>
  [[nodiscard]] auto map_outcomes(F f, R&& inputs, const Extra&... extra) {
    using Out = typename detail::pool_call_types<F, std::ranges::range_value_t<R>, Extra...>::Out;
    std::vector<Outcome<Out>> out;
    if constexpr (std::ranges::sized_range<R>)
      out.reserve(static_cast<std::size_t>(std::ranges::size(inputs)));
    auto results = imap_outcomes(f, std::forward<R>(inputs), extra...);
    detail::ResultsAccess<Outcome<Out>>::drain_into(results, out);
    return out;
  }

  /// Lazy map_outcomes.
  template <class F, std::ranges::input_range R, class... Extra>
  [[nodiscard]] auto imap_outcomes(F f, R&& inputs, const Extra&... extra) {
    return make_results<detail::Delivery::outcomes>(f, std::forward<R>(inputs), extra...);
  }

  /// map over tuples unpacked into `f`.
  template <class F, std::ranges::input_range R, class... Extra>
  auto starmap(F f, R&& tuples, const Extra&... extra) {
    detail::check_pool_callable<F>();
    return map(detail::StarApply<F>{f}, std::forward<R>(tuples), extra...);
  }

  /// Runs `f(args...)` (or `f(state, args...)`) in a worker; the arguments are sent with the task.
  template <class F, class... Args>
  auto submit(F f, Args&&... args) {
    detail::check_pool_callable<F>();
    using Item = std::tuple<std::decay_t<Args>...>;
    using Star = detail::StarApply<F>;
    using Types = detail::pool_call_types<Star, Item>;
    using R = std::conditional_t<std::is_same_v<typename Types::Out, detail::Empty>, void,
                                 typename Types::Out>;
    auto items = std::make_unique<std::vector<Item>>();
    items->emplace_back(std::forward<Args>(args)...);
    using Call = detail::PoolCall<typename Types::Out, Item>;
    auto call = std::make_unique<Call>(core_, make_setup<Star, Item>(Star{f}), std::move(items));
    using Source = detail::PoolFutureSource<detail::stored_t<R>, Call>;
    return detail::make_future<R>(std::make_unique<Source>(std::move(call)));
  }

  /// Where the errors of tasks whose Future was dropped go; called on the
  /// pool's service thread. Without a handler, each is one line on stderr
  /// (the first ten); insights() counts them either way.
  ///
  ///     pool.set_error_handler([](std::exception_ptr e) { log_error(e); });
  ///     pool.submit(&log_event, event);  // fire and forget
  void set_error_handler(std::function<void(std::exception_ptr)> handler);

  /// No more work is accepted; what was accepted still runs.
  void close();
  /// Waits for all accepted work, then ends and reaps the workers. Call close() first.
  void join();
  /// Kills every worker now; unfinished work fails with PoolClosed.
  void terminate();

  [[nodiscard]] unsigned processes() const noexcept;
  /// What the workers did since the pool started, with a diagnosis.
  [[nodiscard]] Insights insights() const;
  /// Process ids of the current workers (they change when a worker is replaced).
  [[nodiscard]] std::vector<pid_t> worker_pids() const;

 private:
  void start(Options options, const std::type_info* state_type,
             std::function<std::shared_ptr<void>()> make_state, detail::SpawnInit spawn_init = {});
  void check_open() const;
  void check_state_type(const std::type_info& wanted) const;

  template <class F, class Item, class... Extra>
  detail::Buffer make_setup(const F& f, const Extra&... extra) {
    static_assert(std::is_trivially_copyable_v<F> && std::is_default_constructible_v<F>);
    using Types = detail::pool_call_types<F, Item, Extra...>;
    using State = typename Types::State;
    if constexpr (std::is_void_v<State>) {
      // a stateless function runs on any pool
    } else {
      check_state_type(typeid(State));
    }
    check_open();
    // Code crosses by identity (module + offset), never by raw address: a
    // spawned worker runs the same binary at another load address.
    static const detail::CodeRef factory = detail::code_ref_of(
        &detail::make_pool_runner<F, State, Item, typename Types::Out, Extra...>);
    detail::Buffer setup;
    detail::Writer out(setup);
    detail::save_code_ref(out, factory);
    detail::code_carrier<F>::save(out, f);
    detail::save_extra_args(out, extra...);
    return setup;
  }

  template <detail::Delivery D, class F, class R, class... Extra>
  auto make_results(F f, R&& inputs, const Extra&... extra) {
    if constexpr (!detail::is_checked_adaptor_v<F>) detail::check_pool_callable<F>();
    using Item = std::ranges::range_value_t<R>;
    using Out = typename detail::pool_call_types<F, Item, Extra...>::Out;
    using Value = detail::delivered_t<D, Out>;
    using View = std::views::all_t<R>;
    detail::Buffer setup = make_setup<F, Item>(f, extra...);
    return Results<Value>(std::make_unique<detail::PoolStreamCall<Out, View, Item, D>>(
        core_, std::move(setup), std::views::all(std::forward<R>(inputs))));
  }

  friend struct detail::PoolAccess;
  std::shared_ptr<detail::PoolCore> core_;
};

namespace detail {

/// The engine under a Pool, for the MPI backend's nodes (see
/// Engine::let_tail_chunks_queue).
struct PoolAccess {
  static Engine& engine(Pool& pool) { return *pool.core_->engine; }
  /// Engine::broken(), under the pool's lock.
  static std::exception_ptr broken(Pool& pool) {
    std::lock_guard lock(pool.core_->mutex);
    return pool.core_->engine->broken();
  }
  /// Engine::compute_nanos(), without the lock (it is atomic).
  static std::uint64_t compute_nanos(Pool& pool) { return pool.core_->engine->compute_nanos(); }
  /// The pool's lock (for tests that hold it).
  static std::mutex& mutex(Pool& pool) { return pool.core_->mutex; }
};

}  // namespace detail

}  // namespace procpool
