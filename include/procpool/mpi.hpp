// procpool/mpi.hpp - the same Pool over every node of an Open MPI job.
//
//     int main(int argc, char** argv) {
//       Vocabulary vocab = load_vocabulary("vocab.tsv");  // every rank: one copy per node
//       procpool::mpi::Session mpi(argc, argv);           // returns only on the root (rank 0)
//       procpool::mpi::Pool pool({}, init);               // every usable CPU of every node
//       auto ids = pool.map(&lookup, words);              // same calls, Options, errors as Pool
//       std::cerr << pool.insights().to_string();         // a row per node and per worker
//     }
//
// Launch with `mpirun -n NODES ./app` (one rank per node: `--map-by ppr:1:node`)
// or `srun --mpi=pmix ./app`. Each rank runs a procpool::Pool of its own
// (Options::processes workers per node, 0: the node's usable CPUs; ranks on
// one node share them out), built with
// the pool's initializer, so tasks still run in forked workers: a task that
// crashes or hangs costs one task, never the MPI job. The root's own node
// runs workers too; a one-rank job, or the program run without mpirun, is a
// one-node pool that behaves like procpool::Pool.
//
// Target procpool::mpi (CMake option PROCPOOL_MPI). MPI's own headers are not
// needed by code that includes this one.
#pragma once

#include <chrono>
#include <cstddef>
#include <cstdint>
#include <exception>
#include <functional>
#include <future>
#include <memory>
#include <optional>
#include <ranges>
#include <string>
#include <tuple>
#include <type_traits>
#include <typeinfo>
#include <utility>
#include <vector>

#include "procpool/detail/mpi/node.hpp"
#include "procpool/errors.hpp"
#include "procpool/insights.hpp"
#include "procpool/options.hpp"
#include "procpool/pool.hpp"
#include "procpool/results.hpp"

namespace procpool::mpi {

/// Initialises MPI for this program; at most one per process.
///
/// On the root (rank 0) the constructor returns. On every other rank it
/// serves the root's pools until the root's Session ends, then finalises MPI
/// and exits the process with status 0 (running its atexit handlers: a rank
/// is a normal run of the program): code after it runs on the root only.
/// A rank that has not heard from the root for PROCPOOL_MPI_ROOT_TIMEOUT
/// seconds (default 300; 0: never), a ping included, ends the job non-zero:
/// a stopped or cut-off root is noticed by no launcher.
///
/// At start every rank checks that it runs the very same executable as the
/// root (its build id): functions cross ranks by their offset in it. A rank
/// that runs another build prints which rank and host, and the job aborts.
class Session {
 public:
  Session(int& argc, char**& argv);
  /// Tells every rank to finish, then finalises MPI. Destroy every mpi::Pool first.
  ~Session();
  Session(const Session&) = delete;
  Session& operator=(const Session&) = delete;

  int rank() const noexcept;
  /// Ranks in the job (1 without mpirun).
  int size() const noexcept;
  /// Nodes the ranks run on (Slurm's node names, else host names). Ranks on
  /// one node share its CPUs: together they fork as many workers as the node
  /// has usable CPUs (or as Options::processes asks per node).
  int nodes() const noexcept;
};

/// Where on the cluster an error of an mpi::Pool task happened. Every error
/// such a task reports (TaskError, WorkerCrashed, TaskTimeout, Error) also
/// derives from this, and its what() ends with " (on node HOST, rank N)".
///
///     catch (const procpool::TaskError& e) {
///       if (auto* on = dynamic_cast<const procpool::mpi::ErrorLocation*>(&e)) log(on->host());
///     }
class ErrorLocation {
 public:
  ErrorLocation(int rank, std::string host) : rank_(rank), host_(std::move(host)) {}
  virtual ~ErrorLocation() = default;
  int rank() const noexcept { return rank_; }
  const std::string& host() const noexcept { return host_; }

 private:
  int rank_;
  std::string host_;
};

/// A procpool error `E` with the node it happened on.
template <class E>
class OnNode final : public E, public ErrorLocation {
 public:
  template <class... A>
  OnNode(int rank, const std::string& host, A&&... args)
      : E(std::forward<A>(args)...),
        ErrorLocation(rank, host),
        message_(std::string(E::what()) + " (on node " + host + ", rank " + std::to_string(rank) +
                 ")") {}
  const char* what() const noexcept override { return message_.c_str(); }

