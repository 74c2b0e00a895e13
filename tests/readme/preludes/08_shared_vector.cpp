// snippet: auto rows = procpool::map([](int row) {
#include <procpool/procpool.hpp>

#include <span>
#include <vector>

void fill_row(std::span<float> values, int row);
std::vector<int> row_ids;
void use(float value);

void snippet() {
  // @snippet
  use(first);
}
