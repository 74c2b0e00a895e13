// snippet: #include <procpool/procpool.hpp>
// The README's first example, a whole program: what it loads.
#include <string>
#include <unordered_map>
#include <vector>

std::unordered_map<std::string, int> load_vocab();
std::vector<std::string> load_words();

// @snippet
