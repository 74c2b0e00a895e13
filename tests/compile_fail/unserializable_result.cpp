#include <procpool/procpool.hpp>
struct Opaque {
  std::string text;  // not trivially copyable, no serialize()
};
int main() {
  auto out = procpool::map([](int x) { return Opaque{std::to_string(x)}; }, std::vector{1, 2});
  return static_cast<int>(out.size());
}
