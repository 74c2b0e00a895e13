// A program the failure tests run as a separate process, to hit it with
// Ctrl-C or kill it outright. Prints "ready" once its workers are busy.
//
//   failure_helper sigint-default   long map; SIGINT ends the program
//   failure_helper sigint-handled   long map; the program handles SIGINT; exits 3 on Interrupted
//   failure_helper pool-busy        a Pool built by a thread that has ended, running long tasks
//   failure_helper first-maps       four threads make the program's first maps at once; exits 0
//   failure_helper sigint-starting  a SIGINT while the map forks its workers; exits 3 on
//   Interrupted
#include <procpool/procpool.hpp>

#include <poll.h>
#include <pthread.h>
#include <unistd.h>

#include <atomic>
#include <csignal>
#include <cstdio>
#include <cstring>
#include <memory>
#include <thread>
#include <vector>

namespace {

volatile std::sig_atomic_t got_sigint = 0;

int slow_task(int x) {
  if (x < 2) {
    std::printf("ready\n");
    std::fflush(stdout);
  }
  std::this_thread::sleep_for(std::chrono::milliseconds(200));
  return x;
}

int long_map() {
  std::vector<int> inputs(1000);
  for (int i = 0; i < 1000; ++i)
    inputs[static_cast<std::size_t>(i)] = i;
  procpool::map(slow_task, inputs, {.processes = 2, .chunksize = 1});
  return 0;
}

}  // namespace

/// GCC 12's ThreadSanitizer makes a thread's signal state (a 72 KiB mapping)
/// on that thread's first blocking call, here the map's first poll. A SIGINT
/// that arrived while it did so made a second one inside the handler (strace),
/// and the program's handler never ran: its flag and the pool's interrupt
/// count were both 0 (gdb) and the map ran to its end, 1-4 times in 100 under
/// load. A blocking call before any SIGINT can come makes that state here, so
/// the tests are about procpool, not that race.
void make_sanitizer_signal_state_early() {
#if defined(__SANITIZE_THREAD__)
  ::poll(nullptr, 0, 0);
#endif
}

int main(int argc, char** argv) {
  if (argc != 2) return 2;
  make_sanitizer_signal_state_early();
  const char* mode = argv[1];
  if (std::strcmp(mode, "sigint-default") == 0) return long_map();
  if (std::strcmp(mode, "sigint-handled") == 0) {
    std::signal(SIGINT, [](int) { got_sigint = 1; });
    try {
      long_map();
    } catch (const procpool::Interrupted& e) {
      std::printf("interrupted: %s\n", e.what());
      return got_sigint ? 3 : 4;
    }
    return 0;
  }
  if (std::strcmp(mode, "sigint-starting") == 0) {
    // The SIGINT comes from inside the first fork of the call (a fork
    // handler of the program's): while the call starts its workers.
    static std::atomic<bool> armed{false};
    ::pthread_atfork(
        [] {
          if (armed.exchange(false)) ::kill(::getpid(), SIGINT);
        },
        nullptr, nullptr);
    std::signal(SIGINT, [](int) { got_sigint = 1; });
    armed = true;
    try {
      long_map();
    } catch (const procpool::Interrupted& e) {
      std::printf("interrupted: %s\n", e.what());
      return got_sigint ? 3 : 4;
    }
    return armed ? 5 : 0;  // 5: no fork ran the handler
  }
  if (std::strcmp(mode, "first-maps") == 0) {
    // Nothing of the library was used before: its singletons are made (or
    // were, as it loaded) while workers are forked on the other threads.
    std::vector<std::thread> threads;
    std::atomic<int> wrong{0};
    for (int t = 0; t < 4; ++t) {
      threads.emplace_back([t, &wrong] {
        const std::vector<int> inputs(50, t);
        for (int v : procpool::map([](int x) { return x + 1; }, inputs, {.processes = 2}))
          wrong += v != t + 1;
      });
    }
    for (auto& thread : threads)
      thread.join();
    return wrong == 0 ? 0 : 1;
  }
  if (std::strcmp(mode, "pool-busy") == 0) {
    std::unique_ptr<procpool::Pool> pool;
    std::thread([&pool] {
      pool = std::make_unique<procpool::Pool>(procpool::Options{.processes = 2});
    }).join();  // the thread that built the pool has ended: its workers must live on
    std::vector<int> inputs(1000);
    for (int i = 0; i < 1000; ++i)
      inputs[static_cast<std::size_t>(i)] = i;
    pool->map(slow_task, inputs);
    return 0;
  }
  return 2;
}
