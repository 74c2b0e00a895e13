#include "node_server.hpp"

#include <algorithm>
#include <atomic>
#include <cstdio>
#include <cstdlib>
#include <exception>
#include <optional>
#include <string>
#include <system_error>
#include <utility>

#include "estimate.hpp"
#include "procpool/detail/code_identity.hpp"

namespace procpool::mpi::detail {
namespace {

/// Chunks that may run at once on one node; more wait in the queue.
constexpr std::size_t max_executors = 256;
/// Inputs of one batch of chunks at most (see executor()).
constexpr std::uint64_t max_batch_inputs = 65536;

double seconds_since(std::chrono::steady_clock::time_point t) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - t).count();
}

/// The exception being handled, as a node's pool that could not be made
/// reports it: a procpool::Error travels with its message, where another
/// type would name a task. (No worker could start: a std::system_error.)
std::exception_ptr current_pool_error() {
  try {
    throw;
  } catch (const Error&) {
    return std::current_exception();
  } catch (const std::exception& e) {
    return std::make_exception_ptr(Error(e.what()));
  } catch (...) {
    return std::current_exception();
  }
}

}  // namespace

bool node_cannot_run(procpool::Pool& pool, const std::exception_ptr& error) {
  if (!error) return false;
  if (error == procpool::detail::PoolAccess::broken(pool)) return true;
  try {
    std::rethrow_exception(error);
  } catch (const TaskError& e) {
    static const std::string initializer_failed =
        procpool::detail::demangle(typeid(InitializerFailed).name());
    return e.type_name() == initializer_failed;
  } catch (...) {
    return false;
  }
}

bool worker_died(const std::exception_ptr& error) {
  if (!error) return false;
  try {
    std::rethrow_exception(error);
  } catch (const WorkerCrashed&) {
    return true;
  } catch (const TaskTimeout&) {
    return true;
  } catch (...) {
    return false;
  }
}

void put_sent_back(Writer& out, std::uint8_t tag, const std::exception_ptr& why,
                   const std::byte* input, std::size_t size) {
  out.put(tag);
  save_error(out, why);
  out.put(static_cast<std::uint64_t>(size));
  out.write(input, size);
}

NodeServer::NodeServer(std::function<void(Parts)> reply) : reply_(std::move(reply)) {}

NodeServer::~NodeServer() {
  {
    std::lock_guard lock(mutex_);
    stop_ = true;
  }
  wake_.notify_all();
  for (std::thread& t : threads_)
    t.join();
  // (Executors wait for the pools being made: by now those are made.)
  for (Maker& m : makers_)
    m.thread.join();
  calls_.clear();
  pools_.clear();  // each Pool finishes its accepted work and reaps its workers
}

