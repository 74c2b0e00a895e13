// A user's program: what each consumption route must be able to build and run.
#include <procpool/procpool.hpp>

#include <cstdio>
#include <vector>

int main() {
  auto doubled = procpool::map([](int x) { return 2 * x; }, std::vector{1, 2, 3}, {.processes = 2});
  if (doubled != std::vector{2, 4, 6}) return 1;
  std::puts("consumer ok");
  return 0;
}
