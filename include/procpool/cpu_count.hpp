// procpool/cpu_count.hpp - how many CPUs this process may really use.
#pragma once

namespace procpool {

/// The number of CPUs this process may use: its CPU affinity mask (taskset,
/// Slurm binding, cgroup cpusets). The default for `Options::processes`.
///
///     std::cout << "using " << procpool::usable_cpu_count() << " processes\n";
unsigned usable_cpu_count();

}  // namespace procpool
