// snippet: build_vocabulary(vocab);
#include <procpool/procpool.hpp>

#include <iostream>
#include <string>
#include <unordered_map>
#include <vector>

void build_vocabulary(std::unordered_map<std::string, int>& vocab);
std::vector<std::string> words;

void snippet() {
  std::unordered_map<std::string, int> vocab;
  // @snippet
}
