// snippet: procpool::Pool pool({.processes = 4, .start = procpool::Start::spawn},
#include <procpool/procpool.hpp>

#include <string>
#include <vector>

struct Model {
  static Model load(const std::string& path);
  std::vector<float> weights;
};

void snippet() {
  // @snippet
}
