// The pieces of the MPI backend that must be templates: what a node runs for
// one call, and how the root encodes inputs and decodes outcomes. Everything
// else (messages, nodes, scheduling) lives in src/mpi/ and never sees a type.
//
// A node (a remote rank, or the root's own LocalNode) receives two kinds of
// code by identity (CodeRef: module + offset, valid in every rank because
// every rank runs the very same executable, checked by Session at start):
//   * a NodePoolFactory, instantiated for the pool's initializer, that builds
//     the node's procpool::Pool exactly as Pool(options, init) would;
//   * a NodeCallFactory, instantiated for (F, Item, Extra...), that decodes a
//     call's function once (its extra arguments go on to the workers as the
//     root wrote them, see ForwardedExtras), then runs each node chunk on the
//     node's Pool with map_outcomes and encodes every outcome.
#pragma once

#include <algorithm>
#include <chrono>
#include <cstdint>
#include <cstring>
#include <exception>
#include <functional>
#include <iterator>
#include <memory>
#include <optional>
#include <ranges>
#include <string>
#include <tuple>
#include <type_traits>
#include <utility>
#include <vector>

#include "procpool/detail/buffer.hpp"
#include "procpool/detail/call.hpp"
#include "procpool/detail/code_identity.hpp"
#include "procpool/options.hpp"
#include "procpool/pool.hpp"
#include "procpool/serialize.hpp"

namespace procpool::mpi::detail {

using procpool::detail::Buffer;
using procpool::detail::CodeRef;
using procpool::detail::Reader;
using procpool::detail::Writer;

/// Builds a node's procpool::Pool; `init` is the initializer function
/// pointer's address in this process, or null (capture-less lambda, or none).
using NodePoolFactoryFn = std::unique_ptr<procpool::Pool>(const Options& options, const void* init);

/// A node's Pool: the root deals the last tasks of a call to nodes with free
/// workers, so within the node they may queue (Engine::let_tail_chunks_queue).
/// (Not long tasks: each runs as a call of its own, to an idle worker only;
/// see NodeServer::Job::alone.)
inline std::unique_ptr<procpool::Pool> as_node_pool(std::unique_ptr<procpool::Pool> pool) {
  procpool::detail::PoolAccess::engine(*pool).let_tail_chunks_queue();
  return pool;
}

template <class Init>
std::unique_ptr<procpool::Pool> make_node_pool(const Options& options, const void* init) {
  if constexpr (procpool::detail::is_function_pointer_v<Init>) {
    return as_node_pool(
        std::make_unique<procpool::Pool>(options, reinterpret_cast<Init>(const_cast<void*>(init))));
  } else {
    return as_node_pool(std::make_unique<procpool::Pool>(options, Init{}));
  }
}

inline std::unique_ptr<procpool::Pool> make_plain_node_pool(const Options& options, const void*) {
  return as_node_pool(std::make_unique<procpool::Pool>(options));
}

/// Writes the error record of `error` (TaskError, WorkerCrashed, TaskTimeout,
/// any other exception) for the root to rebuild (see CallState).
void save_error(Writer& out, const std::exception_ptr& error);

/// A node chunk's reply as it is written. A large value forwarded from a
/// worker (see Forwarded) goes in as a part of its own: the transport sends
/// the parts as the pieces of one message, so the value is never copied into
/// one buffer with the rest.
class ReplyParts {
 public:
  /// Values this large become parts of their own; smaller ones are copied,
  /// which costs less than the message piece each part takes (the root
  /// receives a message's pieces one after the other, a round trip each).
  static constexpr std::size_t own_part_bytes = std::size_t{1} << 20;

  ReplyParts() : writer_(current_) {}
  ReplyParts(const ReplyParts&) = delete;
  ReplyParts& operator=(const ReplyParts&) = delete;

