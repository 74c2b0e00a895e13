// procpool/cpu_count.hpp - how many CPUs this process may really use, and why.
#pragma once

#include <filesystem>
#include <functional>
#include <optional>
#include <string>

namespace procpool {

/// Every source of a CPU limit that procpool looked at, and which one decided.
///
///     std::cout << procpool::cpu_report().to_string() << '\n';
///     // usable CPUs: 1 (decided by Slurm: SLURM_CPUS_PER_TASK=1; affinity 2, cgroup quota none,
///     online 2)
struct CpuReport {
  unsigned usable = 1;
  /// "PROCPOOL_CPUS", "Slurm", "cgroup quota", "cgroup cpuset", "affinity" or "online".
  std::string decided_by;
  /// What the deciding source said, e.g. "SLURM_CPUS_PER_TASK=1" or "cpu.max 50000 100000 in
  /// /user.slice".
  std::string detail;

  unsigned online = 1;               // CPUs the kernel has online
  std::optional<unsigned> affinity;  // sched_getaffinity: taskset, numactl, Slurm binding
  std::optional<unsigned>
      cgroup_quota;  // CPU bandwidth limit of this cgroup or an ancestor, rounded up
  std::optional<unsigned> cgroup_cpuset;  // CPUs the cgroup's cpuset allows
  std::optional<unsigned> slurm;          // CPUs of this task in a Slurm job
  std::optional<unsigned> override_cpus;  // PROCPOOL_CPUS

  /// One line a human can act on.
  std::string to_string() const;
};

/// Examines affinity, cgroup v1/v2 quotas and cpusets (the process's own
/// cgroup and its ancestors), Slurm's environment, and PROCPOOL_CPUS, which
/// wins when set. Throws procpool::Error when PROCPOOL_CPUS is malformed.
[[nodiscard]] CpuReport cpu_report();

/// The smallest of the limits in cpu_report(): the default for Options::processes.
///
///     std::cout << "using " << procpool::usable_cpu_count() << " processes\n";
[[nodiscard]] unsigned usable_cpu_count();

namespace detail {

/// Where cpu_report() reads from; tests point it at fixture trees.
struct CpuInputs {
  std::filesystem::path root = "/";  // /proc and /sys are found under it
  std::function<const char*(const char*)> getenv;
  std::optional<unsigned> affinity;  // empty: ask sched_getaffinity
  std::optional<unsigned> online;    // empty: ask sysconf
};

CpuReport cpu_report(const CpuInputs& inputs);

/// Tasks on this node from Slurm's compressed list ("2(x3),1") and the node's index.
std::optional<unsigned> slurm_tasks_on_node(const std::string& tasks_per_node, unsigned node_id);

/// Number of CPUs in a cpuset list such as "0-3,8,10-11".
std::optional<unsigned> count_cpu_list(const std::string& list);

}  // namespace detail
}  // namespace procpool
