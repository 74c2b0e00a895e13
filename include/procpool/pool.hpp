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
#include "procpool/detail/runners.hpp"
#include "procpool/errors.hpp"
#include "procpool/options.hpp"
#include "procpool/results.hpp"

namespace procpool {
namespace detail {

/// Builds a call's runner inside a worker from its setup message. It travels
/// in that message by identity (CodeRef), valid in forked and spawned workers alike.
using RunnerFactoryFn = std::unique_ptr<TaskRunner>(void* state, Reader& setup);
using RunnerFactory = RunnerFactoryFn*;

/// Builds a worker's state from the initializer `function` (null for a capture-less lambda).
using StateFactoryFn = std::shared_ptr<void>(const void* function);

/// How a Start::spawn worker can run the pool's initializer: by the identity
/// of a factory, and of the initializer itself when it is a function pointer.
/// `spawnable` is false for an initializer that captures (it cannot cross an exec).
struct SpawnInit {
  StateFactoryFn* factory = nullptr;
  const void* function = nullptr;
  bool spawnable = false;
};

/// Worker side of a Pool: the state its initializer built, and the runners of the open calls.
class PoolLogic final : public WorkerLogic {
 public:
  explicit PoolLogic(const std::function<std::shared_ptr<void>()>& make_state);
  void setup(std::uint64_t call, Reader& payload) override;
  void run(ChunkRun& run, Reader& in, Writer& out) override;
  void end(std::uint64_t call) override;

 private:
  std::shared_ptr<void> state_;
  std::exception_ptr init_error_;
  std::map<std::uint64_t, std::unique_ptr<TaskRunner>> runners_;
};

/// A submitted task whose Future was dropped before its result was taken:
/// the pool's service thread sees it to the end and reports its error,
/// since nobody else will.
class DetachedTask {
 public:
  virtual ~DetachedTask() = default;
  /// With the pool's lock held: whether the task has an outcome.
  [[nodiscard]] virtual bool finished_locked() = 0;
  /// Without the lock, once finished: the task's error, or null.
  [[nodiscard]] virtual std::exception_ptr take_error() = 0;
};

/// Everything a Pool and the calls and futures it handed out share.
struct PoolCore {
  std::mutex mutex;
  std::unique_ptr<Engine> engine;
  const std::type_info* state_type = nullptr;  // null: the pool has no initializer
  Options options;
  bool closed = false;
  std::chrono::steady_clock::time_point started = std::chrono::steady_clock::now();

  /// The service thread: moves submitted work along while no caller waits on
  /// the pool, and finishes the tasks of dropped futures.
  std::thread service;
  std::condition_variable wake_service;
  bool service_running = false;
  bool service_stop = false;
  bool service_kicked = false;
  std::vector<std::unique_ptr<DetachedTask>> detached;
  std::function<void(std::exception_ptr)> error_handler;  // empty: one line on stderr
  std::uint64_t unobserved_errors = 0;
  std::vector<std::string> unobserved_messages;  // the first few

  void start_service();
  /// Stops the service thread (the caller must not hold the lock) and
  /// reports what the dropped futures' finished tasks left.
  void stop_service();
  /// Takes over a dropped future's task.
  void adopt(std::unique_ptr<DetachedTask> task) noexcept;
  /// Asks the service thread to send what was queued now. Many submits in a
  /// row then leave in few messages rather than a system call each.
  void kick();

