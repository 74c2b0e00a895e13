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
  // chunksize 1, one worker per rank (two per node, shared out when both
  // ranks are on one host): at least one input runs on rank 1.
  procpool::mpi::Pool pool({.processes = 2, .chunksize = 1});
  auto got = pool.map(&big_on_other_ranks, std::vector<int>{0, 1});
  MPI_CHECK(got.size() == 2);
  std::size_t crossed = 0;
  for (int i = 0; i < 2; ++i) {
    const std::string& r = got[static_cast<std::size_t>(i)];
    if (r == "root " + std::to_string(i)) continue;
    MPI_CHECK(r.size() == huge_size);
    MPI_CHECK(r.front() == 'A' && r.back() == 'Z' && r[huge_size / 2] == '0' + i);
    ++crossed;
  }
  MPI_CHECK_MSG(crossed > 0, "no result came from rank 1");
  std::fprintf(stderr, "mpi_huge: %zu result(s) of %zu bytes crossed from rank 1: OK\n", crossed,
               huge_size);
  return 0;
}
