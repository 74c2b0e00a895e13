// snippet: #include <procpool/mpi.hpp>
// The MPI example, a whole program: what it loads and runs.
#include <iostream>
#include <string>
#include <unordered_map>
#include <vector>

struct Vocabulary {
  std::unordered_map<std::string, int> ids;
};
Vocabulary load_vocabulary(const std::string& path);

// Each worker's state, built by init(), and the task that uses it.
struct Counters {
  long unknown = 0;
};
Counters init();
int lookup(Counters& counters, const std::string& word);
std::vector<std::string> words;

// @snippet
