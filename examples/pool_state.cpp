// A persistent pool whose workers each build an expensive state once, then
// serve several calls; call-wide extra arguments travel once per worker.
#include <procpool/procpool.hpp>

#include <iostream>
#include <string>
#include <unordered_map>
#include <vector>

struct Dictionary {
  std::unordered_map<std::string, int> ids;
};

Dictionary build_dictionary() {
  Dictionary d;
  for (int i = 0; i < 100000; ++i) {
    std::string word = std::to_string(i);
    word.insert(word.begin(), 'w');
    d.ids[word] = i;
  }
  return d;
}

int main() {
  procpool::Pool pool({.processes = 2}, build_dictionary);

  std::vector<std::string> words{"w1", "w42", "nope", "w99999"};
  auto ids = pool.map(
      [](Dictionary& d, const std::string& w, int missing) {
        auto it = d.ids.find(w);
        return it == d.ids.end() ? missing : it->second;
      },
      words, -1);
  for (std::size_t i = 0; i < words.size(); ++i)
    std::cout << words[i] << " -> " << ids[i] << '\n';

  auto future = pool.submit([](Dictionary& d) { return d.ids.size(); });
  std::cout << "dictionary size in a worker: " << future.get() << '\n';
}