void NodeServer::handle(Buffer message) {
  Msg type{};
  Reader in = message_body(message, type);
  switch (type) {
    case Msg::create_pool:
      create_pool(in);
      return;
    case Msg::destroy_pool:
    case Msg::terminate_pool: {
      const auto id = in.get<std::uint64_t>();
      auto it = pools_.find(id);
      if (it == pools_.end()) return;
      if (type == Msg::terminate_pool) {
        PoolEntry& entry = *it->second;
        std::shared_ptr<procpool::Pool> made;
        {
          std::lock_guard lock(entry.mutex);
          if (!entry.made) entry.terminate_when_made = true;
          made = entry.pool;
        }
        if (made) made->terminate();
      }
      // The last chunk that uses it ends it (its destructor waits for its work).
      pools_.erase(it);
      return;
    }
    case Msg::open_call: {
      const auto pool = in.get<std::uint64_t>();
      const auto call = in.get<std::uint64_t>();
      auto entry = std::make_shared<CallEntry>();
      entry->one_shot = in.get<std::uint8_t>() != 0;
      auto p = pools_.find(pool);
      if (p == pools_.end()) {
        entry->error = std::make_exception_ptr(
            Error("procpool::mpi: a call arrived for a pool this node does not have"));
      } else {
        entry->pool = p->second;
        try {
          const CodeRef factory = procpool::detail::load_code_ref(in);
          entry->runner = procpool::detail::function_at<NodeCallFactoryFn>(factory)(in);
        } catch (...) {
          entry->error = std::current_exception();
        }
      }
      calls_[call] = std::move(entry);
      return;
    }
    case Msg::close_call: {
      auto c = calls_.find(in.get<std::uint64_t>());
      if (c == calls_.end()) return;
      c->second->closed = true;
      calls_.erase(c);
      return;
    }
    case Msg::chunk: {
      Job job;
      job.arrived = std::chrono::steady_clock::now();
      job.call_id = in.get<std::uint64_t>();
      job.chunk = in.get<std::uint64_t>();
      job.count = in.get<std::uint64_t>();
      job.alone = in.get<std::uint8_t>() != 0;
      job.items_at = static_cast<std::size_t>(in.position() - message.data());
      auto c = calls_.find(job.call_id);
      if (c != calls_.end()) {
        job.call = c->second;
        // A submitted task: its call has this one chunk, and the root sends no close.
        if (job.call->one_shot) calls_.erase(c);
      }
      job.message = std::move(message);
      std::lock_guard lock(mutex_);
      // A chunk queued right behind one of its own call is taken with it, as
      // one batch (see executor), by whoever takes that one: an executor is
      // on its way for every queued job (one waits only while none is).
      // Waking or starting another for it would leave that one idle.
      const bool joins = !job.alone && !jobs_.empty() && !jobs_.back().alone &&
                         jobs_.back().call_id == job.call_id;
      // A chunk of long tasks gets an executor of its own, bundled or not.
      if (!bundle_.handling || job.alone) {
        if (bundle_.handling && bundle_.queued != 0) end_bundle_run_locked();
        jobs_.push_back(std::move(job));
        if (!joins) start_executor_locked(1);
        return;
      }
      // A bundle's run of chunks of one call is queued whole before an
      // executor is woken for it.
      if (bundle_.queued != 0 && bundle_.call != job.call_id) end_bundle_run_locked();
      // The lock is let go between a run's chunks: an executor may have taken
      // the ones queued so far (it takes the queued chunks of their call, in
      // order), and with them the one the run joined. This one then joins
      // nothing, and the run starts again from it, to wake an executor at its
      // end. (Without this, a burst of chunksize 1 left its last chunks queued
      // beside idle executors, and the call hung: 1 map in about 1000 on 3 ranks.)
      if (bundle_.queued != 0 && !joins) {
        bundle_.queued = 0;
        ++runs_restarted_;
      }
      if (bundle_.queued == 0) {
        bundle_.call = job.call_id;
        bundle_.joins = joins;
      }
      ++bundle_.queued;
      jobs_.push_back(std::move(job));
      return;
    }
    case Msg::bundle: {
      bundle_ = BundleInProgress{};
      bundle_.handling = true;
      auto wake_for_the_last = [this] {
        bundle_.handling = false;
        std::lock_guard lock(mutex_);
        if (bundle_.queued != 0) end_bundle_run_locked();
      };
      try {
        for (Buffer& m : unbundle(in))
          handle(std::move(m));
      } catch (...) {
        wake_for_the_last();
        throw;
      }
      wake_for_the_last();
      return;
    }
    case Msg::insights: {
      const auto pool = in.get<std::uint64_t>();
      const auto request = in.get<std::uint64_t>();
      std::shared_ptr<procpool::Pool> made;
      if (auto p = pools_.find(pool); p != pools_.end()) {
        PoolEntry& entry = *p->second;
        std::lock_guard lock(entry.mutex);
        if (!entry.made) {
          entry.insights_waiting.push_back(request);  // its maker answers
          return;
        }
        made = entry.pool;
      }
      reply_insights(request, made ? made->insights() : procpool::Insights{});
      return;
    }
    default:
      throw ProtocolError("procpool::mpi: a node got a message of unknown type " +
                          std::to_string(static_cast<int>(type)));
  }
}

void NodeServer::PoolEntry::wait_made() {
  std::unique_lock lock(mutex);
  made_cv.wait(lock, [this] { return made; });
}

void NodeServer::create_pool(Reader& in) {
  join_finished_makers();
  const auto id = in.get<std::uint64_t>();
  const Options options = load_options(in);
  auto entry = std::make_shared<PoolEntry>();
  pools_[id] = entry;
  NodePoolFactoryFn* factory = nullptr;
  const void* init = nullptr;
  try {
    factory = procpool::detail::function_at<NodePoolFactoryFn>(procpool::detail::load_code_ref(in));
    if (in.get<std::uint8_t>() != 0) {
      init = procpool::detail::code_address(procpool::detail::load_code_ref(in));
    }
    entry->send_back_deaths = in.get<std::uint8_t>() != 0;
  } catch (...) {
    finish_making(*entry, nullptr, current_pool_error());  // (a rank running other code)
    return;
  }
  if (options.start != Start::fork_server) {
    // Its constructor runs no code of the program's (the initializer runs in
    // each worker) and takes a few forks: made here, as it always was, and
    // no thread is started beside the rank's other threads to fork from.
    make_pool(std::move(entry), options, factory, init);
    return;
  }
  auto finished = std::make_shared<std::atomic<bool>>(false);
  try {
    std::thread thread([this, entry, options, factory, init, finished]() mutable {
      try {
        make_pool(std::move(entry), options, factory, init);
      } catch (const std::exception& e) {
        // Answering an insights request failed (memory): on the rank's own
        // thread that would have ended the job with why; so it does here.
        std::fprintf(stderr, "procpool::mpi: a node cannot go on: %s\n", e.what());
        std::fflush(stderr);
        std::abort();
      }
      finished->store(true);
    });
    makers_.push_back(Maker{std::move(thread), std::move(finished)});
  } catch (const std::system_error&) {
    make_pool(std::move(entry), options, factory, init);  // no thread to spare: here and now
  }
}

