#include "procpool/detail/telemetry.hpp"

#include <cstdio>

#include "procpool/cpu_count.hpp"
#include "procpool/errors.hpp"

namespace procpool::detail {
namespace {

/// The caller's resident anonymous memory (RssAnon in /proc/self/status):
/// what fork copies page-table entries for.
std::uint64_t caller_anonymous_kb() {
  std::FILE* status = std::fopen("/proc/self/status", "re");
  if (!status) return 0;
  char line[256];
  unsigned long long kb = 0;
  while (std::fgets(line, sizeof line, status)) {
    if (std::sscanf(line, "RssAnon: %llu kB", &kb) == 1) break;
  }
  std::fclose(status);
  return kb;
}

double seconds(std::uint64_t nanos) {
  return static_cast<double>(nanos) * 1e-9;
}

WorkerInsights worker_insights(unsigned position, const WorkerRecord& r) {
  WorkerInsights w;
  w.position = position;
  w.pid = r.pid;
  w.tasks = r.tasks;
  // Replies time whole chunks, serialisation included; take that part out.
  w.compute_seconds = seconds(r.compute_ns - std::min(r.compute_ns, r.counted.serialize_ns));
  w.waiting_seconds = seconds(r.counted.wait_ns);
  w.serialize_seconds = seconds(r.counted.serialize_ns);
  w.bytes_received = r.counted.bytes_in;
  w.bytes_sent = r.counted.bytes_out;
  w.peak_rss_kb = r.counted.peak_rss_kb;
  w.crashes = r.crashes;
  w.timeouts = r.timeouts;
  w.recycles = r.recycles;
  return w;
}

}  // namespace

void Telemetry::chunk_done(unsigned position, std::uint64_t tasks, std::uint64_t compute_ns,
                           std::uint64_t slowest_index, std::uint64_t slowest_ns) {
  records_[position].tasks += tasks;
  records_[position].compute_ns += compute_ns;
  if (tasks == 0) return;
  if (slowest_.size() == slow_tasks_kept && slowest_ns <= slowest_.back().nanos) return;
  slowest_.push_back(SlowTask{slowest_index, slowest_ns});
  std::sort(slowest_.begin(), slowest_.end(),
            [](const SlowTask& a, const SlowTask& b) { return a.nanos > b.nanos; });
  if (slowest_.size() > slow_tasks_kept) slowest_.pop_back();
}

void Telemetry::worker_left(unsigned position, Departure why, const WorkerCounters& counted) {
  WorkerRecord& r = records_[position];
  r.counted += counted;
  switch (why) {
    case Departure::crashed:
      ++r.crashes;
      break;
    case Departure::timed_out:
      ++r.timeouts;
      break;
    case Departure::recycled:
      ++r.recycles;
      break;
    case Departure::corrupt:
    case Departure::stopped:
      break;
  }
}

Insights Telemetry::insights(double wall_seconds, unsigned processes,
                             const std::vector<std::pair<unsigned, WorkerCounters>>& live) const {
  Insights in;
  in.wall_seconds = wall_seconds;
  in.processes = processes;
  in.notes = notes_;
  try {
    const CpuReport report = procpool::cpu_report();
    in.usable_cpus = report.usable;
    in.cpu_reason = report.to_string();
  } catch (const Error&) {
    in.usable_cpus = 0;  // a malformed PROCPOOL_CPUS was reported when the call started
  }
  in.parent_input_seconds = seconds(parent_input_ns_);
  in.parent_decode_seconds = seconds(parent_decode_ns_);
  in.starting_seconds = seconds(starting_ns_);
  in.caller_anonymous_kb = caller_anonymous_kb();
  std::vector<WorkerRecord> records = records_;
  for (const auto& [position, counted] : live)
    records[position].counted += counted;
  double compute = 0;
  for (std::size_t i = 0; i < records.size(); ++i) {
    WorkerInsights w = worker_insights(static_cast<unsigned>(i), records[i]);
    in.tasks += w.tasks;
    compute += w.compute_seconds;
    in.workers.push_back(std::move(w));
  }
  if (wall_seconds > 0) in.efficiency = compute / (wall_seconds * static_cast<double>(processes));
  for (const SlowTask& t : slowest_)
    in.slowest_tasks.push_back({static_cast<std::size_t>(t.index), seconds(t.nanos)});
  in.diagnosis = detail::diagnose(in);
  // Nothing else matters as much: the run lost tasks to the OOM killer.
  if (!out_of_memory_.empty()) in.diagnosis = out_of_memory_;
  return in;
}

}  // namespace procpool::detail
