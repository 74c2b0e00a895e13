// Runs a Pool of 8 workers over 2000 inputs (every 100th result 200 KB) and
// prints how many results were wrong and the insights; hostile_test runs it
// under tight ulimits. Exit status: 0 all right, 1 wrong results, 2 an error.
#include <procpool/procpool.hpp>

#include <cstdio>
#include <string>
#include <vector>

namespace {

std::string expected(int x) {
  return x % 100 == 0 ? std::string(200000, 'z') : std::to_string(x);
}

}  // namespace

int main() {
  try {
    procpool::Pool pool({.processes = 8, .warn_oversubscription = false});
    std::vector<int> in(2000);
    for (int i = 0; i < 2000; ++i)
      in[static_cast<std::size_t>(i)] = i;
    const auto out = pool.map(&expected, in);
    std::size_t wrong = 0;
    for (int i = 0; i < 2000; ++i)
      wrong += out[static_cast<std::size_t>(i)] == expected(i) ? 0 : 1;
    std::printf("wrong %zu\n%s", wrong, pool.insights().to_string().c_str());
    return wrong == 0 ? 0 : 1;
  } catch (const std::exception& e) {
    std::printf("error: %s\n", e.what());
    return 2;
  }
}
