// snippet: auto blocks = procpool::map([](int seed) {
#include <procpool/procpool.hpp>

#include <span>
#include <vector>

void fill(std::span<float> values, int seed);
std::vector<int> seeds;

void snippet() {
  // @snippet
}
