// procpool's benchmarks, one workload per subcommand; each prints one JSON line.
//
//   procpool_bench tiny_cs1 [--n 200000] [--reps 5]        tasks/s, chunksize 1, warm pool
//   procpool_bench tiny_lifecycle [--n 200000] [--reps 5]  Pool start + map (auto chunks) + stop
//   procpool_bench tiny_cereal [--n 200000] [--reps 5]     tasks/s, a cereal type in and out
//   procpool_bench payload_out [--tasks 64] [--mib 16]     16 MiB results, GB/s vs the copy floor
//   procpool_bench payload_in [--tasks 64] [--mib 16] [--pool 1]  16 MiB inputs from a lazy range
//   procpool_bench payload_zero_copy [--tasks 64] [--mib 16]  16 MiB SharedBuffer results,
//                                                          handed over, not copied
//   procpool_bench input_memory [--mib 1024]               one large input to a Pool: the
//                                                          caller's peak RSS over its input
//   procpool_bench startup [--reps 20]                     Pool start + one task + stop, ms
//   procpool_bench startup_spawn [--reps 20]               the same with Start::spawn workers
//   procpool_bench cpu [--tasks 64] [--task-ms 50]         efficiency vs serial and std::thread
//   procpool_bench shared [--vocab 5000000] [--keys 100000]  shared table: wall and extra memory,
//                                                          as built and on huge pages
//   procpool_bench imap_flat [--n 100000000]               RSS while imap consumes a lazy range
//   procpool_bench progress [--n 10000000] [--reps 5]      cost of the progress bar
//   procpool_bench submit [--n 100000] [--reps 5] [--processes 2]  tasks/s of n submit() calls
//                                                          kept as futures, then get() on all
//   procpool_bench initializer [--mib 256] [--tasks 16] [--recycle 1] [--processes 2] [--reps 3]
//                                                          a Pool whose initializer builds a table:
//                                                          wall and workers' private memory,
//                                                          Start::fork against Start::fork_server
#include <procpool/detail/memory_file.hpp>
#include <procpool/procpool.hpp>

#include <atomic>
#include <chrono>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <list>
#include <map>
#include <random>
#include <ranges>
#include <string>
#include <thread>
#include <unordered_map>
#include <vector>

#include "bench_util.hpp"