 private:
  std::string message_;
};

/// One node (rank) of an mpi::Pool.
struct NodeInsights {
  int rank = 0;
  std::string host;
  unsigned processes = 0;
  std::uint64_t chunks = 0;  // node chunks it ran
  std::uint64_t tasks = 0;
  double node_seconds = 0;        // chunks' time on the node, from arrival to reply sent
  double round_trip_seconds = 0;  // chunks' time from the root's send to its receipt of the reply
  std::uint64_t bytes_sent = 0;   // inputs and calls sent to the node
  std::uint64_t bytes_received = 0;  // results received from it
  /// Tasks whose worker died (or timed out) here and that the root sent to
  /// another node to run again (Options::retries, on a pool of several nodes).
  std::uint64_t moved_away = 0;
  /// Why the node gets none of the pool's tasks any more (empty: it does).
  /// A node whose pool cannot run anything (no worker could start, new
  /// workers keep dying before they are ready, the initializer threw) sends
  /// its inputs back and the other nodes run them; `processes` is then 0.
  /// So it is for a node given up on (it stopped answering the root: see
  /// PROCPOOL_MPI_NODE_TIMEOUT), whose row says so here.
  std::string out_of_rotation;
  std::uint64_t sent_back = 0;  // inputs it sent back, run on other nodes
  /// The node's own procpool::Pool, over its life: a row per worker.
  procpool::Insights pool;
};

/// What an mpi::Pool did over its life, per node, with a diagnosis.
struct Insights {
  double wall_seconds = 0;
  unsigned nodes = 0;
  unsigned processes = 0;  // workers on all nodes (as Pool::processes())
  std::uint64_t tasks = 0;
  double efficiency = 0;  // total compute / (wall * processes)
  /// Sum over chunks of (round trip - time on the node): time in MPI messages
  /// and in the root's queues, the network's share.
  double transit_seconds = 0;
  double root_encode_seconds = 0;  // taking and serialising inputs on the root
  std::vector<NodeInsights> per_node;
  std::uint64_t unobserved_errors = 0;                 // failed tasks of dropped Futures
  std::vector<std::string> unobserved_error_messages;  // the first ten of them
  std::string diagnosis;

  std::string to_string() const;
};

namespace detail {

class PoolState;
class CallState;

/// One input's outcome as it came back: its value's bytes (kept alive by the
/// OutcomeRun it came in), or its error already rebuilt with the global index
/// and the node.
struct RawOutcome {
  std::size_t index = 0;
  const std::byte* data = nullptr;
  std::size_t size = 0;
  std::exception_ptr error;
  int rank = 0;
};

/// Consecutive outcomes of one chunk's reply (in completion order too: a
/// chunk's outcomes are in input order), handed to the caller at once.
struct OutcomeRun {
  std::size_t first = 0;  // input index of the first
  std::size_t count = 0;
  int rank = 0;                      // the node they ran on
  std::shared_ptr<const void> keep;  // the reply that holds their bytes
  /// Every one a value of a fixed-size type: the i-th one's `size` bytes are
  /// at `values + i * stride`. Null: `each` has them, one per outcome.
  const std::byte* values = nullptr;
  std::size_t stride = 0;
  std::size_t size = 0;
  std::vector<RawOutcome> each;

  RawOutcome at(std::size_t i) const {
    if (values == nullptr) return each[i];
    return RawOutcome{first + i, values + i * stride, size, nullptr, rank};
  }
};

/// A call on the root: schedules its inputs over the nodes, collects outcomes.
class CallHandle {
 public:
  enum class Order { input, completion };
  /// `value_size`: the size of every result value when its type travels bare
  /// (fixed size, see travels_bare_v), else 0.
  CallHandle(std::shared_ptr<PoolState> pool, Buffer setup, std::unique_ptr<InputFeed> feed,
             Order order, std::optional<std::size_t> total, bool submitted, std::size_t value_size);
  ~CallHandle();
  CallHandle(const CallHandle&) = delete;
  CallHandle& operator=(const CallHandle&) = delete;
  /// Replaces `out` by the next outcomes (input or completion order), as many
  /// of one chunk as are ready (at most `most`, at least one); false at the end.
  bool next_run(OutcomeRun& out, std::size_t most);
  /// Whether an outcome is ready by `deadline` (sends work meanwhile).
  bool wait_until(std::chrono::steady_clock::time_point deadline);
  /// The error for a value whose load() threw (called in the catch block).
  std::exception_ptr decode_error(const RawOutcome& raw);
  /// An error stopped the call on its way to the caller: the progress line
  /// ends "failed" now, as procpool::Pool's does, not as the handle goes.
  void failed() noexcept;

