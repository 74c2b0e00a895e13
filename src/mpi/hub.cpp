#include "hub.hpp"

#include <pthread.h>
#include <unistd.h>

#include <algorithm>
#include <climits>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <limits>
#include <string_view>
#include <system_error>
#include <utility>

#include "codec.hpp"
#include "procpool/cpu_count.hpp"
#include "procpool/detail/code_identity.hpp"
#include "procpool/detail/protocol.hpp"

namespace procpool::mpi::detail {
namespace {

using Clock = std::chrono::steady_clock;

double seconds(Clock::duration d) {
  return std::chrono::duration<double>(d).count();
}

/// Work aimed at per node chunk, for the whole node: long enough that a
/// chunk's round trip is a small share of it, short enough that the nodes
/// finish together and the progress bar moves.
constexpr double node_chunk_seconds = 0.05;

/// Inputs per node chunk at most: bounds the root's memory and the work an
/// early-stopped imap leaves behind, whatever the task time.
constexpr double max_node_chunk = 65536;

/// Chunks in flight per worker at most, however small they are.
constexpr std::size_t max_chunks_per_worker = 64;

/// Near the end of a call, node chunks shrink, but not below the work of one
/// chunk's transit (nor this much): smaller ones cost more in round trips than
/// they save in waiting for the last chunk.
constexpr double tail_chunk_seconds = 0.002;

/// How fast the task-time estimate forgets older chunks (per chunk).
constexpr double estimate_decay = 0.5;

/// Chunks a node may hold of a call that has no reply yet but an earlier
/// call's estimate (see capacity_locked).
constexpr std::size_t first_round_chunks = 2;

/// Tasks at least this long are dealt to free workers only (see room_locked).
constexpr double long_task_seconds = 0.01;

/// An input's block of bytes at least this large goes to another rank from
/// the caller's memory, as a part of its own (see Writer::lend_blocks):
/// below it, one more part costs about what copying it would.
constexpr std::size_t lend_at_least = std::size_t{1} << 20;
/// A node chunk of an explicit chunksize ends once its encoded inputs reach
/// this size, whatever its count: a huge chunksize over an endless range
/// (CPython's tests pass sys.maxsize) must not read that range for ever into
/// one message, and the memory in flight stays bounded (a few chunks per
/// worker). A large input still goes whole, alone in its chunk. (An
/// automatic chunk is bounded by its count and its 10 ms of reading, and
/// holds an input per worker however large.) procpool::Pool cuts its
/// chunks at 256 KiB; a message between ranks is worth more per byte.
constexpr std::size_t node_chunk_bytes = std::size_t{1} << 20;
/// How long one top-up may spend in the caller's range (reading and
/// encoding inputs) while results are ready to hand over: a slow range (a
/// stream, a query per input) reads on only after they are handed over, not
/// to the end of the in-flight bound (1024 inputs or more) first. A fast
/// range fills the bound in far less (20k ints: about 1 ms).
/// Also the longest an automatic chunk is read for (see send_new_chunks).
constexpr auto read_ahead_while_ready = std::chrono::milliseconds(10);

/// How long a node that owes the root an answer may stay silent, unless
/// PROCPOOL_MPI_NODE_TIMEOUT says otherwise: a node's rank answers a ping at
/// once, however busy its workers are, so only a node that has stopped
/// (SIGSTOP, a frozen machine, a cut network) is silent this long.
constexpr double default_silence_limit_seconds = 60;

/// How often the root looks for silent nodes.
constexpr auto watch_interval = std::chrono::milliseconds(100);

/// A gap between two looks this long means the root itself did not run.
constexpr auto stall = std::chrono::seconds(1);

std::mutex hub_mutex;
std::shared_ptr<Hub> installed_hub;
pid_t installed_in = 0;  // the process whose hub installed_hub is

/// No fork while hub_mutex is held: a child never inherits it held.
/// Registered as the library loads, before any thread can fork: a child
/// must not inherit a registration half done either (a static's guard).
[[maybe_unused]] const int hub_mutex_guarded_against_forks = ::pthread_atfork(
    [] { hub_mutex.lock(); }, [] { hub_mutex.unlock(); }, [] { hub_mutex.unlock(); });

/// Forgets a hub inherited from the parent process: in a worker whose task
/// makes an mpi::Pool, the hub's threads are not there, nor is MPI that
/// process's to use. It is kept (still reachable), never used nor
/// destroyed: its destructor would join threads of another process.
void forget_inherited_hub_locked() {
  if (!installed_hub || installed_in == ::getpid()) return;
  static auto* inherited = new std::vector<std::shared_ptr<Hub>>();
  inherited->push_back(std::move(installed_hub));
  installed_hub = nullptr;
}

/// Set while this thread runs the LocalNode's handle() with the hub's lock held.
thread_local bool in_local_handle = false;

/// Set while this thread runs a call's top_up, which flushes the outboxes
/// when done: its messages do not wake the pump, which would take the lock
/// as the top_up lets go of it to encode the next chunk and send each chunk
/// alone. (The pump flushes on its own turns too, every 10-500 us while
/// chunks are out: bundles then form from what it finds.)
thread_local bool flushes_its_outboxes = false;

/// Set on the reporter thread when the hub ends there (Hub::stop_reporter).
thread_local bool reporter_lost_its_hub = false;

}  // namespace

Clock::duration limit_from_environment(const char* name, double default_seconds) {
  const char* text = std::getenv(name);
  double limit = default_seconds;
  if (text != nullptr && *text != '\0') {
    char* end = nullptr;
    limit = std::strtod(text, &end);
    if (*end != '\0' || !(limit >= 0) || limit > 1e9) {
      throw Error(std::string("procpool::mpi: ") + name + "=" + text +
                  " is not a number of seconds (0: wait for ever)");
    }
    if (limit > 0) limit = std::max(limit, 0.01);  // not rounded to 0 (for ever)
  }
  return std::chrono::duration_cast<Clock::duration>(std::chrono::duration<double>(limit));
}

// ---- Hub --------------------------------------------------------------------

namespace {

/// How many errors of dropped Futures a pool keeps the message of, and
/// says on stderr without a handler.
constexpr std::size_t kept_unobserved = 10;

/// A dropped Future's failure: nobody will see it unless it is said (with
/// the hub's lock held; the hub's reporter thread says it).
void report_unobserved(const std::shared_ptr<PoolState>& pool, const std::exception_ptr& error) {
  std::string message;
  try {
    std::rethrow_exception(error);
  } catch (const std::exception& err) {
    message = err.what();
  } catch (...) {
    message = "an exception not derived from std::exception";
  }
  const std::uint64_t count = ++pool->unobserved_errors;
  if (pool->unobserved_messages.size() < kept_unobserved)
    pool->unobserved_messages.push_back(message);
  pool->hub->report_locked(Hub::Unobserved{pool, error, std::move(message), count});
}

/// Says one error of a dropped Future, the pool's `count`-th: to `handler`,
/// or on stderr (the first few).
void say_one(const std::function<void(std::exception_ptr)>* handler,
             const std::exception_ptr& error, const std::string& message,
             std::uint64_t count) noexcept {
  if (handler != nullptr && *handler) {
    try {
      (*handler)(error);
    } catch (const std::exception& e) {
      std::fprintf(stderr, "procpool::mpi: the pool's error handler threw: %s\n", e.what());
    } catch (...) {
      std::fprintf(stderr, "procpool::mpi: the pool's error handler threw\n");
    }
    return;
  }
  if (count <= kept_unobserved) {
    const std::string_view prefix = "procpool: ";
    const std::string_view said =
        message.starts_with(prefix) ? std::string_view(message).substr(prefix.size()) : message;
    std::fprintf(stderr, "procpool::mpi: a task whose Future was dropped failed: %.*s\n",
                 static_cast<int>(said.size()), said.data());
  }
  if (count == kept_unobserved) {
    std::fprintf(stderr,
                 "procpool::mpi: more errors of dropped futures are only counted "
                 "(mpi::Pool::insights(); mpi::Pool::set_error_handler() sees them all)\n");
  }
}

}  // namespace

std::vector<NodeSlot> node_slots(const std::vector<RankPlace>& places) {
  const std::vector<RankShare> shares = share_nodes(places);
  std::vector<NodeSlot> slots;
  for (std::size_t r = 0; r < places.size(); ++r) {
    NodeSlot& slot = slots.emplace_back();
    slot.rank = static_cast<int>(r);
    slot.host = places[r].host;
    slot.share = shares[r];
  }
  return slots;
}

Hub::Hub(bool use_mpi, std::vector<NodeSlot> slots) : nodes(std::move(slots)) {
  for (NodeSlot& node : nodes)
    node.heard = Clock::now();
  local_ = std::make_unique<NodeServer>([this](Parts m) { local_reply(joined(std::move(m))); });
  if (use_mpi && nodes.size() > 1) {
    silence_limit_ =
        limit_from_environment("PROCPOOL_MPI_NODE_TIMEOUT", default_silence_limit_seconds);
    transport_ = std::make_unique<Transport>();
    pump_ = std::thread([this] { pump(); });
  }
}

Hub::~Hub() {
  try {
    shutdown();
  } catch (const std::exception& e) {
    std::fprintf(stderr, "procpool::mpi: ending the pools failed: %s\n", e.what());
  }
  try {
    stop_reporter();  // (done already, unless shutdown failed)
  } catch (const std::exception& e) {
    std::fprintf(stderr, "procpool::mpi: ending the error reporter failed: %s\n", e.what());
  }
}

std::shared_ptr<Hub> Hub::current() {
  {
    std::lock_guard lock(hub_mutex);
    forget_inherited_hub_locked();
    if (installed_hub) return installed_hub;
  }
  // No Session (or one without mpirun, or a worker's own pool): a one-node
  // pool, this process alone. Its CPUs are counted without hub_mutex held:
  // counting takes a lock of its own that a fork takes too (the fork's
  // handlers take them in another order: TSan saw the inversion).
  RankPlace self;
  self.node = this_node_name();
  self.host = this_host_name();
  self.usable_cpus = usable_cpu_count();
  std::lock_guard lock(hub_mutex);
  forget_inherited_hub_locked();
  if (!installed_hub) {
    installed_in = ::getpid();
    installed_hub = std::make_shared<Hub>(false, node_slots({self}));
  }
  return installed_hub;
}

void Hub::install(std::shared_ptr<Hub> hub) {
  std::shared_ptr<Hub> replaced;  // ended after the lock is let go: its end may fork or wait
  std::lock_guard lock(hub_mutex);
  installed_in = ::getpid();
  replaced = std::exchange(installed_hub, std::move(hub));
}

void Hub::shutdown() {
  std::unique_lock lock(mutex);
  if (stopped) return;
  stopped = true;
  if (transport_) {
    flush_all_locked();  // what is queued goes before the shutdown
    for (std::size_t n = 1; n < nodes.size(); ++n)
      transport_->send(nodes[n].rank, new_message(Msg::shutdown));
    pump_wake_.notify_one();
    // Each rank finishes its chunks, ends its pools and answers bye; one
    // that stays silent is given up on (watch_silent_nodes_locked).
    changed.wait(lock, [&] {
      return std::all_of(nodes.begin() + 1, nodes.end(),
                         [](const NodeSlot& n) { return n.said_bye || !n.lost.empty(); });
    });
    pump_stop_ = true;
    pump_wake_.notify_one();
    lock.unlock();
    pump_.join();
    lock.lock();
    for (const NodeSlot& n : nodes) {
      // MPI_Finalize would wait for it for ever: only ending the job ends
      // it. (One that came back and said bye: its inputs failed all the same.)
      if (!n.lost.empty()) {
        end_job_without("procpool::mpi: ending the job with an error: node " + n.host + ":" +
                            std::to_string(n.rank) + " " + n.lost,
                        1);
      }
    }
    while (!transport_->progress()) {
      while (transport_->receive_signal()) {
      }  // a late pong: received, not left pending at MPI_Finalize
      lock.unlock();
      std::this_thread::sleep_for(std::chrono::microseconds(100));
      lock.lock();
    }
  }
  lock.unlock();
  local_.reset();  // its replies route under the lock: it must not be held here
  stop_reporter();
}

void Hub::stop_reporter() {
  {
    std::lock_guard lock(mutex);
    reporter_stop_ = true;  // it says what is queued, then returns
  }
  reporter_wake_.notify_one();
  if (!reporter_.joinable()) return;
  if (on_reporter_thread()) {
    // The reporter let go of the hub's last reference (a pool's): it
    // returns without touching the hub again (report_loop).
    reporter_lost_its_hub = true;
    reporter_.detach();
    return;
  }
  reporter_.join();
}

void Hub::send(std::size_t node, Parts message, std::uint64_t lender) {
  if (node == 0) {
    in_local_handle = true;
    try {
      local_->handle(joined(std::move(message)));
    } catch (...) {
      in_local_handle = false;
      throw;
    }
    in_local_handle = false;
    std::vector<Buffer> pending = std::move(local_pending_);
    local_pending_.clear();
    for (Buffer& m : pending)
      route(0, std::move(m));
    if (!pending.empty()) changed.notify_all();
    return;
  }
  if (!nodes[node].lost.empty()) {
    // A chunk its call was making as the node was given up on: it fails now.
    Msg type{};
    Reader in = message_body(message.front(), type);
    if (type == Msg::chunk) {
      in.get<std::uint64_t>();  // its call
      fail_chunk_of_lost_node_locked(in.get<std::uint64_t>());
    }
    return;
  }
  // Small messages of a stream (a call's chunks) wait in the node's outbox,
  // to cross as one message: a call's top_up flushes it when it has sent
  // what it could, and the pump on its next turn (at most a poll's wait
  // away while chunks are out, woken here for other senders). 20k tiny
  // tasks with chunksize 1 sent one MPI message each, each way.
  if (outboxes_.size() < nodes.size()) outboxes_.resize(nodes.size());
  Bundle& outbox = outboxes_[node];
  if (Bundle::takes(message)) {  // (one part, its own: nothing lent)
    if (!outbox.has_room_for(message.front())) flush_locked(node);
    outbox.add(std::move(message.front()));
    if (flushes_its_outboxes) return;
  } else {
    flush_locked(node);  // what was before it goes before it
    transport_->send(nodes[node].rank, std::move(message), lender);
    pace_.active();
  }
  pump_wake_.notify_one();
}

void Hub::flush_locked(std::size_t node) {
  if (node >= outboxes_.size() || outboxes_[node].empty()) return;
  // Emptied once sent: a send that throws leaves every message, of any
  // call, in place for the next flush. (A node given up on had its outbox
  // emptied then: give_up_on_locked.)
  transport_->send(nodes[node].rank, single_part(outboxes_[node].message()));
  outboxes_[node].clear();
  pace_.active();           // an answer to it, if any, comes soon: poll fast
  pump_wake_.notify_one();  // it polls fast while replies are due
}

void Hub::wake_pump() noexcept {
  pump_wake_.notify_one();
}

void Hub::flush_all_locked() {
  for (std::size_t n = 0; n < outboxes_.size(); ++n)
    flush_locked(n);
}

void Hub::wait_until_sent(std::uint64_t lender) noexcept {
  std::unique_lock lock(mutex);
  try {
    while (transport_ && transport_->lending(lender)) {
      transport_->progress();
      if (!transport_->lending(lender)) return;
      lock.unlock();
      std::this_thread::sleep_for(std::chrono::microseconds(50));
      lock.lock();
    }
  } catch (...) {
    // MPI failed: Open MPI ends the job; nothing is left to wait for.
  }
}

void Hub::local_reply(Buffer message) {
  if (in_local_handle) {  // this thread holds the lock, inside send()
    local_pending_.push_back(std::move(message));
    return;
  }
  std::unique_lock lock(mutex);
  route(0, std::move(message));
  changed.notify_all();
  let_go_released(lock);
}

bool Hub::remote_work_locked() const {
  for (std::size_t n = 1; n < nodes.size(); ++n) {
    if (nodes[n].inflight_chunks != 0) return true;
  }
  return insight_requests != 0 || stopped;
}

void Hub::pump() {
  poll_precisely();
  std::unique_lock lock(mutex);
  bool was_on_the_way = false;
  while (!pump_stop_) {
    bool active = false;
    bool moving = false;  // a message is on its way in or out
    try {
      flush_all_locked();
      moving = !transport_->progress();
      while (auto m = transport_->receive(-1)) {
        route(static_cast<std::size_t>(m->first), std::move(m->second));
        active = true;
      }
      while (auto signal = transport_->receive_signal()) {
        active = true;  // pongs: last_heard has them
        // A node that has not heard from the root a while asks whether it is still there.
        if (signal->second == Signal::ping) transport_->signal(signal->first, Signal::pong);
      }
      watch_silent_nodes_locked();
    } catch (const std::exception& e) {
      // A corrupt message, MPI failing: nothing sensible can go on; say where and end the job.
      std::fprintf(stderr, "procpool::mpi: the root (rank 0 on %s) cannot go on: %s\n",
                   nodes[0].host.c_str(), e.what());
      std::fflush(stderr);
      std::abort();
    }
    if (active) {
      pace_.active();
      changed.notify_all();
    }
    let_go_released(lock);  // calls that replies, or a node given up on, held
    if (active) continue;
    // Poll while replies are due, fast just after a message (see PollPace),
    // slowly otherwise: MPI has no way to wake a thread, and the root's node
    // runs workers on the same cores. A message on its way (a large one in
    // pieces, or one past the eager limit, which takes a few exchanges)
    // moves only while MPI is called: poll fast until it is through. (Paced
    // there too, a warm map of 20k tiny tasks lost a quarter of its speed.)
    // One on its way for long has stalled: paced like a quiet one.
    std::chrono::microseconds wait{20000};
    const bool on_the_way = moving || transport_->receiving();
    if (on_the_way && !was_on_the_way) pace_.active();  // it began to move now
    was_on_the_way = on_the_way;
    if (transport_->moving_large()) {
      wait = std::chrono::microseconds(20);
    } else if (on_the_way && pace_.on_the_way_fast()) {
      wait = PollPace::fastest;
    } else if (on_the_way || remote_work_locked()) {
      wait = pace_.next_wait(std::chrono::microseconds(500));
    }
    pump_wake_.wait_for(lock, wait);
  }
}

void Hub::report_locked(Unobserved u) {
  if (reporter_stop_) {  // the hub has ended (no reply routes after that): stderr only
    say_one(nullptr, u.error, u.message, u.count);
    return;
  }
  if (!reporter_.joinable()) {
    try {
      reporter_ = std::thread([this] { report_loop(); });
    } catch (const std::system_error&) {
      // No thread to spare (ulimit -u): said here, on stderr (a handler must
      // not run with the lock held); the next error tries again.
      say_one(nullptr, u.error, u.message, u.count);
      return;
    }
  }
  unobserved_.push_back(std::move(u));
  reporter_wake_.notify_one();
}

bool Hub::reporting_locked(const PoolState& pool) const {
  return pool.reporting != 0 ||
         std::any_of(unobserved_.begin(), unobserved_.end(),
                     [&](const Unobserved& u) { return u.pool.get() == &pool; });
}

bool Hub::on_reporter_thread() const noexcept {
  return reporter_.get_id() == std::this_thread::get_id();
}

void Hub::report_loop() {
  std::unique_lock lock(mutex);
  for (;;) {
    reporter_wake_.wait(lock, [&] { return !unobserved_.empty() || reporter_stop_; });
    if (unobserved_.empty()) return;  // stopped, everything said
    std::vector<Unobserved> due = std::move(unobserved_);
    unobserved_.clear();
    for (Unobserved& u : due)
      ++u.pool->reporting;
    for (Unobserved& u : due) {
      const auto handler = u.pool->error_handler;  // (a shared_ptr's copy: no throw)
      lock.unlock();
      say_one(handler.get(), u.error, u.message, u.count);
      lock.lock();
    }
    // Each pool's end waits until these are said (wait_said); its owner's
    // reference may be gone right after, so these go without the lock, and
    // with them, perhaps, the hub's last.
    for (Unobserved& u : due)
      --u.pool->reporting;
    changed.notify_all();
    lock.unlock();
    due.clear();
    if (reporter_lost_its_hub) return;
    lock.lock();
  }
}

void Hub::let_go_released(std::unique_lock<std::mutex>& lock) {
  if (released.empty()) return;
  std::vector<std::shared_ptr<CallState>> calls_done = std::move(released);
  released.clear();
  lock.unlock();
  calls_done.clear();
  lock.lock();
}

bool Hub::waiting_on_locked(std::size_t node) const {
  const NodeSlot& n = nodes[node];
  return n.inflight_chunks != 0 || n.insights_due != 0 || (stopped && !n.said_bye);
}

void Hub::watch_silent_nodes_locked() {
  const auto now = Clock::now();
  if (silence_limit_ == Clock::duration::zero() || now - watched_ < watch_interval) return;
  const Clock::duration unwatched = now - watched_;
  const bool first = watched_ == Clock::time_point{};
  watched_ = now;
  if (!first && unwatched > stall) {
    // The root itself did not run (stopped, paused in a debugger, swapping):
    // that time is no node's silence. (What was heard meanwhile counts
    // first, so that an answered ping stays answered.)
    for (NodeSlot& node : nodes) {
      node.heard =
          std::min(now, std::max(node.heard, transport_->last_heard(node.rank)) + unwatched);
      node.pinged = std::min(now, node.pinged + unwatched);
    }
  }
  for (std::size_t n = 1; n < nodes.size(); ++n) {
    NodeSlot& node = nodes[n];
    if (!node.lost.empty()) continue;
    node.heard = std::max(node.heard, transport_->last_heard(node.rank));
    if (!waiting_on_locked(n)) {
      node.heard = now;  // silence counts only while the node owes an answer
      continue;
    }
    const Clock::duration silent = now - node.heard;
    const bool ping_unanswered = node.pinged > node.heard;
    if (silent >= silence_limit_ && ping_unanswered && now - node.pinged >= silence_limit_ / 4) {
      give_up_on_locked(n, seconds(silent));
    } else if (silent >= silence_limit_ / 4 && now - node.pinged >= silence_limit_ / 4) {
      transport_->signal(node.rank, Signal::ping);
      node.pinged = now;
    }
  }
}

void Hub::give_up_on_locked(std::size_t node, double silent) {
  NodeSlot& n = nodes[node];
  char said[160];
  std::snprintf(said, sizeof said,
                "has not answered for %.1f s (stopped, frozen, or cut off from the root; "
                "PROCPOOL_MPI_NODE_TIMEOUT sets how long is too long)",
                silent);
  const std::string where = n.host + ":" + std::to_string(n.rank);
  if (transport_->lending_to(n.rank)) {
    // MPI cannot take back a send: it would read the caller's inputs after
    // the call returned, should the node come back.
    end_job_without(
        "procpool::mpi: node " + where + " " + said +
            " while inputs were on their way to it from the caller's memory; ending the job",
        1);
  }
  std::fprintf(stderr,
               "procpool::mpi: node %s %s: the inputs it holds fail, it gets no more work, and the "
               "job ends with an error when the root's Session ends\n",
               where.c_str(), said);
  std::fflush(stderr);
  n.lost = said;
  // What waits in its outbox is never sent: its chunks fail below, with the rest.
  if (node < outboxes_.size()) outboxes_[node] = Bundle{};
  // Its chunks fail as if it had replied so, each input with why.
  std::vector<std::uint64_t> ids;
  for (const auto& [id, record] : chunks)
    if (record.node == node) ids.push_back(id);
  for (std::uint64_t id : ids)
    fail_chunk_of_lost_node_locked(id);
  // Insights it owes: an empty row.
  for (auto& [request, replies] : insight_replies) {
    if (replies.contains(node)) continue;
    replies[node] = procpool::Insights{};
    --insight_requests;
  }
  n.insights_due = 0;
  transport_->give_up_on(n.rank);
  changed.notify_all();
}

void Hub::fail_chunk_of_lost_node_locked(std::uint64_t id) {
  const ChunkRecord& record = chunks.at(id);
  const std::size_t node = record.node;
  Buffer reply = new_message(Msg::chunk_done);
  Writer w(reply);
  w.put(record.call);
  w.put(id);
  w.put(0.0);
  w.put(0.0);
  w.put(0.0);
  w.put(static_cast<std::uint64_t>(record.count));
  for (std::size_t i = 0; i < record.count; ++i) {
    w.put(record_lost_here);
    save_error(w, std::make_exception_ptr(Error("procpool::mpi: input " +
                                                std::to_string(record.first + i) +
                                                " did not finish: its node " + nodes[node].lost)));
  }
  route(node, std::move(reply), true);
  changed.notify_all();  // (from Hub::send, no message wakes the waiters)
}

void Hub::route(std::size_t node, Buffer message, bool made_here) {
  const std::size_t bytes = message.size();
  Msg type{};
  Reader in = message_body(message, type);
  NodeSlot& from = nodes[node];  // (when it was heard: the transport's last_heard)
  if (type == Msg::bye) {
    from.said_bye = true;
    return;
  }
  // A late answer from a node given up on: what it held has failed already.
  if (!from.lost.empty() && !made_here) return;
  if (type == Msg::bundle) {
    for (Buffer& m : unbundle(in))
      route(node, std::move(m), made_here);
    return;
  }
  switch (type) {
    case Msg::chunk_done: {
      const auto call = in.get<std::uint64_t>();
      const auto chunk = in.get<std::uint64_t>();
      const auto node_seconds = in.get<double>();
      const auto run_seconds = in.get<double>();
      const auto worker_seconds = in.get<double>();
      const auto count = in.get<std::uint64_t>();
      auto it = chunks.find(chunk);
      if (it == chunks.end() || it->second.count != count || it->second.call != call) {
        throw ProtocolError("procpool::mpi: a reply from rank " + std::to_string(node) +
                            " for a chunk the root did not send");
      }
      ChunkRecord record = std::move(it->second);
      chunks.erase(it);
      // Let go of (see ChunkRecord::owner) only outside the lock, even if
      // what follows throws: the record must not hold the last reference.
      if (record.owner) released.push_back(record.owner);
      --nodes[record.node].inflight_chunks;
      nodes[record.node].inflight_items -= record.count;
      PoolState& pool = *record.pool;
      --pool.inflight_chunks;
      NodeStats& s = pool.stats[record.node];
      const double round_trip = seconds(Clock::now() - record.sent);
      if (!made_here) {  // not work the node did
        ++s.chunks;
        s.tasks += record.count;
        s.node_seconds += node_seconds;
        s.round_trip_seconds += round_trip;
        s.bytes_received += bytes;
      }
      auto c = calls.find(call);
      if (c != calls.end()) {
        auto shared = std::make_shared<const Buffer>(std::move(message));
        c->second->receive(
            record,
            NodeTimes{run_seconds, worker_seconds, std::max(0.0, round_trip - node_seconds),
                      record.bytes + bytes},
            in, shared);
      } else if (record.report_if_orphaned) {
        // A dropped Future's task: nobody will see its error unless it is said.
        for (std::uint64_t i = 0; i < count; ++i) {
          const auto tag = in.get<std::uint8_t>();
          if (tag == 1) {
            in.take(record.value_size != 0 ? record.value_size
                                           : static_cast<std::size_t>(in.get<std::uint64_t>()));
            continue;
          }
          report_unobserved(record.pool,
                            load_error(in, record.first + i, nodes[node].rank, nodes[node].host));
          if (tag == record_not_run_here || tag == record_died_here)
            in.take(static_cast<std::size_t>(in.get<std::uint64_t>()));
        }
      }
      return;
    }
    case Msg::insights_reply: {
      const auto request = in.get<std::uint64_t>();
      insight_replies[request][node] = load_insights(in);
      --insight_requests;
      if (from.insights_due != 0) --from.insights_due;
      return;
    }
    default:
      throw ProtocolError("procpool::mpi: the root got a message of unknown type " +
                          std::to_string(static_cast<int>(type)) + " from rank " +
                          std::to_string(node));
  }
}

// ---- CallState --------------------------------------------------------------

CallState::CallState(std::shared_ptr<PoolState> pool, Buffer setup, std::unique_ptr<InputFeed> feed,
                     CallHandle::Order order, std::optional<std::size_t> total, bool submitted,
                     std::size_t value_size)
    : pool_(std::move(pool)),
      hub_(*pool_->hub),
      setup_(std::move(setup)),
      feed_(std::move(feed)),
      order_(order),
      total_(total),
      submitted_(submitted),
      value_size_(value_size),
      estimate_key_(std::hash<std::string_view>{}(
          std::string_view(reinterpret_cast<const char*>(setup_.data()), setup_.size()))) {
  std::unique_lock lock(hub_.mutex);
  if (hub_.stopped) {
    throw Error("procpool::mpi::Pool: the Session has ended; create pools while it lives");
  }
  // Accepted here, or not at all: a close() since the caller's check_open()
  // (its setup, the caller's code, may take long) refuses it; join() waits
  // for a submitted task from here on, until its chunk is out (start()).
  if (pool_->closed)
    throw PoolClosed("procpool::mpi::Pool: the pool was closed; no more work is accepted");
  // A call of the same code and arguments as an earlier one starts from what
  // that one measured, instead of from one measuring chunk per node.
  // It weighs as one task per worker, so this call's own first replies
  // outweigh it (its inputs may be harder), and until one has come each node
  // gets two chunks at most (capacity_locked).
  if (auto known = pool_->estimates.find(estimate_key_); known != pool_->estimates.end()) {
    task_seconds_ = known->second.measured_seconds / known->second.measured_tasks;
    measured_tasks_ = std::max(1.0, static_cast<double>(pool_->total_processes()));
    measured_seconds_ = task_seconds_ * measured_tasks_;
    transit_seconds_ = known->second.transit_seconds;
    started_warm_ = true;
  }
  id_ = ++hub_.next_id;
  opened_.assign(hub_.nodes.size(), false);
  hub_.calls[id_] = this;
  if (pool_->options.progress.mode() != Progress::Mode::off) {
    progress_ =
        std::make_unique<procpool::detail::ProgressReporter>(pool_->options.progress, total);
  }
  if (submitted_) {  // last: nothing after it throws, so its destructor will release it
    ++pool_->encoding_chunks;
    holds_submit_ = true;
  }
}

void CallState::start() {
  // A submitted task runs whether or not anyone waits for it. (Not in the
  // constructor: its chunk may hold the call, see ChunkRecord::owner.)
  std::unique_lock lock(hub_.mutex);
  if (!submitted_) return;
  try {
    top_up(lock);
  } catch (...) {
    release_submit_locked();
    throw;
  }
  release_submit_locked();
}

void CallState::release_submit_locked() {
  if (!std::exchange(holds_submit_, false)) return;
  --pool_->encoding_chunks;
  if (pool_->closed) hub_.changed.notify_all();  // join() may be waiting for it
}

void CallState::abandon() {
  std::lock_guard lock(hub_.mutex);
  abandoned_ = submitted_;  // a map's handle ends with its call: nothing to report
  if (!abandoned_) return;
  // Its reply may have come already, unread: its error, if any, is said now.
  for (const auto& [first, chunk] : ready_) {
    const OutcomeRun& run = chunk.outcomes;
    for (std::size_t i = chunk.next; i < run.each.size(); ++i) {
      if (run.each[i].error) report_unobserved(pool_, run.each[i].error);
    }
  }
}

void CallState::wait_until_inputs_sent() noexcept {
  bool lent = false;
  {
    std::lock_guard lock(hub_.mutex);
    lent = lent_;
  }
  if (lent) hub_.wait_until_sent(id_);
}

void CallState::finish_progress_quietly(const char* how) noexcept {
  std::unique_ptr<procpool::detail::ProgressReporter> reporter;
  std::size_t due = 0;
  bool done = false;
  {
    std::lock_guard lock(hub_.mutex);
    reporter = std::move(progress_);
    due = std::exchange(progress_due_, 0);
    done = finished_locked() && !range_failure_;
  }
  if (!reporter) return;
  try {
    if (due != 0) reporter->advance(due);
    reporter->finish(how != nullptr ? how : done ? "done" : "stopped");
  } catch (...) {
    // A callback that throws as its call's handle goes: there is no one to
    // tell, and a destructor cannot throw.
  }
}

CallState::~CallState() {
  {
    std::lock_guard lock(hub_.mutex);
    hub_.calls.erase(id_);  // first: no reply reaches it from here on
    release_submit_locked();
  }
  // Its handle did this on the caller's thread already; this one may be the
  // pump's (a dropped Future's chunk held the call), which must not wait on
  // a callback.
  finish_progress_quietly();
  std::lock_guard lock(hub_.mutex);
  if (hub_.stopped || submitted_) return;  // a submitted call ends on the node by itself
  for (std::size_t n = 0; n < opened_.size(); ++n) {
    if (!opened_[n]) continue;
    Buffer m = new_message(Msg::close_call);
    Writer(m).put(id_);
    try {
      hub_.send(n, std::move(m));
    } catch (...) {
      // The node keeps the call's code until it ends; harmless.
    }
  }
}

bool CallState::front_ready_locked() const {
  if (ready_.empty()) return false;
  const auto& [first, chunk] = *ready_.begin();
  return order_ == CallHandle::Order::completion || first + chunk.next == next_index_;
}

bool CallState::pop_locked(OutcomeRun& out, std::size_t most) {
  if (!front_ready_locked()) return false;
  auto front = ready_.begin();
  ReadyChunk& chunk = front->second;
  OutcomeRun& from = chunk.outcomes;
  const std::size_t n = std::min(most, from.count - chunk.next);
  out.first = from.first + chunk.next;
  out.count = n;
  out.rank = from.rank;
  out.keep = from.keep;
  out.stride = from.stride;
  out.size = from.size;
  out.each.clear();
  if (from.values != nullptr) {
    out.values = from.values + chunk.next * from.stride;
  } else {
    out.values = nullptr;
    const auto begin = from.each.begin() + static_cast<std::ptrdiff_t>(chunk.next);
    out.each.assign(std::make_move_iterator(begin),
                    std::make_move_iterator(begin + static_cast<std::ptrdiff_t>(n)));
  }
  chunk.next += n;
  if (chunk.next == from.count) ready_.erase(front);
  delivered_ += n;
  if (order_ == CallHandle::Order::input) next_index_ += n;
  return true;
}

void CallState::tell_progress(std::unique_lock<std::mutex>& lock, bool finished) {
  // On the caller's thread and without the lock, as procpool::Pool does: the
  // callback may throw (the call then stops, and the caller gets it) or use
  // the pool. The replies only count the tasks done (the pump's thread).
  if (!progress_) return;
  const std::size_t done = std::exchange(progress_due_, 0);
  if (done == 0 && !finished) return;
  auto reporter = std::move(progress_);  // (a throw leaves it gone: never called again)
  lock.unlock();
  try {
    if (done != 0) reporter->advance(done);
    if (finished) reporter->finish("done");
  } catch (...) {
    lock.lock();
    broken_ = std::current_exception();  // the call stops: its next step throws it again
    throw;
  }
  lock.lock();
  if (!finished) progress_ = std::move(reporter);
}

/// Tops the call up; a pool that has ended meanwhile is what it returns (the
/// outcomes of the chunks out are still handed over, as Pool does: after
/// terminate() the nodes answer for them, with PoolClosed or their values).
std::exception_ptr CallState::top_up_unless_closed(std::unique_lock<std::mutex>& lock) {
  try {
    top_up(lock);
  } catch (const PoolClosed&) {
    return std::current_exception();
  }
  return nullptr;
}

bool CallState::next_run(OutcomeRun& out, std::size_t most) {
  std::unique_lock lock(hub_.mutex);
  for (;;) {
    const std::exception_ptr closed = top_up_unless_closed(lock);
    tell_progress(lock, false);
    if (pop_locked(out, most)) return true;
    if (closed && chunks_out_ == 0) std::rethrow_exception(closed);
    if (finished_locked() && ready_.empty()) {
      if (range_failure_) {
        broken_ = range_failure_;  // read again, the call throws it again (top_up)
        std::rethrow_exception(range_failure_);
      }
      out = OutcomeRun{};
      tell_progress(lock, true);
      return false;
    }
    if (hub_.stopped) throw Error("procpool::mpi::Pool: the Session ended during a call");
    hub_.changed.wait_for(lock, std::chrono::milliseconds(100));
  }
}

bool CallState::wait_until(Clock::time_point deadline) {
  std::unique_lock lock(hub_.mutex);
  for (;;) {
    const std::exception_ptr closed = top_up_unless_closed(lock);
    tell_progress(lock, false);
    if (front_ready_locked() || finished_locked()) return true;
    if (closed && chunks_out_ == 0) std::rethrow_exception(closed);
    const auto now = Clock::now();
    if (now >= deadline) return false;
    hub_.changed.wait_until(lock, std::min(deadline, now + std::chrono::milliseconds(100)));
  }
}

std::exception_ptr CallState::decode_error(const RawOutcome& raw) {
  std::string host;
  {
    std::lock_guard lock(hub_.mutex);
    host = hub_.nodes[static_cast<std::size_t>(raw.rank)].host;
  }
  try {
    throw;
  } catch (const std::exception& e) {
    return std::make_exception_ptr(
        OnNode<TaskError>(raw.rank, host, raw.index, procpool::detail::demangle(typeid(e).name()),
                          e.what(), TaskError::Stage::deserialize_result));
  } catch (...) {
    return std::make_exception_ptr(OnNode<TaskError>(raw.rank, host, raw.index, "unknown",
                                                     "an exception not derived from std::exception",
                                                     TaskError::Stage::deserialize_result));
  }
}

std::size_t CallState::capacity_locked(std::size_t node) const {
  // Enough chunks that the node never waits for the next one to arrive.
  // Automatic ~50 ms node chunks: one running, one queued, one travelling;
  // but until this call's first reply has measured the task time, one (a
  // node runs the chunks that wait together as one batch, whose reply comes
  // last), or two when an earlier call of the same code left an estimate:
  // then a call of less work than a round trip crosses in one, not two (a
  // warm map of 20k tiny tasks over 2 nodes: medians 1.13-2.01 ms against
  // 1.60-2.78 in 4 alternating rounds), and inputs harder than the
  // estimate's hold a node for two chunks at most.
  if (pool_->options.chunksize == 0) {
    if (replies_ != 0) return 3;
    // The first round: a chunk per worker, of a task each (chunk_size_locked).
    if (measuring_locked()) return pool_->processes[node];
    return first_round_chunks;
  }
  // An explicit chunksize: one chunk per worker and as many more as run in
  // the time one takes to travel there and back (tiny tasks, chunksize 1:
  // many, which the node then runs together as one batch).
  const std::size_t workers = pool_->processes[node];
  const std::size_t least = 2 * workers + 1;
  const double chunk_seconds = task_seconds_ * static_cast<double>(pool_->options.chunksize);
  if (chunk_seconds <= 0 || transit_seconds_ <= 0) return least;
  const double to_cover = static_cast<double>(workers) * transit_seconds_ / chunk_seconds;
  return std::clamp(least + static_cast<std::size_t>(to_cover), least,
                    max_chunks_per_worker * workers);
}

bool CallState::long_tasks_locked() const {
  return pool_->options.chunksize == 0 && task_seconds_ >= long_task_seconds;
}

bool CallState::measuring_locked() const {
  return pool_->options.chunksize == 0 && !submitted_ && task_seconds_ <= 0 && replies_ == 0;
}

bool CallState::last_rounds_of_long_tasks_locked() const {
  if (!long_tasks_locked() || !total_) return false;
  return *total_ - std::min(*total_, taken_) <= 2 * std::size_t{pool_->total_processes()};
}

std::size_t CallState::room_locked(std::size_t n) const {
  const NodeSlot& node = hub_.nodes[n];
  const std::size_t workers = pool_->processes[n];
  if (workers == 0) return 0;  // the rank's node-mates have its node's CPUs
  if (!node.lost.empty()) return 0;
  // A submitted task goes at once, wherever (the least loaded node): it must
  // run whether or not anyone waits for its Future, and join() waits for it.
  if (submitted_) return 1;
  if (long_tasks_locked()) {
    // Near the end, long tasks go to free workers only: the last ones then
    // run wherever a worker frees up first, instead of queueing behind a busy
    // node while another idles.
    // Until the end is near, two more tasks per worker wait on the node (in
    // its Pool's queue: a long task waits for an idle worker there, see
    // runs_alone_locked), to hide that round trip: with one, a worker that
    // starts its queued task at once keeps the core that the reply and the
    // next task need to travel (64 x 50 ms on 2 workers, 3 ranks on 2 cores:
    // 1669-1690 ms with one, 1627-1649 with two, in chunks of a task per
    // worker). In chunks of one task, each its own reply (chunk_size_locked),
    // two more per worker still did better than one: efficiency 0.989-0.996
    // against 0.961-0.992 there, and on 4 ranks of 4 sleeping workers
    // 0.983-0.987 against one call of 0.795 in six.
    const std::size_t limit = last_rounds_of_long_tasks_locked() ? workers : 3 * workers;
    return node.inflight_items >= limit ? 0 : limit - node.inflight_items;
  }
  if (node.inflight_chunks >= capacity_locked(n)) return 0;
  return chunk_size_locked(n);
}

double CallState::load_locked(std::size_t n) const {
  const NodeSlot& node = hub_.nodes[n];
  if (long_tasks_locked()) {
    return static_cast<double>(node.inflight_items) / pool_->processes[n];
  }
  return static_cast<double>(node.inflight_chunks) / static_cast<double>(capacity_locked(n));
}

std::size_t CallState::chunk_size_locked(std::size_t node) const {
  if (pool_->options.chunksize != 0) {
    // No larger than what is left of a sized range: a chunksize of
    // SIZE_MAX (CPython's test_map_chunksize) is the whole call.
    if (!total_) return pool_->options.chunksize;
    return std::clamp<std::size_t>(*total_ - std::min(*total_, taken_), 1,
                                   pool_->options.chunksize);
  }
  const double workers = pool_->processes[node];
  // The first round measures: a task per worker, one per chunk (below). Long
  // tasks then go one per chunk too, each run apart on its node
  // (runs_alone_locked): its reply frees its worker's slot as soon as it ends,
  // and the root sends the next task to whichever node has a worker free. In
  // chunks of a task per worker, a chunk's reply waited for its slowest task,
  // and so did the node's workers that had run the others: 64 tasks of 20-180
  // ms on 4 nodes of 4 workers (sleeping, 4 ranks on 2 cores) took 648-734 ms,
  // now 496-511, where one task at a time to the first free worker takes 500.
  // Sized by work (3 of 50.7 ms on 4 workers), a chunk left a worker without a
  // queued task while another node held three chunks. The root sends a node a
  // chunk per task time (a hundred a second at 10 ms); they travel bundled.
  // (One per chunk was measured worse on 16 cores in the last rounds,
  // 0.796-0.798 against 0.97-0.995, before the node's threads heard their
  // replies at once: see Engine::Impl::pump_round.)
  if (long_tasks_locked()) return 1;
  // The first round, before any task is timed, goes one task per chunk too,
  // each run apart: sent as one chunk of a task per worker, it ran as one
  // batch, whose reply waited for its slowest task, and so did the node's
  // other workers. A first call of mixed long tasks (64 of 20-180 ms on 4
  // nodes of 4 sleeping workers) took 541-582 ms, now 510-516, where greedy
  // dealing takes 500. Tiny tasks pay a message per worker once per code
  // (the estimate is kept for the pool's next calls of it).
  if (measuring_locked()) return 1;
  std::size_t size = static_cast<std::size_t>(workers);
  if (task_seconds_ > 0) {
    size = static_cast<std::size_t>(
        std::clamp(node_chunk_seconds * workers / task_seconds_, 1.0, max_node_chunk));
  }
  if (total_) {
    // Near the end, smaller chunks: every node finishes at about the same
    // time; but none so small that its round trip costs more than it saves.
    const double left = static_cast<double>(*total_ - std::min(*total_, taken_));
    // (At least one: every node with workers may have been given up on.)
    const double all_workers = std::max(1u, pool_->total_processes());
    double share = std::ceil(left * workers / (2.0 * all_workers));
    if (task_seconds_ > 0) {
      const double least_seconds = transit_seconds_ > 0
                                       ? std::min(tail_chunk_seconds, transit_seconds_)
                                       : tail_chunk_seconds;
      share = std::max(share, std::ceil(least_seconds * workers / task_seconds_));
      // A call that started from an earlier call's estimate: its first
      // chunks, as many per node as a node may hold before the call's first
      // reply, carry the whole call when it fits in them, each node's share
      // in even chunks, rather than in chunks each a fraction of the one
      // before (three quarters, on two nodes of one worker), which leave
      // part of it (a third there) for a second round trip.
      if (started_warm_ &&
          chunks_out_ + replies_ < first_round_chunks * pool_->nodes_with_workers()) {
        const double whole = static_cast<double>(*total_);
        share = std::max(share, std::ceil(whole * workers / (first_round_chunks * all_workers)));
      }
    }
    size = std::min(size, static_cast<std::size_t>(std::max(1.0, share)));
  }
  return std::max<std::size_t>(size, 1);
}

std::size_t CallState::inflight_bound_locked() const {
  if (pool_->options.max_inflight != 0) return pool_->options.max_inflight;
  // Saturating: an explicit chunksize near SIZE_MAX over an unsized range
  // would overflow it (and then bound nothing, or stop every send).
  constexpr std::size_t most = std::numeric_limits<std::size_t>::max();
  std::size_t bound = 0;
  for (std::size_t n = 0; n < hub_.nodes.size(); ++n) {
    const std::size_t chunk = chunk_size_locked(n);
    const std::size_t capacity = capacity_locked(n);
    const std::size_t node_bound =
        capacity != 0 && chunk > most / capacity ? most : capacity * chunk;
    bound = node_bound > most - bound ? most : bound + node_bound;
  }
  return std::max<std::size_t>(1024, bound > most / 2 ? most : 2 * bound);
}

void CallState::top_up(std::unique_lock<std::mutex>& lock) {
  if (broken_) std::rethrow_exception(broken_);
  // (Nested: the caller's range, read without the lock, may run another call.)
  const bool flushing_already = std::exchange(flushes_its_outboxes, true);
  struct Restore {
    bool was;
    ~Restore() { flushes_its_outboxes = was; }
  } restore{flushing_already};
  try {
    while (!lost_.empty())  // (more may be lost while it reads)
      write_lost_again(lock);
    send_retries_locked();
    send_new_chunks(lock);
    // What waits in the outboxes goes now, not on the pump's next turn.
    hub_.flush_all_locked();
  } catch (...) {
    broken_ = std::current_exception();
    hub_.wake_pump();  // it sends what this left in the outboxes
    throw;
  }
}

void CallState::send_new_chunks(std::unique_lock<std::mutex>& lock) {
  Clock::duration reading{};  // in the caller's range, this top-up (not sending)
  while (!exhausted_ && taken_ - delivered_ < inflight_bound_locked()) {
    if (front_ready_locked() && reading > read_ahead_while_ready) return;
    if (total_ && taken_ >= *total_) {
      // Every input was taken (a submitted task's one): nothing more to ask
      // the range, even of a pool that has ended since.
      exhausted_ = true;
      break;
    }
    if (pool_->ended) {
      throw PoolClosed(
          "procpool::mpi::Pool: the pool was ended (join() or terminate()) before this call had "
          "taken all its inputs; those it took have had their outcomes, the rest were left "
          "unread: consume a call's results before join(), or start it on a new pool");
    }
    if (hub_.stopped) return;
    const std::size_t best = least_loaded_with_room_locked(hub_.nodes.size());
    if (best == hub_.nodes.size()) {
      if (pool_->others_have_workers(hub_.nodes.size())) return;
      fail_next_input(lock);
      continue;
    }
    std::size_t size = std::min(room_locked(best), chunk_size_locked(best));
    // (Each input takes a byte at least: no more are read. The in-flight
    // bound then sees what the chunk can hold, not a count it cannot.)
    if (pool_->options.chunksize != 0) size = std::min(size, node_chunk_bytes);
    // Options::max_inflight bounds the inputs taken and not yet handed back:
    // a chunk takes no more than it leaves room for. The automatic bound is
    // only a guard: rather than a sliver, the chunk waits for the consumer.
    const std::size_t in_bound = inflight_bound_locked() - (taken_ - delivered_);
    if (in_bound < size) {
      // (With nothing out, no reply would come to make room: it goes.)
      if (pool_->options.max_inflight == 0 && taken_ != delivered_) return;
      size = in_bound;
    }
    const std::uint64_t chunk = ++hub_.next_id;
    const std::size_t first = taken_;
    std::size_t count = 0;
    std::exception_ptr failed;        // this input's save() threw
    std::exception_ptr range_failed;  // the range threw: the inputs read before still go
    bool end = false;
    Buffer message = new_message(Msg::chunk);
    Writer w(message);
    w.put(id_);
    w.put(chunk);
    const std::size_t count_at = w.size();
    w.put(std::uint64_t{0});
    w.put(runs_alone_locked());
    // Large inputs go to another rank from where they are, not copied into
    // the message: the caller's memory is not held twice (see lent_). For
    // the root's own node they are copied once, below, into a message of
    // its final size: one grown input by input would copy what it held at
    // each growth.
    std::vector<LentBlock> lent;
    if (feed_->inputs_stay_put()) w.lend_blocks(lent, lend_at_least);
    Parts parts;
    const auto started = Clock::now();
    // Reserved while the inputs are encoded (nothing from here to the try
    // below throws: every path out of it gives them back).
    ++hub_.nodes[best].inflight_chunks;
    hub_.nodes[best].inflight_items += size;
    ++pool_->encoding_chunks;
    const bool cut_when_slow = pool_->options.chunksize == 0;
    std::size_t next_clock_check = 1;
    lock.unlock();
    try {
      // The range is read without the lock: its code is the caller's.
      const std::size_t most_bytes = cut_when_slow ? SIZE_MAX : node_chunk_bytes;
      while (count < size && w.size() - count_at < most_bytes) {
        // An automatic chunk holds what the range gives in a moment: one
        // that reads slowly (a stream) goes in small chunks, which run as it
        // is read, rather than a node's whole share read first. The clock is
        // read after 1, 2, 4 ... 64 inputs, then every 64: a read costs
        // several times what encoding an int does (26 against 4.6 ns here).
        if (cut_when_slow && count >= next_clock_check) {
          if (Clock::now() - started > read_ahead_while_ready) break;
          next_clock_check = count < 64 ? 2 * count : count + 64;
        }
        const std::size_t room_bytes = most_bytes - (w.size() - count_at);
        if (const std::size_t block = feed_->next_block(w, size - count, room_bytes); block != 0) {
          count += block;
          continue;
        }
        const InputFeed::Fed fed = feed_->next(w, failed);
        if (fed == InputFeed::Fed::broke) range_failed = std::exchange(failed, nullptr);
        if (fed == InputFeed::Fed::end || fed == InputFeed::Fed::broke) {
          end = true;
          break;
        }
        if (fed == InputFeed::Fed::failed) break;
        ++count;
      }
      const std::uint64_t n = count;
      std::memcpy(message.data() + count_at, &n, sizeof n);
      parts = with_lent_blocks(std::move(message), lent);
      // The root's own node takes one message (Hub::send); joined here, the
      // copy does not hold up the hub (MPI's progress) as it would there.
      if (best == 0 && parts.size() > 1) parts = single_part(joined(std::move(parts)));
    } catch (...) {
      lock.lock();
      done_encoding_locked();
      --hub_.nodes[best].inflight_chunks;
      hub_.nodes[best].inflight_items -= size;
      throw;
    }
    lock.lock();
    done_encoding_locked();
    reading += Clock::now() - started;
    pool_->encode_seconds += seconds(Clock::now() - started);
    exhausted_ = end;
    range_failure_ = range_failed;
    hub_.nodes[best].inflight_items -= size - count;
    if (count == 0 || pool_->ended) {
      --hub_.nodes[best].inflight_chunks;
      hub_.nodes[best].inflight_items -= count;
    }
    if (pool_->ended) {
      // The pool ended (terminate() from another thread) while the inputs
      // were encoded: the nodes have ended it, and the inputs read fail as
      // those of the chunks in flight do; the loop then ends the call.
      fail_on_root_locked(first, count,
                          std::make_exception_ptr(PoolClosed(
                              "procpool::mpi::Pool: the pool was ended (join() or terminate()) "
                              "before this input could be sent")));
      taken_ += count;
    } else if (count != 0) {
      ChunkRecord r;
      r.first = first;
      r.count = count;
      r.node = best;
      taken_ += count;
      lent_ = lent_ || (best != 0 && !lent.empty());
      send_chunk_locked(chunk, std::move(r), std::move(parts));
    }
    if (failed) {
      fail_on_root_locked(taken_, 1, failed);
      ++taken_;
    }
  }
}

void CallState::fail_on_root_locked(std::size_t first, std::size_t count,
                                    const std::exception_ptr& error) {
  if (count == 0) return;
  OutcomeRun& run = ready_[first].outcomes;
  run.first = first;
  run.count = count;
  for (std::size_t i = first; i < first + count; ++i)
    run.each.push_back(RawOutcome{i, nullptr, 0, error, 0});
  if (abandoned_) report_unobserved(pool_, error);
  progress_due_ += count;
}

void CallState::done_encoding_locked() {
  --pool_->encoding_chunks;
  if (pool_->closed) hub_.changed.notify_all();  // join() may be waiting for it
}

void CallState::receive(const ChunkRecord& chunk, const NodeTimes& times, Reader& records,
                        const std::shared_ptr<const Buffer>& message) {
  const NodeSlot& node = hub_.nodes[chunk.node];
  std::size_t failures = 0;
  std::size_t again = 0;  // inputs sent to run again elsewhere
  if (all_bare_values(records, chunk.count)) {
    // Every input succeeded with a fixed-size value: the consumer reads them
    // in place, without a record per input.
    OutcomeRun& ready = ready_[chunk.first].outcomes;
    ready.first = chunk.first;
    ready.count = chunk.count;
    ready.rank = node.rank;
    ready.keep = message;
    ready.values = records.position() + 1;
    ready.stride = 1 + value_size_;
    ready.size = value_size_;
  } else {
    // The outcomes as runs of consecutive inputs: an input that runs again
    // elsewhere leaves a gap, which its own reply fills later.
    OutcomeRun* run = nullptr;
    auto keep = [&](RawOutcome o) {
      if (run == nullptr) {
        run = &ready_[o.index].outcomes;
        run->first = o.index;
        run->rank = node.rank;
        run->keep = message;
        run->each.reserve(chunk.count);
      }
      run->each.push_back(std::move(o));
      ++run->count;
    };
    // Inputs the node could not run: to another node, unless it is the
    // pool's last (then they fail, as on a one-node pool). Inputs whose
    // worker died there: to another node while they have retries left.
    std::vector<RawOutcome> sent_back;
    std::vector<RawOutcome> died;
    const bool send_elsewhere = pool_->others_have_workers(chunk.node);
    const bool retry_deaths = chunk.attempts < pool_->options.retries;
    for (std::size_t i = 0; i < chunk.count; ++i) {
      const std::size_t index = chunk.first + i;
      RawOutcome o;
      o.index = index;
      o.rank = node.rank;
      const auto tag = records.get<std::uint8_t>();
      if (tag == 1) {
        o.size =
            value_size_ != 0 ? value_size_ : static_cast<std::size_t>(records.get<std::uint64_t>());
        o.data = records.take(o.size);
        keep(std::move(o));
        continue;
      }
      o.error = load_error(records, index, node.rank, node.host);
      ++failures;
      if (tag == record_lost_here && retry_deaths && !submitted_ && !abandoned_) {
        // Read again from the range by the consumer (write_lost_again).
        lost_.push_back(Retry{index, chunk.attempts + 1, chunk.node, nullptr, 0, o.error, false});
        run = nullptr;
        ++again;
        continue;
      }
      if (tag == record_not_run_here || tag == record_died_here) {
        o.size = static_cast<std::size_t>(records.get<std::uint64_t>());
        o.data = records.take(o.size);
        std::vector<RawOutcome>* again_from = tag == record_not_run_here
                                                  ? (send_elsewhere ? &sent_back : nullptr)
                                                  : (retry_deaths ? &died : nullptr);
        if (again_from != nullptr) {
          again_from->push_back(std::move(o));
          run = nullptr;
          continue;
        }
        o.data = nullptr;
        o.size = 0;
      }
      if (abandoned_) report_unobserved(pool_, o.error);
      keep(std::move(o));
    }
    if (!sent_back.empty()) {
      if (pool_->processes[chunk.node] != 0)
        pool_->take_out_of_rotation(chunk.node, sent_back.front().error);
      queue_again_locked(chunk.node, chunk.attempts, sent_back, true);
      again += sent_back.size();
    }
    if (!died.empty()) {
      queue_again_locked(chunk.node, chunk.attempts + 1, died, false);
      again += died.size();
    }
  }
  --chunks_out_;
  ++replies_;
  progress_due_ += chunk.count - again;
  send_retries_locked();
  // A reply of errors alone (its node could not run the call, or every task
  // threw at once) says nothing about how long the tasks take.
  if (failures == chunk.count) return;
  const double workers = pool_->processes[chunk.node];
  if (workers == 0) return;  // a node out of rotation: its times tell nothing now
  // A chunk of long tasks that ended with the one before it in its node's
  // batch ran beside it: its time is in that one's (its reply comes a few
  // microseconds after, with no worker time of its own). Counted, such
  // replies pulled an estimate of 100 ms tasks down to 7-16 ms, and the next
  // call of the same code dealt them as short ones. (The first reply of a
  // batch always carries worker time: tasks that really got shorter still
  // move the estimate.)
  if (long_tasks_locked() && times.worker_seconds <= 0 && times.run_seconds < wall_time_counts_from)
    return;
  const double count = static_cast<double>(chunk.count);
  measured_seconds_ = estimate_decay * measured_seconds_ +
                      estimate_seconds(times, workers, count, pool_->options.chunksize == 0);
  measured_tasks_ = estimate_decay * measured_tasks_ + count;
  task_seconds_ = measured_seconds_ / measured_tasks_;
  const double transit = times.transit_seconds;
  transit_seconds_ = transit_seconds_ == 0 ? transit : 0.5 * transit_seconds_ + 0.5 * transit;
  // At most 64 estimates: a pool that runs ever new arguments starts over.
  if (pool_->estimates.size() >= 64 && !pool_->estimates.contains(estimate_key_))
    pool_->estimates.clear();
  pool_->estimates[estimate_key_] =
      TaskEstimate{measured_seconds_, measured_tasks_, transit_seconds_};
}

void CallState::open_on_locked(std::size_t node) {
  // A submitted call is one chunk on its node, which then forgets it: a
  // retry there opens it again.
  if (opened_[node] && !submitted_) return;
  Buffer open = new_message(Msg::open_call);
  Writer o(open);
  o.put(pool_->id);
  o.put(id_);
  o.put(static_cast<std::uint8_t>(submitted_));
  o.write(setup_.data(), setup_.size());
  pool_->stats[node].bytes_sent += open.size();
  hub_.send(node, std::move(open));
  opened_[node] = true;
}

std::size_t CallState::least_loaded_with_room_locked(std::size_t avoid) const {
  // A retry avoids the node it failed on, but not when the pool has no other:
  // it then runs again there, as on a one-node pool.
  if (avoid < hub_.nodes.size() && !pool_->others_have_workers(avoid)) avoid = hub_.nodes.size();
  std::size_t best = hub_.nodes.size();
  double best_load = 0;
  for (std::size_t n = 0; n < hub_.nodes.size(); ++n) {
    if (n == avoid || room_locked(n) == 0) continue;
    const double load = load_locked(n);
    if (best == hub_.nodes.size() || load < best_load) {
      best = n;
      best_load = load;
    }
  }
  return best;
}

void CallState::write_lost_again(std::unique_lock<std::mutex>& lock) {
  if (lost_.empty()) return;
  std::vector<Retry> lost = std::move(lost_);
  lost_.clear();
  auto inputs = std::make_shared<ChunkInputs>();
  std::vector<std::exception_ptr> failed(lost.size());
  lock.unlock();  // the range is the caller's code
  try {
    Writer w(inputs->bytes);
    for (std::size_t i = 0; i < lost.size(); ++i) {
      const std::size_t at = w.size();
      inputs->starts.push_back(at);
      try {
        if (!feed_->write_again(lost[i].index, w)) failed[i] = lost[i].error;
      } catch (...) {
        w.truncate(at);
        failed[i] = current_serialize_input_error(lost[i].index);
      }
    }
    inputs->starts.push_back(w.size());
  } catch (...) {
    lock.lock();
    throw;
  }
  lock.lock();
  for (std::size_t i = 0; i < lost.size(); ++i) {
    Retry& r = lost[i];
    if (failed[i]) {
      ready_[r.index].outcomes =
          OutcomeRun{r.index,
                     1,
                     hub_.nodes[r.avoid].rank,
                     nullptr,
                     nullptr,
                     0,
                     0,
                     {RawOutcome{r.index, nullptr, 0, failed[i], hub_.nodes[r.avoid].rank}}};
      ++progress_due_;
      continue;
    }
    r.inputs = inputs;
    r.position = i;
    retries_.push_back(std::move(r));
  }
}

void CallState::fail_next_input(std::unique_lock<std::mutex>& lock) {
  std::string lost;
  for (const NodeSlot& n : hub_.nodes) {
    if (!n.lost.empty())
      lost += (lost.empty() ? "" : "; ") + n.host + ":" + std::to_string(n.rank) + " " + n.lost;
  }
  Buffer scratch;
  Writer w(scratch);
  std::exception_ptr failed;
  lock.unlock();
  InputFeed::Fed fed{};
  try {
    fed = feed_->next(w, failed);  // the range is the caller's code: read without the lock
  } catch (...) {
    lock.lock();
    throw;
  }
  lock.lock();
  if (fed == InputFeed::Fed::end || fed == InputFeed::Fed::broke) {
    exhausted_ = true;
    if (fed == InputFeed::Fed::broke) range_failure_ = failed;
    return;
  }
  if (!failed) {
    failed = std::make_exception_ptr(Error("procpool::mpi: input " + std::to_string(taken_) +
                                           " did not run: no node with workers is left to the "
                                           "pool (" +
                                           lost + ")"));
  }
  OutcomeRun& one = ready_[taken_].outcomes;
  one.first = taken_;
  one.count = 1;
  one.each.push_back(RawOutcome{taken_, nullptr, 0, failed, 0});
  if (abandoned_) report_unobserved(pool_, failed);
  ++progress_due_;
  ++taken_;
}

void CallState::send_retries_locked() {
  while (!retries_.empty()) {
    Retry& r = retries_.front();
    if (pool_->ended || hub_.stopped || !pool_->others_have_workers(hub_.nodes.size())) {
      // Nowhere left to run it (the pool ended, or its nodes were given up
      // on): it fails as it did.
      ready_[r.index].outcomes =
          OutcomeRun{r.index,
                     1,
                     hub_.nodes[r.avoid].rank,
                     nullptr,
                     nullptr,
                     0,
                     0,
                     {RawOutcome{r.index, nullptr, 0, r.error, hub_.nodes[r.avoid].rank}}};
      if (abandoned_) report_unobserved(pool_, r.error);
      ++progress_due_;
      retries_.pop_front();
      continue;
    }
    // None with room now: it waits for one (a reply frees room, and sends it
    // from receive()). Never a node given up on (room_locked): a send there
    // fails its chunk at once, in receive(), which would come back here
    // while this loop still holds `r`.
    const std::size_t best = least_loaded_with_room_locked(r.avoid);
    if (best == hub_.nodes.size()) return;
    const std::size_t count = retries_alike_locked(room_locked(best));
    const std::size_t last = r.position + count - 1;
    const std::uint64_t chunk = ++hub_.next_id;
    Buffer message = new_message(Msg::chunk);
    Writer w(message);
    w.put(id_);
    w.put(chunk);
    w.put(static_cast<std::uint64_t>(count));
    w.put(runs_alone_locked());
    w.write(r.inputs->input(r.position),
            static_cast<std::size_t>(r.inputs->input(last) - r.inputs->input(r.position)) +
                r.inputs->input_size(last));
    ChunkRecord record;
    record.first = r.index;
    record.count = count;
    record.node = best;
    record.attempts = r.attempts;
    ++hub_.nodes[best].inflight_chunks;
    hub_.nodes[best].inflight_items += count;
    // A send that throws breaks the call (see top_up), retry and all.
    send_chunk_locked(chunk, std::move(record), single_part(std::move(message)));
    if (!r.sent_back) pool_->stats[r.avoid].moved_away += count;
    retries_.erase(retries_.begin(), retries_.begin() + static_cast<std::ptrdiff_t>(count));
  }
}

std::size_t CallState::retries_alike_locked(std::size_t most) const {
  const Retry& first = retries_.front();
  std::size_t count = 1;
  while (count < retries_.size() && count < most) {
    const Retry& r = retries_[count];
    if (r.inputs != first.inputs || r.position != first.position + count ||
        r.index != first.index + count || r.attempts != first.attempts || r.avoid != first.avoid ||
        r.sent_back != first.sent_back)
      break;
    ++count;
  }
  return count;
}

void CallState::queue_again_locked(std::size_t node, unsigned attempts,
                                   const std::vector<RawOutcome>& inputs, bool sent_back) {
  auto kept = std::make_shared<ChunkInputs>();
  std::size_t bytes = 0;
  for (const RawOutcome& o : inputs)
    bytes += o.size;
  kept->bytes = Buffer(bytes);
  std::size_t at = 0;
  for (const RawOutcome& o : inputs) {
    kept->starts.push_back(at);
    if (o.size != 0) std::memcpy(kept->bytes.data() + at, o.data, o.size);
    at += o.size;
  }
  kept->starts.push_back(at);
  for (std::size_t i = 0; i < inputs.size(); ++i)
    retries_.push_back(Retry{inputs[i].index, attempts, node, kept, i, inputs[i].error, sent_back});
  if (!sent_back) return;
  pool_->stats[node].sent_back += inputs.size();
  pool_->stats[node].tasks -= inputs.size();  // counted with their chunk, but not run there
}

void CallState::send_chunk_locked(std::uint64_t id, ChunkRecord record, Parts message) {
  const std::size_t node = record.node;
  const std::size_t count = record.count;
  std::size_t bytes = 0;
  for (const Buffer& part : message)
    bytes += part.size();
  record.call = id_;
  record.pool = pool_;
  record.sent = Clock::now();
  record.report_if_orphaned = submitted_;
  record.value_size = value_size_;
  record.bytes = bytes;
  // A submitted call stays alive while its task runs: the task may have to
  // run again (a retry, or a node that sends it back) though its Future is gone.
  if (submitted_) record.owner = weak_from_this().lock();
  bool recorded = false;
  try {
    open_on_locked(node);
    hub_.chunks[id] = std::move(record);
    recorded = true;
    ++pool_->inflight_chunks;
    ++chunks_out_;
    hub_.send(node, std::move(message), id_);
  } catch (...) {
    // A send throws only before its message is out (NodeServer::handle
    // queues a chunk only if it can run it; an outbox keeps what it held if
    // the flush before it fails, see flush_locked). The root's own node may have
    // answered inside send() all the same: if so, its reply took the record
    // and every count back already.
    if (!recorded || hub_.chunks.erase(id) != 0) {
      if (recorded) {
        --pool_->inflight_chunks;
        --chunks_out_;
      }
      --hub_.nodes[node].inflight_chunks;
      hub_.nodes[node].inflight_items -= count;
    }
    throw;
  }
  pool_->stats[node].bytes_sent += bytes;
}

bool CallState::all_bare_values(const Reader& records, std::size_t count) const {
  if (value_size_ == 0) return false;
  const std::size_t stride = 1 + value_size_;
  if (records.remaining() != count * stride) return false;  // an error record is among them
  const std::byte* at = records.position();
  for (std::size_t i = 0; i < count; ++i)
    if (at[i * stride] != std::byte{1}) return false;
  return true;
}

// ---- CallHandle -------------------------------------------------------------

CallHandle::CallHandle(std::shared_ptr<PoolState> pool, Buffer setup,
                       std::unique_ptr<InputFeed> feed, Order order,
                       std::optional<std::size_t> total, bool submitted, std::size_t value_size)
    : state_(std::make_shared<CallState>(std::move(pool), std::move(setup), std::move(feed), order,
                                         total, submitted, value_size)) {
  try {
    state_->start();
  } catch (...) {
    // No handle will end the progress line: its chunk, if out, may hold the
    // call, which would end it on the pump's thread.
    state_->finish_progress_quietly("failed");
    throw;
  }
}
CallHandle::~CallHandle() {
  if (!state_) return;
  state_->finish_progress_quietly();  // on the caller's thread, as its calls do
  state_->abandon();
  // The range goes with the handle's owner (StreamCall::view_) right after.
  state_->wait_until_inputs_sent();
}
bool CallHandle::next_run(OutcomeRun& out, std::size_t most) {
  return state_->next_run(out, most);
}
void CallHandle::failed() noexcept {
  state_->finish_progress_quietly("failed");
}
bool CallHandle::wait_until(std::chrono::steady_clock::time_point deadline) {
  return state_->wait_until(deadline);
}
std::exception_ptr CallHandle::decode_error(const RawOutcome& raw) {
  return state_->decode_error(raw);
}

// ---- pools ------------------------------------------------------------------

void PoolState::take_out_of_rotation(std::size_t node, const std::exception_ptr& why) {
  std::string reason = "unknown";
  try {
    std::rethrow_exception(why);
  } catch (const TaskError& e) {
    reason = e.remote_what();  // the initializer's error, not the task's that met it
  } catch (const std::runtime_error& e) {
    reason = e.std::runtime_error::what();  // without OnNode's "(on node ...)": said beside it
  } catch (const std::exception& e) {
    reason = e.what();
  } catch (...) {
  }
  processes[node] = 0;
  stats[node].out_of_rotation = reason;
  const NodeSlot& slot = hub->nodes[node];
  std::fprintf(stderr,
               "procpool::mpi: warning: node %s:%d cannot run this pool's tasks; they go to the "
               "other nodes. Why: %s\n",
               slot.host.c_str(), slot.rank, reason.c_str());
}

std::shared_ptr<PoolState> open_pool(const Options& options, NodePoolFactoryFn* factory,
                                     const void* init, const std::type_info* state_type) {
  if (options.start == Start::in_process) {
    throw Error(
        "procpool::mpi::Pool: Start::in_process is for procpool::Pool; debug the task with it "
        "on one machine");
  }
  auto pool = std::make_shared<PoolState>();
  pool->hub = Hub::current();
  pool->options = options;
  pool->state_type = state_type;
  Hub& hub = *pool->hub;
  std::unique_lock lock(hub.mutex);
  if (hub.stopped) throw Error("procpool::mpi::Pool: the Session has ended");
  pool->id = ++hub.next_id;
  pool->stats.resize(hub.nodes.size());
  std::size_t nodes_with_workers = 0;
  for (std::size_t n = 0; n < hub.nodes.size(); ++n) {
    // The node's CPUs (or Options::processes) shared out among its ranks:
    // a rank whose share is none gets no pool and no chunk.
    const RankShare& share = hub.nodes[n].share;
    pool->processes.push_back(options.processes != 0 ? split_workers(options.processes, share)
                                                     : share.automatic);
    nodes_with_workers += pool->processes.back() != 0 ? 1 : 0;
  }
  // A task whose worker died is run again on another node, should the cause
  // be the node's (its memory, a library, a disk): the nodes' own pools then
  // do not retry. On one node, its pool retries, as procpool::Pool does.
  pool->root_retries = options.retries != 0 && nodes_with_workers > 1;
  // Every node makes its pool on a thread of its own (NodeServer::create_pool;
  // with Start::fork_server that runs the initializer), the root's own node
  // (0) too: it is asked last.
  for (std::size_t k = 1; k <= hub.nodes.size(); ++k) {
    const std::size_t n = k % hub.nodes.size();
    const unsigned workers = pool->processes[n];
    if (workers == 0) continue;
    Buffer message = new_message(Msg::create_pool);
    Writer w(message);
    w.put(pool->id);
    Options sent = options;
    sent.processes = workers;
    if (pool->root_retries) sent.retries = 0;
    sent.progress = Progress::off;  // the root draws progress over every node
    sent.insights = nullptr;
    save_options(w, sent);
    procpool::detail::save_code_ref(w, procpool::detail::code_ref_of(factory));
    w.put(static_cast<std::uint8_t>(init != nullptr));
    if (init != nullptr) procpool::detail::save_code_ref(w, procpool::detail::code_ref(init));
    // NodeServer::PoolEntry::send_back_deaths: the root, not the node, retries.
    w.put(static_cast<std::uint8_t>(pool->root_retries));
    pool->stats[n].bytes_sent += message.size();
    hub.send(n, std::move(message));
  }
  return pool;
}

namespace {

void wait_idle(PoolState& pool, std::unique_lock<std::mutex>& lock) {
  pool.hub->changed.wait(lock, [&] {
    return (pool.inflight_chunks == 0 && pool.encoding_chunks == 0) || pool.hub->stopped;
  });
}

/// Waits until every error of the pool's dropped Futures has been said (its
/// handler may use what the pool's owner frees once the pool is gone);
/// except in a handler, which cannot wait for itself: the pool's errors
/// still due are then said after it returns.
void wait_said(PoolState& pool, std::unique_lock<std::mutex>& lock) {
  Hub& hub = *pool.hub;
  if (hub.on_reporter_thread()) return;
  hub.changed.wait(lock, [&] { return !hub.reporting_locked(pool); });
}

/// Every node's insights into its own Pool, by node (empty for a node given
/// up on): one request each, waited for.
std::map<std::size_t, procpool::Insights> ask_nodes_locked(PoolState& pool,
                                                           std::unique_lock<std::mutex>& lock) {
  Hub& hub = *pool.hub;
  const std::uint64_t request = ++hub.next_id;
  for (std::size_t n = 0; n < hub.nodes.size(); ++n) {
    if (!hub.nodes[n].lost.empty()) {
      hub.insight_replies[request][n] = procpool::Insights{};  // it would not answer
      continue;
    }
    ++hub.insight_requests;
    ++hub.nodes[n].insights_due;
    Buffer m = new_message(Msg::insights);
    Writer w(m);
    w.put(pool.id);
    w.put(request);
    hub.send(n, std::move(m));
  }
  hub.changed.wait(
      lock, [&] { return hub.insight_replies[request].size() == hub.nodes.size() || hub.stopped; });
  auto replies = std::move(hub.insight_replies[request]);
  hub.insight_replies.erase(request);
  return replies;
}

void end_pool_locked(PoolState& pool, Msg how) {
  if (pool.ended) return;
  pool.ended = true;
  pool.closed = true;
  if (pool.hub->stopped) return;
  for (std::size_t n = 0; n < pool.hub->nodes.size(); ++n) {
    Buffer m = new_message(how);
    Writer(m).put(pool.id);
    pool.hub->send(n, std::move(m));
  }
}

}  // namespace

void close_pool(PoolState& pool) noexcept {
  std::unique_lock lock(pool.hub->mutex);
  try {
    pool.closed = true;
    wait_idle(pool, lock);
    end_pool_locked(pool, Msg::destroy_pool);
  } catch (const std::exception& e) {
    std::fprintf(stderr, "procpool::mpi::Pool: ending the pool failed: %s\n", e.what());
  }
  wait_said(pool, lock);  // whatever happened above
}

void check_open(const PoolState& pool) {
  std::lock_guard lock(pool.hub->mutex);
  if (pool.closed)
    throw PoolClosed("procpool::mpi::Pool: the pool was closed; no more work is accepted");
}

void check_state_type(const PoolState& pool, const std::type_info& wanted) {
  if (pool.state_type == nullptr) {
    throw Error("procpool::mpi::Pool: the function takes a worker state (" +
                procpool::detail::demangle(wanted.name()) +
                "&) but this pool has no initializer; create it with Pool(options, init)");
  }
  if (*pool.state_type != wanted) {
    throw Error("procpool::mpi::Pool: the function takes a worker state of type " +
                procpool::detail::demangle(wanted.name()) + " but the pool's initializer builds " +
                procpool::detail::demangle(pool.state_type->name()));
  }
}

void pool_close(PoolState& pool) {
  std::lock_guard lock(pool.hub->mutex);
  pool.closed = true;
}

void pool_join(PoolState& pool) {
  std::unique_lock lock(pool.hub->mutex);
  if (!pool.closed) {
    throw Error(
        "procpool::mpi::Pool::join: call close() or terminate() first, as work could still arrive");
  }
  wait_idle(pool, lock);
  // The nodes' pools end with it: what insights() says of them after the
  // end is what they say now.
  if (!pool.ended && !pool.hub->stopped) pool.last_node_insights = ask_nodes_locked(pool, lock);
  end_pool_locked(pool, Msg::destroy_pool);
  wait_said(pool, lock);
}

void pool_set_error_handler(PoolState& pool, std::function<void(std::exception_ptr)> handler) {
  auto shared = std::make_shared<const std::function<void(std::exception_ptr)>>(std::move(handler));
  std::lock_guard lock(pool.hub->mutex);
  pool.error_handler = std::move(shared);
}

void pool_terminate(PoolState& pool) {
  std::lock_guard lock(pool.hub->mutex);
  end_pool_locked(pool, Msg::terminate_pool);
}

unsigned pool_processes(const PoolState& pool) {
  std::lock_guard lock(pool.hub->mutex);  // a node taken out of rotation has none
  return pool.total_processes();
}

bool pool_bounds_inflight(const PoolState& pool) {
  return pool.options.max_inflight != 0;
}

Insights pool_insights(PoolState& pool) {
  Hub& hub = *pool.hub;
  std::unique_lock lock(hub.mutex);
  Insights out;
  out.wall_seconds = seconds(Clock::now() - pool.started);
  out.nodes = static_cast<unsigned>(hub.nodes.size());
  out.root_encode_seconds = pool.encode_seconds;
  out.unobserved_errors = pool.unobserved_errors;
  out.unobserved_error_messages = pool.unobserved_messages;
  std::map<std::size_t, procpool::Insights> replies;
  if (!pool.ended && !hub.stopped) {
    replies = ask_nodes_locked(pool, lock);
  } else if (pool.last_node_insights) {
    replies = *pool.last_node_insights;  // as join() found them
  }
  out.processes = pool.total_processes();  // (less a node given up on while it waited)
  double compute = 0;
  for (std::size_t n = 0; n < hub.nodes.size(); ++n) {
    NodeInsights node;
    node.rank = hub.nodes[n].rank;
    node.host = hub.nodes[n].host;
    node.processes = hub.nodes[n].lost.empty() ? pool.processes[n] : 0;  // none it can use
    const NodeStats& s = pool.stats[n];
    node.chunks = s.chunks;
    node.tasks = s.tasks;
    node.node_seconds = s.node_seconds;
    node.round_trip_seconds = s.round_trip_seconds;
    node.bytes_sent = s.bytes_sent;
    node.moved_away = s.moved_away;
    node.sent_back = s.sent_back;
    node.out_of_rotation = s.out_of_rotation.empty() ? hub.nodes[n].lost : s.out_of_rotation;
    node.bytes_received = s.bytes_received;
    if (auto it = replies.find(n); it != replies.end()) node.pool = std::move(it->second);
    for (const WorkerInsights& w : node.pool.workers)
      compute += w.compute_seconds;
    out.tasks += s.tasks;
    out.transit_seconds += std::max(0.0, s.round_trip_seconds - s.node_seconds);
    out.per_node.push_back(std::move(node));
  }
  if (out.wall_seconds > 0 && out.processes > 0) {
    out.efficiency = compute / (out.wall_seconds * out.processes);
  }
  // The diagnosis: the cluster's share first, then the busiest node's own.
  std::string idle;
  for (const NodeInsights& n : out.per_node) {
    if (n.tasks == 0 && n.processes != 0 && out.tasks >= 2 * out.per_node.size()) {
      idle += (idle.empty() ? "" : ", ") + n.host + ":" + std::to_string(n.rank);
    }
  }
  double round_trip = 0;
  double on_node = 0;
  for (const NodeInsights& n : out.per_node) {
    round_trip += n.round_trip_seconds;
    on_node += n.node_seconds;
  }
  std::string out_of_rotation;
  for (const NodeInsights& n : out.per_node) {
    if (n.out_of_rotation.empty()) continue;
    out_of_rotation += (out_of_rotation.empty() ? "" : "; ") + n.host + ":" +
                       std::to_string(n.rank) + " (" + n.out_of_rotation + ")";
  }
  if (!out_of_rotation.empty()) {
    out.diagnosis =
        "node(s) could not run this pool's tasks and got no more of them: " + out_of_rotation +
        "; fix those nodes, or leave them out of the job";
  } else if (!idle.empty()) {
    out.diagnosis = "node(s) " + idle +
                    " got no work: too few inputs or chunks too large for this many nodes "
                    "(lower Options::chunksize)";
  } else if (round_trip > 0 && out.transit_seconds > 0.5 * round_trip && out.tasks > 0) {
    out.diagnosis = "network-bound: chunks spent " +
                    std::to_string(static_cast<int>(100 * out.transit_seconds / round_trip)) +
                    "% of their round trip in transit or queued on the root; send more work per "
                    "chunk (Options::chunksize, or fewer bytes per input and result)";
  } else if (out.wall_seconds > 0 && out.root_encode_seconds > 0.5 * out.wall_seconds) {
    out.diagnosis =
        "root-bound: taking and serialising the inputs on the root took most of the time; "
        "make inputs smaller or let the task produce its own input from an index";
  } else {
    std::size_t busiest = 0;
    for (std::size_t n = 1; n < out.per_node.size(); ++n) {
      if (out.per_node[n].node_seconds > out.per_node[busiest].node_seconds) busiest = n;
    }
    out.diagnosis = out.per_node.empty() || out.per_node[busiest].pool.diagnosis.empty()
                        ? "no work yet"
                        : "per node (busiest, " + out.per_node[busiest].host + ":" +
                              std::to_string(out.per_node[busiest].rank) +
                              "): " + out.per_node[busiest].pool.diagnosis;
  }
  (void)on_node;
  return out;
}

}  // namespace procpool::mpi::detail

