// Bundles (src/mpi/wire.hpp): many small messages to one rank as one, without MPI.
#include <gtest/gtest.h>

#include <cstring>
#include <string>
#include <vector>

#include "../../src/mpi/wire.hpp"
#include "procpool/errors.hpp"

namespace procpool::mpi::detail {
namespace {

Buffer chunk_message(std::uint64_t chunk, std::size_t input_bytes) {
  Buffer m = new_message(Msg::chunk);
  Writer w(m);
  w.put(std::uint64_t{7});  // call
  w.put(chunk);
  w.put(std::uint64_t{1});  // count
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

}  // namespace
}  // namespace procpool::mpi::detail
