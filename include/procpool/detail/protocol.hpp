// The messages between the parent and its workers, and the interfaces the
// worker side is built from.
#pragma once

#include <cstdint>
#include <exception>
#include <string>
#include <utility>

#include "procpool/detail/buffer.hpp"
#include "procpool/serialize.hpp"

namespace procpool::detail {

inline constexpr std::uint32_t frame_magic = 0x31505050;  // "PPP1"

enum class FrameKind : std::uint16_t {
  task = 1,      // parent -> worker: run `count` inputs starting at `first` of call `call`
  result = 2,    // worker -> parent: their outcomes, and the time spent computing
  setup = 3,     // parent -> worker: what a call needs once per worker (function, extra arguments)
  end_call = 4,  // parent -> worker: forget a call's setup
};

/// Task flag: run alone and reply at once, so that a crash is pinned on this task.
inline constexpr std::uint16_t flag_isolated = 1;

/// Fixed-size header in front of every message; sizes are 64-bit.
struct FrameHeader {
  std::uint32_t magic = frame_magic;
  FrameKind kind = FrameKind::task;
  std::uint16_t flags = 0;
  std::uint64_t call = 0;
  std::uint64_t first = 0;
  std::uint64_t count = 0;
  std::uint64_t size = 0;   // payload bytes that follow the header
  std::uint64_t nanos = 0;  // result only: time the worker spent computing
};
static_assert(sizeof(FrameHeader) == 48);

/// Each task's outcome inside a result payload starts with one of these tags.
enum class OutcomeTag : std::uint8_t { value = 0, error = 1 };

/// Writes the exception being handled as an error outcome (type name and what()).
void write_current_exception(Writer& out);

/// Runs one task and writes its outcome: the value, or the exception it threw.
template <class Out, class Fn>
void run_task(Writer& out, Fn&& fn) {
  const std::size_t mark = out.size();
  out.put(OutcomeTag::value);
  try {
    if constexpr (std::is_empty_v<Out>) {
      std::forward<Fn>(fn)();  // nothing to send for a void task
    } else {
      save(out, static_cast<const Out&>(std::forward<Fn>(fn)()));
    }
  } catch (...) {
    out.truncate(mark);
    write_current_exception(out);
  }
}

/// One call's task code, as run inside a worker.
class TaskRunner {
 public:
  virtual ~TaskRunner() = default;
  /// Runs inputs `first` .. `first + count - 1`; serialised inputs, if any, come from `in`.
  virtual void run(std::uint64_t first, std::uint64_t count, Reader& in, Writer& out) = 0;
};

/// What a worker process does with the messages it receives.
class WorkerLogic {
 public:
  virtual ~WorkerLogic() = default;
  virtual void setup(std::uint64_t call, Reader& payload) = 0;
  virtual void run(std::uint64_t call, std::uint64_t first, std::uint64_t count, Reader& in,
                   Writer& out) = 0;
  virtual void end(std::uint64_t call) = 0;
};

/// Fork per call: the worker was forked for one call and runs one runner.
class SingleCallLogic final : public WorkerLogic {
 public:
  explicit SingleCallLogic(TaskRunner& runner) : runner_(runner) {}
  void setup(std::uint64_t, Reader&) override {}
  void run(std::uint64_t, std::uint64_t first, std::uint64_t count, Reader& in,
           Writer& out) override {
    runner_.run(first, count, in, out);
  }
  void end(std::uint64_t) override {}

 private:
  TaskRunner& runner_;
};

/// Demangled name of a type, for messages.
std::string demangle(const char* mangled);

}  // namespace procpool::detail
