#include "procpool/pool.hpp"

#include <unistd.h>

namespace procpool {
namespace detail {
namespace {

/// Stands in for the runner of a call whose setup failed: every task reports why.
class FailingRunner final : public TaskRunner {
 public:
  explicit FailingRunner(std::exception_ptr error) : error_(std::move(error)) {}
  void run(std::uint64_t first, std::uint64_t count, Reader&, Writer& out) override {
    for (std::uint64_t i = 0; i < count; ++i) {
      run_task<Empty>(out, first + i, [&] { std::rethrow_exception(error_); });
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
    init_error_ = std::make_exception_ptr(
        Error("procpool: the pool's initializer threw in worker " + std::to_string(::getpid()) +
              ": " + describe_current_exception() + "; every task of this pool fails"));
  }
}

void PoolLogic::setup(std::uint64_t call, Reader& payload) {
  if (init_error_) {
    runners_[call] = std::make_unique<FailingRunner>(init_error_);
    return;
  }
  auto factory = reinterpret_cast<RunnerFactory>(payload.get<std::uintptr_t>());
  try {
    runners_[call] = factory(state_.get(), payload);
  } catch (...) {
    runners_[call] = std::make_unique<FailingRunner>(std::current_exception());
  }
}

void PoolLogic::run(std::uint64_t call, std::uint64_t first, std::uint64_t count, Reader& in,
                    Writer& out) {
  auto it = runners_.find(call);
  if (it == runners_.end()) {
    FailingRunner(
        std::make_exception_ptr(ProtocolError("procpool: a worker got a task of call " +
                                              std::to_string(call) + " without its setup")))
        .run(first, count, in, out);
    return;
  }
  it->second->run(first, count, in, out);
}

void PoolLogic::end(std::uint64_t call) {
  runners_.erase(call);
}

}  // namespace detail

Pool::Pool(Options options) {
  start(options, nullptr, {});
}

void Pool::start(Options options, const std::type_info* state_type,
                 std::function<std::shared_ptr<void>()> make_state) {
  core_ = std::make_shared<detail::PoolCore>();
  core_->options = options;
  core_->state_type = state_type;
  core_->engine = std::make_unique<detail::Engine>(
      detail::engine_config(options, detail::plan_processes(options, std::nullopt), true),
      [make_state = std::move(make_state)] {
        return std::make_unique<detail::PoolLogic>(make_state);
      });
}

Pool::~Pool() {
  try {
    std::unique_lock lock(core_->mutex);
    core_->closed = true;
    while (core_->engine->outstanding() != 0) {
      core_->engine->pump(lock, std::chrono::milliseconds(100));
    }
    core_->engine->stop_gracefully();
  } catch (...) {
    core_->engine->kill_workers();
  }
}

void Pool::close() {
  std::lock_guard lock(core_->mutex);
  core_->closed = true;
}

void Pool::join() {
  std::unique_lock lock(core_->mutex);
  if (!core_->closed) {
    throw Error(
        "procpool::Pool::join: call close() or terminate() first, as work could still arrive");
  }
  while (core_->engine->outstanding() != 0) {
    core_->engine->pump(lock, std::chrono::milliseconds(100));
  }
  core_->engine->stop_gracefully();
}

void Pool::terminate() {
  std::lock_guard lock(core_->mutex);
  core_->closed = true;
  core_->engine->kill_workers(std::make_exception_ptr(
      PoolClosed("procpool: the pool was terminated before this task finished")));
}

Insights Pool::insights() const {
  std::lock_guard lock(core_->mutex);
  return core_->engine->insights(
      std::chrono::duration<double>(std::chrono::steady_clock::now() - core_->started).count());
}

unsigned Pool::processes() const noexcept {
  return core_->engine->processes();
}

std::vector<pid_t> Pool::worker_pids() const {
  std::lock_guard lock(core_->mutex);
  return core_->engine->worker_pids();
}

void Pool::check_open() const {
  std::lock_guard lock(core_->mutex);
  if (core_->closed) {
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
