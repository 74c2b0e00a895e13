// A result of more than 2 GiB crossing ranks: Open MPI 4.1 counts in int, so
// the message must travel in pieces. Run as `mpirun -n 2 mpi_huge`.
#include <procpool/mpi.hpp>

#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

#include "mpi_check.hpp"

namespace {

constexpr std::size_t huge_size = (std::size_t{2} << 30) + 12345;  // 2 GiB and a bit

std::string big_on_other_ranks(int x) {
  const char* rank = std::getenv("OMPI_COMM_WORLD_RANK");
  if (rank == nullptr || std::strcmp(rank, "0") == 0) return "root " + std::to_string(x);
  std::string s(huge_size, 'x');
  s.front() = 'A';
  s.back() = 'Z';
  s[huge_size / 2] = static_cast<char>('0' + x % 10);
  return s;
}

}  // namespace

int main(int argc, char** argv) {
  procpool::mpi::Session session(argc, argv);
  MPI_CHECK_MSG(session.size() == 2, "run with mpirun -n 2");
  // chunksize 1: the first input goes to the root's node, the second to rank 1.
  procpool::mpi::Pool pool({.processes = 1, .chunksize = 1});
  auto got = pool.map(&big_on_other_ranks, std::vector<int>{0, 1});
  MPI_CHECK(got.size() == 2);
  MPI_CHECK(got[0] == "root 0");
  MPI_CHECK(got[1].size() == huge_size);
  MPI_CHECK(got[1].front() == 'A' && got[1].back() == 'Z' && got[1][huge_size / 2] == '1');
  std::fprintf(stderr, "mpi_huge: a %zu-byte result crossed from rank 1: OK\n", got[1].size());
  return 0;
}
