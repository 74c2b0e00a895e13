// The caller side of a Pool: what the pool, its calls and its futures
// share, and the calls it hands out.
#pragma once

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <exception>
#include <functional>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <thread>
#include <typeinfo>
#include <utility>
#include <vector>

#include "procpool/detail/call.hpp"
#include "procpool/detail/engine.hpp"
#include "procpool/options.hpp"
#include "procpool/results.hpp"

namespace procpool::detail {

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
  /// Read without the lock by submit() (Engine::post refuses what comes after).
  std::atomic<bool> closed{false};
  std::chrono::steady_clock::time_point started = std::chrono::steady_clock::now();

  /// The service thread: moves submitted work along while no caller waits on
  /// the pool, and finishes the tasks of dropped futures.
  std::thread service;
  std::atomic<bool> service_running{false};  // read by after_post() without the lock
  bool service_stop = false;                 // set by the one thread that joins the service thread,
  bool service_stopped = false;              // ...and this once it is done with it (stop_service),
  std::condition_variable service_stopped_changed;  // which wakes the others waiting
  bool service_kicked = false;
  std::vector<std::unique_ptr<DetachedTask>> detached;
  std::function<void(std::exception_ptr)> error_handler;  // empty: one line on stderr
  std::uint64_t unobserved_errors = 0;
  std::vector<std::string> unobserved_messages;  // the first few

  /// Starts the service thread, or says on stderr why it cannot (the pool then
  /// moves only while a caller waits on it).
  void start_service();
  /// After a submit posted its task: without a service thread (it could not
  /// start), has a round that a caller drives send it now.
  void after_post();
  /// Stops the service thread (the caller must not hold the lock) and
  /// reports what the dropped futures' finished tasks left.
  void stop_service();
  /// Takes over a dropped future's task.
  void adopt(std::unique_ptr<DetachedTask> task) noexcept;

 private:
  void serve();
  void wake_service() noexcept;
  /// The service thread's wait while it drives no round: until woken, posts
  /// arrive (then service_kicked), or `timeout`; without the lock meanwhile.
  void idle_wait(std::unique_lock<std::mutex>& lock, std::chrono::milliseconds timeout);
  /// Hands finished detached tasks' errors on; unlocks while doing so.
  void finish_detached(std::unique_lock<std::mutex>& lock);
  void report(std::exception_ptr error);
};

/// A submitted task: its result as a one-element source; holds the pool core alive.
template <class Out, class Item>
class PoolCall final : public ResultSource<Out>, public DetachedTask {
  using Items = std::vector<Item>;

 public:
  PoolCall(std::shared_ptr<PoolCore> core, Buffer setup, std::unique_ptr<Items> owned)
      : core_(std::move(core)),
        items_(std::move(owned)),
        driver_(typename Driver::OneTaskPosted{}, *core_->engine, core_->mutex, std::move(setup),
                StreamFeed<Items, Item>(*items_), core_->options) {
    // The service thread hears of the post and sends it: it runs before
    // anyone waits for it.
    core_->after_post();
  }

  std::optional<Out> next() override { return deliver<Delivery::ordered, Out>(driver_); }
  bool wait_until(std::chrono::steady_clock::time_point deadline) {
    return driver_.wait_until(deadline);
  }
  const std::shared_ptr<PoolCore>& core() const noexcept { return core_; }

  bool finished_locked() override { return driver_.ready_locked(); }
  std::exception_ptr take_error() override {
    try {
      auto outcome = driver_.next();
      return outcome ? outcome->error : nullptr;
    } catch (...) {  // the pool ended before the task was sent (PoolClosed)
      return std::current_exception();
    }
  }

 private:
  std::shared_ptr<PoolCore> core_;
  using Driver = CallDriver<Out, StreamFeed<Items, Item>>;
  std::unique_ptr<Items> items_;
  Driver driver_;
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

}  // namespace procpool::detail