  /// Writes at the end of the reply.
  Writer& writer() noexcept { return writer_; }
  /// Appends `bytes`: copied when small, else as a part of their own.
  void append(Buffer bytes) {
    if (bytes.size() < own_part_bytes) {
      writer_.write(bytes.data(), bytes.size());
      return;
    }
    parts_.reserve(parts_.size() + 2);                             // then nothing below can throw
    if (!current_.empty()) parts_.push_back(std::move(current_));  // leaves current_ empty
    parts_.push_back(std::move(bytes));
  }
  /// The first part, where the message's header and first fields are.
  std::byte* front() noexcept { return parts_.empty() ? current_.data() : parts_.front().data(); }
  /// Forgets everything after the first `size` bytes of the first part.
  void rewind(std::size_t size) {
    if (!parts_.empty()) {
      current_ = std::move(parts_.front());
      parts_.clear();
    }
    current_.resize(size);
  }
  /// Its bytes so far, in every part.
  std::size_t size() const noexcept {
    std::size_t n = current_.size();
    for (const Buffer& part : parts_)
      n += part.size();
    return n;
  }
  /// The parts in order; the reply is left empty.
  std::vector<Buffer> take() {
    if (!current_.empty() || parts_.empty()) parts_.push_back(std::move(current_));
    return std::move(parts_);
  }

 private:
  std::vector<Buffer> parts_;
  Buffer current_;
  Writer writer_;
};

/// One node chunk's inputs, where its outcome records go, and who hears
/// that its records are all written (its reply then leaves at once, before
/// the rest of its batch has run).
struct NodeChunk {
  std::uint64_t count = 0;
  Reader items;
  ReplyParts* reply = nullptr;
  std::function<void()> finished;
};

/// The outcome record of an input that its node did not run because it
/// cannot run the pool's tasks at all (NodeCall): u8 2, the error record of
/// why, u64 size, then the input's bytes as the chunk had them. The root
/// sends such inputs to another node (CallState::receive).
inline constexpr std::uint8_t record_not_run_here = 2;
/// The same for an input whose worker died (or timed out) running it, when
/// the root retries on other nodes (Options::retries on several nodes): its
/// bytes go back with its error, so the root keeps no copy of what it sent.
inline constexpr std::uint8_t record_died_here = 3;
/// The record the root makes itself for an input on a node it gave up on
/// (it stopped answering): u8 4, the error record of why.
inline constexpr std::uint8_t record_lost_here = 4;

/// Whether `error`, a task's failure on the node's `pool`, says that the pool
/// can run nothing there: its new workers keep dying before they are ready,
/// or its initializer threw in the task's worker.
bool node_cannot_run(procpool::Pool& pool, const std::exception_ptr& error);

/// Whether `error` says that the task's worker died or timed out under it.
bool worker_died(const std::exception_ptr& error);

/// Writes a record_not_run_here or record_died_here record (`tag`) of the
/// input at `input`.
void put_sent_back(Writer& out, std::uint8_t tag, const std::exception_ptr& why,
                   const std::byte* input, std::size_t size);

/// One call's code on a node: decoded once per node, run for every node chunk.
class NodeCall {
 public:
  virtual ~NodeCall() = default;
  /// Writes every input of `chunks` as not run here, because of `why` (the
  /// node's pool could not be made), and hears each chunk finished.
  virtual void send_back(std::vector<NodeChunk>& chunks, const std::exception_ptr& why) = 0;
  /// Decodes each chunk's `count` inputs (put_framed), runs them all on
  /// `pool` in one call (several chunks of one call that wait together cost
  /// one Pool call, not one each) and writes one outcome record per input, in
  /// input order, to its chunk's `reply`: u8 1, the value (put_framed) |
  /// u8 0, error record | record_not_run_here (node_cannot_run) |
  /// record_died_here (worker_died, if `send_back_deaths`).
  virtual void run(procpool::Pool& pool, std::vector<NodeChunk>& chunks, bool send_back_deaths) = 0;
};
using NodeCallFactoryFn = std::unique_ptr<NodeCall>(Reader& setup);

/// Values of a fixed-size, trivially copyable type travel bare: their size
/// is known on both sides (every rank runs the same binary), and their
/// load() cannot throw, so no frame is needed to skip one.
template <class T>
inline constexpr bool travels_bare_v = procpool::detail::is_raw_v<T>;

/// Writes `value` framed by its length (unless it travels bare), so the root
/// can slice a reply without knowing the type, and one value whose load()
/// misbehaves cannot spoil the next.
template <class T>
void put_framed(Writer& out, const T& value) {
  if constexpr (travels_bare_v<T>) {
    out.put(value);
  } else {
    const std::size_t at = out.size();
    out.put(std::uint64_t{0});
    procpool::detail::save(out, value);
    const std::uint64_t length = out.size() - at - sizeof(std::uint64_t);
    out.overwrite(at, &length, sizeof length);
  }
}

/// The bytes of the next value of type T that put_framed wrote.
template <class T>
Reader take_framed(Reader& in) {
  const auto length = travels_bare_v<T> ? sizeof(T) : in.get<std::uint64_t>();
  return Reader(in.take(static_cast<std::size_t>(length)), static_cast<std::size_t>(length));
}

/// Whether a T is, or holds, a SharedBuffer or SharedVector as such: from a
/// worker it comes to its node as a memory file, not bytes, so the node
/// decodes it (no copy) and encodes it for the root itself.
template <class T>
constexpr bool holds_shared_memory() {
  using procpool::detail::is_std_array;
  using procpool::detail::is_std_optional;
  using procpool::detail::is_std_vector;
  using procpool::detail::is_tuple_like;
  if constexpr (procpool::detail::is_shared_memory_v<T>) {
    return true;
  } else if constexpr (is_std_vector<T>::value || is_std_array<T>::value ||
                       is_std_optional<T>::value) {
    return holds_shared_memory<std::remove_cv_t<typename T::value_type>>();
  } else if constexpr (is_tuple_like<T>::value) {
    return []<std::size_t... I>(std::index_sequence<I...>) {
      return (holds_shared_memory<std::remove_cv_t<std::tuple_element_t<I, T>>>() || ...);
    }
    (std::make_index_sequence<std::tuple_size_v<T>>{});
  } else {
    return false;
  }
}

/// A task's result on its way through a node. The worker writes the value
/// as the root reads it (put_framed); the node keeps those bytes as they are
/// instead of decoding the value only to encode it again: for a large result
/// that is one copy, and one block of fresh pages, fewer on every node.
template <class T>
class Forwarded {
 public:
  using procpool_writes_itself = void;  // see procpool::detail::writes_itself