 private:
  void serve();
  /// Hands finished detached tasks' errors on; unlocks while doing so.
  void finish_detached(std::unique_lock<std::mutex>& lock);
  void report(std::exception_ptr error);
};

template <class F>
inline constexpr bool is_function_pointer_v =
    std::is_pointer_v<F>&& std::is_function_v<std::remove_pointer_t<F>>;

/// What a Pool can run: code that needs nothing from the caller's memory.
template <class F>
inline constexpr bool pool_callable_v = is_function_pointer_v<F> ||
                                        (std::is_empty_v<F> && std::is_trivially_copyable_v<F> &&
                                         std::is_default_constructible_v<F>);

template <class Init, class State>
std::shared_ptr<void> make_state_of(const void* function) {
  if constexpr (is_function_pointer_v<Init>) {
    auto init = reinterpret_cast<Init>(const_cast<void*>(function));
    return std::make_shared<State>(init());
  } else {
    Init init{};  // capture-less: its type says everything
    return std::make_shared<State>(init());
  }
}

template <class Init, class State>
SpawnInit spawn_init_of([[maybe_unused]] const Init& init) {
  if constexpr (is_function_pointer_v<Init>) {
    return {&make_state_of<Init, State>, reinterpret_cast<const void*>(init), true};
  } else if constexpr (pool_callable_v<Init>) {
    return {&make_state_of<Init, State>, nullptr, true};
  } else {
    return {};
  }
}

/// How a Pool's function crosses to its workers: a function pointer as the
/// identity of the code it points to; an empty callable as nothing at all
/// (its type, which the runner factory's identity carries, says everything).
template <class F>
struct code_carrier {
  static void save(Writer&, const F&) {}
  static F load(Reader&) { return F{}; }
};
template <class F>
requires is_function_pointer_v<F>
struct code_carrier<F> {
  static void save(Writer& out, F f) { save_code_ref(out, code_ref_of(f)); }
  static F load(Reader& in) { return function_at<std::remove_pointer_t<F>>(load_code_ref(in)); }
};

template <class F>
inline constexpr bool is_star_apply_v = false;
template <class F>
inline constexpr bool is_star_apply_v<StarApply<F>> = true;

template <class F>
constexpr void check_pool_callable() {
  static_assert(pool_callable_v<F>,
                "procpool::Pool runs only function pointers and capture-less lambdas: its workers "
                "were forked before this call and cannot see what a capture refers to. Use "
                "procpool::map (fork per call), whose function may capture anything, or build "
                "the data once per worker with Pool(options, init) and take it as the "
                "function's first parameter, State&.");
}

/// The first parameter's type of a function pointer or non-generic lambda.
template <class F>
struct first_parameter {};
template <class R, class A0, class... A>
struct first_parameter<R (*)(A0, A...)> {
  using type = A0;
};
template <class R, class A0, class... A>
struct first_parameter<R (*)(A0, A...) noexcept> {
  using type = A0;
};
template <class C, class R, class A0, class... A>
struct first_parameter<R (C::*)(A0, A...) const> {
  using type = A0;
};
template <class C, class R, class A0, class... A>
struct first_parameter<R (C::*)(A0, A...) const noexcept> {
  using type = A0;
};
template <class F>
requires requires {
  &F::operator();
}
struct first_parameter<F> : first_parameter<decltype(&F::operator())> {};
template <class F>
struct first_parameter<StarApply<F>> : first_parameter<F> {};

template <class G>
struct code_carrier<StarApply<G>> {
  static void save(Writer& out, const StarApply<G>& f) { code_carrier<G>::save(out, f.f); }
  static StarApply<G> load(Reader& in) { return StarApply<G>{code_carrier<G>::load(in)}; }
};

/// The state type a function takes first, or void when it takes none.
template <class F, bool Stateless>
struct state_of {
  using type = void;
};
template <class F>
struct state_of<F, false> {
  using type = std::remove_cvref_t<typename first_parameter<F>::type>;
};

/// What `f(state?, item, extra...)` returns.
template <bool Stateless, class F, class State, class Item, class... Extra>
struct pool_result : std::invoke_result<F&, Item&&, const Extra&...> {};
template <class F, class State, class Item, class... Extra>
struct pool_result<false, F, State, Item, Extra...>
    : std::invoke_result<F&, State&, Item&&, const Extra&...> {};

/// How a Pool calls `F` on an `Item` with call-wide `Extra` arguments: with
/// the worker's state first when F takes one.
template <class F, class Item, class... Extra>
struct pool_call_types {
  static constexpr bool stateless = std::is_invocable_v<F&, Item&&, const Extra&...>;
  using State = typename state_of<F, stateless>::type;
  static constexpr bool invocable = [] {
    if constexpr (stateless) {
      return true;
    } else {
      return std::is_invocable_v<F&, State&, Item&&, const Extra&...>;
    }
  }();
  static_assert(invocable,
                "procpool::Pool: the function must be callable as f(item, extra...) or, for a "
                "pool with an initializer, f(State&, item, extra...) with a non-generic State&");
  using Result = typename pool_result<stateless, F, State, Item, Extra...>::type;
  using Out = stored_t<std::decay_t<Result>>;
};

template <class F, class State, class Item, class Out, class... Extra>
class PoolRunner final : public TaskRunner {
 public:
  PoolRunner(F f, State* state, std::tuple<Extra...> extra)
      : f_(f), state_(state), extra_(std::move(extra)) {}
  void run(ChunkRun& run, Reader& in, Writer& out) override {
    run_chunk<Out>(run, out, [&](std::uint64_t) {
      return [&]() -> decltype(auto) {
        Item item = load_input<Item>(in);
        return std::apply(
            [&](const Extra&... extra) -> decltype(auto) {
              if constexpr (std::is_void_v<State>) {
                return invoke_stored(f_, std::move(item), extra...);
              } else {
                return invoke_stored(f_, *state_, std::move(item), extra...);
              }
            },
            extra_);
      };
    });
  }

 private:
  F f_;
  State* state_;
  std::tuple<Extra...> extra_;
};

template <class F, class State, class Item, class Out, class... Extra>
std::unique_ptr<TaskRunner> make_pool_runner(void* state, Reader& setup) {
  F f = code_carrier<F>::load(setup);
  std::tuple<Extra...> extra;
  load(setup, extra);
  return std::make_unique<PoolRunner<F, State, Item, Out, Extra...>>(f, static_cast<State*>(state),
                                                                     std::move(extra));
}

/// A submitted task: its result as a one-element source; holds the pool core alive.
template <class Out, class Item>
class PoolCall final : public ResultSource<Out>, public DetachedTask {
  using Items = std::vector<Item>;

