// Telling an OOM kill from any other SIGKILL: a worker killed for memory is
// reported with the cgroup limit and its peak memory, so that users know to
// run fewer processes or smaller tasks, not to look for a bug.
#pragma once

#include <cstdint>
#include <optional>
#include <string>

namespace procpool::detail {

/// This process's memory cgroup (v2 memory.events/memory.max or v1
/// memory.oom_control/memory.limit_in_bytes), or the system's OOM count
/// (/proc/vmstat) when there is none. Workers are in their parent's cgroup.
class OomWatch {
 public:
  OomWatch();

  /// Called when a worker was killed by SIGKILL: if the OOM killer struck
  /// since the last look, what was seen ("the OOM killer killed it: cgroup
  /// memory limit 2.0 GiB; its peak RSS 1.9 GiB"). `peak_rss_kb` is the
  /// worker's own peak, 0 if unknown.
  [[nodiscard]] std::optional<std::string> explain_kill(std::uint64_t peak_rss_kb);

 private:
  std::string events_file_;  // where the oom_kill count is
  std::string limit_file_;   // the cgroup's memory limit, if any
  std::string peak_file_;    // the cgroup's peak memory use, if known
  std::uint64_t kills_seen_ = 0;
};

}  // namespace procpool::detail
