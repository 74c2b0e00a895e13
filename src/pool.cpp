#include "procpool/pool.hpp"

#include <poll.h>
#include <unistd.h>

#include <cstdio>
#include <string_view>
#include <system_error>
#include <utility>

#include "fork_server.hpp"
#include "spawn.hpp"

namespace procpool {
namespace detail {
namespace {

/// Stands in for the runner of a call whose setup failed: every task reports why.
class FailingRunner final : public TaskRunner {
 public:
  explicit FailingRunner(std::exception_ptr error) : error_(std::move(error)) {}
  void run(ChunkRun& run, Reader&, Writer& out) override {
    for (std::uint64_t i = 0; i < run.count; ++i) {
      run_task<Empty>(run, out, run.first + i, [&] { std::rethrow_exception(error_); });
    }
  }

 private:
  std::exception_ptr error_;
};

std::string describe_current_exception() {
  Buffer scratch;
  Writer out(scratch);
  write_current_exception(out);
  Reader in(scratch);
  in.get<OutcomeTag>();
  auto type_name = load_value<std::string>(in);
  auto what = load_value<std::string>(in);
  return type_name + ": " + what;
}

}  // namespace

PoolLogic::PoolLogic(const std::function<std::shared_ptr<void>()>& make_state) {
  if (!make_state) return;
  try {
    state_ = make_state();
  } catch (...) {
    const std::string where = in_fork_server()
                                  ? "in the pool's fork server (pid " + std::to_string(::getpid()) +
                                        "), which runs it once for every worker"
                                  : "in worker " + std::to_string(::getpid());
    init_error_ = std::make_exception_ptr(
        InitializerFailed("procpool: the pool's initializer threw " + where + ": " +
                          describe_current_exception() + "; every task of this pool fails"));
  }
}

void PoolLogic::setup(std::uint64_t call, Reader& payload) {
  if (init_error_) {
    runners_[call] = std::make_unique<FailingRunner>(init_error_);
    return;
  }
  try {
    const RunnerFactory factory = function_at<RunnerFactoryFn>(load_code_ref(payload));
    runners_[call] = factory(state_.get(), payload);
  } catch (...) {
    runners_[call] = std::make_unique<FailingRunner>(std::current_exception());
  }
}

void PoolLogic::run(ChunkRun& run, Reader& in, Writer& out) {
  auto it = runners_.find(run.call);
  if (it == runners_.end()) {
    FailingRunner(
        std::make_exception_ptr(ProtocolError("procpool: a worker got a task of call " +
                                              std::to_string(run.call) + " without its setup")))
        .run(run, in, out);
    return;
  }
  it->second->run(run, in, out);
}

void PoolLogic::end(std::uint64_t call) {
  runners_.erase(call);
}

void PoolCore::start_service() {
  try {
    engine->enable_wake();  // (again, if it could not before the workers started)
    service = std::thread([this] { serve(); });
    service_running = true;
  } catch (const std::system_error& e) {
    // A thread counts against ulimit -u like a process, and its descriptors
    // against ulimit -n: the workers may have taken the last. The pool still
    // works, driven by its callers.
    std::fprintf(stderr,
                 "procpool: warning: cannot start the pool's service thread (%s): submitted "
                 "tasks run only while a caller waits for a result\n",
                 e.what());
  }
}

void PoolCore::stop_service() {
  {
    std::unique_lock lock(mutex);
    if (!service_running) return;
    if (service_stop) {
      // Another thread (a join() beside this one) joins it: a thread can be
      // joined once. Wait until that one is done, as if this one had done it.
      service_stopped_changed.wait(lock, [this] { return service_stopped; });
      return;
    }
    service_stop = true;
    engine->wake();  // it may be waiting for the workers
  }
  wake_service();
  service.join();
  std::unique_lock lock(mutex);
  service_running = false;
  finish_detached(lock);
  // Unfinished ones can no longer finish: the pool is going away.
  std::vector<std::unique_ptr<DetachedTask>> dropped = std::move(detached);
  lock.unlock();
  dropped.clear();
  lock.lock();
  service_stopped = true;
  service_stopped_changed.notify_all();
}

void PoolCore::adopt(std::unique_ptr<DetachedTask> task) noexcept {
  try {
    std::unique_lock lock(mutex);
    if (service_running) {
      detached.push_back(std::move(task));
      lock.unlock();
      wake_service();
      return;
    }
    // The pool has stopped: the task ran before join() returned, or failed.
    const bool finished = task->finished_locked();
    lock.unlock();
    if (finished) {
      if (std::exception_ptr error = task->take_error()) report(error);
    }
  } catch (...) {
    // Nothing to report to: the task's outcome is lost, as a destructor cannot throw.
  }
}

void PoolCore::after_post() {
  if (service_running.load(std::memory_order_acquire)) return;  // it hears of the post
  std::lock_guard lock(mutex);
  if (engine->pumping()) engine->nudge();
}

void PoolCore::wake_service() noexcept {
  engine->knock();
}

void PoolCore::idle_wait(std::unique_lock<std::mutex>& lock, std::chrono::milliseconds timeout) {
  // A word is a post to take in, or a knock (stop, a dropped future): a
  // round of no wait does the first and costs little for the others.
  pollfd fd{engine->posts_fd(), POLLIN, 0};
  lock.unlock();
  const int ready = ::poll(&fd, 1, static_cast<int>(timeout.count()));
  lock.lock();
  if (ready > 0 && engine->take_posts_word()) service_kicked = true;
}

void PoolCore::serve() {
  // A caller that waits drives the engine itself, without the hand-over a
  // thread would cost; this thread steps in once no caller has for a while.
  constexpr std::chrono::milliseconds caller_grace{20};
  constexpr std::chrono::milliseconds round{50};
  std::unique_lock lock(mutex);
  while (!service_stop) {
    try {
      if (!detached.empty()) finish_detached(lock);
      if (service_stop) break;
      const bool work = engine->outstanding() != 0;
      if (std::exchange(service_kicked, false)) {
        engine->pump(lock, std::chrono::milliseconds(0), Engine::Driver::service);
      } else if (!work) {
        idle_wait(lock, std::chrono::milliseconds(200));
      } else if (engine->caller_driving(caller_grace)) {
        idle_wait(lock, caller_grace / 4);
      } else {
        engine->pump(lock, round, Engine::Driver::service);
      }
    } catch (const std::exception& e) {
      // Say it once per failure and go on; the calls see their own errors.
      std::fprintf(stderr, "procpool: the pool's service thread: %s\n", e.what());
      idle_wait(lock, round);
    }
  }
}

void PoolCore::finish_detached(std::unique_lock<std::mutex>& lock) {
  std::vector<std::unique_ptr<DetachedTask>> finished;
  std::erase_if(detached, [&](std::unique_ptr<DetachedTask>& task) {
    if (!task->finished_locked()) return false;
    finished.push_back(std::move(task));
    return true;
  });
  if (finished.empty()) return;
  lock.unlock();
  for (auto& task : finished) {
    if (std::exception_ptr error = task->take_error()) report(error);
    task.reset();  // closes the call, which takes the lock
  }
  lock.lock();
}

void PoolCore::report(std::exception_ptr error) {
  constexpr std::size_t kept_messages = 10;
  std::string message;
  try {
    std::rethrow_exception(error);
  } catch (const std::exception& e) {
    message = e.what();
  } catch (...) {
    message = "an exception not derived from std::exception";
  }
  std::function<void(std::exception_ptr)> handler;
  std::uint64_t count = 0;
  {
    std::lock_guard lock(mutex);
    handler = error_handler;
    count = ++unobserved_errors;
    if (unobserved_messages.size() < kept_messages) unobserved_messages.push_back(message);
  }
  if (handler) {
    try {
      handler(error);
    } catch (const std::exception& e) {
      std::fprintf(stderr, "procpool: the pool's error handler threw: %s\n", e.what());
    } catch (...) {
      std::fprintf(stderr, "procpool: the pool's error handler threw\n");
    }
    return;
  }
  if (count <= kept_messages) {
    const std::string_view prefix = "procpool: ";
    const std::string_view said =
        message.starts_with(prefix) ? std::string_view(message).substr(prefix.size()) : message;
    std::fprintf(stderr, "procpool: a task whose Future was dropped failed: %.*s\n",
                 static_cast<int>(said.size()), said.data());
  }
  if (count == kept_messages) {
    std::fprintf(stderr,
                 "procpool: more errors of dropped futures are only counted "
                 "(Pool::insights(); Pool::set_error_handler() sees them all)\n");
  }
}

namespace {

/// What a spawned Pool worker needs to build its PoolLogic: whether the pool
/// has an initializer and, if so, the identities of its state factory and of
/// the initializer function itself (absent for a capture-less lambda).
Buffer spawn_logic_setup(const SpawnInit& init) {
  Buffer setup;
  Writer out(setup);
  out.put(static_cast<std::uint8_t>(init.factory ? 1 : 0));
  if (init.factory) {
    save_code_ref(out, code_ref_of(init.factory));
    out.put(static_cast<std::uint8_t>(init.function ? 1 : 0));
    if (init.function) save_code_ref(out, code_ref(init.function));
  }
  return setup;
}

/// The worker side of spawn_logic_setup.
std::unique_ptr<WorkerLogic> spawned_pool_logic(Reader& setup) {
  std::function<std::shared_ptr<void>()> make_state;
  if (setup.get<std::uint8_t>() != 0) {
    CodeRef factory = load_code_ref(setup);
    std::optional<CodeRef> function;
    if (setup.get<std::uint8_t>() != 0) function = load_code_ref(setup);
    // Resolved when the state is built, so that a failure becomes the
    // initializer's error that every task reports, not a crashing worker.
    make_state = [factory = std::move(factory), function = std::move(function)] {
      const void* init = function ? code_address(*function) : nullptr;
      return function_at<StateFactoryFn>(factory)(init);
    };
  }
  return std::make_unique<PoolLogic>(make_state);
}

/// A process that procpool spawned as a Pool worker (Start::spawn) becomes one
/// here, before main(), and never returns. This file holds Pool's
/// constructors, so it is linked into every program that makes a Pool.
///
/// Default priority on purpose: an executable's static initialisers run in
/// link order, and a static libprocpool comes after the program's own
/// objects, so those have run by now and task code may use the program's
/// globals (a `const std::string` table, a registry), as Python's spawn
/// re-imports the main module. (Linked as a shared library, procpool's
/// initialisers run before the executable's, and the program's globals with
/// dynamic initialisation are not initialised in a worker.)
__attribute__((constructor)) void enter_spawned_pool_worker() {
  serve_if_spawned_worker(&spawned_pool_logic);
}

}  // namespace
}  // namespace detail

Pool::Pool(Options options) {
  start(options, nullptr, {});
}

void Pool::start(Options options, const std::type_info* state_type,
                 std::function<std::shared_ptr<void>()> make_state, detail::SpawnInit spawn_init) {
  core_ = std::make_shared<detail::PoolCore>();
  core_->options = options;
  core_->state_type = state_type;
  detail::EngineConfig config =
      detail::engine_config(options, detail::plan_processes(options, std::nullopt), true);
  if (options.start == Start::spawn) {
    if (state_type != nullptr && !spawn_init.spawnable) {
      throw Error(
          "procpool::Pool: with Start::spawn the initializer must be a function pointer or a "
          "capture-less lambda. A spawned worker is a fresh run of the program and cannot see "
          "what a capture refers to; build the state inside the initializer (e.g. read the "
          "file there), or use Start::fork, whose workers inherit the caller's memory.");
    }
    config.spawn_logic = std::make_shared<const detail::Buffer>(
        detail::spawn_logic_setup(state_type != nullptr ? spawn_init : detail::SpawnInit{}));
  }
  config.wake_before_workers = true;
  core_->engine = std::make_unique<detail::Engine>(config, [make_state = std::move(make_state)] {
    return std::make_unique<detail::PoolLogic>(make_state);
  });
  core_->start_service();
}

Pool::~Pool() {
  try {
    {
      std::unique_lock lock(core_->mutex);
      core_->closed = true;
      core_->engine->refuse_posts();
      while (core_->engine->outstanding() != 0) {
        core_->engine->pump(lock, std::chrono::milliseconds(100));
      }
    }
    core_->stop_service();
    std::lock_guard lock(core_->mutex);
    core_->engine->stop_gracefully();
  } catch (...) {
    core_->stop_service();
    std::lock_guard lock(core_->mutex);
    core_->engine->kill_workers();
  }
}

void Pool::set_error_handler(std::function<void(std::exception_ptr)> handler) {
  std::lock_guard lock(core_->mutex);
  core_->error_handler = std::move(handler);
}

void Pool::close() {
  std::lock_guard lock(core_->mutex);
  core_->closed = true;
  core_->engine->refuse_posts();  // a submit that saw the pool open but had not posted yet
}

void Pool::join() {
  {
    std::unique_lock lock(core_->mutex);
    if (!core_->closed) {
      throw Error(
          "procpool::Pool::join: call close() or terminate() first, as work could still arrive");
    }
    while (core_->engine->outstanding() != 0) {
      core_->engine->pump(lock, std::chrono::milliseconds(100));
    }
  }
  core_->stop_service();
  std::lock_guard lock(core_->mutex);
  core_->engine->stop_gracefully();
}

void Pool::terminate() {
  std::lock_guard lock(core_->mutex);
  core_->closed = true;
  core_->engine->refuse_posts();
  core_->engine->kill_workers(std::make_exception_ptr(
      PoolClosed("procpool: the pool was terminated before this task finished")));
}

Insights Pool::insights() const {
  std::lock_guard lock(core_->mutex);
  Insights in = core_->engine->insights(
      std::chrono::duration<double>(std::chrono::steady_clock::now() - core_->started).count());
  in.unobserved_errors = core_->unobserved_errors;
  in.unobserved_error_messages = core_->unobserved_messages;
  return in;
}

unsigned Pool::processes() const noexcept {
  return core_->engine->processes();
}

std::vector<pid_t> Pool::worker_pids() const {
  std::lock_guard lock(core_->mutex);
  return core_->engine->worker_pids();
}

void Pool::check_open() const {
  if (core_->closed) {  // (an atomic, read without the lock: submit() takes none)
    throw PoolClosed("procpool::Pool: the pool was closed; no more work is accepted");
  }
}

void Pool::check_state_type(const std::type_info& wanted) const {
  if (core_->state_type == nullptr) {
    throw Error("procpool::Pool: the function takes a worker state (" +
                detail::demangle(wanted.name()) +
                "&) but this pool has no initializer; create it with Pool(options, init)");
  }
  if (*core_->state_type != wanted) {
    throw Error("procpool::Pool: the function takes a worker state of type " +
                detail::demangle(wanted.name()) + " but the pool's initializer builds " +
                detail::demangle(core_->state_type->name()));
  }
}

}  // namespace procpool
