// A user's MPI program, run here without mpirun: a one-node pool.
#include <procpool/mpi.hpp>

#include <cstdio>
#include <vector>

int main(int argc, char** argv) {
  procpool::mpi::Session session(argc, argv);
  procpool::mpi::Pool pool({.processes = 2});
  auto doubled = pool.map([](int x) { return 2 * x; }, std::vector{1, 2, 3});
  if (doubled != std::vector{2, 4, 6}) return 1;
  std::puts("mpi consumer ok");
  return 0;
}
