// Bundles (src/mpi/wire.hpp): many small messages to one rank as one, without
// MPI; and the error records a node writes for the root (codec.hpp).
#include <gtest/gtest.h>

#include <chrono>
#include <csignal>
#include <cstring>
#include <stdexcept>
#include <string>
#include <vector>

#include "../../src/mpi/codec.hpp"
#include "../../src/mpi/wire.hpp"
#include "procpool/errors.hpp"
#include "procpool/mpi.hpp"

namespace procpool::mpi::detail {
namespace {

Buffer chunk_message(std::uint64_t chunk, std::size_t input_bytes) {
  Buffer m = new_message(Msg::chunk);
  Writer w(m);
  w.put(std::uint64_t{7});  // call
  w.put(chunk);
  w.put(std::uint64_t{1});  // count
  w.put(std::uint8_t{0});   // alone
  const std::string input(input_bytes, static_cast<char>('a' + chunk % 26));
  w.write(input.data(), input.size());
  return m;
}

std::vector<std::byte> bytes_of(const Buffer& b) {
  return {b.data(), b.data() + b.size()};
}

TEST(MpiBundle, MessagesComeOutWholeAndInOrder) {
  Bundle bundle;
  std::vector<std::vector<std::byte>> sent;
  for (std::uint64_t c = 0; c < 50; ++c) {
    ASSERT_TRUE(Bundle::takes(single_part(chunk_message(c, c * 3))));
    Buffer m = chunk_message(c, c * 3);
    ASSERT_TRUE(bundle.has_room_for(m));
    sent.push_back(bytes_of(m));
    bundle.add(std::move(m));
  }
  const Buffer out = bundle.take();
  EXPECT_TRUE(bundle.empty());
  Msg type{};
  Reader in = message_body(out, type);
  ASSERT_EQ(type, Msg::bundle);
  const std::vector<Buffer> got = unbundle(in);
  ASSERT_EQ(got.size(), sent.size());
  for (std::size_t i = 0; i < got.size(); ++i)
    EXPECT_EQ(bytes_of(got[i]), sent[i]) << "message " << i;
}

TEST(MpiBundle, OneMessageTravelsAsItself) {
  Bundle bundle;
  Buffer m = chunk_message(3, 10);
  const auto sent = bytes_of(m);
  bundle.add(std::move(m));
  EXPECT_EQ(bytes_of(bundle.take()), sent);
}

TEST(MpiBundle, StaysUnderTheEagerSize) {
  Bundle bundle;
  std::size_t added = 0;
  for (std::uint64_t c = 0;; ++c) {
    Buffer m = chunk_message(c, 4000);
    if (!bundle.has_room_for(m)) break;
    bundle.add(std::move(m));
    ++added;
  }
  EXPECT_GT(added, 1u);
  EXPECT_LT(bundle.take().size(), std::size_t{64} << 10);
}

TEST(MpiBundle, TakesOnlySmallMessagesOfAStream) {
  EXPECT_TRUE(Bundle::takes(single_part(new_message(Msg::open_call))));
  EXPECT_TRUE(Bundle::takes(single_part(new_message(Msg::close_call))));
  EXPECT_TRUE(Bundle::takes(single_part(new_message(Msg::chunk_done))));
  EXPECT_FALSE(Bundle::takes(single_part(new_message(Msg::create_pool))));
  EXPECT_FALSE(Bundle::takes(single_part(new_message(Msg::shutdown))));
  EXPECT_FALSE(Bundle::takes(single_part(new_message(Msg::insights))));
  EXPECT_FALSE(Bundle::takes(single_part(new_message(Msg::bye))));
  EXPECT_FALSE(Bundle::takes(single_part(chunk_message(1, 64 << 10))));  // large: alone
  Parts two = single_part(chunk_message(1, 10));
  two.push_back(Buffer(16));
  EXPECT_FALSE(Bundle::takes(two));  // a part lent from the caller's memory
}

Buffer bundle_with(std::uint64_t count, const std::vector<std::uint64_t>& sizes) {
  Buffer b = new_message(Msg::bundle);
  Writer w(b);
  w.put(count);
  for (std::uint64_t size : sizes) {
    w.put(size);
    Buffer m = new_message(Msg::close_call);
    m.resize(static_cast<std::size_t>(std::max<std::uint64_t>(size, m.size())));
    w.write(m.data(), std::min<std::size_t>(m.size(), 20));
  }
  return b;
}

TEST(MpiBundle, ACorruptBundleIsAProtocolError) {
  Msg type{};
  const Buffer huge_count = bundle_with(~std::uint64_t{0}, {});
  EXPECT_THROW(unbundle(message_body(huge_count, type)), ProtocolError);
  const Buffer too_long = bundle_with(1, {1000});
  EXPECT_THROW(unbundle(message_body(too_long, type)), ProtocolError);
  const Buffer too_short = bundle_with(1, {3});
  EXPECT_THROW(unbundle(message_body(too_short, type)), ProtocolError);
  Buffer inner = new_message(Msg::bundle);
  Buffer nested = new_message(Msg::bundle);
  Writer w(nested);
  w.put(std::uint64_t{1});
  w.put(static_cast<std::uint64_t>(inner.size()));
  w.write(inner.data(), inner.size());
  EXPECT_THROW(unbundle(message_body(nested, type)), ProtocolError);
}

/// `error` written by a node (save_error) and rebuilt by the root for global
/// input `index` on rank 2 of host "n2".
template <class E>
const E& across_ranks(const E& error, std::size_t index, std::exception_ptr& kept) {
  Buffer record;
  Writer out(record);
  save_error(out, std::make_exception_ptr(error));
  Reader in(record);
  kept = load_error(in, index, 2, "n2");
  EXPECT_EQ(in.remaining(), 0u);
  try {
    std::rethrow_exception(kept);
  } catch (const E& e) {
    EXPECT_NE(dynamic_cast<const ErrorLocation*>(&e), nullptr);
    return e;
  } catch (...) {
  }
  ADD_FAILURE() << "not rebuilt as the same type";
  throw std::runtime_error("not rebuilt as the same type");
}

TEST(MpiErrorRecord, AnOutOfMemoryDeathReachesTheRootWithTheLimitAndTheAdvice) {
  std::exception_ptr kept;
  const auto& e = across_ranks(
      WorkerCrashed::out_of_memory(5, 1234, "the OOM killer killed it: memory limit 0.25 GiB"),
      4005, kept);
  EXPECT_TRUE(e.out_of_memory());
  EXPECT_EQ(e.index(), 4005u);  // the global index, not the node's
  EXPECT_EQ(e.pid(), 1234);
  EXPECT_EQ(e.signal(), SIGKILL);
  EXPECT_EQ(e.observed(), "the OOM killer killed it: memory limit 0.25 GiB");
  const std::string what = e.what();
  EXPECT_NE(what.find("running task 4005"), std::string::npos) << what;
  EXPECT_NE(what.find("memory limit 0.25 GiB. Use fewer processes"), std::string::npos) << what;
  EXPECT_NE(what.find("(on node n2, rank 2)"), std::string::npos) << what;
  EXPECT_EQ(what.find("under a debugger"), std::string::npos) << what;
}

TEST(MpiErrorRecord, ADeathAroundATaskKeepsWhatWasSeen) {
  std::exception_ptr kept;
  const auto& e = across_ranks(
      WorkerCrashed(7, 99, SIGKILL, 0, "its worker died 3 times as it waited"), 70, kept);
  EXPECT_FALSE(e.out_of_memory());
  EXPECT_EQ(e.observed(), "its worker died 3 times as it waited");
  EXPECT_NE(std::string(e.what()).find("task 70 failed: its worker died 3 times"),
            std::string::npos)
      << e.what();
}

TEST(MpiErrorRecord, APlainCrashStaysPlain) {
  std::exception_ptr kept;
  const auto& e = across_ranks(WorkerCrashed(1, 42, SIGSEGV, 0), 11, kept);
  EXPECT_FALSE(e.out_of_memory());
  EXPECT_TRUE(e.observed().empty());
  EXPECT_EQ(e.signal(), SIGSEGV);
  EXPECT_NE(std::string(e.what()).find("running task 11"), std::string::npos) << e.what();
}

TEST(PollPace, PollsFastAfterAMessageThenWaitsAShareOfTheQuietUpToItsLimit) {
  using std::chrono::microseconds;
  using std::chrono::milliseconds;
  const PollPace::Clock::time_point t0{};
  PollPace pace;
  pace.active(t0);
  const microseconds slowest{500};
  // A stream of small chunks: their replies come within fast_for of each other.
  EXPECT_EQ(pace.next_wait(slowest, t0), PollPace::fastest);
  EXPECT_EQ(pace.next_wait(slowest, t0 + PollPace::fast_for - microseconds(1)), PollPace::fastest);
  // Quiet for longer: a share of the quiet time, so a late message waits at
  // most that share more, and polls grow rarer the longer nothing comes.
  EXPECT_EQ(pace.next_wait(slowest, t0 + milliseconds(2)), microseconds(2000 / PollPace::share));
  EXPECT_EQ(pace.next_wait(slowest, t0 + milliseconds(50)), slowest);
  EXPECT_EQ(pace.next_wait(milliseconds(20), t0 + milliseconds(50)),
            microseconds(50000 / PollPace::share));
  // A limit below the fastest poll does not make polls faster than that.
  EXPECT_EQ(pace.next_wait(microseconds(1), t0 + milliseconds(50)), PollPace::fastest);
  // A message starts the fast polls again.
  pace.active(t0 + milliseconds(50));
  EXPECT_EQ(pace.next_wait(slowest, t0 + milliseconds(50) + microseconds(100)), PollPace::fastest);
}

TEST(PollPace, AMessageOnItsWayIsPolledFastOnlyUntilItHasStalled) {
  const PollPace::Clock::time_point t0{};
  PollPace pace;
  pace.active(t0);
  EXPECT_TRUE(pace.on_the_way_fast(t0));
  EXPECT_TRUE(pace.on_the_way_fast(t0 + PollPace::on_the_way_for - std::chrono::microseconds(1)));
  // Its peer stopped, say: the pump polls it as a quiet one.
  EXPECT_FALSE(pace.on_the_way_fast(t0 + PollPace::on_the_way_for));
  pace.active(t0 + std::chrono::seconds(1));
  EXPECT_TRUE(pace.on_the_way_fast(t0 + std::chrono::seconds(1)));
}

}  // namespace
}  // namespace procpool::mpi::detail
