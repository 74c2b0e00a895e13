// A node's server (src/mpi/node_server.cpp) fed the root's messages directly,
// without MPI: the chunks it queues are all run, however its executors race
// the thread that queues them.
#include <gtest/gtest.h>

#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <mutex>
#include <set>
#include <thread>
#include <utility>
#include <vector>

#include "../../src/mpi/node_server.hpp"
#include "../../src/mpi/wire.hpp"
#include "procpool/mpi.hpp"

namespace procpool::mpi::detail {
namespace {

using namespace std::chrono_literals;

long square(int x) {
  return static_cast<long>(x) * x;
}

constexpr std::uint64_t pool_id = 1;

Buffer create_pool_message() {
  Buffer m = new_message(Msg::create_pool);
  Writer w(m);
  w.put(pool_id);
  // Start::fork: the pool is made in handle(), so that handle()'s thread
  // answers insights requests itself (the test holds it there).
  save_options(w, Options{.processes = 1, .start = Start::fork});
  procpool::detail::save_code_ref(w, procpool::detail::code_ref_of(&make_plain_node_pool));
  w.put(std::uint8_t{0});  // no initializer
  w.put(std::uint8_t{0});  // the node retries, not the root
  return m;
}

Buffer open_call_message(std::uint64_t call) {
  using F = long (*)(int);
  using Out = procpool::detail::pool_call_types<F, int>::Out;
  Buffer m = new_message(Msg::open_call);
  Writer w(m);
  w.put(pool_id);
  w.put(call);
  w.put(std::uint8_t{0});  // not a submitted task
  procpool::detail::save_code_ref(w, procpool::detail::code_ref_of(&make_node_call<F, int, Out>));
  procpool::detail::code_carrier<F>::save(w, &square);
  return m;
}

Buffer chunk_message(std::uint64_t call, std::uint64_t chunk, int input) {
  Buffer m = new_message(Msg::chunk);
  Writer w(m);
  w.put(call);
  w.put(chunk);
  w.put(std::uint64_t{1});  // count
  w.put(std::uint8_t{0});   // not alone
  put_framed(w, input);
  return m;
}

Buffer close_call_message(std::uint64_t call) {
  Buffer m = new_message(Msg::close_call);
  Writer w(m);
  w.put(call);
  return m;
}

Buffer insights_message() {
  Buffer m = new_message(Msg::insights);
  Writer w(m);
  w.put(pool_id);
  w.put(std::uint64_t{0});  // request
  return m;
}

template <class... Messages>
Buffer bundle_of(Messages... messages) {
  Bundle bundle;
  (bundle.add(std::move(messages)), ...);
  return bundle.take();
}

/// What the server sent back: the chunks done so far. An insights reply
/// (sent from the thread that calls handle(), in the middle of a bundle)
/// runs `on_insights` there.
class Root {
 public:
  std::function<void()> on_insights;

  void receive(Parts parts) {
    Buffer message = joined(std::move(parts));
    Msg type{};
    Reader in = message_body(message, type);
    if (type == Msg::insights_reply) {
      if (on_insights) on_insights();
      return;
    }
    ASSERT_EQ(type, Msg::chunk_done);
    in.get<std::uint64_t>();  // call
    const auto chunk = in.get<std::uint64_t>();
    {
      std::lock_guard lock(mutex_);
      done_.insert(chunk);
    }
    changed_.notify_all();
  }

  bool wait_done(std::initializer_list<std::uint64_t> chunks, std::chrono::milliseconds within) {
    std::unique_lock lock(mutex_);
    return changed_.wait_for(lock, within, [&] {
      for (const std::uint64_t c : chunks)
        if (!done_.contains(c)) return false;
      return true;
    });
  }

 private:
  std::mutex mutex_;
  std::condition_variable changed_;
  std::set<std::uint64_t> done_;
};

// The race behind a hang seen about once in 1000 burst maps on 3 ranks
// (mpi.slurm_pmix): a bundle's chunk joins the one queued before it (of the
// same call, an executor woken for it); that executor takes both and finishes
// before the bundle's next chunk of the call is queued. That one joins
// nothing, and must wake an executor. Here the thread handling the bundle is
// held between the two chunks (by an insights request in between, which it
// answers itself; the root never bundles one, but a node handles any message
// it is given in a bundle the same way) until the executor has run the first
// two and gone idle.
TEST(NodeServer, AChunkQueuedAfterTheOnesItsBundleJoinedWereTakenStillRuns) {
  Root root;
  NodeServer server([&root](Parts parts) { root.receive(std::move(parts)); });
  server.handle(create_pool_message());
  // Up to 200 attempts: under a sanitizer the executor may win most races.
  for (std::uint64_t attempt = 0; attempt < 200 && server.runs_restarted() < 3; ++attempt) {
    const std::uint64_t call = 100 + attempt;
    const std::uint64_t first = call * 10;
    bool took_both = false;
    root.on_insights = [&] {
      took_both = root.wait_done({first, first + 1}, 500ms);
      std::this_thread::sleep_for(20ms);  // its executor goes back to waiting
    };
    server.handle(open_call_message(call));
    server.handle(chunk_message(call, first, 1));  // unbundled: an executor is woken for it
    server.handle(bundle_of(chunk_message(call, first + 1, 2), insights_message(),
                            chunk_message(call, first + 2, 3)));
    EXPECT_TRUE(root.wait_done({first, first + 1, first + 2}, 10s))
        << "attempt " << attempt << ": a chunk was left queued (the first two were "
        << (took_both ? "done before the third came" : "not done within 500 ms") << ")";
    server.handle(close_call_message(call));
    if (HasFailure()) break;  // (each chunk left queued costs the 10 s wait)
  }
  // On a machine where the executor always won the race to the first chunk,
  // the case was never reached: say so rather than pass.
  EXPECT_GT(server.runs_restarted(), 0u)
      << "the bundle's first chunk never joined one that was then taken before the third came";
}

}  // namespace
}  // namespace procpool::mpi::detail