  Forwarded() = default;
  explicit Forwarded(T value) : value_(std::move(value)) {}
  /// A result the function returned by reference (a member of the worker's
  /// state, say): written from where it is, as procpool::Pool writes it,
  /// right after the call, never copied (T may be move-only, or large).
  static Forwarded referring_to(const T& value) {
    Forwarded forwarded;
    forwarded.referred_ = &value;
    return forwarded;
  }

  /// In the worker. A SharedBuffer inside the value (in a type of the user's)
  /// is written as bytes, not as a memory file: the bytes go on to another rank.
  void write_to(Writer& out) const {
    procpool::detail::ScopedPointer<std::vector<int>> no_files(procpool::detail::files_to_attach(),
                                                               nullptr);
    put_framed(out, referred_ != nullptr ? *referred_ : *value_);
  }
  /// On the node: the frame (length, then the value's bytes) as it came.
  void read_from(Reader& in) {
    static_assert(!travels_bare_v<T>, "bare values are cheaper to copy than to forward");
    const auto length = static_cast<std::size_t>(in.get<std::uint64_t>());
    const std::byte* at = in.take(length);
    Writer out(bytes_);
    out.put(static_cast<std::uint64_t>(length));
    out.write_block(at, length);
    in.consumed(at, length);  // a result's memory file is given back as it is read
  }
  /// The frame's bytes, for the reply to the root.
  Buffer take_bytes() noexcept { return std::move(bytes_); }

 private:
  std::optional<T> value_;
  const T* referred_ = nullptr;
  Buffer bytes_;
};

/// The results a node forwards as the worker wrote them, and the inputs it
/// forwards as the root wrote them: all but those that are cheaper to copy
/// (bare values) or travel between a node and its workers as memory files.
template <class T>
inline constexpr bool forwarded_v = !travels_bare_v<T> && !holds_shared_memory<T>();

/// An input on its way through a node. The node hands the bytes the root
/// wrote (save()) on to the worker as they are, instead of decoding the input
/// only for its Pool to encode it again: for a large input that is one copy,
/// and one block of fresh pages, fewer on every node, and the node holds it
/// once (in the message it came in), not twice. The worker decodes it.
template <class T>
class ForwardedInput {
 public:
  using procpool_writes_itself = void;  // see procpool::detail::writes_itself

