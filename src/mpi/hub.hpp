// The root's side of the MPI backend: the nodes (the root's own LocalNode and
// one RemoteNode per other rank) and the calls that schedule work over them.
#pragma once

#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <deque>
#include <exception>
#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <thread>
#include <vector>

#include "estimate.hpp"
#include "layout.hpp"
#include "node_server.hpp"
#include "procpool/mpi.hpp"
#include "wire.hpp"

namespace procpool::mpi::detail {

/// A time limit read from the environment variable `name`, in seconds (0:
/// none, wait for ever), `default_seconds` when it is unset; an Error that
/// names it when it is not a number of seconds.
std::chrono::steady_clock::duration limit_from_environment(const char* name,
                                                           double default_seconds);

/// One node of the job as the root sees it (index = MPI rank).
struct NodeSlot {
  int rank = 0;
  std::string host;
  RankShare share;                  // its part of its node's CPUs
  std::size_t inflight_chunks = 0;  // over every pool and call
  std::size_t inflight_items = 0;
  // Whether it still answers (see Hub::watch_silent_nodes_locked).
  std::chrono::steady_clock::time_point heard{};  // its last sign of life
  std::chrono::steady_clock::time_point pinged{};
  std::size_t insights_due = 0;  // insights requests it has not answered
  bool said_bye = false;
  std::string lost;  // why the root gave up on it; empty while it answers
};

/// The root's NodeSlots for the ranks at `places` (index = rank).
std::vector<NodeSlot> node_slots(const std::vector<RankPlace>& places);

/// Inputs that a node sent back (record_not_run_here, record_died_here), as
/// they were encoded, kept on the root until they are sent to another node.
struct ChunkInputs {
  Buffer bytes;
  std::vector<std::size_t> starts;  // where each input begins, and the end last

  std::size_t count() const noexcept { return starts.empty() ? 0 : starts.size() - 1; }
  const std::byte* input(std::size_t i) const noexcept { return bytes.data() + starts[i]; }
  std::size_t input_size(std::size_t i) const noexcept { return starts[i + 1] - starts[i]; }
};

/// A chunk the root sent and has no reply for yet.
struct ChunkRecord {
  std::uint64_t call = 0;
  std::shared_ptr<PoolState> pool;
  std::size_t first = 0;
  std::size_t count = 0;
  std::size_t node = 0;
  std::chrono::steady_clock::time_point sent;
  bool report_if_orphaned = false;  // a dropped Future's task: its error is still reported
  std::size_t value_size = 0;       // its results' size when they travel bare, else 0
  std::size_t bytes = 0;            // its message's size, inputs included
  /// How often its inputs ran before (a chunk sent again: see CallState::Retry).
  unsigned attempts = 0;
  /// A submitted call: kept alive until its reply is in, even if its Future
  /// was dropped, so that a retry, or a task its node sent back, still runs.
  std::shared_ptr<CallState> owner;
};

/// Everything the root's pools share; one per process. Every field is
/// guarded by `mutex`, and every MPI call on the root is made with it held
/// (so MPI_THREAD_SERIALIZED suffices).
class Hub {
 public:
  /// `nodes[0]` is the root itself. With `use_mpi`, the other nodes are the
  /// other ranks and a thread polls MPI for their replies.
  Hub(bool use_mpi, std::vector<NodeSlot> nodes);
  ~Hub();
  /// The Session's hub, or (without a Session) a one-node hub made on first use.
  static std::shared_ptr<Hub> current();
  static void install(std::shared_ptr<Hub> hub);
  /// Tells every rank to finish and waits for them to say so; ends the LocalNode.
  void shutdown();

  /// Sends `message` to node `node` (with `mutex` held).
  void send(std::size_t node, Buffer message) { send(node, single_part(std::move(message)), 0); }
  /// The same in parts, some of them lent by call `lender` (see Transport::send).
  void send(std::size_t node, Parts message, std::uint64_t lender);
  /// Sends every node's outbox (with `mutex` held).
  void flush_all_locked();
  /// Has the pump take a turn now (it flushes the outboxes, among others).
  void wake_pump() noexcept;
  /// Waits until no message with parts lent by call `lender` is being sent
  /// (takes `mutex`).
  void wait_until_sent(std::uint64_t lender) noexcept;