 private:
  std::shared_ptr<CallState> state_;
};

/// The message a rank prints when it runs another build than the root (its
/// executable_identity() differs), or nothing when they match.
std::optional<std::string> identity_mismatch(int rank, const std::string& host,
                                             const std::string& mine, const std::string& root_host,
                                             const std::string& roots);

std::shared_ptr<PoolState> open_pool(const Options& options, NodePoolFactoryFn* factory,
                                     const void* init, const std::type_info* state_type);
void close_pool(PoolState& pool) noexcept;
void check_open(const PoolState& pool);
void check_state_type(const PoolState& pool, const std::type_info& wanted);
void pool_set_error_handler(PoolState& pool, std::function<void(std::exception_ptr)> handler);
void pool_close(PoolState& pool);
void pool_join(PoolState& pool);
void pool_terminate(PoolState& pool);
unsigned pool_processes(const PoolState& pool);
bool pool_bounds_inflight(const PoolState& pool);
Insights pool_insights(PoolState& pool);

template <class Out, class View, class Item, procpool::detail::Delivery D>
class StreamCall final
    : public procpool::detail::ResultSource<procpool::detail::delivered_t<D, Out>> {
  using Value = procpool::detail::delivered_t<D, Out>;

 public:
  StreamCall(std::shared_ptr<PoolState> pool, Buffer setup, View view,
             std::optional<std::size_t> total, bool submitted = false)
      : view_(std::move(view)),
        bounded_(pool_bounds_inflight(*pool)),
        call_(std::move(pool), std::move(setup), std::make_unique<RangeFeed<View, Item>>(view_),
              D == procpool::detail::Delivery::unordered ? CallHandle::Order::completion
                                                         : CallHandle::Order::input,
              total, submitted, travels_bare_v<Out> ? sizeof(Out) : 0) {}

  std::optional<Value> next() override {
    try {
      return next_outcome();
    } catch (...) {
      call_.failed();
      throw;
    }
  }
  /// map's way in: a run of fixed-size values (a reply with no failure in
  /// it) goes in one pass, without a step through next() for each.
  void drain_into(std::vector<Value>& out) override {
    for (;;) {
      if constexpr (D != procpool::detail::Delivery::unordered && travels_bare_v<Out> &&
                    std::is_default_constructible_v<Out>) {
        take_rest_of_bare_run(out);
      }
      auto value = next();
      if (!value) return;
      out.push_back(std::move(*value));
    }
  }

  bool wait_until(std::chrono::steady_clock::time_point deadline) {
    try {
      return call_.wait_until(deadline);
    } catch (...) {
      call_.failed();
      throw;
    }
  }

 private:
  std::optional<Value> next_outcome() {
    if (stopped_by_) std::rethrow_exception(stopped_by_);  // read again after it threw
    if (taken_ == run_.count) {
      // Outcomes come from the root's queues a chunk's run at a time (one
      // lock, not one per input); with Options::max_inflight, one at a time,
      // so that the bound counts what the caller has really been handed.
      taken_ = 0;
      run_.count = 0;  // if next_run throws, the old run is not read again
      if (!call_.next_run(run_, bounded_ ? 1 : 4096)) return std::nullopt;
    }
    const RawOutcome raw = run_.at(taken_++);
    std::optional<Out> value;
    std::exception_ptr error = raw.error;
    if (!error) {
      try {
        Reader in(raw.data, raw.size);
        value.emplace(procpool::detail::load_value<Out>(in));
      } catch (...) {
        error = call_.decode_error(raw);
      }
    }
    if (taken_ == run_.count) run_.keep.reset();  // a large reply goes as soon as it is read
    if constexpr (D == procpool::detail::Delivery::outcomes) {
      return Outcome<Out>{raw.index, std::move(value), error};
    } else {
      if (error) {
        // The first failure stops the call, as procpool::Pool's does: read
        // again, it throws the same error, never the results after it.
        stopped_by_ = error;
        std::rethrow_exception(error);
      }
      if constexpr (D == procpool::detail::Delivery::unordered) {
        return Indexed<Out>{raw.index, std::move(*value)};
      } else {
        return std::move(*value);
      }
    }
  }
  /// Appends what is left of the current run when all of it is values of
  /// Out's own size (anything else goes through next(), which says why).
  void take_rest_of_bare_run(std::vector<Value>& out) {
    if (run_.values == nullptr || run_.size != sizeof(Out) || taken_ >= run_.count) return;
    const std::size_t n = run_.count - taken_;
    out.reserve(out.size() + n);
    for (std::size_t i = taken_; i < run_.count; ++i) {
      Out value;
      std::memcpy(static_cast<void*>(&value), run_.values + i * run_.stride, sizeof(Out));
      if constexpr (D == procpool::detail::Delivery::outcomes) {
        out.push_back(Outcome<Out>{run_.first + i, value, nullptr});
      } else {
        out.push_back(value);
      }
    }
    taken_ = run_.count;
    run_.keep.reset();
  }

  View view_;
  bool bounded_;  // Options::max_inflight is set
  CallHandle call_;
  OutcomeRun run_;
  std::size_t taken_ = 0;
  std::exception_ptr stopped_by_;  // the task error that stopped the call
};

}  // namespace detail

/// The result of mpi::Pool::submit: a procpool::Future. The task is sent to a
/// node at once and runs whether or not anyone waits; a Future dropped before
/// get() leaves its task running, and its error is printed on stderr and
/// counted in insights().
template <class R>
using Future = procpool::Future<R>;

namespace detail {

/// A submitted mpi call as a Future's source. Dropped, the call's record
/// goes; its node still runs the task, and the root reports an error that
/// nobody will get (the chunk is marked so when sent).
template <class Stored, class Call>
struct NodeFutureSource final : procpool::detail::FutureSource<Stored> {
  explicit NodeFutureSource(std::unique_ptr<Call> c) : call(std::move(c)) {}
  std::optional<Stored> next() override { return call->next(); }
  bool wait_until(std::chrono::steady_clock::time_point d) override { return call->wait_until(d); }
  void detach() noexcept override { call.reset(); }
  std::unique_ptr<Call> call;
};

}  // namespace detail

/// procpool::Pool over every rank of the MPI job (see the top of this file).
/// The same calls, Options and errors as procpool::Pool, with these meanings:
///  - Options::processes: workers per node (0: each node's usable CPUs),
///    shared out among the ranks on that node (see Session::nodes());
///  - Options::chunksize: inputs per node chunk (and per message inside the
///    node); 0 sizes node chunks from the measured task time, about 50 ms
///    of work for the whole node per chunk, a few chunks in flight per node;
///  - retries: a task whose worker died or timed out runs again on another
///    node (the least loaded one with room), should the cause be the node's;
///    on a pool of one node, on a fresh worker of that node;
///  - task_timeout, max_tasks_per_child: applied by each node's own Pool
///    (task_timeout to each batch's decoding of the call's extra arguments
///    in a worker too);
///  - progress: on the root, over every node;
///  - imap_unordered's and every error's index is the global input index,
///    and every error also names its node (see ErrorLocation).
/// Functions are function pointers or capture-less lambdas, as for Pool; the
/// initializer too: both cross to the other ranks by identity.
class Pool {
 public:
  explicit Pool(Options options = {})
      : state_(detail::open_pool(options, &detail::make_plain_node_pool, nullptr, nullptr)) {}
  /// `Pool pool({})`: the default Options.
  explicit Pool(std::initializer_list<procpool::detail::DefaultOptions>) : Pool(Options{}) {}

