// Task runners shared by both ways of running, and the callable adaptors.
#pragma once

#include <cstdint>
#include <functional>
#include <iterator>
#include <ranges>
#include <tuple>
#include <utility>

#include "procpool/detail/call.hpp"
#include "procpool/detail/protocol.hpp"

namespace procpool::detail {

template <class T>
concept tuple_like = requires {
  std::tuple_size<std::remove_cvref_t<T>>::value;
};

/// `F` with its first argument (a worker state) already bound, for traits only.
template <class F, class State>
struct BindFirst {
  template <class... Args>
  requires std::is_invocable_v<F&, State&, Args...>
  void operator()(Args&&...);
};

/// Whether `F` accepts, then a tuple's elements, then `After...`.
template <class F, class Tuple, class Seq, class... Args>
struct apply_invocable;
template <class F, class Tuple, std::size_t... I, class... Args>
struct apply_invocable<F, Tuple, std::index_sequence<I...>, Args...>
    : std::is_invocable<F, decltype(std::get<I>(std::declval<Tuple>()))..., Args...> {};
template <class F, class Tuple, class... After>
inline constexpr bool tuple_invocable_v =
    apply_invocable<F, Tuple,
                    std::make_index_sequence<std::tuple_size_v<std::remove_cvref_t<Tuple>>>,
                    After...>::value;

/// Calls `f` with a tuple's elements (after the worker state, if any), for starmap and submit.
template <class F>
struct StarApply {
  [[no_unique_address]] F f;

  // clang-format 14 reads these requires-clauses as comparisons: left as written.
  // clang-format off
  template <class Tuple, class... Extra>
  requires tuple_like<Tuple> && tuple_invocable_v<F&, Tuple, const Extra&...>
  decltype(auto) operator()(Tuple&& args, const Extra&... extra) {
    return std::apply(f,
                      std::tuple_cat(std::forward<Tuple>(args), std::forward_as_tuple(extra...)));
  }

  template <class State, class Tuple, class... Extra>
  requires tuple_like<Tuple> && tuple_invocable_v<BindFirst<F, State>, Tuple, const Extra&...>
  decltype(auto) operator()(State& state, Tuple&& args, const Extra&... extra) {
    return std::apply(f, std::tuple_cat(std::forward_as_tuple(state), std::forward<Tuple>(args),
                                        std::forward_as_tuple(extra...)));
  }
  // clang-format on
};

/// Fork per call over a random-access input: each worker reads the inputs
/// from the memory it inherited, so only results travel.
template <class F, class View, class Out>
class IndexRunner final : public TaskRunner {
 public:
  IndexRunner(F& f, View& view) : f_(f), view_(view) {}
  void run(ChunkRun& run, Reader&, Writer& out) override {
    auto begin = std::ranges::begin(view_);
    using Diff = std::ranges::range_difference_t<View>;
    const std::uint64_t first = run.first;
    run_chunk<Out>(run, out, [&](std::uint64_t i) {
      return [&, i]() -> decltype(auto) {
        return invoke_stored(f_, begin[static_cast<Diff>(first + i)]);
      };
    });
  }

 private:
  F& f_;
  View& view_;
};

/// Inputs that arrive serialised in the task message.
template <class F, class Item, class Out>
class StreamRunner final : public TaskRunner {
 public:
  explicit StreamRunner(F& f) : f_(f) {}
  void run(ChunkRun& run, Reader& in, Writer& out) override {
    run_chunk<Out>(run, out, [&](std::uint64_t) {
      return [&]() -> decltype(auto) {
        Item item = load_input<Item>(in);
        return invoke_stored(f_, std::move(item));
      };
    });
  }

 private:
  F& f_;
};

}  // namespace procpool::detail