  ForwardedInput() = default;
  /// On the node: the input's bytes, in the message that outlives the call.
  ForwardedInput(const std::byte* bytes, std::size_t size) noexcept : bytes_(bytes), size_(size) {}

  /// On the node, for the worker: framed, so that an input whose load()
  /// misbehaves cannot spoil what follows.
  void write_to(Writer& out) const {
    out.put(static_cast<std::uint64_t>(size_));
    out.write_block(bytes_, size_);
  }
  /// In the worker.
  void read_from(Reader& in) {
    const auto length = static_cast<std::size_t>(in.get<std::uint64_t>());
    Reader own(in.take(length), length);
    if (in.gives_back()) own.allow_giving_back();
    value_.emplace(procpool::detail::load_value<T>(own));
  }
  T&& value() && noexcept { return std::move(*value_); }

 private:
  const std::byte* bytes_ = nullptr;
  std::size_t size_ = 0;
  std::optional<T> value_;
};

/// A call's extra arguments on their way through a node: the bytes the root
/// wrote (save_extra_args) handed on to its workers as they are. The node
/// never decodes them: a load() that throws or crashes costs the workers
/// (each input fails, as on procpool::Pool), never the rank, whose death
/// would end the MPI job. Each worker decodes them once per batch of chunks
/// (one call of the node's Pool).
template <class... Extra>
class ForwardedExtras {
 public:
  using procpool_writes_itself = void;  // see procpool::detail::writes_itself

  ForwardedExtras() = default;
  /// On the node: the rest of the call's setup, as the root wrote it.
  explicit ForwardedExtras(Reader& setup)
      : bytes_(setup.position(), setup.position() + setup.remaining()) {
    setup.take(setup.remaining());
  }

  /// On the node, for the worker: framed, so that a load() that reads too
  /// little or too much cannot spoil what follows.
  void write_to(Writer& out) const {
    out.put(static_cast<std::uint64_t>(bytes_.size()));
    out.write_block(bytes_.data(), bytes_.size());
  }
  /// In the worker.
  void read_from(Reader& in) {
    const auto length = static_cast<std::size_t>(in.get<std::uint64_t>());
    Reader own(in.take(length), length);
    values_.emplace();
    procpool::detail::load_extra_args(own, *values_);
  }
  const std::tuple<Extra...>& values() const noexcept { return *values_; }

 private:
  std::vector<std::byte> bytes_;
  std::optional<std::tuple<Extra...>> values_;
};

/// `F` taking the call's extra arguments as one ForwardedExtras: what a
/// node's Pool runs for a call that has some.
template <class F, class Extras>
struct ApplyExtras;
template <class F, class... Extra>
struct ApplyExtras<F, std::tuple<Extra...>> {
  [[no_unique_address]] F f;

  template <class Item>
  requires std::is_invocable_v<F&, Item&&, const Extra&...>
  decltype(auto) operator()(Item&& item, const ForwardedExtras<Extra...>& extras) {
    return std::apply(
        [&](const Extra&... extra) -> decltype(auto) {
          return std::invoke(f, std::forward<Item>(item), extra...);
        },
        extras.values());
  }
  template <class State, class Item>
  requires std::is_invocable_v<F&, State&, Item&&, const Extra&...>
  decltype(auto) operator()(State& state, Item&& item, const ForwardedExtras<Extra...>& extras) {
    return std::apply(
        [&](const Extra&... extra) -> decltype(auto) {
          return std::invoke(f, state, std::forward<Item>(item), extra...);
        },
        extras.values());
  }
};

/// `F` taking its input as a ForwardedInput<Item>: what a node's Pool runs
/// for a call whose inputs are forwarded.
template <class F, class Item>
struct DecodeInput {
  [[no_unique_address]] F f;

  template <class... Extra>
  requires std::is_invocable_v<F&, Item&&, const Extra&...>
  decltype(auto) operator()(ForwardedInput<Item>&& input, const Extra&... extra) {
    return std::invoke(f, std::move(input).value(), extra...);
  }
  template <class State, class... Extra>
  requires std::is_invocable_v<F&, State&, Item&&, const Extra&...>
  decltype(auto) operator()(State& state, ForwardedInput<Item>&& input, const Extra&... extra) {
    return std::invoke(f, state, std::move(input).value(), extra...);
  }
};

/// `F` returning its result as a Forwarded<Out>: what a node's Pool runs for
/// a call whose results do not travel bare.
template <class F, class Out>
struct ForwardResult {
  [[no_unique_address]] F f;