 public:
  PoolCall(std::shared_ptr<PoolCore> core, Buffer setup, std::unique_ptr<Items> owned)
      : core_(std::move(core)),
        items_(std::move(owned)),
        driver_(*core_->engine, core_->mutex, std::move(setup), StreamFeed<Items, Item>(*items_),
                core_->options, true, StopMode::close_call, Engine::SetupScope::each_chunk) {
    driver_.start();
    core_->kick();  // the service thread sends it: it runs before anyone waits for it
  }

  std::optional<Out> next() override { return deliver<Delivery::ordered, Out>(driver_); }
  bool wait_until(std::chrono::steady_clock::time_point deadline) {
    return driver_.wait_until(deadline);
  }
  const std::shared_ptr<PoolCore>& core() const noexcept { return core_; }

  bool finished_locked() override { return driver_.ready_locked(); }
  std::exception_ptr take_error() override {
    auto outcome = driver_.next();
    return outcome ? outcome->error : nullptr;
  }

 private:
  std::shared_ptr<PoolCore> core_;
  std::unique_ptr<Items> items_;
  CallDriver<Out, StreamFeed<Items, Item>> driver_;
};

/// A Pool call over a lazy (possibly endless) input range.
template <class Out, class View, class Item, Delivery D>
class PoolStreamCall final : public ResultSource<delivered_t<D, Out>> {
  using Value = delivered_t<D, Out>;

 public:
  PoolStreamCall(std::shared_ptr<PoolCore> core, Buffer setup, View view)
      : core_(std::move(core)),
        view_(std::move(view)),
        driver_(*core_->engine, core_->mutex, std::move(setup), StreamFeed<View, Item>(view_),
                core_->options, D != Delivery::unordered, StopMode::close_call) {}

  std::optional<Value> next() override { return deliver<D, Out>(driver_); }
  void drain_into(std::vector<Value>& out) override { drain<D, Out>(driver_, out); }

 private:
  std::shared_ptr<PoolCore> core_;
  View view_;
  CallDriver<Out, StreamFeed<View, Item>> driver_;
};

}  // namespace detail

/// The result of `Pool::submit`: like std::future. The task runs whether or
/// not anyone waits; dropping the Future without get() leaves the task
/// running, and its error, if any, goes to the pool's error handler.
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
  friend class Pool;
  using Source = detail::ResultSource<Stored>;
  struct Waitable : Source {
    virtual bool wait_until(std::chrono::steady_clock::time_point deadline) = 0;
    /// Gives the task to its pool, to be finished without this Future.
    virtual void detach() noexcept = 0;
  };
  template <class Inner>
  struct Adapter final : Waitable {
    explicit Adapter(std::unique_ptr<Inner> inner) : call(std::move(inner)) {}
    std::optional<Stored> next() override { return call->next(); }
    bool wait_until(std::chrono::steady_clock::time_point d) override {
      return call->wait_until(d);
    }
    void detach() noexcept override {
      std::shared_ptr<detail::PoolCore> core = call->core();
      core->adopt(std::move(call));
    }
    std::unique_ptr<Inner> call;
  };
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

  /// Starts the workers; each runs `init()` once and keeps its result as that worker's state.
  template <class Init>
  requires std::invocable<Init&> Pool(Options options, Init init) {
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
  auto imap(F f, R&& inputs, const Extra&... extra) {
    return make_results<detail::Delivery::ordered>(f, std::forward<R>(inputs), extra...);
  }

  /// Lazy, in completion order, as `Indexed{index, value}`.
  template <class F, std::ranges::input_range R, class... Extra>
  auto imap_unordered(F f, R&& inputs, const Extra&... extra) {
    return make_results<detail::Delivery::unordered>(f, std::forward<R>(inputs), extra...);
  }

  /// Every input's Outcome in input order; failures do not stop the call.
  template <class F, std::ranges::input_range R, class... Extra>
  auto map_outcomes(F f, R&& inputs, const Extra&... extra) {
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
  auto imap_outcomes(F f, R&& inputs, const Extra&... extra) {
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
    using Adapter = typename Future<R>::template Adapter<Call>;
    return Future<R>(std::make_unique<Adapter>(std::move(call)));
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

  unsigned processes() const noexcept;
  /// What the workers did since the pool started, with a diagnosis.
  Insights insights() const;
  /// Process ids of the current workers (they change when a worker is replaced).
  std::vector<pid_t> worker_pids() const;

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
    detail::save(out, std::tuple<Extra...>(extra...));
    return setup;
  }

  template <detail::Delivery D, class F, class R, class... Extra>
  auto make_results(F f, R&& inputs, const Extra&... extra) {
    if constexpr (!detail::is_star_apply_v<F>) detail::check_pool_callable<F>();
    using Item = std::ranges::range_value_t<R>;
    using Out = typename detail::pool_call_types<F, Item, Extra...>::Out;
    using Value = detail::delivered_t<D, Out>;
    using View = std::views::all_t<R>;
    detail::Buffer setup = make_setup<F, Item>(f, extra...);
    return Results<Value>(std::make_unique<detail::PoolStreamCall<Out, View, Item, D>>(
        core_, std::move(setup), std::views::all(std::forward<R>(inputs))));
  }

  std::shared_ptr<detail::PoolCore> core_;
};

}  // namespace procpool
