// Shows the progress bar: N tasks of M milliseconds each, in worker processes.
//   progress_demo [tasks] [ms]
#include <procpool/procpool.hpp>

#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <thread>
#include <vector>

int main(int argc, char** argv) {
  const int tasks = argc > 1 ? std::atoi(argv[1]) : 200;
  const int ms = argc > 2 ? std::atoi(argv[2]) : 10;
  std::vector<int> inputs(static_cast<std::size_t>(tasks > 0 ? tasks : 1));
  auto out = procpool::map(
      [ms](int) {
        std::this_thread::sleep_for(std::chrono::milliseconds(ms));
        return 1;
      },
      inputs, {.chunksize = 1, .progress = procpool::Progress::automatic});
  std::printf("ran %zu tasks\n", out.size());
}
