// snippet: procpool::Pool pool({.processes = 4}, [] { return Parser(load_grammar()); });
#include <procpool/procpool.hpp>

#include <chrono>
#include <future>
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

std::string load_grammar();

class Parser {
 public:
  explicit Parser(std::string grammar);
  Tree parse(const std::string& text);
  Tree parse(const std::string& text, int depth);
};

std::vector<std::string> lines;
void use(const Tree& tree);

void snippet() {
  // @snippet
}
