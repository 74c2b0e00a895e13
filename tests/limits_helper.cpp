// Runs a Pool of 8 workers over 2000 inputs (every 100th result 200 KB) and
// prints how many results were wrong and the insights; hostile_test runs it
// under tight ulimits. Exit status: 0 all right, 1 wrong results, 2 an error.
//
//     limits_helper [--open-files-beyond N | --open-files N | --out-of-memory]
//     limits_helper --large-results-beyond N   four 32 MiB results, N descriptors free
//
// These set RLIMIT_NOFILE once the program has loaded: so that N more
// descriptors can be opened, or to N. A test runner's inherited
// descriptors make a fixed ulimit -n in a shell meaningless (and can keep
// the program from even loading its libraries).
#include <dirent.h>
#include <sys/resource.h>

#include <procpool/procpool.hpp>

#include <cstdio>
#include <cstdlib>
#include <set>
#include <string>
#include <vector>

namespace {

std::string expected(int x) {
  return x % 100 == 0 ? std::string(200000, 'z') : std::to_string(x);
}

/// The limit under which exactly `free` more descriptors can be opened:
/// new descriptors take the lowest numbers not in use, below the limit.
int limit_leaving(int free) {
  std::set<int> open;
  DIR* dir = ::opendir("/proc/self/fd");
  if (!dir) return free + 3;
  const int own = ::dirfd(dir);
  while (dirent* entry = ::readdir(dir)) {
    if (entry->d_name[0] == '.') continue;
    const int fd = std::atoi(entry->d_name);
    if (fd != own) open.insert(fd);
  }
  ::closedir(dir);
  int limit = 0;
  for (int left = free; left > 0; ++limit)
    left -= open.contains(limit) ? 0 : 1;
  return limit;
}

}  // namespace

/// Touches `mib` MiB, page by page, and returns a checksum.
long touch_memory(int mib) {
  std::vector<char> block(static_cast<std::size_t>(mib) << 20);
  long sum = 0;
  for (std::size_t i = 0; i < block.size(); i += 4096) {
    block[i] = static_cast<char>(i);
    sum += block[i];
  }
  return sum;
}

/// One worker whose task needs more memory than the cgroup allows: exits 0
/// when the task failed with WorkerCrashed saying the OOM killer killed it.
int out_of_memory() {
  procpool::Pool pool({.processes = 1});
  try {
    (void)pool.map(&touch_memory, std::vector<int>{1024});
    std::printf("no error\n");
    return 1;
  } catch (const procpool::WorkerCrashed& e) {
    std::printf("what: %s\n%s", e.what(), pool.insights().to_string().c_str());
    return e.out_of_memory() ? 0 : 1;
  }
}

/// Four results of 32 MiB (each arrives as a memory file, one descriptor)
/// from a fork-per-call map: 0 when all are right, 2 with the error.
int large_results() {
  try {
    const auto out = procpool::map(
        [](int x) { return std::vector<char>(std::size_t{32} << 20, static_cast<char>(x)); },
        std::vector<int>{1, 2, 3, 4}, {.processes = 2});
    for (std::size_t i = 0; i < out.size(); ++i)
      if (out[i].size() != std::size_t{32} << 20 || out[i][12345] != static_cast<char>(i + 1))
        return 1;
    std::printf("all right\n");
    return 0;
  } catch (const std::exception& e) {
    std::printf("error: %s\n", e.what());
    return 2;
  }
}

int main(int argc, char** argv) {
  if (argc == 2 && std::string(argv[1]) == "--out-of-memory") return out_of_memory();
  if (argc == 3 && std::string(argv[1]) == "--large-results-beyond") {
    const auto limit = static_cast<rlim_t>(limit_leaving(std::atoi(argv[2])));
    const rlimit open_files{limit, limit};
    if (::setrlimit(RLIMIT_NOFILE, &open_files) != 0) return 3;
    return large_results();
  }
  const std::string option = argc == 3 ? argv[1] : "";
  if (option == "--open-files-beyond" || option == "--open-files") {
    const int n = std::atoi(argv[2]);
    const auto limit = static_cast<rlim_t>(option == "--open-files" ? n : limit_leaving(n));
    const rlimit open_files{limit, limit};
    if (::setrlimit(RLIMIT_NOFILE, &open_files) != 0) return 3;
    std::printf("open files limit %lu\n", static_cast<unsigned long>(limit));
  }
  try {
    procpool::Pool pool({.processes = 8, .warn_oversubscription = false});
    std::vector<int> in(2000);
    for (int i = 0; i < 2000; ++i)
      in[static_cast<std::size_t>(i)] = i;
    const auto out = pool.map(&expected, in);
    std::size_t wrong = 0;
    for (int i = 0; i < 2000; ++i)
      wrong += out[static_cast<std::size_t>(i)] == expected(i) ? 0 : 1;
    std::printf("wrong %zu\n%s", wrong, pool.insights().to_string().c_str());
    return wrong == 0 ? 0 : 1;
  } catch (const std::exception& e) {
    std::printf("error: %s\n", e.what());
    return 2;
  }
}
