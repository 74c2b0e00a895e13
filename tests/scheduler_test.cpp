// The scheduling policy and the engine's use of it, without a single fork:
// the engine's workers here are fake links (the transport seam, worker_link.hpp).
#include <sys/eventfd.h>
#include <unistd.h>

#include <gtest/gtest.h>

#include <cstdint>
#include <deque>
#include <memory>
#include <mutex>
#include <utility>
#include <vector>

#include "procpool/detail/engine.hpp"
#include "procpool/detail/schedule.hpp"
#include "procpool/detail/worker_link.hpp"

namespace {

using procpool::detail::Buffer;
using procpool::detail::Chunk;
using procpool::detail::ChunkPlan;
using procpool::detail::Engine;
using procpool::detail::EngineConfig;
using procpool::detail::LinkState;
using procpool::detail::RecentTaskTime;
using procpool::detail::Reply;
using procpool::detail::ReplySink;
using procpool::detail::RunningTaskRef;
using procpool::detail::SchedulePolicy;
using procpool::detail::TaskTimeEstimate;
using procpool::detail::WorkerCounters;
using procpool::detail::WorkerExit;
using procpool::detail::WorkerLink;

TEST(Schedule, UntimedTasksGoOneAtATime) {
  const SchedulePolicy policy(4, 0, 0);
  const ChunkPlan plan = policy.next_chunk(0, std::nullopt);
  EXPECT_EQ(plan.tasks, 1u);
  EXPECT_FALSE(plan.tail);
}

TEST(Schedule, ChunkSizeFollowsMeasuredTaskTime) {
  const SchedulePolicy policy(4, 0, 0);
  // About 5 ms of work per chunk.
  EXPECT_EQ(policy.next_chunk(1000, std::nullopt).tasks, 5000u);
  EXPECT_EQ(policy.next_chunk(1e6, std::nullopt).tasks, 5u);
  EXPECT_EQ(policy.next_chunk(1e9, std::nullopt).tasks, 1u);
  EXPECT_EQ(policy.next_chunk(1, std::nullopt).tasks, 16384u);  // capped
}

TEST(Schedule, ChunksizeOptionWins) {
  const SchedulePolicy policy(4, 7, 0);
  EXPECT_EQ(policy.next_chunk(1000, 10).tasks, 7u);
  EXPECT_FALSE(policy.next_chunk(1000, 10).tail);
}

TEST(Schedule, TailChunksAreSmallerSoWorkersFinishTogether) {
  const SchedulePolicy policy(2, 0, 0);
  const ChunkPlan far = policy.next_chunk(1000, 1'000'000);
  EXPECT_EQ(far.tasks, 5000u);
  EXPECT_FALSE(far.tail);
  const ChunkPlan near = policy.next_chunk(1000, 1000);  // 250 each for 2 workers, twice
  EXPECT_EQ(near.tasks, 250u);
  EXPECT_TRUE(near.tail);
  // Never below ~0.1 ms of work: 100 tasks of 1 us.
  EXPECT_EQ(policy.next_chunk(1000, 10).tasks, 100u);
}

TEST(Schedule, InflightBoundScalesWithWorkersAndPipeline) {
  const SchedulePolicy automatic(4, 0, 0);
  // 1 ms chunks: a pipeline of 2 (the minimum), plus 2.
  EXPECT_EQ(automatic.inflight_limit(1e6, 1), 1u * 4 * (2 + 2));
  // 10 us chunks: 50 deep.
  EXPECT_EQ(automatic.inflight_limit(1e4, 1), 1u * 4 * (50 + 2));
  const SchedulePolicy bounded(4, 0, 33);
  EXPECT_EQ(bounded.inflight_limit(1e4, 1), 33u);
}

TEST(Schedule, PipelineDepthIsBounded) {
  EXPECT_EQ(SchedulePolicy::pipeline_depth(0, 10), SchedulePolicy::min_pipeline);
  EXPECT_EQ(SchedulePolicy::pipeline_depth(1e9, 1), SchedulePolicy::min_pipeline);
  EXPECT_EQ(SchedulePolicy::pipeline_depth(1, 1), 64u);
  EXPECT_EQ(SchedulePolicy::pipeline_depth(1e4, 1), 50u);
}

TEST(Schedule, TailAndLongSubmitsGoOnlyToIdleWorkers) {
  EXPECT_EQ(SchedulePolicy::queue_limit(10, true, false, 1000), 1u);
  EXPECT_GT(SchedulePolicy::queue_limit(10, false, false, 1000), 1u);
  EXPECT_EQ(SchedulePolicy::queue_limit(1, false, true, 0), 1u);    // untimed submit
  EXPECT_EQ(SchedulePolicy::queue_limit(1, false, true, 2e6), 1u);  // long submit
  EXPECT_GT(SchedulePolicy::queue_limit(1, false, true, 1e3), 1u);  // short submit queues
}

TEST(Schedule, SlowFirstTaskIsForgottenAndSlowdownShowsAtOnce) {
  TaskTimeEstimate estimate;
  EXPECT_EQ(estimate.nanos_per_task(), 0.0);
  estimate.add(1, 1e6);  // cold start
  estimate.add(1000, 1e6);
  EXPECT_LT(estimate.nanos_per_task(), 2e3);
  estimate.add(10, 1e6);  // now 100 us each
  EXPECT_EQ(estimate.nanos_per_task(), 1e5);
}

TEST(Schedule, RecentSubmitsWeighMost) {
  RecentTaskTime recent;
  recent.add(1, 1000);
  EXPECT_EQ(recent.nanos_per_task(), 1000.0);
  recent.add(1, 1e6);
  EXPECT_EQ(recent.nanos_per_task(), 1e6);  // a slow one shows at once
  recent.add(1, 1000);
  EXPECT_LT(recent.nanos_per_task(), 1e6);  // then fades
}

/// A worker that answers only when told to: the chunks it was sent wait in `queued`.
class FakeLink final : public WorkerLink {
 public:
  FakeLink() : fd_(::eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK)) {}
  ~FakeLink() override { ::close(fd_); }