  std::mutex mutex;
  std::condition_variable changed;  // a reply arrived
  std::vector<NodeSlot> nodes;
  std::uint64_t next_id = 0;
  std::map<std::uint64_t, CallState*> calls;
  std::map<std::uint64_t, ChunkRecord> chunks;
  std::map<std::uint64_t, std::map<std::size_t, procpool::Insights>> insight_replies;
  std::size_t insight_requests = 0;  // outstanding
  bool stopped = false;
  /// Calls that chunk replies kept alive (ChunkRecord::owner), to be let go
  /// without the lock: a CallState's destructor takes it.
  std::vector<std::shared_ptr<CallState>> released;
  /// An error of a dropped Future's task, its pool's `count`-th.
  struct Unobserved {
    std::shared_ptr<PoolState> pool;
    std::exception_ptr error;
    std::string message;
    std::uint64_t count = 0;
  };
  /// Queues `u` to be said (to its pool's handler, or on stderr) by the
  /// hub's reporter thread, started on first use (with `mutex` held).
  void report_locked(Unobserved u);
  /// Whether errors of `pool` are queued or being said (with `mutex` held).
  bool reporting_locked(const PoolState& pool) const;
  /// Whether this thread is the reporter (a handler that ends a pool).
  bool on_reporter_thread() const noexcept;

 private:
  void let_go_released(std::unique_lock<std::mutex>& lock);
  void pump();
  /// Whether node `node` owes the root an answer: a chunk's reply, insights, bye.
  bool waiting_on_locked(std::size_t node) const;
  /// Pings a node that owes the root an answer and has said nothing for a
  /// quarter of the silence limit; gives up on one silent for all of it.
  void watch_silent_nodes_locked();
  /// Node `node` stopped answering (`silent` seconds): the inputs it holds
  /// fail, and it gets no more work (NodeSlot::lost).
  void give_up_on_locked(std::size_t node, double silent);
  /// Chunk `id`, on a node given up on, fails: each of its inputs with why.
  void fail_chunk_of_lost_node_locked(std::uint64_t id);
  /// Sends what waits in node `node`'s outbox (see send).
  void flush_locked(std::size_t node);
  void local_reply(Buffer message);
  /// Takes a message from node `node`; `made_here`: one the root made in its
  /// stead (give_up_on_locked), taken even though the node is given up on.
  void route(std::size_t node, Buffer message, bool made_here = false);
  bool remote_work_locked() const;