  /// Each worker of every node runs `init()` once and keeps its result as
  /// its state, as procpool::Pool's do: in the worker, so that an initializer
  /// that crashes (a library a node lacks) costs that node's workers, never
  /// its rank and so the MPI job. Big read-only data that every worker of a
  /// rank should share: build it before the Session (inherited copy-on-write;
  /// once per node with one rank per node), or use Start::fork_server: the
  /// initializer then runs once per rank, in a server its workers are forked
  /// from (made on a thread of the rank's own: the constructor returns at
  /// once, and that node's tasks wait for its initializer).
  template <class Init>
  requires std::invocable<Init&> Pool(Options options, Init init) {
    using State = std::decay_t<std::invoke_result_t<Init&>>;
    static_assert(!std::is_void_v<State>,
                  "procpool::mpi::Pool: the initializer must return the state");
    static_assert(procpool::detail::pool_callable_v<Init>,
                  "procpool::mpi::Pool: the initializer must be a function pointer or a "
                  "capture-less lambda: it runs on every node (other machines), which cannot see "
                  "what a capture refers to. Read or build the data inside the initializer, or "
                  "build it before the Session (every rank runs main up to it).");
    const void* function = nullptr;
    if constexpr (procpool::detail::is_function_pointer_v<Init>) {
      function = reinterpret_cast<const void*>(init);
    }
    state_ = detail::open_pool(options, &detail::make_node_pool<Init>, function, &typeid(State));
  }

