// Serialisation: the fast raw path, cereal, 64-bit sizes, and hostile bytes.
#include <gtest/gtest.h>
#include <procpool/procpool.hpp>

#include "decode_chunk.hpp"

#include <sys/mman.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>
#include <map>
#include <optional>
#include <random>
#include <set>
#include <stdexcept>
#include <string>
#include <tuple>
#include <vector>

namespace {

using procpool::detail::Buffer;
using procpool::detail::Reader;
using procpool::detail::Writer;

template <class T>
T round_trip(const T& value) {
  Buffer buffer;
  Writer out(buffer);
  procpool::detail::save(out, value);
  Reader in(buffer);
  T back = procpool::detail::load_value<T>(in);
  EXPECT_EQ(in.remaining(), 0u) << "bytes left over";
  return back;
}

struct Point {
  double x, y;
  bool operator==(const Point&) const = default;
};

struct Named {
  std::string name;
  std::map<std::string, std::vector<int>> groups;
  template <class Archive>
  void serialize(Archive& ar) {
    ar(name, groups);
  }
  bool operator==(const Named&) const = default;
};

struct NotSerializable {
  std::string s;
};

static_assert(procpool::serializable<int>);
static_assert(procpool::serializable<Point>);
static_assert(procpool::serializable<std::vector<std::string>>);
static_assert(procpool::serializable<Named>);
static_assert(procpool::serializable<std::map<std::string, Named>>);
static_assert(!procpool::serializable<NotSerializable>);
static_assert(!procpool::serializable<int*>, "pointers mean nothing in another process");

TEST(Serialize, RoundTripsTheTypesUsersSend) {
  EXPECT_EQ(round_trip(42), 42);
  EXPECT_EQ(round_trip(Point{1.5, -2}), (Point{1.5, -2}));
  EXPECT_EQ(round_trip(std::string("hello\0world", 11)), std::string("hello\0world", 11));
  EXPECT_EQ(round_trip(std::vector<double>{1, 2, 3}), (std::vector<double>{1, 2, 3}));
  EXPECT_EQ(round_trip(std::vector<std::string>{"a", "", "ccc"}),
            (std::vector<std::string>{"a", "", "ccc"}));
  EXPECT_EQ(round_trip(std::vector<bool>{true, false, true}),
            (std::vector<bool>{true, false, true}));
  EXPECT_EQ(round_trip(std::optional<std::string>{}), std::optional<std::string>{});
  EXPECT_EQ(round_trip(std::optional<std::string>{"x"}), std::optional<std::string>{"x"});
  auto t = std::tuple<int, std::string, std::pair<double, std::vector<int>>>{1, "s", {2.5, {7}}};
  EXPECT_EQ(round_trip(t), t);
  Named named{"n", {{"g", {1, 2}}, {"h", {}}}};
  EXPECT_EQ(round_trip(named), named);
  std::map<int, std::string> m{{1, "one"}, {2, "two"}};
  EXPECT_EQ(round_trip(m), m);
}

/// Trivially copyable, but with save() and load() of its own: a symbol
/// interned in a table of each process's own, which travels as its text.
/// Its bytes (a pointer into this process's table) mean nothing elsewhere,
/// and its load() refuses an empty name.
struct Symbol {
  const std::string* text = nullptr;
  static Symbol intern(const std::string& s) {
    static std::set<std::string> table;  // per process
    return Symbol{&*table.insert(s).first};
  }
  template <class Archive>
  void save(Archive& ar) const {
    ar(*text);
  }
  template <class Archive>
  void load(Archive& ar) {
    std::string s;
    ar(s);
    if (s.empty()) throw std::invalid_argument("Symbol::load: an empty name");
    *this = intern(s);
  }
};
static_assert(std::is_trivially_copyable_v<Symbol>);
static_assert(procpool::detail::runs_user_code_v<Symbol>,
              "a type's own save()/load() are used even when it is trivially copyable");

TEST(Serialize, ATriviallyCopyableTypeWithItsOwnSaveAndLoadTravelsThroughThem) {
  Buffer buffer;
  Writer out(buffer);
  procpool::detail::save(out, Symbol::intern("gamma"));
  EXPECT_EQ(buffer.size(), 8u + 5u) << "its save() writes the length and the text";
  // In a pool started before the symbols exist: raw pointer bytes would name
  // strings its workers never had.
  procpool::Pool pool({.processes = 2});
  std::vector<Symbol> symbols;
  for (const char* name : {"alpha", "beta", "", "delta"})
    symbols.push_back(Symbol::intern(name));
  const auto outcomes = pool.map_outcomes([](const Symbol& s) { return *s.text + "!"; }, symbols);
  ASSERT_EQ(outcomes.size(), 4u);
  ASSERT_TRUE(outcomes[0].ok()) << outcomes[0].what();
  EXPECT_EQ(*outcomes[0].value, "alpha!");
  ASSERT_TRUE(outcomes[1].ok()) << outcomes[1].what();
  EXPECT_EQ(*outcomes[1].value, "beta!");
  EXPECT_FALSE(outcomes[2].ok()) << "its load() refuses an empty name";
  ASSERT_TRUE(outcomes[3].ok()) << outcomes[3].what();
  EXPECT_EQ(*outcomes[3].value, "delta!");
}

TEST(Serialize, LengthsAre64Bit) {
  Buffer buffer;
  Writer out(buffer);
  procpool::detail::save(out, std::string(3, 'x'));
  EXPECT_EQ(buffer.size(), 8u + 3u);
}

// A call's setup bytes are hashed (the MPI backend's task-time estimates):
// a call without extra arguments must add no byte to them, let alone one
// never set (as the empty std::tuple's raw byte was).
TEST(Serialize, ExtraArgumentsAddTheirBytesOnly) {
  Buffer none;
  Writer none_out(none);
  procpool::detail::save_extra_args(none_out);
  EXPECT_EQ(none.size(), 0u);

  Buffer some;
  Writer some_out(some);
  procpool::detail::save_extra_args(some_out, 7, std::string("ab"), Point{1, 2});
  EXPECT_EQ(some.size(), sizeof(int) + 8u + 2u + sizeof(Point));
  Reader in(some);
  std::tuple<int, std::string, Point> back;
  procpool::detail::load_extra_args(in, back);
  EXPECT_EQ(back, std::make_tuple(7, std::string("ab"), Point{1, 2}));
  EXPECT_EQ(in.remaining(), 0u);
}

TEST(Serialize, TruncatedMessageIsAProtocolError) {
  Buffer buffer;
  Writer out(buffer);
  procpool::detail::save(out, std::vector<std::string>{"abc", "defgh"});
  for (std::size_t cut = 0; cut < buffer.size(); ++cut) {
    Reader in(buffer.data(), cut);
    EXPECT_THROW(procpool::detail::load_value<std::vector<std::string>>(in),
                 procpool::ProtocolError)
        << "cut at " << cut;
  }
  Buffer cereal_buffer;
  Writer cereal_out(cereal_buffer);
  procpool::detail::save(cereal_out, Named{"n", {{"g", {1, 2}}}});
  Reader short_in(cereal_buffer.data(), cereal_buffer.size() - 3);
  EXPECT_THROW(procpool::detail::load_value<Named>(short_in), procpool::ProtocolError);
}

TEST(Serialize, BogusLengthIsRefusedWithoutAllocatingIt) {
  Buffer buffer;
  Writer out(buffer);
  out.put(std::uint64_t{1} << 60);  // claims 2^60 elements
  out.put(std::uint64_t{0});
  Reader in(buffer);
  try {
    procpool::detail::load_value<std::vector<double>>(in);
    FAIL() << "no exception";
  } catch (const procpool::ProtocolError& e) {
    EXPECT_NE(std::string(e.what()).find("does not fit"), std::string::npos) << e.what();
  }
}

TEST(Serialize, BogusLengthInsideACerealTypeIsRefusedToo) {
  // Found by tests/fuzz/decode_fuzz: cereal's own archive would allocate this length.
  Buffer buffer;
  Writer out(buffer);
  out.put(std::uint64_t{0x4500000001});  // Named::name claims ~300 GB
  out.put(std::uint64_t{0});
  Reader in(buffer);
  EXPECT_THROW(procpool::detail::load_value<Named>(in), procpool::ProtocolError);
}

TEST(Serialize, RandomBytesNeverCrashTheDecoder) {
  std::mt19937_64 rng(12345);
  for (int round = 0; round < 20000; ++round) {
    Buffer buffer(rng() % 64);
    for (std::size_t i = 0; i < buffer.size(); ++i)
      buffer.data()[i] = std::byte(rng() & 0xff);
    Reader in(buffer);
    try {
      procpool::detail::load_value<std::vector<std::pair<std::string, std::vector<int>>>>(in);
    } catch (const procpool::ProtocolError&) {
      // the only acceptable failure
    }
  }
}

/// What a lending Writer wrote, with its lent blocks put back where they go.
std::vector<std::byte> reassembled(const Buffer& written,
                                   const std::vector<procpool::detail::LentBlock>& lent) {
  std::vector<std::byte> whole;
  std::size_t at = 0;
  for (const auto& block : lent) {
    whole.insert(whole.end(), written.data() + at, written.data() + block.at);
    whole.insert(whole.end(), block.data, block.data + block.size);
    at = block.at;
  }
  whole.insert(whole.end(), written.data() + at, written.data() + written.size());
  return whole;
}

std::vector<std::byte> plain_bytes(const Buffer& b) {
  return std::vector<std::byte>(b.data(), b.data() + b.size());
}

/// The same values written by a plain Writer and by one that lends blocks
/// of 1 KiB or more.
struct PlainAndLending {
  Buffer plain;
  Writer plain_out{plain};
  Buffer lending;
  Writer lending_out{lending};
  std::vector<procpool::detail::LentBlock> lent;