  std::unique_ptr<Transport> transport_;
  std::unique_ptr<NodeServer> local_;
  /// The reporter: user code (error handlers) never runs on the pump, which
  /// routes the replies a handler may wait for, nor with the lock held.
  void report_loop();
  /// Says what is queued, then ends the reporter (at the hub's end).
  void stop_reporter();
  std::vector<Unobserved> unobserved_;
  std::thread reporter_;
  std::condition_variable reporter_wake_;
  bool reporter_stop_ = false;
  std::vector<Buffer> local_pending_;  // replies the LocalNode gave while `send` held the lock
  /// Per node, small messages not yet handed to MPI: sent as one bundle by
  /// the next flush (the pump's next turn, or the end of a call's top_up).
  std::vector<Bundle> outboxes_;
  std::thread pump_;
  std::condition_variable pump_wake_;
  /// When the pump last moved a message either way, for its next poll's wait.
  PollPace pace_;
  bool pump_stop_ = false;
  /// How long a node that owes the root an answer may stay silent
  /// (PROCPOOL_MPI_NODE_TIMEOUT seconds; 0: for ever).
  std::chrono::steady_clock::duration silence_limit_{};
  std::chrono::steady_clock::time_point watched_{};
};

/// Per node, what one pool did there.
struct NodeStats {
  std::uint64_t chunks = 0;
  std::uint64_t tasks = 0;
  double node_seconds = 0;
  double round_trip_seconds = 0;
  std::uint64_t bytes_sent = 0;
  std::uint64_t bytes_received = 0;
  std::uint64_t moved_away = 0;  // tasks whose worker died here, retried on another node
  std::uint64_t sent_back = 0;   // inputs it could not run, sent to another node
  std::string out_of_rotation;   // why it gets no more of the pool's tasks; empty: it does
};

/// What a call learnt about its tasks, kept by its pool for the next call
/// of the same code and arguments (which then needs no measuring chunk).
struct TaskEstimate {
  double measured_seconds = 0;
  double measured_tasks = 0;
  double transit_seconds = 0;
};

class PoolState {
 public:
  std::shared_ptr<Hub> hub;
  std::uint64_t id = 0;
  Options options;
  const std::type_info* state_type = nullptr;
  bool closed = false;
  bool ended = false;
  /// Options::retries over several nodes: the nodes' pools do not retry; a
  /// node sends the input of a task whose worker died (or timed out) back
  /// (record_died_here), and the root sends it on to another node.
  bool root_retries = false;
  std::vector<unsigned> processes;  // per node
  std::vector<NodeStats> stats;     // per node
  std::size_t inflight_chunks = 0;
  /// Chunks whose inputs a call is encoding (without the lock): accepted
  /// work, which join() waits for as for the chunks in flight.
  std::size_t encoding_chunks = 0;
  /// The nodes' insights as join() found them, just before it ended their
  /// pools: what insights() says of them afterwards.
  std::optional<std::map<std::size_t, procpool::Insights>> last_node_insights;
  double encode_seconds = 0;
  std::uint64_t unobserved_errors = 0;
  std::vector<std::string> unobserved_messages;  // the first ten
  /// Empty: a line on stderr. Shared, so that the reporter's copy cannot throw.
  std::shared_ptr<const std::function<void(std::exception_ptr)>> error_handler;
  unsigned reporting = 0;  // errors the reporter is saying (Hub::report_loop)
  std::map<std::size_t, TaskEstimate> estimates;  // by the hash of a call's setup
  std::chrono::steady_clock::time_point started = std::chrono::steady_clock::now();

  /// Whether a node other than `node` has workers for this pool.
  bool others_have_workers(std::size_t node) const {
    for (std::size_t n = 0; n < processes.size(); ++n)
      if (n != node && processes[n] != 0 && hub->nodes[n].lost.empty()) return true;
    return false;
  }
  /// Gives node `node` no more of this pool's tasks: it cannot run them
  /// (`why`, rebuilt with its node). Says so once on stderr.
  void take_out_of_rotation(std::size_t node, const std::exception_ptr& why);

  /// Workers on the nodes not given up on (NodeSlot::lost), which is what
  /// the pool can still use (with the hub's lock held).
  unsigned total_processes() const {
    unsigned total = 0;
    for (std::size_t n = 0; n < processes.size(); ++n)
      total += hub->nodes[n].lost.empty() ? processes[n] : 0;
    return total;
  }
  /// The nodes among those that have workers for the pool (same lock).
  std::size_t nodes_with_workers() const {
    std::size_t count = 0;
    for (std::size_t n = 0; n < processes.size(); ++n)
      count += hub->nodes[n].lost.empty() && processes[n] != 0 ? 1 : 0;
    return count;
  }
};

class CallState : public std::enable_shared_from_this<CallState> {
 public:
  CallState(std::shared_ptr<PoolState> pool, Buffer setup, std::unique_ptr<InputFeed> feed,
            CallHandle::Order order, std::optional<std::size_t> total, bool submitted,
            std::size_t value_size);
  ~CallState();
  /// Sends a submitted call's task (after construction: see ChunkRecord::owner).
  void start();
  /// See CallHandle::next_run.
  bool next_run(OutcomeRun& out, std::size_t most);
  bool wait_until(std::chrono::steady_clock::time_point deadline);
  /// Its handle is gone (a dropped Future): failures are reported on stderr.
  void abandon();
  /// The progress line's last word (on the caller's thread, as its handle
  /// goes or its error reaches the caller; without the lock: the callback may
  /// use the pool): `how`, else "done" or "stopped". Never throws; once only.
  void finish_progress_quietly(const char* how = nullptr) noexcept;
  /// Returns once no chunk is still being sent from its range's memory (the
  /// range may go after that).
  void wait_until_inputs_sent() noexcept;
  std::exception_ptr decode_error(const RawOutcome& raw);
  /// A chunk's reply (with the hub's lock held).
  void receive(const ChunkRecord& chunk, const NodeTimes& times, Reader& records,
               const std::shared_ptr<const Buffer>& message);