  /// Waits for the work already sent (dropped Futures' too), then ends every node's pool.
  ~Pool() {
    if (state_) detail::close_pool(*state_);
  }
  Pool(const Pool&) = delete;
  Pool& operator=(const Pool&) = delete;

  template <class F, std::ranges::input_range R, class... Extra>
  auto map(F f, R&& inputs, const Extra&... extra) {
    using Out =
        typename procpool::detail::pool_call_types<F, std::ranges::range_value_t<R>, Extra...>::Out;
    std::vector<Out> out;
    if constexpr (std::ranges::sized_range<R>)
      out.reserve(static_cast<std::size_t>(std::ranges::size(inputs)));
    auto results = imap(f, std::forward<R>(inputs), extra...);
    procpool::detail::ResultsAccess<Out>::drain_into(results, out);
    return out;
  }

  template <class F, std::ranges::input_range R, class... Extra>
  auto imap(F f, R&& inputs, const Extra&... extra) {
    return make_results<procpool::detail::Delivery::ordered>(f, std::forward<R>(inputs), extra...);
  }

  /// In completion order, as Indexed{global input index, value}.
  template <class F, std::ranges::input_range R, class... Extra>
  auto imap_unordered(F f, R&& inputs, const Extra&... extra) {
    return make_results<procpool::detail::Delivery::unordered>(f, std::forward<R>(inputs),
                                                               extra...);
  }

  template <class F, std::ranges::input_range R, class... Extra>
  auto map_outcomes(F f, R&& inputs, const Extra&... extra) {
    using Out =
        typename procpool::detail::pool_call_types<F, std::ranges::range_value_t<R>, Extra...>::Out;
    std::vector<Outcome<Out>> out;
    if constexpr (std::ranges::sized_range<R>)
      out.reserve(static_cast<std::size_t>(std::ranges::size(inputs)));
    auto results = imap_outcomes(f, std::forward<R>(inputs), extra...);
    procpool::detail::ResultsAccess<Outcome<Out>>::drain_into(results, out);
    return out;
  }

  template <class F, std::ranges::input_range R, class... Extra>
  auto imap_outcomes(F f, R&& inputs, const Extra&... extra) {
    return make_results<procpool::detail::Delivery::outcomes>(f, std::forward<R>(inputs), extra...);
  }

  template <class F, std::ranges::input_range R, class... Extra>
  auto starmap(F f, R&& tuples, const Extra&... extra) {
    check_callable<F>();
    return map(procpool::detail::StarApply<F>{f}, std::forward<R>(tuples), extra...);
  }