  pid_t pid() const noexcept override { return 4242; }
  void send_setup(std::uint64_t, const Buffer&) override {}
  void send_end_call(std::uint64_t) override {}
  void send_chunk(const Chunk& chunk, const Buffer*) override {
    queued.push_back({chunk.call, chunk.first, chunk.count});
    most_queued = std::max(most_queued, queued.size());
  }
  bool ready_for(const Chunk&) const noexcept override { return true; }
  int wait_fd() const noexcept override { return fd_; }
  bool wants_write() const noexcept override { return false; }
  LinkState flush() override { return {}; }
  LinkState receive(ReplySink& sink) override {
    std::uint64_t count = 0;
    [[maybe_unused]] const ssize_t n = ::read(fd_, &count, sizeof count);
    while (answered != 0 && !queued.empty()) {
      const Sent sent = queued.front();
      queued.pop_front();
      --answered;
      Reply reply;
      reply.call = sent.call;
      reply.nanos = nanos_per_task * sent.count;
      reply.done.first = sent.first;
      reply.done.count = sent.count;
      if (!sink.take(std::move(reply))) break;
    }
    return {};
  }
  bool mid_message() const noexcept override { return false; }
  std::optional<RunningTaskRef> running_task() const noexcept override { return std::nullopt; }
  WorkerCounters counters() const noexcept override { return {}; }
  void begin_end(Ending) noexcept override {}
  WorkerExit finish_end() noexcept override { return {}; }

  /// Answers every chunk queued so far, each task having taken `nanos`.
  void answer_all(std::uint64_t nanos) {
    nanos_per_task = nanos;
    answered = queued.size();
    const std::uint64_t one = 1;
    [[maybe_unused]] const ssize_t n = ::write(fd_, &one, sizeof one);
  }

  struct Sent {
    std::uint64_t call, first, count;
  };
  std::deque<Sent> queued;
  std::size_t most_queued = 0;

 private:
  int fd_;
  std::size_t answered = 0;
  std::uint64_t nanos_per_task = 0;
};

struct FakeEngine {
  static EngineConfig config_for(unsigned processes) {
    EngineConfig config;
    config.processes = processes;
    return config;
  }
  explicit FakeEngine(unsigned processes = 1) : FakeEngine(config_for(processes)) {}
  explicit FakeEngine(const EngineConfig& config)
      : engine(config, Engine::LinkFactory([this](unsigned) {
                 auto link = std::make_unique<FakeLink>();
                 fake = link.get();
                 fakes.push_back(fake);
                 return link;
               })) {}
  void pump() {
    std::unique_lock lock(mutex);
    engine.pump(lock, std::chrono::milliseconds(0));
  }
  /// Submits a one-task call, as Pool::submit does.
  std::uint64_t submit_one() {
    const std::uint64_t call = engine.open_call(Buffer{}, Engine::SetupScope::each_chunk);
    submit_task(call, 0);
    return call;
  }

