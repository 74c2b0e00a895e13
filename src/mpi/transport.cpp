#include <mpi.h>
#include <sys/prctl.h>

#include <climits>
#include <cstdlib>
#include <cstring>

#include "procpool/errors.hpp"
#include "wire.hpp"

namespace procpool::mpi::detail {
namespace {

/// One tag for every message: MPI keeps messages between two ranks with the
/// same tag in order, which is what lets a message's pieces follow it.
constexpr int message_tag = 7171;

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
    check(MPI_Isend(p.message.data() + at, as_count(n), MPI_BYTE, rank, message_tag, MPI_COMM_WORLD,
                    &request),
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
  int arrived = 0;
  MPI_Status status;
  check(
      MPI_Iprobe(rank < 0 ? MPI_ANY_SOURCE : rank, message_tag, MPI_COMM_WORLD, &arrived, &status),
      "MPI_Iprobe");
  if (!arrived) return std::nullopt;
  const int from = status.MPI_SOURCE;
  int count = 0;
  MPI_Get_count(&status, MPI_BYTE, &count);
  Buffer message(static_cast<std::size_t>(count));
  check(MPI_Recv(message.data(), count, MPI_BYTE, from, message_tag, MPI_COMM_WORLD,
                 MPI_STATUS_IGNORE),
        "MPI_Recv");
  if (message.size() < message_header + 1) {
    throw ProtocolError("procpool::mpi: a message from rank " + std::to_string(from) +
                        " is too short");
  }
  std::uint64_t total = 0;
  std::memcpy(&total, message.data(), sizeof total);
  if (total < message.size()) {
    throw ProtocolError("procpool::mpi: a corrupt message header from rank " +
                        std::to_string(from));
  }
  if (total > message.size()) {
    // The rest follows in pieces that were sent right after this one.
    std::size_t at = message.size();
    message.resize(static_cast<std::size_t>(total));
    while (at < total) {
      const std::size_t room = std::min<std::size_t>(std::size_t{INT_MAX}, total - at);
      MPI_Status piece;
      check(MPI_Recv(message.data() + at, as_count(room), MPI_BYTE, from, message_tag,
                     MPI_COMM_WORLD, &piece),
            "MPI_Recv");
      int got = 0;
      MPI_Get_count(&piece, MPI_BYTE, &got);
      if (got <= 0) throw ProtocolError("procpool::mpi: an empty piece of a message");
      at += static_cast<std::size_t>(got);
    }
  }
  return std::make_pair(from, std::move(message));
}

void poll_precisely() {
  ::prctl(PR_SET_TIMERSLACK, 1000UL);  // 1 us; best effort
}

}  // namespace procpool::mpi::detail
