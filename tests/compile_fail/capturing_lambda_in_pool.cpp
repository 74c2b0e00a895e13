#include <procpool/procpool.hpp>
int main() {
  procpool::Pool pool;
  int offset = 3;
  return pool.map([offset](int x) { return x + offset; }, std::vector{1, 2}).front();
}
