// The README's first example: squares of 0..9999 in worker processes, in order.
#include <procpool/procpool.hpp>

#include <iostream>
#include <numeric>
#include <vector>

int main() {
  std::vector<long> inputs(10000);
  std::iota(inputs.begin(), inputs.end(), 0L);
  std::vector<long> squares = procpool::map([](long x) { return x * x; }, inputs);
  std::cout << "sum of squares: " << std::accumulate(squares.begin(), squares.end(), 0L) << '\n';
}
