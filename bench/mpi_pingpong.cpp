// The floor for big results over MPI: a plain ping-pong between ranks 0 and
// 1 of a message of M MiB (default 16), R round trips; prints GB/s one way.
//   mpirun -n 2 --mca btl tcp,self mpi_pingpong [MIB] [ROUNDS]
#include <mpi.h>

#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <vector>

int main(int argc, char** argv) {
  MPI_Init(&argc, &argv);
  const int mib = argc > 1 ? std::atoi(argv[1]) : 16;
  const int rounds = argc > 2 ? std::atoi(argv[2]) : 20;
  int rank = 0;
  MPI_Comm_rank(MPI_COMM_WORLD, &rank);
  const int bytes = mib << 20;
  std::vector<char> buffer(static_cast<std::size_t>(bytes), 'x');
  const auto start = std::chrono::steady_clock::now();
  for (int i = 0; i < rounds; ++i) {
    if (rank == 0) {
      MPI_Send(buffer.data(), bytes, MPI_BYTE, 1, 0, MPI_COMM_WORLD);
      MPI_Recv(buffer.data(), bytes, MPI_BYTE, 1, 0, MPI_COMM_WORLD, MPI_STATUS_IGNORE);
    } else if (rank == 1) {
      MPI_Recv(buffer.data(), bytes, MPI_BYTE, 0, 0, MPI_COMM_WORLD, MPI_STATUS_IGNORE);
      MPI_Send(buffer.data(), bytes, MPI_BYTE, 0, 0, MPI_COMM_WORLD);
    }
  }
  const double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  if (rank == 0) {
    std::printf("{\"pingpong_mib\": %d, \"pingpong_gbps\": %.4f}\n", mib,
                2.0 * rounds * static_cast<double>(bytes) / s / 1e9);
  }
  MPI_Finalize();
  return 0;
}