  template <class... Args>
  requires std::is_invocable_v<F&, Args&&...> Forwarded<Out>
  operator()(Args&&... args) {
    if constexpr (std::is_reference_v<std::invoke_result_t<F&, Args&&...>>) {
      return Forwarded<Out>::referring_to(std::invoke(f, std::forward<Args>(args)...));
    } else {
      return Forwarded<Out>(std::invoke(f, std::forward<Args>(args)...));
    }
  }
};

}  // namespace procpool::mpi::detail

namespace procpool::detail {

/// How a node's wrapper around the user's function G (its member `f`)
/// travels to the node's workers: as G does.
template <template <class, class> class Wrapper, class G, class T>
struct wrapper_code_carrier {
  static void save(Writer& out, const Wrapper<G, T>& f) { code_carrier<G>::save(out, f.f); }
  static Wrapper<G, T> load(Reader& in) { return {code_carrier<G>::load(in)}; }
};

template <class F, class Out>
inline constexpr bool is_checked_adaptor_v<mpi::detail::ForwardResult<F, Out>> = true;
template <class F, class Out>
struct first_parameter<mpi::detail::ForwardResult<F, Out>> : first_parameter<F> {};
template <class G, class Out>
struct code_carrier<mpi::detail::ForwardResult<G, Out>>
    : wrapper_code_carrier<mpi::detail::ForwardResult, G, Out> {};

template <class F, class Extras>
inline constexpr bool is_checked_adaptor_v<mpi::detail::ApplyExtras<F, Extras>> = true;
template <class F, class Extras>
struct first_parameter<mpi::detail::ApplyExtras<F, Extras>> : first_parameter<F> {};
template <class G, class Extras>
struct code_carrier<mpi::detail::ApplyExtras<G, Extras>>
    : wrapper_code_carrier<mpi::detail::ApplyExtras, G, Extras> {};

template <class F, class Item>
inline constexpr bool is_checked_adaptor_v<mpi::detail::DecodeInput<F, Item>> = true;
template <class F, class Item>
struct first_parameter<mpi::detail::DecodeInput<F, Item>> : first_parameter<F> {};
template <class G, class Item>
struct code_carrier<mpi::detail::DecodeInput<G, Item>>
    : wrapper_code_carrier<mpi::detail::DecodeInput, G, Item> {};

}  // namespace procpool::detail

namespace procpool::mpi::detail {

template <class F, class Item, class Out, class... Extra>
class TypedNodeCall final : public NodeCall {
 public:
  explicit TypedNodeCall(Reader& setup)
      : f_(procpool::detail::code_carrier<F>::load(setup)), extras_(held_extras(setup)) {}

  void run(procpool::Pool& pool, std::vector<NodeChunk>& chunks, bool send_back_deaths) override {
    std::vector<std::exception_ptr> decode_errors;  // per input; none for bare or forwarded ones
    if constexpr (forwarded_v<Item>) {
      std::vector<ForwardedInput<Item>> inputs;
      for (NodeChunk& chunk : chunks)
        forward_inputs(chunk.items, chunk.count, inputs);
      run_on(pool, DecodeInput<F, Item>{f_}, inputs, chunks, decode_errors, send_back_deaths);
    } else {
      std::vector<Item> inputs;
      for (NodeChunk& chunk : chunks)
        decode_inputs(chunk.items, chunk.count, inputs, decode_errors);
      run_on(pool, f_, inputs, chunks, decode_errors, send_back_deaths);
    }
  }

  void send_back(std::vector<NodeChunk>& chunks, const std::exception_ptr& why) override {
    for (NodeChunk& chunk : chunks) {
      for (std::uint64_t i = 0; i < chunk.count; ++i) {
        const auto [at, size] = next_input(chunk.items);
        put_sent_back(chunk.reply->writer(), record_not_run_here, why, at, size);
      }
      if (chunk.finished) chunk.finished();
    }
  }

