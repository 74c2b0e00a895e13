// What a Pool can run and how it calls it: compile-time traits of the
// function, its optional worker state, and how its code reaches a worker.
#pragma once

#include <memory>
#include <type_traits>

#include "procpool/detail/buffer.hpp"
#include "procpool/detail/call.hpp"
#include "procpool/detail/code_identity.hpp"
#include "procpool/detail/runners.hpp"

namespace procpool::detail {

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

// In parentheses: without them clang-format 14 glues `>&&`.
template <class F>
inline constexpr bool is_function_pointer_v = (std::is_pointer_v<F> &&
                                               std::is_function_v<std::remove_pointer_t<F>>);

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

/// Adaptors around a function that was checked when the adaptor was made
/// (StarApply; the MPI backend's ForwardResult): a Pool runs them as it
/// would run that function, although a function pointer inside one makes
/// the adaptor itself non-empty.
template <class F>
inline constexpr bool is_checked_adaptor_v = false;
template <class F>
inline constexpr bool is_checked_adaptor_v<StarApply<F>> = true;

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
concept has_call_operator = requires {
  &F::operator();
};
template <class F>
requires has_call_operator<F>
struct first_parameter<F> : first_parameter<decltype(&F::operator())> {
};
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

}  // namespace procpool::detail