 private:
  /// An input to run again on another node than `avoid`: its worker died
  /// there, or (`sent_back`) that node cannot run the pool's tasks at all.
  struct Retry {
    std::size_t index = 0;
    unsigned attempts = 0;  // runs so far
    std::size_t avoid = 0;
    std::shared_ptr<const ChunkInputs> inputs;
    std::size_t position = 0;  // in `inputs`
    std::exception_ptr error;  // what it failed with, should it not run again
    bool sent_back = false;
  };
  /// How many retries from the front can go as one chunk of at most `most`
  /// inputs: consecutive inputs, consecutive in one ChunkInputs, alike.
  std::size_t retries_alike_locked(std::size_t most) const;
  /// Queues the inputs that node `node` sent back (record_not_run_here if
  /// `sent_back`, else record_died_here) to run elsewhere, as Retry entries
  /// of `attempts` runs so far; their bytes are copied out of the reply.
  void queue_again_locked(std::size_t node, unsigned attempts,
                          const std::vector<RawOutcome>& inputs, bool sent_back);
  /// Inputs `first` .. `first + count - 1`, read but never sent (their
  /// save() threw, or the pool ended as they were encoded), fail with `error`.
  void fail_on_root_locked(std::size_t first, std::size_t count, const std::exception_ptr& error);
  bool front_ready_locked() const;
  bool finished_locked() const {
    return exhausted_ && chunks_out_ == 0 && retries_.empty() && lost_.empty();
  }
  /// Reads the inputs of lost_ again from the range, on the consumer's
  /// thread, and queues them as retries (or fails those it cannot read).
  void write_lost_again(std::unique_lock<std::mutex>& lock);
  /// Sends the queued retries that a node other than the one they failed on has room for.
  void send_retries_locked();
  void open_on_locked(std::size_t node);
  /// Keeps `record` (its node, inputs and attempts filled in; the node's
  /// inflight counts already raised) as chunk `id` and sends `message` to
  /// its node. If the send throws, the record and every count it raised
  /// are taken back: no reply will come, and nothing may wait for one.
  void send_chunk_locked(std::uint64_t id, ChunkRecord record, Parts message);
  bool pop_locked(OutcomeRun& out, std::size_t most);
  /// Whether `records` holds `count` successes of bare values and nothing else.
  bool all_bare_values(const Reader& records, std::size_t count) const;
  /// Sends queued retries and new chunks while there is room. Whatever
  /// escapes it (the range threw, a send failed) breaks the call for good:
  /// every later top_up throws it again, rather than the call going on with
  /// inputs taken that will never come back.
  void top_up(std::unique_lock<std::mutex>& lock);
  std::exception_ptr top_up_unless_closed(std::unique_lock<std::mutex>& lock);
  void send_new_chunks(std::unique_lock<std::mutex>& lock);
  /// A chunk's inputs are encoded: join() need no longer wait for that.
  void done_encoding_locked();
  /// Tells the progress reporter the tasks done since, and that the call is
  /// over if `finished`.
  void tell_progress(std::unique_lock<std::mutex>& lock, bool finished);
  /// Ends start()'s hold on PoolState::encoding_chunks, if it has one.
  void release_submit_locked();
  /// Takes the next input from the range and fails it: no node with workers
  /// is left to the pool (they were given up on, see Hub::give_up_on_locked).
  void fail_next_input(std::unique_lock<std::mutex>& lock);
  std::size_t chunk_size_locked(std::size_t node) const;
  std::size_t capacity_locked(std::size_t node) const;
  bool long_tasks_locked() const;
  /// Automatic chunks, and nothing yet says how long this call's tasks take
  /// (no reply, no earlier call's estimate): the first round, a task per
  /// chunk (see chunk_size_locked).
  bool measuring_locked() const;
  /// A chunk's `alone` byte (Msg::chunk): long tasks' chunks, and the first
  /// round's, run apart from the call's others on their node, so that each
  /// one's reply leaves as soon as its own task ends, not behind a longer one.
  std::uint8_t runs_alone_locked() const {
    return long_tasks_locked() || measuring_locked() ? 1 : 0;
  }
  /// Long tasks, and what is left to take would fill every worker twice at
  /// most: the last rounds, dealt to free workers only.
  bool last_rounds_of_long_tasks_locked() const;
  /// How many inputs node `node` may get now (0: it is full), and its load.
  std::size_t room_locked(std::size_t node) const;
  double load_locked(std::size_t node) const;
  /// The least loaded node with room other than `avoid` (unless no other
  /// node has workers for the pool); nodes.size() if none.
  std::size_t least_loaded_with_room_locked(std::size_t avoid) const;
  std::size_t inflight_bound_locked() const;

