// The messages between the root and the nodes of an mpi::Pool, and the MPI
// transport that carries them between ranks.
#pragma once

#include <chrono>
#include <cstdint>
#include <list>
#include <map>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "procpool/detail/buffer.hpp"
#include "procpool/insights.hpp"
#include "procpool/options.hpp"

namespace procpool::mpi::detail {

using procpool::detail::Buffer;
using procpool::detail::LentBlock;
using procpool::detail::Reader;
using procpool::detail::Writer;

/// Every message starts with an 8-byte slot (its total size, filled in by the
/// transport) and this type.
enum class Msg : std::uint8_t {
  // root -> node
  create_pool = 1,  // u64 pool, options, code ref factory, u8 has init, [code ref init]
  destroy_pool,     // u64 pool: finish its work and end its workers
  terminate_pool,   // u64 pool: kill its workers now
  open_call,        // u64 pool, u64 call, u8 one shot, setup bytes (rest)
  chunk,            // u64 call, u64 chunk, u64 count, u8 alone, framed inputs (rest); alone:
                    // long tasks, run apart from the call's other chunks (see NodeServer::Job)
  close_call,       // u64 call
  insights,         // u64 pool, u64 request
  shutdown,         // finish everything, answer bye, exit
  // node -> root
  chunk_done = 101,  // u64 call, u64 chunk, f64 node s, f64 run s, f64 worker s, u64 count,
                     // outcome records
  insights_reply,    // u64 request, insights
  bye,
  // either way
  bundle = 200,  // u64 count, then each message: u64 size, its bytes (its header slot, 0, included)
};

/// One byte that overtakes messages (Transport::signal): the root asks a
/// node that has said nothing for a while whether it is still there, even
/// while a large message to or from it is on its way.
enum class Signal : std::uint8_t { ping = 1, pong };

constexpr std::size_t message_header = sizeof(std::uint64_t);

/// A message as the parts it is sent in: the first holds the header and the
/// first fields; a large value can be a part of its own, sent from where it
/// is instead of copied into one buffer with the rest. The receiver gets the
/// message whole, in one Buffer.
using Parts = std::vector<Buffer>;

inline Parts single_part(Buffer message) {
  Parts parts;
  parts.push_back(std::move(message));
  return parts;
}

/// The parts joined in one buffer (a message that does not cross ranks).
Buffer joined(Parts parts);

/// `message` with the blocks its Writer lent (Writer::lend_blocks) put back
/// in as parts of their own, sent from where they are: the bytes between
/// them are copied into parts of their own, each small.
Parts with_lent_blocks(Buffer message, const std::vector<LentBlock>& lent);

/// A new message of `type`, ready for more fields.
inline Buffer new_message(Msg type) {
  Buffer b;
  Writer out(b);
  out.put(std::uint64_t{0});
  out.put(type);
  return b;
}

/// A reader over a message's fields after its type.
inline Reader message_body(const Buffer& message, Msg& type) {
  Reader in(message);
  in.take(message_header);
  type = in.get<Msg>();
  return in;
}

inline void put_string(Writer& out, const std::string& s) {
  out.put(static_cast<std::uint64_t>(s.size()));
  out.write(s.data(), s.size());
}
inline std::string get_string(Reader& in) {
  const auto n = in.get<std::uint64_t>();
  if (n > in.remaining()) throw ProtocolError("procpool::mpi: corrupt message (string length)");
  std::string s(static_cast<std::size_t>(n), '\0');
  in.read(s.data(), s.size());
  return s;
}

/// Small messages to one rank, sent as one (Msg::bundle): one MPI message,
/// and one system call on each side, instead of one per message. Only
/// messages that come in streams travel in bundles: a call's chunks (and
/// its opening and closing, which are ordered with them) and their replies.
/// A sender keeps the order of its messages to a rank: it sends its bundle
/// before any other message to that rank.
class Bundle {
 public:
  /// Whether `message` may travel in a bundle: one part, small, of a type
  /// that comes in streams.
  static bool takes(const Parts& message) noexcept;
  bool empty() const noexcept { return messages_.empty(); }
  /// Whether `message` fits beside those already in: the bundle stays small
  /// enough to be sent eagerly and received at once.
  bool has_room_for(const Buffer& message) const noexcept;
  void add(Buffer message);
  /// What to send: the one message alone (a copy), or a bundle of them.
  Buffer message() const;
  void clear() noexcept;
  /// message(), then clear().
  Buffer take() {
    Buffer m = message();
    clear();
    return m;
  }

