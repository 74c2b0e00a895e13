// What every node of an mpi::Pool runs: the remote ranks in their serve
// loop, the root in its LocalNode. It owns the node's procpool::Pools and
// runs node chunks on them from a few threads, so that several chunks (of
// one call or of several) keep the node's workers busy while the next ones travel.
#pragma once

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <deque>
#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <thread>
#include <vector>

#include "procpool/detail/mpi/node.hpp"
#include "procpool/pool.hpp"
#include "wire.hpp"

namespace procpool::mpi::detail {

class NodeServer {
 public:
  /// `reply` receives every message for the root, from any of the server's
  /// threads, as the parts it is to be sent in (see ReplyParts).
  explicit NodeServer(std::function<void(Parts)> reply);
  /// Finishes the chunks already received, then ends every pool.
  ~NodeServer();
  NodeServer(const NodeServer&) = delete;
  NodeServer& operator=(const NodeServer&) = delete;

  /// Handles one message from the root (not shutdown); called from one thread.
  void handle(Buffer message);
  /// How many times a bundle's run of chunks started again because the
  /// chunk it joined was taken meanwhile (see handle); for tests.
  std::uint64_t runs_restarted() const noexcept { return runs_restarted_.load(); }

 private:
  /// A node's Pool. With Start::fork_server it is made on a thread of its
  /// own: its constructor runs the initializer (once per node: loading a
  /// model, a vocabulary), maybe for longer than the root waits for a silent
  /// node, and the rank must go on answering the root meanwhile. Chunks wait for it
  /// (an executor each), and an insights request is answered once it is made.
  struct PoolEntry {
    /// The root retries on other nodes: an input whose worker died goes back
    /// to it (record_died_here). Set before its maker starts.
    bool send_back_deaths = false;
    std::mutex mutex;
    std::condition_variable made_cv;
    // Set by its maker, under `mutex`, with `made`:
    bool made = false;
    std::shared_ptr<procpool::Pool> pool;
    std::exception_ptr error;  // the pool could not be built: its chunks go back
    // Asked of it before it was made, done by its maker once it is:
    bool terminate_when_made = false;
    std::vector<std::uint64_t> insights_waiting;  // their request ids
    void wait_made();
  };
  struct Maker {
    std::thread thread;
    std::shared_ptr<std::atomic<bool>> finished;  // its pool made, and its part done
  };
  struct CallEntry {
    std::shared_ptr<PoolEntry> pool;
    std::unique_ptr<NodeCall> runner;
    std::exception_ptr error;
    /// The root dropped the call (its Results ended early): chunks still
    /// queued are answered at once instead of run.
    std::atomic<bool> closed{false};
    bool one_shot = false;  // a submitted task's call: ends with its only chunk
  };
  struct Job {
    std::shared_ptr<CallEntry> call;
    std::uint64_t call_id = 0;
    std::uint64_t chunk = 0;
    std::uint64_t count = 0;
    /// Long tasks (Msg::chunk's alone): a batch of its own, whose reply
    /// waits for no other chunk's tasks.
    bool alone = false;
    Buffer message;
    std::size_t items_at = 0;
    std::chrono::steady_clock::time_point arrived;
  };
  void run(std::vector<Job>& jobs);
  /// Handles create_pool: a Start::fork_server pool is made on a thread of
  /// its own (or on this one, if no thread can start), others here.
  void create_pool(Reader& in);
  /// Makes the pool (on its maker thread, or on this one).
  void make_pool(std::shared_ptr<PoolEntry> entry, const Options& options,
                 NodePoolFactoryFn* factory, const void* init);
  /// Publishes the pool (or why there is none), then does what was asked of it meanwhile.
  void finish_making(PoolEntry& entry, std::shared_ptr<procpool::Pool> made,
                     std::exception_ptr error);
  void reply_insights(std::uint64_t request, const procpool::Insights& insights);
  /// Joins the makers that have finished (with none running, a rank that
  /// makes pool after pool holds no thread for each).
  void join_finished_makers();
  void executor();
  /// Wakes an idle executor for the `queued` jobs just queued, or starts
  /// one (with mutex_ held); if none can start and none runs, takes them
  /// back out and throws.
  void start_executor_locked(std::size_t queued);

  std::function<void(Parts)> reply_;
  /// The bundle `handle` is taking apart (its thread's only): a run of its
  /// chunks of one call is queued whole before an executor is woken, so
  /// that the executor finds them together (and runs them as one batch, up
  /// to max_batch_inputs).
  struct BundleInProgress {
    bool handling = false;
    std::size_t queued = 0;  // chunks queued since an executor was last woken
    std::uint64_t call = 0;  // whose
    bool joins = false;      // queued right behind a job of that call (see handle)
  };
  /// The bundle's run of chunks of one call is queued: wakes or starts an
  /// executor for it unless it joins a job queued before (with mutex_ held).
  void end_bundle_run_locked();
  BundleInProgress bundle_;
  std::atomic<std::uint64_t> runs_restarted_{0};
  std::map<std::uint64_t, std::shared_ptr<PoolEntry>> pools_;
  std::map<std::uint64_t, std::shared_ptr<CallEntry>> calls_;
  std::vector<Maker> makers_;  // (the thread that calls handle() only)

  std::mutex mutex_;
  std::condition_variable wake_;
  std::deque<Job> jobs_;
  std::vector<std::thread> threads_;
  unsigned idle_ = 0;  // executors waiting for jobs
  /// Of those, notified and not yet awake (at most: a spurious wake-up
  /// takes a claim that was another's; that one then comes back for jobs too).
  unsigned woken_ = 0;
  bool stop_ = false;
};

}  // namespace procpool::mpi::detail
