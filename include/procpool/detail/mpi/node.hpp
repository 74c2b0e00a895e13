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
//     call's function and extra arguments once, then runs each node chunk on
//     the node's Pool with map_outcomes and encodes every outcome.
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

/// One node chunk's inputs, where its outcome records go, and who hears
/// that its records are all written (its reply then leaves at once, before
/// the rest of its batch has run).
struct NodeChunk {
  std::uint64_t count = 0;
  Reader items;
  Writer* out = nullptr;
  std::function<void()> finished;
};

/// One call's code on a node: decoded once per node, run for every node chunk.
class NodeCall {
 public:
  virtual ~NodeCall() = default;
  /// Decodes each chunk's `count` inputs (put_framed), runs them all on
  /// `pool` in one call (several chunks of one call that wait together cost
  /// one Pool call, not one each) and writes one outcome record per input, in
  /// input order, to its chunk's `out`: u8 1, the value (put_framed) | u8 0,
  /// error record.
  virtual void run(procpool::Pool& pool, std::vector<NodeChunk>& chunks) = 0;
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
    std::memcpy(out.buffer().data() + at, &length, sizeof length);
  }
}

/// The bytes of the next value of type T that put_framed wrote.
template <class T>
Reader take_framed(Reader& in) {
  const auto length = travels_bare_v<T> ? sizeof(T) : in.get<std::uint64_t>();
  return Reader(in.take(static_cast<std::size_t>(length)), static_cast<std::size_t>(length));
}

template <class F, class Item, class Out, class... Extra>
class TypedNodeCall final : public NodeCall {
 public:
  explicit TypedNodeCall(Reader& setup) : f_(procpool::detail::code_carrier<F>::load(setup)) {
    procpool::detail::load(setup, extra_);
  }

  void run(procpool::Pool& pool, std::vector<NodeChunk>& chunks) override {
    std::vector<Item> inputs;
    std::vector<std::exception_ptr> decode_errors;  // per input; none for bare ones
    for (NodeChunk& chunk : chunks)
      decode_inputs(chunk, inputs, decode_errors);
    // Outcomes in input order, as they come: each chunk's reply can leave as
    // soon as its own inputs are done.
    auto results = std::apply(
        [&](const Extra&... extra) { return pool.imap_outcomes(f_, inputs, extra...); }, extra_);
    auto next = results.begin();
    std::size_t position = 0;
    for (NodeChunk& chunk : chunks) {
      Writer& out = *chunk.out;
      for (std::uint64_t i = 0; i < chunk.count; ++i) {
        if (!decode_errors.empty()) {
          if (std::exception_ptr& e = decode_errors[position++]) {
            out.put(std::uint8_t{0});
            save_error(out, e);
            continue;
          }
        }
        Outcome<Out> o = std::move(*next);
        ++next;
        if (o.ok()) {
          const std::size_t at = out.size();
          try {
            out.put(std::uint8_t{1});
            put_framed(out, *o.value);
            continue;
          } catch (const std::exception& e) {
            out.truncate(at);
            o.error = std::make_exception_ptr(
                TaskError(static_cast<std::size_t>(i), procpool::detail::demangle(typeid(e).name()),
                          e.what(), TaskError::Stage::serialize_result));
          }
        }
        out.put(std::uint8_t{0});
        save_error(out, o.error);
      }
      if (chunk.finished) chunk.finished();
    }
  }

 private:
  /// Appends `chunk`'s inputs to `inputs`. Inputs whose load() throws fail
  /// alone, with Stage::deserialize_input (their error at their position in
  /// `errors`); bare ones cannot, and are copied in one go.
  static void decode_inputs(NodeChunk& chunk, std::vector<Item>& inputs,
                            std::vector<std::exception_ptr>& errors) {
    const auto count = static_cast<std::size_t>(chunk.count);
    if constexpr (travels_bare_v<Item>) {
      const std::byte* from = chunk.items.take(count * sizeof(Item));
      const std::size_t at = inputs.size();
      inputs.resize(at + count);
      std::memcpy(static_cast<void*>(inputs.data() + at), from, count * sizeof(Item));
    } else {
      for (std::size_t i = 0; i < count; ++i) {
        Reader one = take_framed<Item>(chunk.items);
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

  F f_;
  std::tuple<Extra...> extra_;
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
  enum class Fed { item, failed, end };
  virtual ~InputFeed() = default;
  /// Appends the next input to `out` (framed) and returns `item`; `failed`
  /// when its save() threw (then `error` says why and nothing was written);
  /// `end` when the range is exhausted.
  virtual Fed next(Writer& out, std::exception_ptr& error) = 0;
  /// Appends up to `most` inputs in one copy when the range allows it
  /// (bare values in contiguous memory); returns how many (0: use next()).
  virtual std::size_t next_block(Writer& out, std::size_t most) = 0;
};

/// The TaskError for an input whose save() is throwing now (in a catch block).
std::exception_ptr current_serialize_input_error(std::size_t index);

template <class View, class Item>
class RangeFeed final : public InputFeed {
 public:
  explicit RangeFeed(View& view) : view_(view) {}
  Fed next(Writer& out, std::exception_ptr& error) override {
    advance();
    if (*it_ == std::ranges::end(view_)) return Fed::end;
    // The iterator moves on only when the next input is asked for: an input
    // range (a stream) is never read further than the inputs taken.
    pending_ = true;
    const std::size_t at = out.size();
    try {
      put_framed(out, static_cast<const Item&>(**it_));
      ++index_;
      return Fed::item;
    } catch (...) {
      out.truncate(at);
      error = current_serialize_input_error(index_++);
      return Fed::failed;
    }
  }

  std::size_t next_block(Writer& out, std::size_t most) override {
    using Iterator = std::ranges::iterator_t<View>;
    if constexpr (travels_bare_v<Item> && std::contiguous_iterator<Iterator> &&
                  std::sized_sentinel_for<std::ranges::sentinel_t<View>, Iterator> &&
                  std::same_as<std::iter_value_t<Iterator>, Item>) {
      advance();
      const auto n = std::min(most, static_cast<std::size_t>(std::ranges::end(view_) - *it_));
      out.write(std::to_address(*it_), n * sizeof(Item));
      *it_ += static_cast<std::iter_difference_t<Iterator>>(n);
      index_ += n;
      return n;
    } else {
      (void)out;
      (void)most;
      return 0;
    }
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

  View& view_;
  std::optional<std::ranges::iterator_t<View>> it_;
  bool pending_ = false;  // *it_ was taken: move on before the next input
  std::size_t index_ = 0;
};

}  // namespace procpool::mpi::detail
