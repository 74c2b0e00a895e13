// procpool over every node of an MPI job: look words up in a vocabulary that
// each node builds once, and count them by length.
//
//   mpirun -n 3 --oversubscribe --bind-to none build/debug/examples/mpi_words --words 200000
//   srun -N4 --ntasks-per-node=1 -c32 --mpi=pmix ./mpi_words
//   ./mpi_words                      (no mpirun: a one-node pool)
#include <procpool/mpi.hpp>

#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <iostream>
#include <string>
#include <unordered_map>
#include <vector>

namespace {

/// Read-only and big in a real program (a vocabulary file): built by every
/// rank before the Session, it lives once per node and its workers inherit
/// it copy-on-write.
std::unordered_map<std::string, int> vocabulary;

std::string word(std::size_t i) {
  static const char* syllables[] = {"ka", "lo", "mi", "ne", "ru", "ta", "so", "vi"};
  std::string w;
  for (std::size_t n = i % 5 + 1; n > 0; --n, i /= 8)
    w += syllables[i % 8];
  return w;
}

/// Runs in a worker on some node: reads the inherited vocabulary.
int lookup(const std::string& w) {
  auto it = vocabulary.find(w);
  return it == vocabulary.end() ? -1 : it->second;
}

}  // namespace

int main(int argc, char** argv) {
  std::size_t words = 100000;
  for (int i = 1; i + 1 < argc; ++i) {
    if (std::strcmp(argv[i], "--words") == 0) words = std::strtoull(argv[i + 1], nullptr, 10);
  }
  for (std::size_t i = 0; i < 4096; ++i)
    vocabulary.emplace(word(i), static_cast<int>(i));

  procpool::mpi::Session mpi(argc, argv);  // returns on the root (rank 0) only
  procpool::mpi::Pool pool({.progress = procpool::Progress::automatic});

  std::vector<std::string> text;
  for (std::size_t i = 0; i < words; ++i)
    text.push_back(word(i * 7919 % 5000));
  std::vector<int> ids = pool.map(&lookup, text);

  std::size_t unknown = 0;
  for (int id : ids)
    unknown += id < 0;
  std::printf("%zu words on %d node(s), %u workers: %zu known, %zu unknown\n", ids.size(),
              mpi.size(), pool.processes(), ids.size() - unknown, unknown);
  std::cerr << pool.insights().to_string();
  return ids.size() == words ? 0 : 1;
}