 private:
  /// Runs `g` on every input of `inputs` on `pool` in one call, and writes
  /// the outcomes (write_outcomes).
  template <class G, class Inputs>
  void run_on(procpool::Pool& pool, const G& g, Inputs& inputs, std::vector<NodeChunk>& chunks,
              std::vector<std::exception_ptr>& decode_errors, bool send_back_deaths) {
    // Outcomes in input order, as they come: each chunk's reply can leave as
    // soon as its own inputs are done.
    if constexpr (forwards_extras) {
      run_with(pool, ApplyExtras<G, std::tuple<Extra...>>{g}, inputs, chunks, decode_errors,
               send_back_deaths, extras_);
    } else {
      std::apply(
          [&](const Extra&... extra) {
            run_with(pool, g, inputs, chunks, decode_errors, send_back_deaths, extra...);
          },
          extras_);
    }
  }

  /// run_on's call, with what the node's Pool passes as extra arguments.
  template <class G, class Inputs, class... Passed>
  void run_with(procpool::Pool& pool, const G& g, Inputs& inputs, std::vector<NodeChunk>& chunks,
                std::vector<std::exception_ptr>& decode_errors, bool send_back_deaths,
                const Passed&... passed) {
    if constexpr (forwarded_v<Out>) {
      auto results = pool.imap_outcomes(ForwardResult<G, Out>{g}, inputs, passed...);
      write_outcomes(
          pool, send_back_deaths, chunks, decode_errors, results,
          [](ReplyParts& reply, Forwarded<Out>& value) { reply.append(value.take_bytes()); });
    } else {
      auto results = pool.imap_outcomes(g, inputs, passed...);
      write_outcomes(pool, send_back_deaths, chunks, decode_errors, results,
                     [](ReplyParts& reply, Out& value) { put_framed(reply.writer(), value); });
    }
  }

  /// Appends the `chunk_count` inputs at `items` to `inputs` as they are
  /// (`items` is read from a copy: the outcomes step over the inputs again).
  static void forward_inputs(Reader items, std::uint64_t chunk_count,
                             std::vector<ForwardedInput<Item>>& inputs) {
    for (std::uint64_t i = 0; i < chunk_count; ++i) {
      const Reader one = take_framed<Item>(items);
      inputs.emplace_back(one.position(), one.remaining());
    }
  }

  /// Where the next input of `items` is, as put_framed wrote it; steps over it.
  static std::pair<const std::byte*, std::size_t> next_input(Reader& items) {
    const std::byte* at = items.position();
    take_framed<Item>(items);
    return {at, static_cast<std::size_t>(items.position() - at)};
  }

  /// Writes each chunk's outcome records, in input order, from `results`
  /// (skipping the inputs that failed to decode, whose errors are in
  /// `decode_errors`); `put_value` writes a success's value. An input that
  /// `pool` could not run at all goes back as it came (record_not_run_here),
  /// and so does one whose worker died if `send_back_deaths` (record_died_here).
  template <class Results, class PutValue>
  static void write_outcomes(procpool::Pool& pool, bool send_back_deaths,
                             std::vector<NodeChunk>& chunks,
                             std::vector<std::exception_ptr>& decode_errors, Results& results,
                             PutValue put_value) {
    // The node's pool ended mid-batch (the root terminated it): the call
    // ends there, with PoolClosed, and each input left fails with it.
    std::exception_ptr ended;
    std::optional<decltype(results.begin())> next;
    try {
      next.emplace(results.begin());
    } catch (const PoolClosed&) {
      ended = std::current_exception();
    }
    std::size_t position = 0;
    for (NodeChunk& chunk : chunks) {
      ReplyParts& reply = *chunk.reply;
      for (std::uint64_t i = 0; i < chunk.count; ++i) {
        const auto [input_at, input_size] = next_input(chunk.items);
        if (!decode_errors.empty()) {
          if (std::exception_ptr& e = decode_errors[position++]) {
            reply.writer().put(std::uint8_t{0});
            save_error(reply.writer(), e);
            continue;
          }
        }
        if (ended) {
          reply.writer().put(std::uint8_t{0});
          save_error(reply.writer(), ended);
          continue;
        }
        auto outcome = std::move(**next);
        try {
          ++*next;
        } catch (const PoolClosed&) {
          ended = std::current_exception();
        }
        if (outcome.ok()) {
          const std::size_t at = reply.writer().size();
          try {
            reply.writer().put(std::uint8_t{1});
            put_value(reply, *outcome.value);
            continue;
          } catch (const std::exception& e) {
            // Encoding it again on the node threw (a value that is not forwarded).
            reply.writer().truncate(at);
            outcome.error = std::make_exception_ptr(
                TaskError(static_cast<std::size_t>(i), procpool::detail::demangle(typeid(e).name()),
                          e.what(), TaskError::Stage::serialize_result));
          }
        }
        if (node_cannot_run(pool, outcome.error)) {
          put_sent_back(reply.writer(), record_not_run_here, outcome.error, input_at, input_size);
          continue;
        }
        if (send_back_deaths && worker_died(outcome.error)) {
          put_sent_back(reply.writer(), record_died_here, outcome.error, input_at, input_size);
          continue;
        }
        reply.writer().put(std::uint8_t{0});
        save_error(reply.writer(), outcome.error);
      }
      if (chunk.finished) chunk.finished();
    }
  }