void NodeServer::make_pool(std::shared_ptr<PoolEntry> entry, const Options& options,
                           NodePoolFactoryFn* factory, const void* init) {
  std::shared_ptr<procpool::Pool> made;
  std::exception_ptr error;
  try {
    made = factory(options, init);
  } catch (...) {
    error = current_pool_error();
  }
  finish_making(*entry, std::move(made), std::move(error));
}

void NodeServer::finish_making(PoolEntry& entry, std::shared_ptr<procpool::Pool> made,
                               std::exception_ptr error) {
  bool terminate = false;
  std::vector<std::uint64_t> insights_waiting;
  {
    std::lock_guard lock(entry.mutex);
    entry.pool = made;
    entry.error = std::move(error);
    entry.made = true;
    terminate = entry.terminate_when_made;
    insights_waiting.swap(entry.insights_waiting);
  }
  entry.made_cv.notify_all();
  if (terminate && made) made->terminate();
  for (const std::uint64_t request : insights_waiting)
    reply_insights(request, made ? made->insights() : procpool::Insights{});
}

void NodeServer::reply_insights(std::uint64_t request, const procpool::Insights& insights) {
  Buffer out = new_message(Msg::insights_reply);
  Writer w(out);
  w.put(request);
  save_insights(w, insights);
  reply_(single_part(std::move(out)));
}

void NodeServer::join_finished_makers() {
  std::erase_if(makers_, [](Maker& m) {
    if (!m.finished->load()) return false;
    m.thread.join();
    return true;
  });
}

void NodeServer::end_bundle_run_locked() {
  const std::size_t queued = std::exchange(bundle_.queued, 0);
  if (!bundle_.joins) start_executor_locked(queued);
}

void NodeServer::start_executor_locked(std::size_t queued) {
  // An idle executor already woken for other jobs does not count: it takes
  // those (of another call) alone, and these would wait for its batch. Two
  // calls' chunks that arrived together ran one after the other (4 maps of
  // one 300 ms task on 2 nodes of 2 workers: 603-621 ms).
  if (idle_ > woken_) {
    ++woken_;
    wake_.notify_one();
    return;
  }
  if (threads_.size() >= max_executors) {
    wake_.notify_one();  // all busy: the first free one takes them
    return;
  }
  try {
    threads_.emplace_back([this] { executor(); });
  } catch (...) {
    // No thread to spare: a busy executor (or one already woken) takes the
    // chunks when free. With none at all nobody would, so those just queued
    // are refused, not queued.
    if (!threads_.empty()) return;
    for (; queued != 0; --queued)
      jobs_.pop_back();
    throw;
  }
}

void NodeServer::executor() {
  std::unique_lock lock(mutex_);
  std::vector<Job> batch;
  for (;;) {
    if (jobs_.empty()) {
      if (stop_) return;
      ++idle_;
      wake_.wait(lock);
      --idle_;
      if (woken_ != 0) --woken_;  // (or a spurious wake-up: it takes the jobs all the same)
      continue;
    }
    batch.push_back(std::move(jobs_.front()));
    jobs_.pop_front();
    // Chunks of the same call waiting behind it run with it, as one call on
    // the node's Pool: small chunks (chunksize 1) then cost one call per
    // batch instead of one each.
    std::size_t inputs = batch.front().count;
    const bool alone = batch.front().alone;
    for (auto it = jobs_.begin(); !alone && it != jobs_.end() && inputs < max_batch_inputs;) {
      if (it->call_id == batch.front().call_id && !it->alone) {
        inputs += it->count;
        batch.push_back(std::move(*it));
        it = jobs_.erase(it);
      } else {
        ++it;
      }
    }
    lock.unlock();
    run(batch);
    batch.clear();  // the call and its pool may end here, outside the lock
    lock.lock();
  }
}

