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
  Buffer message;
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

void Transport::send(int rank, Buffer message) {
  const std::uint64_t total = message.size();
  std::memcpy(message.data(), &total, sizeof total);
  Pending& p = pending_.emplace_back();
  p.message = std::move(message);
  for (std::size_t at = 0; at < total; at += max_piece_) {
    const std::size_t n = std::min<std::size_t>(max_piece_, total - at);
    MPI_Request request;
    check(MPI_Isend(p.message.data() + at, as_count(n), MPI_BYTE, rank,
                    at == 0 ? message_tag : piece_tag, MPI_COMM_WORLD, &request),
          "MPI_Isend");
    p.requests.push_back(request);
  }
}

bool Transport::progress() {
  for (auto it = pending_.begin(); it != pending_.end();) {
    int done = 0;
    check(MPI_Testall(static_cast<int>(it->requests.size()), it->requests.data(), &done,
                      MPI_STATUSES_IGNORE),
          "MPI_Testall");
    it = done ? pending_.erase(it) : std::next(it);
  }
  return pending_.empty();
}

std::optional<std::pair<int, Buffer>> Transport::receive(int rank) {
  start_receives(rank);
  for (Incoming& in : incoming_)
    advance(in);
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
    MPI_Message handle;
    MPI_Status status;
    check(MPI_Improbe(rank < 0 ? MPI_ANY_SOURCE : rank, message_tag, MPI_COMM_WORLD, &arrived,
                      &handle, &status),
          "MPI_Improbe");
    if (!arrived) return;
    int count = 0;
    MPI_Get_count(&status, MPI_BYTE, &count);
    Incoming& in = incoming_.emplace_back();
    in.from = status.MPI_SOURCE;
    in.message = Buffer(static_cast<std::size_t>(count));
    check(MPI_Imrecv(in.message.data(), count, MPI_BYTE, &handle, &in.request), "MPI_Imrecv");
  }
}

void Transport::advance(Incoming& in) {
  while (!in.done) {
    int finished = 0;
    MPI_Status status;
    check(MPI_Test(&in.request, &finished, &status), "MPI_Test");
    if (!finished) return;
    int got = 0;
    MPI_Get_count(&status, MPI_BYTE, &got);
    if (in.total == 0) {
      // The first piece: its header says how long the whole message is.
      if (in.message.size() < message_header + 1) {
        throw ProtocolError("procpool::mpi: a message from rank " + std::to_string(in.from) +
                            " is too short");
      }
      std::memcpy(&in.total, in.message.data(), sizeof in.total);
      if (in.total < in.message.size()) {
        throw ProtocolError("procpool::mpi: a corrupt message header from rank " +
                            std::to_string(in.from));
      }
      in.at = in.message.size();
      in.message.resize(static_cast<std::size_t>(in.total));
    } else {
      if (got <= 0) throw ProtocolError("procpool::mpi: an empty piece of a message");
      in.at += static_cast<std::size_t>(got);
    }
    if (in.at >= in.total) {
      in.done = true;
      return;
    }
    // The rest follows in pieces that were sent right after the first.
    const std::size_t room = std::min<std::size_t>(std::size_t{INT_MAX}, in.total - in.at);
    check(MPI_Irecv(in.message.data() + in.at, as_count(room), MPI_BYTE, in.from, piece_tag,
                    MPI_COMM_WORLD, &in.request),
          "MPI_Irecv");
  }
}

void poll_precisely() {
  ::prctl(PR_SET_TIMERSLACK, 1000UL);  // 1 us; best effort
}

}  // namespace procpool::mpi::detail