  std::shared_ptr<PoolState> pool_;
  Hub& hub_;
  std::uint64_t id_;
  Buffer setup_;
  std::unique_ptr<InputFeed> feed_;
  CallHandle::Order order_;
  std::optional<std::size_t> total_;
  bool submitted_;
  std::size_t value_size_;    // results' size when they travel bare, else 0
  std::size_t estimate_key_;  // the hash of setup_: see PoolState::estimates
  std::vector<bool> opened_;  // per node: the call's code was sent
  std::size_t taken_ = 0;     // inputs taken from the range
  std::size_t delivered_ = 0;
  std::size_t next_index_ = 0;  // input order: the next index to deliver
  std::size_t chunks_out_ = 0;
  bool exhausted_ = false;
  bool lent_ = false;        // a chunk was sent from the range's memory
  double task_seconds_ = 0;  // estimated time of one task on one worker (0: unknown)
  // The estimate's sums, each chunk weighted by its inputs and older chunks
  // fading: a chunk's fixed cost counts little once chunks grow.
  double measured_seconds_ = 0;
  double measured_tasks_ = 0;
  double transit_seconds_ = 0;  // a chunk's round trip less its time on the node (0: unknown)
  std::size_t replies_ = 0;     // chunks of this call answered so far
  bool started_warm_ = false;   // from an earlier call's estimate (PoolState::estimates)
  std::deque<Retry> retries_;
  /// Inputs of a node given up on, to run elsewhere once read again from
  /// the range (write_lost_again); `inputs` is not set yet.
  std::vector<Retry> lost_;
  bool abandoned_ = false;
  std::exception_ptr broken_;  // see top_up
  /// What the input range threw: the call ends with it once the outcomes of
  /// the inputs read before are handed over (exhausted_ is then set).
  std::exception_ptr range_failure_;
  /// The outcomes of one chunk (or of one input that failed on the root),
  /// handed out in order: one map entry per chunk, not per input.
  struct ReadyChunk {
    OutcomeRun outcomes;  // first: the chunk's first input
    std::size_t next = 0;
  };
  std::map<std::size_t, ReadyChunk> ready_;  // by the chunk's first input index
  std::unique_ptr<procpool::detail::ProgressReporter> progress_;
  std::size_t progress_due_ = 0;  // tasks done, not yet told to progress_
  /// A submitted call counts in PoolState::encoding_chunks from its
  /// construction until start() has sent its chunk (or failed to).
  bool holds_submit_ = false;
};

}  // namespace procpool::mpi::detail