  /// Submits chunk `first` (one task) of `call`.
  void submit_task(std::uint64_t call, std::uint64_t first) {
    Chunk chunk;
    chunk.call = call;
    chunk.first = first;
    chunk.count = 1;
    engine.submit(std::move(chunk));
  }
  /// Opens a call and times one task of it at 1 us: its chunks may then
  /// queue behind a busy worker.
  std::uint64_t open_short_call() {
    const std::uint64_t call = engine.open_call();
    submit_task(call, 0);
    pump();
    for (FakeLink* link : fakes)
      link->answer_all(1000);
    pump();
    EXPECT_EQ(engine.completed(call).size(), 1u);
    return call;
  }

  std::mutex mutex;
  FakeLink* fake = nullptr;      // the last worker started
  std::vector<FakeLink*> fakes;  // every worker started, in order (a replaced one dangles)
  Engine engine;
};

/// Chunks as (call, first task).
using Sent = std::vector<std::pair<std::uint64_t, std::uint64_t>>;

/// What a fake worker was sent and has not answered.
Sent sent_to(const FakeLink& link) {
  Sent sent;
  for (const FakeLink::Sent& chunk : link.queued)
    sent.emplace_back(chunk.call, chunk.first);
  return sent;
}

TEST(EngineSchedule, UntimedSubmitsWaitForAnIdleWorker) {
  FakeEngine f;
  for (int i = 0; i < 5; ++i)
    f.submit_one();
  f.pump();
  EXPECT_EQ(f.fake->queued.size(), 1u);  // a long task must not hold up the others
  EXPECT_EQ(f.engine.outstanding(), 5u);
}

TEST(EngineSchedule, StreamOfShortSubmitsIsPipelined) {
  FakeEngine f;
  const std::uint64_t first = f.submit_one();
  f.pump();
  f.fake->answer_all(1000);  // 1 us: short
  f.pump();
  EXPECT_EQ(f.engine.completed(first).size(), 1u);
  f.engine.close_call(first, false);
  for (int i = 0; i < 20; ++i)
    f.submit_one();
  f.pump();
  EXPECT_EQ(f.fake->queued.size(), 20u);  // all queued at once, no ping-pong
  f.fake->answer_all(1000);
  f.pump();
  EXPECT_EQ(f.engine.outstanding(), 0u);
}

TEST(EngineSchedule, TailChunkGoesOnlyToAnIdleWorker) {
  FakeEngine f;
  const std::uint64_t call = f.engine.open_call();
  for (std::uint64_t i = 0; i < 3; ++i) {
    Chunk chunk;
    chunk.call = call;
    chunk.first = i;
    chunk.count = 1;
    chunk.tail = true;
    f.engine.submit(std::move(chunk));
  }
  f.pump();
  EXPECT_EQ(f.fake->most_queued, 1u);
  f.fake->answer_all(1000);
  f.pump();
  EXPECT_EQ(f.engine.completed(call).size(), 1u);
  EXPECT_EQ(f.fake->queued.size(), 1u);
}

TEST(EngineSchedule, AnotherCallsChunkPassesAHeadThatWaitsForAnIdleWorker) {
  // The head of the queue, an untimed submit, waits for an idle worker. A
  // short call's chunk behind it may queue at the busy worker now: it would
  // otherwise wait too, and the worker would run dry when its task ends.
  FakeEngine f;
  const std::uint64_t quick = f.open_short_call();
  const std::uint64_t running = f.submit_one();
  const std::uint64_t waiting = f.submit_one();
  for (std::uint64_t i = 1; i <= 3; ++i)
    f.submit_task(quick, i);
  f.pump();
  // One chunk passed (one per worker while the same head waits), the first
  // of its call: the others wait behind the head, in their order.
  EXPECT_EQ(sent_to(*f.fake), (Sent{{running, 0}, {quick, 1}}));
  EXPECT_EQ(f.engine.queued(), 3u);
  // Once the worker is idle, the head goes first, then the rest of the call.
  f.fake->answer_all(1000);
  f.pump();
  EXPECT_EQ(sent_to(*f.fake), (Sent{{waiting, 0}, {quick, 2}, {quick, 3}}));
  EXPECT_EQ(f.engine.queued(), 0u);
}

