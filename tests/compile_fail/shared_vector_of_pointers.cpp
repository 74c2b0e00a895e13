#include <procpool/procpool.hpp>
int main() {
  static int x = 1;
  auto out = procpool::map(
      [](int) {
        procpool::SharedVector<int*> addresses(1);
        addresses[0] = &x;
        return addresses;
      },
      std::vector{1});
  return static_cast<int>(out.size());
}
