// snippet: // A crash (segfault, abort, exit(), kill -9 from outside, the OOM killer):
#include <procpool/procpool.hpp>

#include <chrono>
#include <iostream>
#include <string>
#include <vector>

struct Tree {
  std::string text;
  int depth = 0;
  template <class Archive>
  void serialize(Archive& ar) {
    ar(text, depth);
  }
};

Tree parse(const std::string& text);
std::vector<std::string> records;
std::vector<std::string> lines;
void use(const Tree& tree);

int flaky(int input);
std::vector<int> inputs;

struct Puzzle {
  int cells[81];
};
int solve(const Puzzle& puzzle);
std::vector<Puzzle> puzzles;

void snippet() {
  // @snippet
}