  /// Appends the `chunk_count` inputs at `items` to `inputs` (`items` is
  /// read from a copy: the outcomes step over the inputs again). Inputs whose
  /// load() throws fail alone, with Stage::deserialize_input (their error at
  /// their position in `errors`); bare ones cannot, and are copied in one go.
  static void decode_inputs(Reader items, std::uint64_t chunk_count, std::vector<Item>& inputs,
                            std::vector<std::exception_ptr>& errors) {
    const auto count = static_cast<std::size_t>(chunk_count);
    if constexpr (travels_bare_v<Item>) {
      const std::byte* from = items.take(count * sizeof(Item));
      const std::size_t at = inputs.size();
      inputs.resize(at + count);
      std::memcpy(static_cast<void*>(inputs.data() + at), from, count * sizeof(Item));
    } else {
      for (std::size_t i = 0; i < count; ++i) {
        Reader one = take_framed<Item>(items);
        try {
          inputs.push_back(procpool::detail::load_value<Item>(one));
          errors.emplace_back();
        } catch (const std::exception& e) {
          errors.push_back(
              std::make_exception_ptr(TaskError(i, procpool::detail::demangle(typeid(e).name()),
                                                e.what(), TaskError::Stage::deserialize_input)));
        }
      }
    }
  }

  /// The extra arguments go on to the workers undecoded (a load() that
  /// crashes must not end the rank), unless one holds a SharedBuffer or
  /// SharedVector: decoded here, its memory is shared by the node's workers,
  /// not copied into each (as for inputs, see forwarded_v).
  static constexpr bool forwards_extras =
      sizeof...(Extra) != 0 && (!holds_shared_memory<Extra>() && ...);
  using HeldExtras =
      std::conditional_t<forwards_extras, ForwardedExtras<Extra...>, std::tuple<Extra...>>;

  static HeldExtras held_extras(Reader& setup) {
    if constexpr (forwards_extras) {
      return HeldExtras(setup);
    } else {
      std::tuple<Extra...> extra;
      procpool::detail::load_extra_args(setup, extra);
      return extra;
    }
  }

