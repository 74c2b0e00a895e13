#include <algorithm>
#include <atomic>
#include <cstdio>

#include "procpool/cpu_count.hpp"
#include "procpool/detail/engine.hpp"

namespace procpool {
namespace detail {

ProcessPlan plan_processes(const Options& options, std::optional<std::size_t> inputs) {
  const CpuReport report = procpool::cpu_report();
  ProcessPlan plan;
  plan.processes = options.processes != 0 ? options.processes : report.usable;
  if (options.processes > report.usable && options.warn_oversubscription) {
    static std::atomic<bool> warned{false};
    if (!warned.exchange(true)) {
      std::fprintf(stderr,
                   "procpool: warning: %u processes requested but only %u CPUs are usable (%s: "
                   "%s); they will share CPUs. Set Options::warn_oversubscription = false to "
                   "silence this.\n",
                   options.processes, report.usable, report.decided_by.c_str(),
                   report.detail.c_str());
    }
  }
  if (inputs && *inputs < plan.processes) {
    plan.processes = static_cast<unsigned>(std::max<std::size_t>(1, *inputs));
  }
  if (options.limit_inner_threads)
    plan.inner_threads = std::max(1u, report.usable / plan.processes);
  return plan;
}

}  // namespace detail

}  // namespace procpool
