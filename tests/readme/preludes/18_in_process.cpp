// snippet: auto out = procpool::map(f, inputs, {.start = procpool::Start::in_process});
#include <procpool/procpool.hpp>

#include <vector>

double f(double input);
std::vector<double> inputs;

void snippet() {
  // @snippet
}