void NodeServer::run(std::vector<Job>& jobs) {
  struct Reply {
    ReplyParts parts;
    std::size_t times_at = 0;
    std::size_t records_at = 0;
    bool sent = false;
  };
  std::deque<Reply> replies(jobs.size());  // a deque: ReplyParts stays where it is
  std::vector<NodeChunk> chunks;
  const Job& job = jobs.front();  // every job of a batch is of the same call
  if (job.call && job.call->pool) job.call->pool->wait_made();
  procpool::Pool* pool = job.call && job.call->pool ? job.call->pool->pool.get() : nullptr;
  auto worker_nanos = [pool] {
    return pool != nullptr ? procpool::detail::PoolAccess::compute_nanos(*pool) : 0;
  };
  auto last_done = std::chrono::steady_clock::now();
  std::uint64_t last_worker_nanos = worker_nanos();
  // A chunk's reply: its times, then off to the root. `run_seconds` is the
  // time it took beyond the chunk before it in the batch, and
  // `worker_seconds` what the node's workers spent running tasks meanwhile
  // (other calls' too, if they share the pool): the root estimates task time
  // from them (CallState::receive).
  // A chunk of one long task run alone says its task's own time, as its
  // worker timed it, for both: its wall time would hold its wait in the
  // node's queue too (up to two tasks per worker ahead of it), and a call
  // of 5 ms tasks, once taken for long, would stay so.
  std::uint64_t alone_worker_nanos = 0;
  auto send = [&](std::size_t j) {
    Reply& r = replies[j];
    const auto now = std::chrono::steady_clock::now();
    const std::uint64_t nanos = worker_nanos();
    double times[] = {seconds_since(jobs[j].arrived),
                      std::chrono::duration<double>(now - last_done).count(),
                      static_cast<double>(nanos - last_worker_nanos) * 1e-9};
    // (Not when it moved a megabyte or more: the worker's time would leave
    // out the moving, and a call's first round, a task per chunk, would
    // size its next chunks of big results by their compute time alone.)
    const std::size_t moved = jobs[j].message.size() + r.parts.size();
    if (jobs[j].alone && jobs[j].count == 1 && alone_worker_nanos != 0 &&
        moved < wall_time_counts_from_bytes) {
      times[1] = times[2] = static_cast<double>(alone_worker_nanos) * 1e-9;
    }
    last_done = now;
    last_worker_nanos = nanos;
    std::memcpy(r.parts.front() + r.times_at, times, sizeof times);
    jobs[j].message = Buffer{};
    r.sent = true;
    reply_(r.parts.take());
  };
  for (std::size_t j = 0; j < jobs.size(); ++j) {
    Reply& r = replies[j];
    Writer& w = r.parts.writer();
    w.buffer() = new_message(Msg::chunk_done);
    w.put(jobs[j].call_id);
    w.put(jobs[j].chunk);
    r.times_at = w.size();
    w.put(0.0);
    w.put(0.0);
    w.put(0.0);
    w.put(jobs[j].count);
    r.records_at = w.size();
    chunks.push_back(NodeChunk{jobs[j].count,
                               Reader(jobs[j].message.data() + jobs[j].items_at,
                                      jobs[j].message.size() - jobs[j].items_at),
                               &r.parts, [&send, j] { send(j); }});
  }
  std::exception_ptr error;
  if (!job.call) {
    error = std::make_exception_ptr(
        Error("procpool::mpi: a chunk arrived for a call this node does not know"));
  } else if (job.call->closed) {
    error =
        std::make_exception_ptr(PoolClosed("procpool::mpi: the call ended before this chunk ran"));
  } else if (job.call->error) {
    error = job.call->error;
  } else if (job.call->pool->error) {
    // The node's pool could not be made (no worker could start): the inputs
    // go back to the root, for a node that can run them.
    try {
      job.call->runner->send_back(chunks, job.call->pool->error);
    } catch (...) {
      error = job.call->pool->error;
    }
  } else {
    try {
      std::optional<procpool::detail::Engine::IdleWorkersOnly> idle_workers_only;
      if (job.alone) idle_workers_only.emplace(&alone_worker_nanos);
      job.call->runner->run(*job.call->pool->pool, chunks, job.call->pool->send_back_deaths);
    } catch (...) {
      error = std::current_exception();
    }
  }
  for (std::size_t j = 0; j < jobs.size(); ++j) {
    if (replies[j].sent) continue;
    if (error) {
      // The chunk could not run (the node's pool or the call's code could not
      // be set up, or the pool failed under it): every input reports why.
      ReplyParts& parts = replies[j].parts;
      parts.rewind(replies[j].records_at);
      for (std::uint64_t i = 0; i < jobs[j].count; ++i) {
        parts.writer().put(std::uint8_t{0});
        save_error(parts.writer(), error);
      }
    }
    send(j);
  }
}

}  // namespace procpool::mpi::detail