TEST(EngineSchedule, AWaitingHeadIsPassedAtMostOnceAtEachWorker) {
  FakeEngine f(2);
  ASSERT_EQ(f.fakes.size(), 2u);
  FakeLink& first = *f.fakes[0];
  FakeLink& second = *f.fakes[1];
  const std::uint64_t quick = f.open_short_call();
  // The first worker runs an untimed submit; the second has two of the
  // short call's chunks queued.
  for (std::uint64_t i = 1; i <= 4; ++i)
    f.submit_task(quick, i);
  f.pump();
  first.answer_all(1000);
  f.pump();
  ASSERT_EQ(first.queued.size(), 0u);
  ASSERT_EQ(second.queued.size(), 2u);
  const std::uint64_t running = f.submit_one();
  f.pump();
  ASSERT_EQ(sent_to(first).at(0).first, running);
  // The head waits for an idle worker; the short call's next four queue behind it.
  f.submit_one();
  for (std::uint64_t i = 5; i <= 8; ++i)
    f.submit_task(quick, i);
  f.pump();
  f.pump();  // a later round passes no more for the same head
  // The least loaded worker would take two; each worker takes one, in the call's order.
  EXPECT_EQ(sent_to(first), (Sent{{running, 0}, {quick, 5}}));
  EXPECT_EQ(sent_to(second), (Sent{{quick, 2}, {quick, 4}, {quick, 6}}));
  EXPECT_EQ(f.engine.queued(), 3u);  // the head and two chunks behind it
}

TEST(EngineSchedule, TheHeadsOwnCallsLaterChunksDoNotPassIt) {
  // A short call's tail chunk waits for an idle worker; its later chunks,
  // which could queue, keep their place behind it.
  FakeEngine f;
  const std::uint64_t quick = f.open_short_call();
  const std::uint64_t running = f.submit_one();
  f.pump();
  Chunk tail;
  tail.call = quick;
  tail.first = 1;
  tail.count = 1;
  tail.tail = true;
  f.engine.submit(std::move(tail));
  f.submit_task(quick, 2);
  f.pump();
  EXPECT_EQ(sent_to(*f.fake), (Sent{{running, 0}}));
  EXPECT_EQ(f.engine.queued(), 2u);
}

TEST(EngineSchedule, AChunkThatPassesIsCutToItsWorkersTaskQuota) {
  // max_tasks_per_child 4: a worker that ran one task and runs a second
  // takes two of a passing chunk's five; the other three keep its place.
  EngineConfig config = FakeEngine::config_for(1);
  config.max_tasks_per_child = 4;
  FakeEngine f(config);
  const std::uint64_t quick = f.open_short_call();
  const std::uint64_t running = f.submit_one();
  const std::uint64_t waiting = f.submit_one();
  Chunk five;
  five.call = quick;
  five.first = 10;
  five.count = 5;
  f.engine.submit(std::move(five));
  f.pump();
  ASSERT_EQ(f.fake->queued.size(), 2u);
  EXPECT_EQ(f.fake->queued[0].call, running);
  EXPECT_EQ(f.fake->queued[1].call, quick);
  EXPECT_EQ(f.fake->queued[1].first, 10u);
  EXPECT_EQ(f.fake->queued[1].count, 2u);
  EXPECT_EQ(f.engine.queued(), 2u);  // the head, and the chunk's rest behind it
  // The worker, at its quota, is replaced; the new one takes the head, then the rest.
  f.fake->answer_all(1000);
  f.pump();
  ASSERT_EQ(f.fakes.size(), 2u);  // a second worker was started
  ASSERT_EQ(f.fake->queued.size(), 2u);
  EXPECT_EQ(f.fake->queued[0].call, waiting);
  EXPECT_EQ(f.fake->queued[1].call, quick);
  EXPECT_EQ(f.fake->queued[1].first, 12u);
  EXPECT_EQ(f.fake->queued[1].count, 3u);
  EXPECT_EQ(f.engine.queued(), 0u);
}

}  // namespace