  PlainAndLending() { lending_out.lend_blocks(lent, 1024); }
  std::vector<Writer*> writers() { return {&plain_out, &lending_out}; }
  void expect_the_same_bytes() const {
    EXPECT_EQ(lending_out.size(), plain_out.size());
    EXPECT_EQ(reassembled(lending, lent), plain_bytes(plain));
  }
};

TEST(LendingWriter, LentBlocksPutBackGiveTheSameBytes) {
  using Item = std::tuple<std::string, int, std::vector<double>, std::optional<std::vector<char>>>;
  const std::vector<Item> items{
      {std::string(3000, 'a'), 1, std::vector<double>(500, 2.5), std::vector<char>(10, 'c')},
      {"short", 2, {}, std::nullopt},
      {std::string(100, 'b'), 3, std::vector<double>(2000, -1.0), std::vector<char>(4096, 'd')}};
  PlainAndLending both;
  for (const Item& item : items) {
    for (Writer* out : both.writers()) {
      // A length ahead of each value, written over once the value is in.
      const std::size_t at = out->size();
      out->put(std::uint64_t{0});
      procpool::detail::save(*out, item);
      const std::uint64_t length = out->size() - at - sizeof length;
      out->overwrite(at, &length, sizeof length);
    }
  }
  both.expect_the_same_bytes();
  // The string of 3000, the 500 and 2000 doubles, the 4096 chars: not copied.
  ASSERT_EQ(both.lent.size(), 4u);
  EXPECT_EQ(both.lent[0].data, reinterpret_cast<const std::byte*>(std::get<0>(items[0]).data()));
  EXPECT_LT(both.lending.size(), both.plain.size() - 3000 - 4000 - 16000 - 4096 + 1);
}

TEST(LendingWriter, TruncatingDropsTheBlocksLentAfter) {
  const std::vector<char> big(5000, 'x');
  PlainAndLending both;
  for (Writer* out : both.writers()) {
    procpool::detail::save(*out, big);
    const std::size_t mark = out->size();
    procpool::detail::save(*out, std::make_tuple(big, 7, big));  // as an input whose save threw
    out->truncate(mark);
    procpool::detail::save(*out, 42);
  }
  both.expect_the_same_bytes();
  EXPECT_EQ(both.lent.size(), 1u);
}

TEST(DenseReplies, RetaggingInPlaceKeepsEveryValue) {
  Buffer buffer;
  Writer out(buffer);
  out.put(std::uint32_t{0xabcdef});  // something before the values stays put
  for (std::int64_t v : {11, -22, 33})
    out.put(v);
  procpool::detail::retag_dense_values(buffer, 4, 3, sizeof(std::int64_t));
  procpool::detail::ChunkDone done;
  done.count = 3;
  done.payload.append(buffer.data() + 4, buffer.size() - 4);
  const auto outcomes = procpool::detail::decode_chunk<std::int64_t>(done);
  ASSERT_EQ(outcomes.size(), 3u);
  EXPECT_EQ(*outcomes[0].value, 11);
  EXPECT_EQ(*outcomes[1].value, -22);
  EXPECT_EQ(*outcomes[2].value, 33);
}

TEST(DenseReplies, ADenseReplyOfTheWrongSizeIsAProtocolError) {
  procpool::detail::ChunkDone done;
  done.count = 4;
  done.dense = true;
  for (std::int64_t v : {1, 2, 3})  // one value short
    done.payload.append(&v, sizeof v);
  const auto outcomes = procpool::detail::decode_chunk<std::int64_t>(done);
  ASSERT_EQ(outcomes.size(), 4u);
  for (const auto& o : outcomes)
    EXPECT_THROW(std::rethrow_exception(o.error), procpool::ProtocolError);
  const auto strings = procpool::detail::decode_chunk<std::string>(done);  // never dense
  EXPECT_THROW(std::rethrow_exception(strings[0].error), procpool::ProtocolError);
}

}  // namespace
