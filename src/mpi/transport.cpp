#include <mpi.h>
#include <sys/prctl.h>

#include <algorithm>
#include <climits>
#include <cstdlib>
#include <cstring>

#include "procpool/errors.hpp"
#include "wire.hpp"

namespace procpool::mpi::detail {
namespace {

/// The first piece of every message has this tag, the rest the next one: MPI
/// keeps messages between two ranks with the same tag in order, which is what
/// lets a message's pieces follow it, and a probe for new messages never
/// mistakes a piece for one.
constexpr int message_tag = 7171;
constexpr int piece_tag = 7172;
/// Signals (see Transport::signal) have a tag of their own: they overtake
/// the messages before them, a large one still arriving included.
constexpr int signal_tag = 7173;

/// Messages shorter than this are sent eagerly (Open MPI's TCP eager limit
/// is 64 KiB): once probed, they are received at once.
constexpr std::size_t small_message = std::size_t{64} << 10;

/// A message with lent parts (with_lent_blocks) takes at least this much
/// into its first part: more than small_message.
constexpr std::size_t first_part_at_least = std::size_t{128} << 10;

void check(int status, const char* what) {
  if (status == MPI_SUCCESS) return;
  char text[MPI_MAX_ERROR_STRING];
  int length = 0;
  MPI_Error_string(status, text, &length);
  throw Error(std::string("procpool::mpi: ") + what +
              " failed: " + std::string(text, static_cast<std::size_t>(length)));
}

int as_count(std::size_t n) {
  return static_cast<int>(n);  // callers keep n <= max_piece_ < INT_MAX
}

}  // namespace

struct Transport::Pending {
  int rank = 0;
  Parts message;
  std::size_t size = 0;
  std::uint64_t lender = 0;  // see send
  std::vector<MPI_Request> requests;
};

/// A message being received: its first piece, then each further one in turn.
struct Transport::Incoming {
  int from = 0;
  Buffer message;
  std::size_t at = 0;       // bytes in place
  std::uint64_t total = 0;  // 0: the first piece has not arrived yet
  MPI_Request request = MPI_REQUEST_NULL;
  bool done = false;
};

Transport::Transport() : max_piece_(std::size_t{1} << 30) {
  // Tests set a small piece to exercise the splitting without moving 2 GiB.
  if (const char* piece = std::getenv("PROCPOOL_MPI_MAX_PIECE")) {
    const unsigned long long n = std::strtoull(piece, nullptr, 10);
    if (n >= 64 && n <= (std::size_t{1} << 30)) max_piece_ = static_cast<std::size_t>(n);
  }
}

Transport::~Transport() = default;

Buffer joined(Parts parts) {
  if (parts.size() == 1) return std::move(parts.front());
  std::size_t total = 0;
  for (const Buffer& part : parts)
    total += part.size();
  Buffer message;
  Writer out(message);
  out.prepare_for(total);
  for (const Buffer& part : parts)
    out.write_block(part.data(), part.size());
  return message;
}

Parts with_lent_blocks(Buffer message, const std::vector<LentBlock>& lent) {
  if (lent.empty()) return single_part(std::move(message));
  Parts parts;
  const auto copy_of = [&message](std::size_t from, std::size_t to) {
    Buffer part(to - from);
    if (to != from) std::memcpy(part.data(), message.data() + from, to - from);
    return part;
  };
  std::size_t at = 0;
  for (const LentBlock& block : lent) {
    std::size_t taken = 0;  // of the block's first bytes, into the part before it
    if (parts.empty()) {
      // The first part keeps the header, and the start of the first block
      // too: a first piece that goes eagerly (under small_message) made
      // 16 MiB inputs cross at half the speed (0.20 against 0.30-0.49 GB/s
      // in mpi_bench --profile-inputs), though why was not found.
      parts.push_back(copy_of(at, block.at));
      taken = std::min(block.size, first_part_at_least);
      parts.back().append(block.data, taken);
    } else if (block.at != at) {
      parts.push_back(copy_of(at, block.at));
    }
    parts.push_back(Buffer::over(const_cast<std::byte*>(block.data + taken), block.size - taken));
    parts.back().resize(block.size - taken);
    at = block.at;
  }
  if (at != message.size()) parts.push_back(copy_of(at, message.size()));
  return parts;
}

bool Transport::lending(std::uint64_t lender) const noexcept {
  return std::any_of(pending_.begin(), pending_.end(),
                     [lender](const Pending& p) { return p.lender == lender; });
}

void Transport::send(int rank, Parts message, std::uint64_t lender) {
  std::uint64_t total = 0;
  for (const Buffer& part : message)
    total += part.size();
  if (message.empty() || message.front().size() < message_header + 1) {  // its size, then its type
    throw ProtocolError("procpool::mpi: a message without its header");
  }
  std::memcpy(message.front().data(), &total, sizeof total);
  Pending& p = pending_.emplace_back();
  p.rank = rank;
  p.message = std::move(message);
  p.size = static_cast<std::size_t>(total);
  // Only a message that holds some of the lender's memory (a part it
  // borrows) is its: one whose bytes are all its own may stay pending for
  // ever (a stopped node) at no cost to the caller (Hub::give_up_on_locked).
  const bool borrows = std::any_of(p.message.begin(), p.message.end(),
                                   [](const Buffer& part) { return part.borrowed(); });
  p.lender = borrows ? lender : 0;
  // Each part goes in pieces of at most max_piece_ bytes, in order; the
  // receiver puts them one after the other (post_next_piece), whatever their
  // sizes. Only the very first piece has the message tag.
  bool first = true;
  for (const Buffer& part : p.message) {
    for (std::size_t at = 0; at < part.size(); at += max_piece_) {
      const std::size_t n = std::min<std::size_t>(max_piece_, part.size() - at);
      MPI_Request request;
      check(MPI_Isend(part.data() + at, as_count(n), MPI_BYTE, rank,
                      first ? message_tag : piece_tag, MPI_COMM_WORLD, &request),
            "MPI_Isend");
      p.requests.push_back(request);
      first = false;
    }
  }
  if (indices_.size() < p.requests.size()) indices_.resize(p.requests.size());
}

void Transport::signal(int rank, Signal what) {
  Pending& p = pending_.emplace_back();
  p.rank = rank;
  p.message = single_part(Buffer(1));
  p.message.front().data()[0] = static_cast<std::byte>(what);
  p.size = 1;
  MPI_Request request;
  check(
      MPI_Isend(p.message.front().data(), 1, MPI_BYTE, rank, signal_tag, MPI_COMM_WORLD, &request),
      "MPI_Isend");
  p.requests.push_back(request);
  if (indices_.empty()) indices_.resize(1);
}

std::optional<std::pair<int, Signal>> Transport::receive_signal() {
  int arrived = 0;
  MPI_Status status;
  check(MPI_Iprobe(MPI_ANY_SOURCE, signal_tag, MPI_COMM_WORLD, &arrived, &status), "MPI_Iprobe");
  if (!arrived) return std::nullopt;
  std::byte what{};
  check(MPI_Recv(&what, 1, MPI_BYTE, status.MPI_SOURCE, signal_tag, MPI_COMM_WORLD,
                 MPI_STATUS_IGNORE),
        "MPI_Recv");
  heard_[status.MPI_SOURCE] = std::chrono::steady_clock::now();
  return std::make_pair(status.MPI_SOURCE, static_cast<Signal>(what));
}

bool Transport::progress() {
  for (auto it = pending_.begin(); it != pending_.end();) {
    int finished = 0;
    check(MPI_Testsome(static_cast<int>(it->requests.size()), it->requests.data(), &finished,
                       indices_.data(), MPI_STATUSES_IGNORE),
          "MPI_Testsome");
    // A piece of a message that is not tiny has reached `rank` (beyond what
    // MPI buffers): it is alive. (A tiny one, a signal, is buffered at once.)
    if (finished > 0 && it->size >= small_message)
      heard_[it->rank] = std::chrono::steady_clock::now();
    const bool done = std::all_of(it->requests.begin(), it->requests.end(),
                                  [](MPI_Request r) { return r == MPI_REQUEST_NULL; });
    it = done ? pending_.erase(it) : std::next(it);
  }
  return std::all_of(pending_.begin(), pending_.end(),
                     [this](const Pending& p) { return given_up(p.rank); });
}

bool Transport::receiving() const noexcept {
  return std::any_of(incoming_.begin(), incoming_.end(),
                     [this](const Incoming& in) { return !given_up(in.from); });
}

std::chrono::steady_clock::time_point Transport::last_heard(int rank) const {
  const auto it = heard_.find(rank);
  return it == heard_.end() ? std::chrono::steady_clock::time_point{} : it->second;
}

bool Transport::lending_to(int rank) const noexcept {
  return std::any_of(pending_.begin(), pending_.end(),
                     [rank](const Pending& p) { return p.rank == rank && p.lender != 0; });
}

void Transport::give_up_on(int rank) {
  if (!given_up(rank)) given_up_.push_back(rank);
}

bool Transport::given_up(int rank) const noexcept {
  return std::find(given_up_.begin(), given_up_.end(), rank) != given_up_.end();
}

bool Transport::moving_large() const noexcept {
  constexpr std::size_t large = std::size_t{1} << 20;
  for (const Pending& p : pending_) {
    if (p.size >= large && !given_up(p.rank)) return true;
  }
  for (const Incoming& in : incoming_) {
    if (in.message.size() >= large && !given_up(in.from)) return true;
  }
  return false;
}

std::optional<std::pair<int, Buffer>> Transport::receive(int rank) {
  // Messages already in are handed out before MPI is asked for more: a probe
  // that finds nothing costs a pass over every connection.
  if (auto ready = take_finished(rank)) return ready;
  start_receives(rank);
  // A message's further pieces share one tag with every other message's from
  // that rank: they are taken only once the rank's earlier message is whole.
  std::vector<int> busy;
  for (Incoming& in : incoming_) {
    if (std::find(busy.begin(), busy.end(), in.from) != busy.end()) continue;
    advance(in);
    if (!in.done) busy.push_back(in.from);
  }
  return take_finished(rank);
}

std::optional<std::pair<int, Buffer>> Transport::take_finished(int rank) {
  // The first finished message that no earlier one from its rank precedes.
  std::vector<int> waiting;
  for (auto it = incoming_.begin(); it != incoming_.end(); ++it) {
    const bool behind = std::find(waiting.begin(), waiting.end(), it->from) != waiting.end();
    if (!it->done) {
      waiting.push_back(it->from);
      continue;
    }
    if (behind || (rank >= 0 && it->from != rank)) continue;
    auto out = std::make_pair(it->from, std::move(it->message));
    incoming_.erase(it);
    return out;
  }
  return std::nullopt;
}

void Transport::start_receives(int rank) {
  for (;;) {
    int arrived = 0;
    MPI_Status status;
    check(MPI_Iprobe(rank < 0 ? MPI_ANY_SOURCE : rank, message_tag, MPI_COMM_WORLD, &arrived,
                     &status),
          "MPI_Iprobe");
    if (!arrived) return;
    int count = 0;
    MPI_Get_count(&status, MPI_BYTE, &count);
    Incoming& in = incoming_.emplace_back();
    in.from = status.MPI_SOURCE;
    heard_[in.from] = std::chrono::steady_clock::now();
    in.message = Buffer(static_cast<std::size_t>(count));
    if (static_cast<std::size_t>(count) < small_message) {
      // Already here whole (sent eagerly): take it now, without another poll.
      // (The first message from that rank with this tag is the one probed.)
      check(MPI_Recv(in.message.data(), count, MPI_BYTE, in.from, message_tag, MPI_COMM_WORLD,
                     MPI_STATUS_IGNORE),
            "MPI_Recv");
      in.at = in.message.size();
      check_first_piece(in);
    } else {
      // Claimed by a matched probe (the rank's earliest message with this
      // tag is the one probed), so that no later probe can see it again.
      MPI_Message handle;
      check(MPI_Improbe(in.from, message_tag, MPI_COMM_WORLD, &arrived, &handle, &status),
            "MPI_Improbe");
      check(MPI_Imrecv(in.message.data(), count, MPI_BYTE, &handle, &in.request), "MPI_Imrecv");
    }
  }
}

void Transport::check_first_piece(Incoming& in) {
  // Its header says how long the whole message is.
  if (in.message.size() < message_header + 1) {
    throw ProtocolError("procpool::mpi: a message from rank " + std::to_string(in.from) +
                        " is too short");
  }
  std::memcpy(&in.total, in.message.data(), sizeof in.total);
  if (in.total < in.message.size()) {
    throw ProtocolError("procpool::mpi: a corrupt message header from rank " +
                        std::to_string(in.from));
  }
  in.message.resize(static_cast<std::size_t>(in.total));
  in.done = in.at >= in.total;
}

void Transport::post_next_piece(Incoming& in) {
  // The rest follows in pieces that were sent right after the first.
  const std::size_t room = std::min<std::size_t>(std::size_t{INT_MAX}, in.total - in.at);
  check(MPI_Irecv(in.message.data() + in.at, as_count(room), MPI_BYTE, in.from, piece_tag,
                  MPI_COMM_WORLD, &in.request),
        "MPI_Irecv");
}

void Transport::advance(Incoming& in) {
  while (!in.done) {
    if (in.request == MPI_REQUEST_NULL) {
      post_next_piece(in);  // the first piece is in: now the rest, in turn
      continue;
    }
    int finished = 0;
    MPI_Status status;
    check(MPI_Test(&in.request, &finished, &status), "MPI_Test");
    if (!finished) return;
    int got = 0;
    MPI_Get_count(&status, MPI_BYTE, &got);
    // (MPI_Test has set the finished request to MPI_REQUEST_NULL.)
    if (in.total == 0) {
      in.at = in.message.size();
      check_first_piece(in);
      continue;
    }
    if (got <= 0) throw ProtocolError("procpool::mpi: an empty piece of a message");
    heard_[in.from] = std::chrono::steady_clock::now();
    in.at += static_cast<std::size_t>(got);
    in.done = in.at >= in.total;
  }
}

void poll_precisely() {
  ::prctl(PR_SET_TIMERSLACK, 1000UL);  // 1 us; best effort
}

std::chrono::microseconds PollPace::next_wait(std::chrono::microseconds slowest,
                                              Clock::time_point now) const {
  const auto quiet = std::chrono::duration_cast<std::chrono::microseconds>(now - last_active_);
  if (quiet < fast_for) return fastest;
  return std::clamp(quiet / share, fastest, std::max(fastest, slowest));
}

}  // namespace procpool::mpi::detail