namespace procpool::mpi {

std::string Insights::to_string() const {
  std::string s;
  char line[512];
  std::snprintf(line, sizeof line,
                "procpool::mpi: %u node(s), %u workers, %llu tasks in %.3f s, efficiency %.2f, "
                "transit %.3f s, root encoding %.3f s\n",
                nodes, processes, static_cast<unsigned long long>(tasks), wall_seconds, efficiency,
                transit_seconds, root_encode_seconds);
  s += line;
  s += "  node (host:rank)             workers  chunks    tasks  on node s  round trip s   MB sent "
       " MB recv\n";
  for (const NodeInsights& n : per_node) {
    const std::string name = n.host + ":" + std::to_string(n.rank);
    std::snprintf(line, sizeof line, "  %-28s %7u %7llu %8llu %10.3f %13.3f %9.2f %8.2f\n",
                  name.c_str(), n.processes, static_cast<unsigned long long>(n.chunks),
                  static_cast<unsigned long long>(n.tasks), n.node_seconds, n.round_trip_seconds,
                  static_cast<double>(n.bytes_sent) / 1e6,
                  static_cast<double>(n.bytes_received) / 1e6);
    s += line;
  }
  for (const NodeInsights& n : per_node) {
    s += "  -- node " + n.host + ":" + std::to_string(n.rank) + " --\n";
    if (!n.out_of_rotation.empty()) {
      s += "    out of rotation, " + std::to_string(n.sent_back) +
           " input(s) sent back to run elsewhere: " + n.out_of_rotation + "\n";
    } else if (n.processes == 0) {
      s += "    no workers: the other ranks on this node have its CPUs\n";
      continue;
    }
    std::string table = n.pool.to_string();
    // Indent the node pool's own table under its node.
    std::size_t at = 0;
    while (at < table.size()) {
      const std::size_t end = table.find('\n', at);
      s += "    " + table.substr(at, end == std::string::npos ? std::string::npos : end - at + 1);
      if (end == std::string::npos) {
        s += "\n";
        break;
      }
      at = end + 1;
    }
  }
  for (const NodeInsights& n : per_node) {
    if (n.moved_away == 0) continue;
    s += "  " + std::to_string(n.moved_away) + " task(s) whose worker died on " + n.host + ":" +
         std::to_string(n.rank) + " ran again on another node\n";
  }
  if (unobserved_errors != 0) {
    s += "  " + std::to_string(unobserved_errors) + " task(s) of dropped futures failed";
    if (!unobserved_error_messages.empty()) s += " (first: " + unobserved_error_messages[0] + ")";
    s += "\n";
  }
  s += "  diagnosis: " + diagnosis + "\n";
  return s;
}

}  // namespace procpool::mpi
