// snippet: // Results in input order.
// snippet: std::vector<long> squares = procpool::map(
#include <procpool/procpool.hpp>

#include <ranges>
#include <string>
#include <utility>
#include <vector>

std::vector<long> inputs;
double score(const std::string& document);
std::vector<std::string> documents;
std::vector<double> best;

void snippet() {
  // @snippet
}
