#include "oom.hpp"

#include <cstdio>
#include <fstream>
#include <sstream>

namespace procpool::detail {
namespace {

/// The value after `key` in a "key value" file (memory.events, vmstat...).
std::optional<std::uint64_t> read_counter(const std::string& file, const std::string& key) {
  std::ifstream in(file);
  std::string name;
  std::uint64_t value = 0;
  while (in >> name >> value) {
    if (name == key) return value;
  }
  return std::nullopt;
}

/// A file holding one number ("max" for none, as cgroup v2 writes it).
std::optional<std::uint64_t> read_number(const std::string& file) {
  std::ifstream in(file);
  std::uint64_t value = 0;
  if (!(in >> value)) return std::nullopt;
  return value;
}

/// The path of this process's cgroup in `hierarchy` ("" for v2's, "memory"
/// for v1's memory controller), from /proc/self/cgroup.
std::optional<std::string> cgroup_path(const std::string& hierarchy) {
  std::ifstream in("/proc/self/cgroup");
  std::string line;
  while (std::getline(in, line)) {
    const auto first = line.find(':');
    const auto second = line.find(':', first + 1);
    if (first == std::string::npos || second == std::string::npos) continue;
    std::stringstream controllers(line.substr(first + 1, second - first - 1));
    std::string controller;
    bool match = hierarchy.empty() && second == first + 1 && line.substr(0, first) == "0";
    while (!match && std::getline(controllers, controller, ','))
      match = controller == hierarchy;
    if (match) return line.substr(second + 1);
  }
  return std::nullopt;
}

std::string gib(std::uint64_t bytes) {
  char text[32];
  std::snprintf(text, sizeof text, "%.2f GiB", static_cast<double>(bytes) / (1 << 30));
  return text;
}

}  // namespace

OomWatch::OomWatch() {
  // Where the limit is set decides which counter tells: a cgroup of our own
  // (v2, then v1's memory controller), else the whole system's.
  for (const char* root : {"/sys/fs/cgroup", "/sys/fs/cgroup/unified"}) {
    const auto path = cgroup_path("");
    if (!path) break;
    const std::string dir = std::string(root) + *path;
    if (read_counter(dir + "/memory.events", "oom_kill")) {
      events_file_ = dir + "/memory.events";
      limit_file_ = dir + "/memory.max";
      peak_file_ = dir + "/memory.peak";
      break;
    }
  }
  if (events_file_.empty()) {
    if (const auto path = cgroup_path("memory")) {
      const std::string dir = "/sys/fs/cgroup/memory" + *path;
      if (read_counter(dir + "/memory.oom_control", "oom_kill")) {
        events_file_ = dir + "/memory.oom_control";
        limit_file_ = dir + "/memory.limit_in_bytes";
        peak_file_ = dir + "/memory.max_usage_in_bytes";
      }
    }
  }
  if (events_file_.empty()) events_file_ = "/proc/vmstat";
  kills_seen_ = read_counter(events_file_, "oom_kill").value_or(0);
}

std::optional<std::string> OomWatch::explain_kill(std::uint64_t peak_rss_kb) {
  const std::uint64_t kills = read_counter(events_file_, "oom_kill").value_or(0);
  if (kills <= kills_seen_) return std::nullopt;
  kills_seen_ = kills;
  std::string seen = "the OOM killer killed it: ";
  // No limit file, or "max", or v1's huge number: no limit of our own.
  const std::optional<std::uint64_t> limit =
      limit_file_.empty() ? std::nullopt : read_number(limit_file_);
  if (limit && *limit < (std::uint64_t{1} << 60)) {
    seen += "memory limit " + gib(*limit) + " (" + limit_file_ + ")";
  } else {
    seen += "the machine ran out of memory";
  }
  // The worker notes its peak only between tasks; the cgroup's own peak
  // includes the task that was killed.
  if (const auto peak = peak_file_.empty() ? std::nullopt : read_number(peak_file_)) {
    seen += "; the cgroup's peak use " + gib(*peak);
  } else if (peak_rss_kb != 0) {
    seen += "; its peak RSS between tasks " + gib(peak_rss_kb * 1024);
  }
  return seen;
}

}  // namespace procpool::detail