namespace {

using bench::Args;
using bench::Json;

long inc(long x) {
  return x + 1;
}

std::vector<long> iota_long(long n) {
  std::vector<long> v(static_cast<std::size_t>(n));
  for (long i = 0; i < n; ++i)
    v[static_cast<std::size_t>(i)] = i;
  return v;
}

int tiny_cs1(const Args& a) {
  const long n = a.get("--n", 200000);
  const auto inputs = iota_long(n);
  procpool::Pool pool({.processes = 2, .chunksize = 1});
  pool.map(inc, iota_long(1000));  // warm
  auto runs = bench::repeat(static_cast<int>(a.get("--reps", 5)), [&] { pool.map(inc, inputs); });
  for (double& r : runs)
    r = static_cast<double>(n) / r;
  Json("tiny_cs1")
      .num("tasks", static_cast<double>(n))
      .stats("tasks_per_s", bench::stats(runs))
      .print();
  return 0;
}

/// A user type that goes through cereal: its inputs and results are framed.
struct Record {
  std::string name;
  long id = 0;
  template <class Archive>
  void serialize(Archive& ar) {
    ar(name, id);
  }
};

Record bump(const Record& r) {
  return Record{r.name, r.id + 1};
}

int tiny_cereal(const Args& a) {
  const long n = a.get("--n", 200000);
  std::vector<Record> inputs;
  for (long i = 0; i < n; ++i)
    inputs.push_back(Record{"record", i});
  procpool::Pool pool({.processes = 2});
  pool.map(bump, std::vector<Record>(1000, Record{"warm", 0}));
  auto runs = bench::repeat(static_cast<int>(a.get("--reps", 5)), [&] { pool.map(bump, inputs); });
  for (double& r : runs)
    r = static_cast<double>(n) / r;
  Json("tiny_cereal")
      .num("tasks", static_cast<double>(n))
      .stats("tasks_per_s", bench::stats(runs))
      .print();
  return 0;
}

int tiny_lifecycle(const Args& a) {
  const long n = a.get("--n", 200000);
  const auto inputs = iota_long(n);
  const int reps = static_cast<int>(a.get("--reps", 5));
  auto pool_runs = bench::repeat(reps, [&] {
    procpool::Pool pool({.processes = 2});
    pool.map(inc, inputs);
  });
  auto fork_runs = bench::repeat(reps, [&] { procpool::map(inc, inputs, {.processes = 2}); });
  Json("tiny_lifecycle")
      .num("tasks", static_cast<double>(n))
      .stats("pool_s", bench::stats(pool_runs))
      .stats("fork_per_call_s", bench::stats(fork_runs))
      .print();
  return 0;
}

/// The floor for moving `tasks` payloads of `bytes`: the parent copying them into fresh vectors.
std::vector<double> copy_floor(const std::vector<char>& source, long tasks, int reps) {
  return bench::repeat(reps, [&] {
    std::vector<std::vector<char>> out;
    for (long i = 0; i < tasks; ++i)
      out.emplace_back(source.begin(), source.end());
  });
}

std::vector<double> to_gbps(std::vector<double> runs, double bytes) {
  for (double& r : runs)
    r = bytes / r / 1e9;
  return runs;
}

/// Moves `tasks` payloads of `--mib` MiB with `move(source)` and prints GB/s
/// next to the copy floor measured in the same run.
/// `more` adds fields of the workload's own to the line.
template <class Move>
int payload(const char* workload, const Args& a, char fill, Move move,
            const std::function<void(Json&, double bytes)>& more = {}) {
  const long tasks = a.get("--tasks", 64);
  const std::size_t size = static_cast<std::size_t>(a.get("--mib", 16)) << 20;
  const int reps = static_cast<int>(a.get("--reps", 5));
  const std::vector<char> source(size, fill);
  const double bytes = static_cast<double>(size) * static_cast<double>(tasks);
  auto floor = to_gbps(copy_floor(source, tasks, reps), bytes);
  auto runs = to_gbps(move(source, tasks, reps), bytes);
  const auto s = bench::stats(runs), f = bench::stats(floor);
  Json line(workload);
  line.num("mib", static_cast<double>(size >> 20))
      .num("tasks", static_cast<double>(tasks))
      .stats("gbps", s)
      .stats("floor_gbps", f)
      .num("fraction_of_floor", s.median / f.median);
  if (more) more(line, bytes);
  line.print();
  return 0;
}

int payload_out(const Args& a) {
  return payload("payload_out", a, 'x', [](const std::vector<char>& source, long tasks, int reps) {
    std::vector<long> ids(static_cast<std::size_t>(tasks));
    // Each worker returns the buffer it inherited: the cost measured is the transport.
    return bench::repeat(reps, [&] {
      procpool::map([&source](long) -> const std::vector<char>& { return source; }, ids,
                    {.processes = 2});
    });
  });
}

int payload_in(const Args& a) {
  // --pool 1: through a procpool::Pool started before the timed calls.
  const bool through_pool = a.get("--pool", 0) != 0;
  return payload("payload_in", a, 'y', [&](const std::vector<char>& source, long tasks, int reps) {
    std::list<std::vector<char>> inputs(static_cast<std::size_t>(tasks), source);  // must travel
    const auto size = [](const std::vector<char>& v) { return v.size(); };
    if (!through_pool)
      return bench::repeat(reps, [&] { procpool::map(size, inputs, {.processes = 2}); });
    procpool::Pool pool({.processes = 2});
    pool.map(size, std::vector<std::vector<char>>(2));  // its workers are up
    return bench::repeat(reps, [&] { pool.map(size, inputs); });
  });
}

/// What one large input costs the caller beyond the input itself: its peak
/// RSS (VmHWM) during a Pool's map of it, less the RSS with the input built.
int input_memory(const Args& a) {
  const auto bytes = static_cast<std::size_t>(a.get("--mib", 1024)) << 20;
  procpool::Pool pool({.processes = 1});
  pool.map(inc, iota_long(1));  // the worker is up before the measure
  std::vector<std::vector<char>> inputs;
  inputs.emplace_back(bytes, 'i');
  const long before_kb = bench::status_kb("VmHWM:");
  const double wall = bench::seconds(
      [&] { pool.map([](const std::vector<char>& v) { return v.size(); }, inputs); });
  const long peak_kb = bench::status_kb("VmHWM:");
  Json("input_memory")
      .num("mib", static_cast<double>(bytes >> 20))
      .num("seconds", wall)
      .num("caller_peak_mb", static_cast<double>(peak_kb) / 1024)
      .num("caller_peak_over_input_mb", static_cast<double>(peak_kb - before_kb) / 1024)
      .print();
  return 0;
}

/// SharedBuffers a worker filled before the timed call (one worker, so that
/// it holds them all): the call returns them, and what is timed is the hand-over.
std::vector<procpool::SharedBuffer>& worker_stock() {
  static std::vector<procpool::SharedBuffer> stock;
  return stock;
}

long stock_up(std::size_t bytes) {
  procpool::SharedBuffer block(bytes);
  std::memset(block.data(), 'z', block.size());
  worker_stock().push_back(std::move(block));
  return 0;
}

procpool::SharedBuffer take_from_stock(long) {
  procpool::SharedBuffer block = std::move(worker_stock().back());
  worker_stock().pop_back();
  return block;
}

int payload_zero_copy(const Args& a) {
  // The caller drops the buffers at the end of the timed call, as the floor
  // frees its copies; their pages are freed on another thread
  // (close_memory_file_aside), so each run is also timed until they are.
  std::vector<double> until_freed;
  return payload(
      "payload_zero_copy", a, 'z',
      [&](const std::vector<char>& source, long tasks, int reps) {
        procpool::Pool pool({.processes = 1});
        const std::vector<std::size_t> sizes(static_cast<std::size_t>(tasks), source.size());
        const std::vector<long> ids(static_cast<std::size_t>(tasks));
        std::vector<double> runs;
        for (int r = 0; r < reps; ++r) {
          pool.map(stock_up, sizes);  // not timed: the task's own work
          // Timed: the results arrive, are checked, and are dropped.
          const auto start = std::chrono::steady_clock::now();
          {
            const auto blocks = pool.map(take_from_stock, ids);
            for (const auto& block : blocks)
              if (block.size() != source.size() || block.data()[block.size() - 1] != std::byte{'z'})
                std::abort();
          }
          runs.push_back(bench::seconds_since(start));
          procpool::detail::wait_for_memory_files_closed_aside();
          until_freed.push_back(bench::seconds_since(start));
        }
        return runs;
      },
      [&](Json& line, double bytes) {
        if (!until_freed.empty())
          line.stats("until_freed_gbps", bench::stats(to_gbps(until_freed, bytes)));
      });
}

int startup(const Args& a) {
  const int reps = static_cast<int>(a.get("--reps", 20));
  const auto one_pool = [] {
    procpool::Pool pool({.processes = 2});
    pool.submit([](int x) { return x; }, 1).get();
  };
  one_pool();  // not timed, as the Python baseline leaves out its first ("cold") round
  auto pool_runs = bench::repeat(reps, one_pool);
  auto fork_runs = bench::repeat(
      reps, [] { procpool::map([](int x) { return x; }, std::vector<int>{1}, {.processes = 2}); });
  for (double& r : pool_runs)
    r *= 1e3;
  for (double& r : fork_runs)
    r *= 1e3;
  Json("startup")
      .stats("pool_ms", bench::stats(pool_runs))
      .stats("map_one_ms", bench::stats(fork_runs))
      .print();
  return 0;
}

/// As `startup`, with workers that are fresh runs of this executable
/// (Start::spawn): to compare with Python's spawn and forkserver Pools.
int startup_spawn(const Args& a) {
  const int reps = static_cast<int>(a.get("--reps", 20));
  const auto one_pool = [] {
    procpool::Pool pool({.processes = 2, .start = procpool::Start::spawn});
    pool.submit([](int x) { return x; }, 1).get();
  };
  one_pool();  // not timed, as in `startup`
  auto runs = bench::repeat(reps, one_pool);
  for (double& r : runs)
    r *= 1e3;
  Json("startup_spawn").stats("pool_ms", bench::stats(runs)).print();
  return 0;
}

volatile std::uint64_t sink;

std::uint64_t busy(std::uint64_t iterations) {
  std::uint64_t s = 0;
  for (std::uint64_t i = 0; i < iterations; ++i)
    s += i * i % 7;
  return s;
}

int cpu(const Args& a) {
  const long tasks = a.get("--tasks", 64);
  const double task_s = static_cast<double>(a.get("--task-ms", 50)) / 1e3;
  const int reps = static_cast<int>(a.get("--reps", 5));
  // Calibrate: iterations for one task of task_s.
  std::uint64_t iters = 1'000'000;
  while (bench::seconds([&] { sink = busy(iters); }) < 0.02)
    iters *= 2;
  iters = static_cast<std::uint64_t>(static_cast<double>(iters) * task_s /
                                     bench::seconds([&] { sink = busy(iters); }));
  std::vector<long> ids(static_cast<std::size_t>(tasks));
  std::vector<double> serial, pool, threads;
  for (int r = 0; r < reps; ++r) {  // alternate the three so drift hits all alike
    serial.push_back(bench::seconds([&] {
      for (long i = 0; i < tasks; ++i)
        sink = busy(iters);
    }));
    pool.push_back(bench::seconds(
        [&] { procpool::map([iters](long) { return busy(iters); }, ids, {.processes = 2}); }));
    threads.push_back(bench::seconds([&] {
      std::atomic<long> next{0};
      std::vector<std::thread> team;
      for (int t = 0; t < 2; ++t) {
        team.emplace_back([&] {
          while (next.fetch_add(1) < tasks)
            sink = busy(iters);
        });
      }
      for (auto& t : team)
        t.join();
    }));
  }
  const auto s = bench::stats(serial), p = bench::stats(pool), t = bench::stats(threads);
  Json("cpu")
      .num("tasks", static_cast<double>(tasks))
      .num("task_ms", task_s * 1e3)
      .stats("serial_s", s)
      .stats("procpool_s", p)
      .stats("threads_s", t)
      .num("efficiency", s.median / (2 * p.median))
      .num("threads_efficiency", s.median / (2 * t.median))
      .num("procpool_over_threads", p.median / t.median)
      .print();
  return 0;
}

// Wall time of `reps` calls (start, map, join) and the workers' extra memory:
// each worker reports its private memory now and then; its largest counts.
struct SharedRun {
  std::vector<double> runs;
  long extra_kb = 0;
};

SharedRun run_shared(const std::unordered_map<std::string, int>& vocab,
                     const std::vector<std::string>& keys, int reps) {
  SharedRun out;
  out.runs = bench::repeat(reps, [&] {
    procpool::map([&vocab](const std::string& k) { return vocab.at(k); }, keys, {.processes = 2});
  });
  struct Seen {
    pid_t pid;
    long private_kb;
  };
  auto seen = procpool::map(
      [&vocab](const std::string& k) {
        volatile int id = vocab.at(k);
        (void)id;
        static long calls = 0;
        long priv = 0;
        if (++calls % 5000 == 0) {
          priv = bench::rollup_kb("Private_Clean") + bench::rollup_kb("Private_Dirty");
        }
        return Seen{::getpid(), priv};
      },
      keys, {.processes = 2});
  std::map<pid_t, long> per_worker;
  for (const auto& s : seen)
    per_worker[s.pid] = std::max(per_worker[s.pid], s.private_kb);
  for (auto& [pid, kb] : per_worker)
    out.extra_kb += kb;
  return out;
}

// The table on the heap as built, then again after share_with_huge_pages().
int shared(const Args& a) {
  const long vocab_size = a.get("--vocab", 5000000);
  const long keys_n = a.get("--keys", 100000);
  const int reps = static_cast<int>(a.get("--reps", 5));
  const long rss_before = bench::status_kb("VmRSS");
  std::unordered_map<std::string, int> vocab;
  vocab.reserve(static_cast<std::size_t>(vocab_size));
  char name[32];
  for (long i = 0; i < vocab_size; ++i) {
    std::snprintf(name, sizeof name, "tok%08ld", i);
    vocab.emplace(name, static_cast<int>(i));
  }
  const long table_kb = bench::status_kb("VmRSS") - rss_before;
  std::mt19937_64 rng(1);
  std::vector<std::string> keys;
  for (long i = 0; i < keys_n; ++i) {
    std::snprintf(name, sizeof name, "tok%08ld",
                  static_cast<long>(rng() % static_cast<unsigned long>(vocab_size)));
    keys.emplace_back(name);
  }
  const SharedRun plain = run_shared(vocab, keys, reps);
  const procpool::HugePageReport moved = procpool::share_with_huge_pages();
  const SharedRun huge = run_shared(vocab, keys, reps);
  const auto fraction = [&](long kb) {
    return static_cast<double>(kb) / static_cast<double>(table_kb);
  };
  Json("shared")
      .num("vocab", static_cast<double>(vocab_size))
      .num("keys", static_cast<double>(keys_n))
      .stats("wall_s", bench::stats(plain.runs))
      .num("table_mb", static_cast<double>(table_kb) / 1024)
      .num("workers_extra_mb", static_cast<double>(plain.extra_kb) / 1024)
      .num("extra_fraction", fraction(plain.extra_kb))
      .num("huge_pages_move_s", moved.seconds)
      .num("huge_pages_mb", static_cast<double>(moved.huge_bytes) / (1 << 20))
      .num("huge_pages_error", moved.error)
      .stats("huge_wall_s", bench::stats(huge.runs))
      .num("huge_extra_fraction", fraction(huge.extra_kb))
      .print();
  return 0;
}

int imap_flat(const Args& a) {
  const long n = a.get("--n", 100000000);
  long rss_at_1m = 0, rss_max = 0;
  long i = 0, sum = 0;
  const double wall = bench::seconds([&] {
    for (long v : procpool::imap(inc, std::views::iota(0L, n), {.processes = 2})) {
      sum += v;
      if (++i % 1000000 == 0) {
        const long rss = bench::status_kb("VmRSS");
        if (i == 1000000) rss_at_1m = rss;
        rss_max = std::max(rss_max, rss);
      }
    }
  });
  Json("imap_flat")
      .num("items", static_cast<double>(n))
      .num("wall_s", wall)
      .num("items_per_s", static_cast<double>(n) / wall)
      .num("rss_at_1e6_kb", static_cast<double>(rss_at_1m))
      .num("rss_max_kb", static_cast<double>(rss_max))
      .num("growth_percent", rss_at_1m ? 100.0 * static_cast<double>(rss_max - rss_at_1m) /
                                             static_cast<double>(rss_at_1m)
                                       : 0)
      .num("checksum", static_cast<double>(sum % 1000003))
      .print();
  return 0;
}

int progress(const Args& a) {
  const long n = a.get("--n", 10000000);
  const int reps = static_cast<int>(a.get("--reps", 5));
  const auto inputs = iota_long(n);
  std::vector<double> off, on;
  const auto run_off = [&] {
    off.push_back(bench::seconds([&] { procpool::map(inc, inputs, {.processes = 2}); }));
  };
  const auto run_on = [&] {
    on.push_back(bench::seconds(
        [&] { procpool::map(inc, inputs, {.processes = 2, .progress = procpool::Progress::on}); }));
  };
  // Alternate, so that drift affects both alike, and swap which goes first
  // each time: the second of two back-to-back runs finds warmer caches.
  for (int r = 0; r < reps; ++r) {
    if (r % 2 == 0) {
      run_off();
      run_on();
    } else {
      run_on();
      run_off();
    }
  }
  // Each "on" run is compared with the "off" run next to it, so that a slow
  // stretch of the machine affects both sides of a ratio alike.
  std::vector<double> paired;
  for (std::size_t r = 0; r < on.size(); ++r)
    paired.push_back(on[r] / off[r]);
  const auto f = bench::stats(off), o = bench::stats(on);
  Json("progress")
      .num("tasks", static_cast<double>(n))
      .str("stderr", ::isatty(2) ? "terminal" : "not a terminal")
      .stats("off_s", f)
      .stats("on_s", o)
      .num("ratio_on_over_off", bench::stats(paired).median)
      .num("ratio_of_medians", o.median / f.median)
      .print();
  return 0;
}

// n pool.submit() calls kept as futures, then get() on each; Pool start is not timed.
int submit(const Args& a) {
  const long n = a.get("--n", 100000);
  const int reps = static_cast<int>(a.get("--reps", 5));
  procpool::Pool pool({.processes = static_cast<unsigned>(a.get("--processes", 2))});
  pool.submit(&inc, 0L).get();  // warm
  std::vector<procpool::Future<long>> futures;
  futures.reserve(static_cast<std::size_t>(n));
  long wrong = 0;
  auto runs = bench::repeat(reps, [&] {
    futures.clear();
    for (long i = 0; i < n; ++i)
      futures.push_back(pool.submit(&inc, i));
    for (long i = 0; i < n; ++i)
      wrong += futures[static_cast<std::size_t>(i)].get() != i + 1;
  });
  if (wrong) {
    std::fprintf(stderr, "procpool_bench submit: %ld wrong results\n", wrong);
    return 1;
  }
  for (double& r : runs)
    r = static_cast<double>(n) / r;
  Json("submit")
      .num("tasks", static_cast<double>(n))
      .num("processes", static_cast<double>(pool.processes()))
      .stats("tasks_per_s", bench::stats(runs))
      .print();
  return 0;
}

// ---- initializer: the state built once per worker, or once in a fork server

std::size_t model_bytes = 0;  // set before a pool starts; its workers (and server) inherit it

struct Model {
  std::vector<std::uint64_t> table;
};

Model build_model() {
  Model m;
  m.table.resize(model_bytes / sizeof(std::uint64_t));
  std::uint64_t x = 88172645463325252ull;
  for (std::uint64_t& v : m.table) {  // xorshift: some work per word, every page written
    x ^= x << 13;
    x ^= x >> 7;
    x ^= x << 17;
    v = x;
  }
  return m;
}

struct ModelSeen {
  pid_t pid = 0;
  long private_kb = 0;
  std::uint64_t probe = 0;
};

ModelSeen use_model(Model& m, const long& i) {
  std::uint64_t sum = 0;
  for (std::size_t at = 0; at < m.table.size(); at += 512)  // every 4 KiB page read
    sum += m.table[at];
  return {::getpid(), bench::rollup_kb("Private_Clean") + bench::rollup_kb("Private_Dirty"),
          sum + static_cast<std::uint64_t>(i)};
}

int initializer(const Args& a) {
  model_bytes = static_cast<std::size_t>(a.get("--mib", 256)) << 20;
  const long tasks = a.get("--tasks", 16);
  const auto recycle = static_cast<std::size_t>(a.get("--recycle", 1));
  const auto processes = static_cast<unsigned>(a.get("--processes", 2));
  const int reps = static_cast<int>(a.get("--reps", 3));
  const std::vector<long> inputs(static_cast<std::size_t>(tasks), 0);
  for (const procpool::Start start : {procpool::Start::fork, procpool::Start::fork_server}) {
    std::map<pid_t, long> private_kb;  // per worker, over every run
    const auto run = [&] {
      procpool::Pool pool(
          {.processes = processes, .chunksize = 1, .start = start, .max_tasks_per_child = recycle},
          &build_model);
      for (const ModelSeen& seen : pool.map(&use_model, inputs))
        private_kb[seen.pid] = std::max(private_kb[seen.pid], seen.private_kb);
    };
    const std::vector<double> runs = bench::repeat(reps, run);
    long private_total = 0;
    for (const auto& [pid, kb] : private_kb)
      private_total += kb;
    Json(start == procpool::Start::fork ? "initializer_fork" : "initializer_fork_server")
        .num("mib", static_cast<double>(model_bytes >> 20))
        .num("tasks", static_cast<double>(tasks))
        .num("max_tasks_per_child", static_cast<double>(recycle))
        .num("processes", processes)
        .stats("wall_s", bench::stats(runs))
        .num("workers", static_cast<double>(private_kb.size()))
        .num("private_mib_per_worker",
             static_cast<double>(private_total) / 1024 /
                 static_cast<double>(std::max<std::size_t>(1, private_kb.size())))
        .print();
  }
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  if (argc < 2) {
    std::fprintf(stderr,
                 "usage: procpool_bench WORKLOAD [--name value...]; see the source header\n");
    return 2;
  }
  const std::string w = argv[1];
  const Args args(argc, argv, 2);
  if (w == "tiny_cs1") return tiny_cs1(args);
  if (w == "tiny_lifecycle") return tiny_lifecycle(args);
  if (w == "tiny_cereal") return tiny_cereal(args);
  if (w == "payload_out") return payload_out(args);
  if (w == "payload_in") return payload_in(args);
  if (w == "payload_zero_copy") return payload_zero_copy(args);
  if (w == "input_memory") return input_memory(args);
  if (w == "startup") return startup(args);
  if (w == "startup_spawn") return startup_spawn(args);
  if (w == "cpu") return cpu(args);
  if (w == "shared") return shared(args);
  if (w == "imap_flat") return imap_flat(args);
  if (w == "progress") return progress(args);
  if (w == "submit") return submit(args);
  if (w == "initializer") return initializer(args);
  std::fprintf(stderr, "procpool_bench: unknown workload '%s'\n", w.c_str());
  return 2;
}
