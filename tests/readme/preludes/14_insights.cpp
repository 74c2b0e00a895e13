// snippet: procpool::Insights insights;
#include <procpool/procpool.hpp>

#include <iostream>
#include <string>
#include <vector>

std::vector<int> tokenize(const std::string& document);
std::vector<std::string> documents;

void snippet() {
  // @snippet
}