  /// Runs `f(args...)` (or `f(state, args...)`) on some node's worker.
  template <class F, class... Args>
  auto submit(F f, Args&&... args) {
    check_callable<F>();
    using Item = std::tuple<std::decay_t<Args>...>;
    using Star = procpool::detail::StarApply<F>;
    using Types = procpool::detail::pool_call_types<Star, Item>;
    using Out = typename Types::Out;
    using R = std::conditional_t<std::is_same_v<Out, procpool::detail::Empty>, void, Out>;
    using Items = std::vector<Item>;
    using Call = detail::StreamCall<Out, Items, Item, procpool::detail::Delivery::ordered>;
    Items items;
    items.emplace_back(std::forward<Args>(args)...);
    detail::Buffer setup = make_setup<Star, Item>(Star{f});
    auto call = std::make_unique<Call>(state_, std::move(setup), std::move(items), 1, true);
    using Source = detail::NodeFutureSource<procpool::detail::stored_t<R>, Call>;
    return procpool::detail::make_future<R>(std::make_unique<Source>(std::move(call)));
  }

  /// Where the errors of tasks whose Future was dropped go, as
  /// procpool::Pool::set_error_handler: called on a thread of its own, one
  /// error at a time (it may use the pools). Without a handler each is one
  /// line on stderr (the first ten); insights() counts them either way. The
  /// pool's destructor (and join()) returns after the handler has seen every one.
  void set_error_handler(std::function<void(std::exception_ptr)> handler) {
    detail::pool_set_error_handler(*state_, std::move(handler));
  }

  /// No more work is accepted; what was accepted still runs.
  void close() { detail::pool_close(*state_); }
  /// Waits for all accepted work, then ends every node's pool. Call close() first.
  void join() { detail::pool_join(*state_); }
  /// Ends every node's pool now; its workers are killed.
  void terminate() { detail::pool_terminate(*state_); }
  /// Workers on all nodes (less those of a node taken out of rotation or
  /// given up on: see NodeInsights::out_of_rotation).
  unsigned processes() const { return detail::pool_processes(*state_); }
  /// A row per node (each with its pool's rows per worker), and a diagnosis.
  Insights insights() const { return detail::pool_insights(*state_); }

 private:
  template <class F>
  static constexpr void check_callable() {
    static_assert(procpool::detail::pool_callable_v<F>,
                  "procpool::mpi::Pool runs only function pointers and capture-less lambdas: "
                  "they run on other machines (MPI ranks) and in workers forked before this "
                  "call, which cannot see what a capture refers to. Build the data once per "
                  "worker with Pool(options, init) and take it as the function's first "
                  "parameter, State&, build it once per rank before the Session, or pass it "
                  "as an extra argument of the call.");
  }

  template <class F, class Item, class... Extra>
  detail::Buffer make_setup(const F& f, const Extra&... extra) {
    using Types = procpool::detail::pool_call_types<F, Item, Extra...>;
    using State = typename Types::State;
    if constexpr (!std::is_void_v<State>) detail::check_state_type(*state_, typeid(State));
    detail::check_open(*state_);
    // Code crosses by identity (module + offset), never by raw address:
    // every rank runs the same binary at its own load address.
    static const detail::CodeRef factory = procpool::detail::code_ref_of(
        &detail::make_node_call<F, Item, typename Types::Out, Extra...>);
    detail::Buffer setup;
    detail::Writer out(setup);
    procpool::detail::save_code_ref(out, factory);
    procpool::detail::code_carrier<F>::save(out, f);
    procpool::detail::save_extra_args(out, extra...);
    return setup;
  }

  template <procpool::detail::Delivery D, class F, class R, class... Extra>
  auto make_results(F f, R&& inputs, const Extra&... extra) {
    if constexpr (!procpool::detail::is_checked_adaptor_v<F>) check_callable<F>();
    using Item = std::ranges::range_value_t<R>;
    using Out = typename procpool::detail::pool_call_types<F, Item, Extra...>::Out;
    using Value = procpool::detail::delivered_t<D, Out>;
    using View = std::views::all_t<R>;
    std::optional<std::size_t> total;
    if constexpr (std::ranges::sized_range<R>) {
      total = static_cast<std::size_t>(std::ranges::size(inputs));
    }
    detail::Buffer setup = make_setup<F, Item>(f, extra...);
    return Results<Value>(std::make_unique<detail::StreamCall<Out, View, Item, D>>(
        state_, std::move(setup), std::views::all(std::forward<R>(inputs)), total));
  }

  std::shared_ptr<detail::PoolState> state_;
};

}  // namespace procpool::mpi