  F f_;
  HeldExtras extras_;
};

template <class F, class Item, class Out, class... Extra>
std::unique_ptr<NodeCall> make_node_call(Reader& setup) {
  return std::make_unique<TypedNodeCall<F, Item, Out, Extra...>>(setup);
}

/// The root's side of a call's inputs: hands them to the scheduler one at a
/// time, serialised and framed, as it asks for them (so an endless range is
/// read only as far as the results are consumed).
class InputFeed {
 public:
  enum class Fed { item, failed, end, broke };
  virtual ~InputFeed() = default;
  /// Appends the next input to `out` (framed) and returns `item`; `failed`
  /// when its save() threw (then `error` says why and nothing was written);
  /// `end` when the range is exhausted; `broke` when the range itself threw
  /// (its iterator moving on, being read or compared with its end: `error`
  /// holds what it threw, and the range is not read again).
  virtual Fed next(Writer& out, std::exception_ptr& error) = 0;
  /// Appends up to `most` inputs, and no more than `most_bytes` of them
  /// (but at least one), in one copy when the range allows it (bare values
  /// in contiguous memory); returns how many (0: use next()).
  virtual std::size_t next_block(Writer& out, std::size_t most, std::size_t most_bytes) = 0;
  /// Whether each input next() writes is an object of the range that stays
  /// where it is while the call lasts (not a temporary made to be read), so
  /// that its large blocks may be sent from where they are (Writer::lend_blocks).
  virtual bool inputs_stay_put() const noexcept = 0;
  /// Appends input `index` again, as next() wrote it, if the range can be
  /// read at an index (random access); false if it cannot. Only while the
  /// call's range is alive (its handle is).
  virtual bool write_again(std::size_t index, Writer& out) = 0;
};

/// The TaskError for an input whose save() is throwing now (in a catch block).
std::exception_ptr current_serialize_input_error(std::size_t index);

template <class View, class Item>
class RangeFeed final : public InputFeed {
 public:
  explicit RangeFeed(View& view) : view_(view) {}
  Fed next(Writer& out, std::exception_ptr& error) override {
    if (broke_) return Fed::end;
    // The range's own failure ends the feed: the inputs read before it still
    // run, and the call throws it once their outcomes are handed over
    // (procpool::Pool does the same, as CPython's imap does).
    try {
      advance();
      if (*it_ == std::ranges::end(view_)) return Fed::end;
    } catch (...) {
      return broke(error);
    }
    // The iterator moves on only when the next input is asked for: an input
    // range (a stream) is never read further than the inputs taken.
    pending_ = true;
    const std::size_t at = out.size();
    bool read = false;
    try {
      decltype(auto) item = **it_;
      read = true;
      put_framed(out, static_cast<const Item&>(item));
      ++index_;
      return Fed::item;
    } catch (...) {
      if (!read) return broke(error);
      out.truncate(at);
      error = current_serialize_input_error(index_++);
      return Fed::failed;
    }
  }

  std::size_t next_block(Writer& out, std::size_t most, std::size_t most_bytes) override {
    using Iterator = std::ranges::iterator_t<View>;
    if constexpr (travels_bare_v<Item> && std::contiguous_iterator<Iterator> &&
                  std::sized_sentinel_for<std::ranges::sentinel_t<View>, Iterator> &&
                  std::same_as<std::iter_value_t<Iterator>, Item>) {
      advance();
      const auto n = std::min({most, std::max<std::size_t>(1, most_bytes / sizeof(Item)),
                               static_cast<std::size_t>(std::ranges::end(view_) - *it_)});
      out.write(std::to_address(*it_), n * sizeof(Item));
      *it_ += static_cast<std::iter_difference_t<Iterator>>(n);
      index_ += n;
      return n;
    } else {
      (void)out;
      (void)most;
      (void)most_bytes;
      return 0;
    }
  }

  bool write_again(std::size_t index, Writer& out) override {
    if constexpr (std::ranges::random_access_range<View>) {
      const auto at = static_cast<std::ranges::range_difference_t<View>>(index);
      put_framed(out, static_cast<const Item&>(std::ranges::begin(view_)[at]));
      return true;
    } else {
      (void)index;
      (void)out;
      return false;
    }
  }

  bool inputs_stay_put() const noexcept override {
    // Only a range known to keep its elements: a view may hand out a
    // reference to one object it refills for each element (a cache, a
    // thread_local), and a reference of another type than Item would be
    // converted into a temporary.
    using Reference = std::ranges::range_reference_t<View>;
    return procpool::detail::keeps_its_elements_v<View> && std::is_lvalue_reference_v<Reference> &&
           std::same_as<std::remove_cvref_t<Reference>, Item>;
  }

 private:
  void advance() {
    if (!it_) {
      it_.emplace(std::ranges::begin(view_));
    } else if (pending_) {
      ++*it_;
    }
    pending_ = false;
  }

  Fed broke(std::exception_ptr& error) {
    broke_ = true;
    error = std::current_exception();
    return Fed::broke;
  }

  View& view_;
  std::optional<std::ranges::iterator_t<View>> it_;
  bool pending_ = false;  // *it_ was taken: move on before the next input
  bool broke_ = false;    // the range threw: never read again
  std::size_t index_ = 0;
};

}  // namespace procpool::mpi::detail