 private:
  std::vector<Buffer> messages_;
  std::size_t bytes_ = 0;
};

/// The messages of a bundle (its fields after the type), in order. Throws
/// ProtocolError if it is corrupt.
std::vector<Buffer> unbundle(Reader in);

void save_options(Writer& out, const Options& options);
Options load_options(Reader& in);
void save_insights(Writer& out, const procpool::Insights& insights);
procpool::Insights load_insights(Reader& in);

/// Messages of any size between ranks over MPI_COMM_WORLD. Open MPI 4.1
/// counts in int, so a message travels as pieces of at most 1 GiB: the first
/// (which holds the total size in its header slot, and has a tag of its own),
/// then the rest, received straight into place. Receives never block: several
/// messages (from several ranks) arrive at once, and the thread that polls
/// can do other work between polls. Not thread-safe: one thread per process
/// uses it (or the callers serialise, as the root's Hub does).
class Transport {
 public:
  Transport();
  ~Transport();
  Transport(const Transport&) = delete;
  Transport& operator=(const Transport&) = delete;
  /// Starts sending; the message is kept until MPI is done with it.
  void send(int rank, Buffer message) { send(rank, single_part(std::move(message))); }
  /// The same for a message in parts (see Parts). `lender`, if not 0, names
  /// the call whose memory some parts are (see lending).
  void send(int rank, Parts message, std::uint64_t lender = 0);
  /// Whether a message with parts lent by call `lender` is still being sent:
  /// until it is, that memory must stay as it is.
  bool lending(std::uint64_t lender) const noexcept;
  /// Completes what it can of the sends; true when none is left.
  bool progress();
  /// A whole message from `rank` (or any rank: -1), if one has arrived;
  /// messages from one rank come in the order it sent them.
  std::optional<std::pair<int, Buffer>> receive(int rank);
  /// Whether a message has started to arrive and not finished.
  bool receiving() const noexcept;
  /// Whether a message of a MiB or more is on its way in or out: it moves
  /// only while MPI is called, for long enough that the caller should sleep
  /// between calls rather than spin.
  bool moving_large() const noexcept;
  /// Sends `what` to `rank`, ahead of any message not yet received there.
  void signal(int rank, Signal what);
  /// A signal that has arrived (from any rank), if one has.
  std::optional<std::pair<int, Signal>> receive_signal();
  /// When a message, a piece of one, or a signal last arrived from `rank`.
  std::chrono::steady_clock::time_point last_heard(int rank) const;
  /// Whether a message to `rank` that lends memory (see send) is unfinished.
  bool lending_to(int rank) const noexcept;
  /// `rank` is given up on (it stopped answering): what is on its way to or
  /// from it no longer counts in progress(), receiving() or moving_large().
  /// (MPI cannot take back a send: its buffers stay kept.)
  void give_up_on(int rank);

 private:
  struct Pending;
  struct Incoming;
  void start_receives(int rank);
  std::optional<std::pair<int, Buffer>> take_finished(int rank);
  void advance(Incoming& in);
  void check_first_piece(Incoming& in);
  void post_next_piece(Incoming& in);
  bool given_up(int rank) const noexcept;
  std::list<Pending> pending_;
  std::list<Incoming> incoming_;
  std::size_t max_piece_;
  std::map<int, std::chrono::steady_clock::time_point> heard_;
  std::vector<int> given_up_;
  std::vector<int> indices_;  // MPI_Testsome's, as many as a message's pieces
};

/// MPI cannot wake a thread: the threads that wait for it poll, sleeping a
/// few microseconds between polls while replies are due. Linux lets such a
/// sleep overrun by 50 us by default (timer slack), which would be most of a
/// small chunk's round trip; this makes the calling thread's sleeps precise.
void poll_precisely();

/// How long a polling thread sleeps before its next poll: a fraction of the
/// time since something last arrived or left, from `fastest` up to `slowest`.
/// Right after activity (a chunk's reply, say) the answer to it comes soon,
/// so it polls fast; the longer it has been quiet, the longer the next
/// message will likely take, and each poll (every connection asked, a system
/// call or two) is a cost to the workers on the same cores. A count of
/// polls (64 at 10 us, then 100 us) polled a node with 10 ms tasks ~80 times
/// between its replies, whatever their length.
class PollPace {
 public:
  using Clock = std::chrono::steady_clock;
  void active(Clock::time_point now = Clock::now()) noexcept { last_active_ = now; }
  [[nodiscard]] std::chrono::microseconds next_wait(std::chrono::microseconds slowest,
                                                    Clock::time_point now = Clock::now()) const;
  static constexpr std::chrono::microseconds fastest{10};
  /// Replies to a stream of small chunks come this soon after each other:
  /// until then every poll is a fast one.
  static constexpr std::chrono::microseconds fast_for{250};
  /// After that, a message that arrives t after the last waits at most
  /// t / share more.
  static constexpr int share = 8;

  /// Whether a message on its way (past the eager limit, it moves only while
  /// MPI is called) is still polled fast: for on_the_way_for after the last
  /// message. One on its way longer has stalled (its peer is stopped, say):
  /// it is polled as when quiet, not 100 000 times a second on a core that
  /// the workers need, until its peer is given up on.
  [[nodiscard]] bool on_the_way_fast(Clock::time_point now = Clock::now()) const noexcept {
    return now - last_active_ < on_the_way_for;
  }
  static constexpr std::chrono::microseconds on_the_way_for{2000};

 private:
  Clock::time_point last_active_ = Clock::now();
};

/// Says `message` on stderr and ends every rank of the job with status `code`.
[[noreturn]] void abort_job(const std::string& message, int code);
/// The same for a job that has given up on a node (see Hub::give_up_on_locked).
[[noreturn]] void end_job_without(const std::string& message, int code);

}  // namespace procpool::mpi::detail
