#include "procpool/insights.hpp"

#include <algorithm>
#include <cstdio>
#include <numeric>

namespace procpool {
namespace {

std::string format(const char* fmt, double a) {
  char buf[64];
  std::snprintf(buf, sizeof buf, fmt, a);
  return buf;
}

std::string bytes(double n) {
  const char* units[] = {"B", "KB", "MB", "GB", "TB"};
  int u = 0;
  while (n >= 1000 && u < 4) {
    n /= 1000;
    ++u;
  }
  char buf[32];
  std::snprintf(buf, sizeof buf, u == 0 ? "%.0f %s" : "%.1f %s", n, units[u]);
  return buf;
}

double sum(const std::vector<WorkerInsights>& w, double WorkerInsights::*field) {
  double total = 0;
  for (const auto& x : w)
    total += x.*field;
  return total;
}

double median(std::vector<double> v) {
  if (v.empty()) return 0;
  std::sort(v.begin(), v.end());
  const std::size_t n = v.size();
  return n % 2 ? v[n / 2] : (v[n / 2 - 1] + v[n / 2]) / 2;
}

}  // namespace

namespace detail {

std::string diagnose(const Insights& in) {
  const double compute = sum(in.workers, &WorkerInsights::compute_seconds);
  const double waiting = sum(in.workers, &WorkerInsights::waiting_seconds);
  const double worker_ser = sum(in.workers, &WorkerInsights::serialize_seconds);
  std::uint64_t moved = 0;
  for (const auto& w : in.workers)
    moved += w.bytes_received + w.bytes_sent;
  const double tasks = static_cast<double>(std::max<std::uint64_t>(1, in.tasks));
  const double busy_wall = in.wall_seconds * std::max(1u, in.processes);

  if (in.tasks == 0) return "no tasks ran";
  if (in.usable_cpus != 0 && in.processes > in.usable_cpus) {
    return "fewer usable CPUs (" + std::to_string(in.usable_cpus) + ") than processes (" +
           std::to_string(in.processes) + "): " + in.cpu_reason +
           "; use processes = " + std::to_string(in.usable_cpus);
  }
  if (in.efficiency >= 0.8) {
    return "no bottleneck found: parallel efficiency " + format("%.0f%%", in.efficiency * 100);
  }
  // Forks of a big process are slow: one page-table entry per 4 KiB page.
  const bool big_caller = in.caller_anonymous_kb >= 64 * 1024;
  if (big_caller && in.starting_seconds >= 1e-3 && in.starting_seconds > 0.1 * in.wall_seconds) {
    return "starting the workers took " + format("%.1f ms", in.starting_seconds * 1e3) +
           " of the " + format("%.1f ms", in.wall_seconds * 1e3) +
           " run: fork copies the page tables of this process's " +
           bytes(static_cast<double>(in.caller_anonymous_kb) * 1024) +
           " of memory, and each worker pays again on its first touch of each page; call "
           "procpool::share_with_huge_pages() once after building big shared data, and use "
           "one Pool for many calls";
  }
  const double serialisation = worker_ser + in.parent_input_seconds + in.parent_decode_seconds;
  if (in.parent_input_seconds > 0.5 * in.wall_seconds && waiting > 0.5 * busy_wall) {
    return "workers waited " + format("%.0f%%", 100 * waiting / busy_wall) +
           " of the time for input while the caller spent " +
           format("%.2f s", in.parent_input_seconds) +
           " producing it: the input range (or its serialisation) is the bottleneck; make "
           "inputs cheaper to produce, or pass a random-access range that workers read from "
           "inherited memory";
  }
  const bool serialisation_costly = serialisation > compute && serialisation > 0.25 * busy_wall;
  if (serialisation_costly || static_cast<double>(moved) / tasks > 1e6) {
    return "serialisation and transport dominate: " + bytes(static_cast<double>(moved) / tasks) +
           " moved per task, " + format("%.2f s", serialisation) + " serialising vs " +
           format("%.2f s", compute) +
           " computing; share big data through fork (capture it by reference in "
           "procpool::map) or build it once per worker with Pool's initializer, and return less";
  }
  const double per_task = compute / tasks;
  if (per_task < 100e-6 && compute < 0.5 * busy_wall) {
    const double chunk = std::clamp(5e-3 / std::max(per_task, 1e-9), 1.0, 65536.0);
    return "tasks are too small for the per-message overhead (" + format("%.1f", per_task * 1e6) +
           " us of work each): use chunksize = " + std::to_string(static_cast<long>(chunk)) +
           " (about 5 ms of work per message), or leave chunksize at 0 (automatic)";
  }
  std::vector<double> per_worker;
  for (const auto& w : in.workers)
    per_worker.push_back(w.compute_seconds);
  const double slowest_worker =
      per_worker.empty() ? 0 : *std::max_element(per_worker.begin(), per_worker.end());
  const double mid = median(per_worker);
  if (in.workers.size() > 1 && slowest_worker > 1.5 * mid) {
    std::string line = "load imbalance: the busiest worker computed " +
                       format("%.2f s", slowest_worker) + " vs a median of " +
                       format("%.2f s", mid);
    if (!in.slowest_tasks.empty()) {
      line += "; slowest task #" + std::to_string(in.slowest_tasks.front().index) + " took " +
              format("%.2f s", in.slowest_tasks.front().seconds);
    }
    return line + ": start long tasks first, split them, or use smaller chunks";
  }
  return "parallel efficiency " + format("%.0f%%", in.efficiency * 100) +
         "; no single cause stands out (startup and tail effects, or a short run)";
}

}  // namespace detail

std::string Insights::to_string() const {
  std::string out;
  char line[256];
  std::snprintf(line, sizeof line,
                "procpool insights: %llu tasks in %.3f s on %u processes (%u usable CPUs), "
                "efficiency %.0f%%\n",
                static_cast<unsigned long long>(tasks), wall_seconds, processes, usable_cpus,
                efficiency * 100);
  out += line;
  std::snprintf(line, sizeof line, "%-7s %-8s %9s %9s %9s %9s %10s %10s %9s %8s\n", "worker", "pid",
                "tasks", "compute", "waiting", "serialise", "received", "sent", "peak RSS",
                "restarts");
  out += line;
  for (const auto& w : workers) {
    std::snprintf(line, sizeof line, "%-7u %-8d %9llu %8.3fs %8.3fs %8.3fs %10s %10s %9s %8u\n",
                  w.position, static_cast<int>(w.pid), static_cast<unsigned long long>(w.tasks),
                  w.compute_seconds, w.waiting_seconds, w.serialize_seconds,
                  bytes(static_cast<double>(w.bytes_received)).c_str(),
                  bytes(static_cast<double>(w.bytes_sent)).c_str(),
                  bytes(static_cast<double>(w.peak_rss_kb) * 1000).c_str(),
                  w.crashes + w.timeouts + w.recycles);
    out += line;
  }
  std::snprintf(line, sizeof line,
                "caller: %.3f s starting workers, %.3f s producing inputs, %.3f s decoding "
                "results\n",
                starting_seconds, parent_input_seconds, parent_decode_seconds);
  out += line;
  if (!slowest_tasks.empty()) {
    out += "slowest tasks:";
    for (const auto& t : slowest_tasks) {
      std::snprintf(line, sizeof line, " #%zu %.3fs", t.index, t.seconds);
      out += line;
    }
    out += "\n";
  }
  for (const std::string& note : notes)
    out += "note: " + note + "\n";
  if (unobserved_errors != 0) {
    out += "dropped futures whose tasks failed: " + std::to_string(unobserved_errors);
    if (!unobserved_error_messages.empty()) out += " (first: " + unobserved_error_messages[0] + ")";
    out += "\n";
  }
  out += "diagnosis: " + diagnosis + "\n";
  return out;
}

}  // namespace procpool
