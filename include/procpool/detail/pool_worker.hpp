// The worker side of a Pool: the state its initializer built, and the
// runner each call sets up in every worker.
#pragma once

#include <cstdint>
#include <exception>
#include <functional>
#include <map>
#include <memory>
#include <tuple>
#include <type_traits>
#include <utility>

#include "procpool/detail/buffer.hpp"
#include "procpool/detail/call.hpp"
#include "procpool/detail/pool_traits.hpp"
#include "procpool/detail/protocol.hpp"
#include "procpool/errors.hpp"

namespace procpool::detail {

/// Builds a call's runner inside a worker from its setup message. It travels
/// in that message by identity (CodeRef), valid in forked and spawned workers alike.
using RunnerFactoryFn = std::unique_ptr<TaskRunner>(void* state, Reader& setup);
using RunnerFactory = RunnerFactoryFn*;

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
  try {
    load_extra_args(setup, extra);
  } catch (...) {
    // The call's arguments, not its tasks, failed: each input's outcome says
    // so (TaskError::Stage::deserialize_input), as an input's load() would.
    throw InputDecodeFailed{std::current_exception()};
  }
  return std::make_unique<PoolRunner<F, State, Item, Out, Extra...>>(f, static_cast<State*>(state),
                                                                     std::move(extra));
}

}  // namespace procpool::detail
