// procpool's motivating scenario: tokenize a large corpus and look every word
// up in a vocabulary table that all workers share through fork, never copied.
//
//   procpool_demo [--words N] [--processes P]
#include <procpool/procpool.hpp>

#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <random>
#include <string>
#include <string_view>
#include <unordered_map>
#include <utility>
#include <vector>

namespace {

using Vocabulary = std::unordered_map<std::string, std::int32_t>;

std::string word_for(std::uint64_t n) {
  std::string w;
  do {
    w.push_back(static_cast<char>('a' + n % 26));
    n /= 26;
  } while (n != 0);
  return w;
}

Vocabulary build_vocabulary(std::size_t size) {
  Vocabulary vocab;
  vocab.reserve(size);
  for (std::size_t i = 0; i < size; ++i)
    vocab.emplace(word_for(i), static_cast<std::int32_t>(i));
  return vocab;
}

/// Documents of ~1000 words, Zipf-like: frequent words are short, some words are unknown.
std::vector<std::string> build_corpus(std::size_t words, std::size_t vocab_size) {
  std::mt19937_64 rng(2026);
  std::vector<std::string> documents;
  std::string doc;
  for (std::size_t i = 0; i < words; ++i) {
    const double u = std::uniform_real_distribution<double>(0, 1)(rng);
    const auto rank =
        static_cast<std::uint64_t>(std::pow(static_cast<double>(vocab_size) * 1.05, u));
    if (!doc.empty()) doc.push_back(' ');
    doc += word_for(rank);
    if ((i + 1) % 1000 == 0) documents.push_back(std::exchange(doc, {}));
  }
  if (!doc.empty()) documents.push_back(std::move(doc));
  return documents;
}

/// Token ids of one document; -1 for a word the vocabulary does not know.
std::vector<std::int32_t> tokenize(const std::string& document, const Vocabulary& vocab) {
  std::vector<std::int32_t> ids;
  std::string_view rest(document);
  std::string word;
  while (!rest.empty()) {
    const auto space = rest.find(' ');
    word.assign(rest.substr(0, space));
    auto it = vocab.find(word);
    ids.push_back(it == vocab.end() ? -1 : it->second);
    rest = space == std::string_view::npos ? std::string_view{} : rest.substr(space + 1);
  }
  return ids;
}

double seconds_since(std::chrono::steady_clock::time_point start) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
}

std::size_t parse_count(const char* text, const char* flag) {
  char* end = nullptr;
  unsigned long long value = std::strtoull(text, &end, 10);
  if (end == text || *end != '\0' || value == 0) {
    std::fprintf(stderr, "procpool_demo: %s needs a positive whole number, got '%s'\n", flag, text);
    std::exit(2);
  }
  return static_cast<std::size_t>(value);
}

}  // namespace

int main(int argc, char** argv) {
  std::size_t words = 4'000'000;
  unsigned processes = 0;
  for (int i = 1; i + 1 < argc; i += 2) {
    if (std::strcmp(argv[i], "--words") == 0) {
      words = parse_count(argv[i + 1], "--words");
    } else if (std::strcmp(argv[i], "--processes") == 0) {
      processes = static_cast<unsigned>(parse_count(argv[i + 1], "--processes"));
    } else {
      std::fprintf(stderr, "usage: procpool_demo [--words N] [--processes P]\n");
      return 2;
    }
  }
  const std::size_t vocab_size = 500'000;
  std::printf("%s\n", procpool::cpu_report().to_string().c_str());
  auto start = std::chrono::steady_clock::now();
  const Vocabulary vocab = build_vocabulary(vocab_size);
  const std::vector<std::string> corpus = build_corpus(words, vocab_size);
  std::printf("corpus: %zu words in %zu documents, vocabulary: %zu words (built in %.2f s)\n",
              words, corpus.size(), vocab.size(), seconds_since(start));

  start = std::chrono::steady_clock::now();
  std::vector<std::vector<std::int32_t>> serial;
  serial.reserve(corpus.size());
  for (const auto& doc : corpus)
    serial.push_back(tokenize(doc, vocab));
  const double serial_s = seconds_since(start);

  // The workers read `corpus` and `vocab` from the memory they inherit: only ids travel back.
  start = std::chrono::steady_clock::now();
  procpool::Insights insights;
  auto parallel = procpool::map(
      [&vocab](const std::string& doc) { return tokenize(doc, vocab); }, corpus,
      {.processes = processes, .progress = procpool::Progress::automatic, .insights = &insights});
  const double parallel_s = seconds_since(start);

  std::size_t unknown = 0;
  for (const auto& ids : serial) {
    for (auto id : ids)
      unknown += id < 0 ? 1 : 0;
  }
  const bool same = serial == parallel;
  std::printf("serial:   %.3f s\n", serial_s);
  std::printf("parallel: %.3f s (%u processes)\n", parallel_s,
              processes != 0 ? processes : procpool::usable_cpu_count());
  std::printf("speedup:  %.2fx\n", serial_s / parallel_s);
  std::printf("results identical: %s (%zu unknown words)\n", same ? "yes" : "NO", unknown);
  std::printf("\n%s", insights.to_string().c_str());
  return same ? 0 : 1;
}
