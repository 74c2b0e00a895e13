// snippet: procpool::Pool pool({.processes = 8, .start = procpool::Start::fork_server,
#include <procpool/procpool.hpp>

#include <vector>

struct Model {
  std::vector<float> weights;
};
Model load_model();

void snippet() {
  // @snippet
}
