#include "procpool/cpu_count.hpp"

#include <fcntl.h>
#include <pthread.h>
#include <sched.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstdio>
#include <cstdlib>
#include <mutex>
#include <optional>
#include <set>
#include <sstream>
#include <vector>

#include "procpool/errors.hpp"

namespace procpool {
namespace fs = std::filesystem;

namespace {

/// A limit and the words that explain it.
struct Limit {
  unsigned cpus;
  std::string detail;
};

/// The whole of a small file; plain system calls, because a Pool reads
/// several of these every time it starts.
std::optional<std::string> read_file(const fs::path& path) {
  const int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) return std::nullopt;
  std::string text;
  char chunk[4096];
  for (;;) {
    const ssize_t n = ::read(fd, chunk, sizeof chunk);
    if (n > 0) {
      text.append(chunk, static_cast<std::size_t>(n));
    } else if (n == 0) {
      break;
    } else if (errno != EINTR) {
      ::close(fd);
      return std::nullopt;  // e.g. a directory where a file should be
    }
  }
  ::close(fd);
  return text;
}

std::string trim(std::string s) {
  const auto not_space = [](unsigned char c) { return !std::isspace(c); };
  s.erase(s.begin(), std::find_if(s.begin(), s.end(), not_space));
  s.erase(std::find_if(s.rbegin(), s.rend(), not_space).base(), s.end());
  return s;
}

/// A whole positive decimal number, or nothing.
std::optional<std::uint64_t> parse_positive(const std::string& text) {
  if (text.empty() || !std::all_of(text.begin(), text.end(), ::isdigit)) return std::nullopt;
  errno = 0;
  const unsigned long long value = std::strtoull(text.c_str(), nullptr, 10);
  if (errno != 0 || value == 0) return std::nullopt;
  return value;
}

std::vector<std::string> split(const std::string& s, char sep) {
  std::vector<std::string> parts;
  std::string part;
  std::istringstream in(s);
  while (std::getline(in, part, sep))
    parts.push_back(part);
  return parts;
}

unsigned ceil_div(std::uint64_t quota, std::uint64_t period) {
  return static_cast<unsigned>(std::max<std::uint64_t>(1, (quota + period - 1) / period));
}

/// Keeps the smaller of two limits.
void keep_min(std::optional<Limit>& best, std::optional<Limit> candidate) {
  if (candidate && (!best || candidate->cpus < best->cpus)) best = std::move(candidate);
}

struct Mount {
  std::string root;        // the part of the hierarchy mounted here
  std::string mountpoint;  // where
  std::string fstype;      // cgroup or cgroup2
  std::vector<std::string> options;
};

std::vector<Mount> read_cgroup_mounts(const fs::path& root) {
  std::vector<Mount> mounts;
  std::istringstream text(read_file(root / "proc/self/mountinfo").value_or(""));
  for (std::string line; std::getline(text, line);) {
    // id parent major:minor root mountpoint options [optional...] - fstype source superoptions
    std::istringstream fields(line);
    std::string id, parent, dev, mroot, point, opts, word;
    if (!(fields >> id >> parent >> dev >> mroot >> point >> opts)) continue;
    while (fields >> word && word != "-") {
    }
    std::string fstype, source, super;
    if (!(fields >> fstype >> source >> super)) continue;
    if (fstype == "cgroup" || fstype == "cgroup2") {
      mounts.push_back(Mount{mroot, point, fstype, split(super, ',')});
    }
  }
  return mounts;
}

std::mutex system_mounts_mutex;
std::optional<std::vector<Mount>> system_mounts;  // guarded by system_mounts_mutex

/// No fork while the table is being read: a worker never inherits the lock
/// held (a Pool it makes counts CPUs). Registered as the library loads.
[[maybe_unused]] const int system_mounts_guarded_against_forks =
    ::pthread_atfork([] { system_mounts_mutex.lock(); }, [] { system_mounts_mutex.unlock(); },
                     [] { system_mounts_mutex.unlock(); });

/// Where the cgroup file systems are mounted. The real system's table is
/// read once per process: mounting them again under a running program does
/// not happen in practice, and reading it was half the cost of a Pool start.
/// The limits themselves are read afresh every time.
std::vector<Mount> cgroup_mounts(const fs::path& root) {
  if (root != "/") return read_cgroup_mounts(root);  // test fixtures
  std::lock_guard lock(system_mounts_mutex);
  if (!system_mounts) system_mounts = read_cgroup_mounts(root);
  return *system_mounts;
}

struct CgroupMembership {
  std::vector<std::string> controllers;  // empty for cgroup v2
  std::string path;
};

std::vector<CgroupMembership> memberships(const fs::path& root) {
  std::vector<CgroupMembership> found;
  std::istringstream text(read_file(root / "proc/self/cgroup").value_or(""));
  for (std::string line; std::getline(text, line);) {
    const auto first = line.find(':');
    const auto second = first == std::string::npos ? first : line.find(':', first + 1);
    if (second == std::string::npos) continue;  // not "id:controllers:path": ignore
    std::string path = line.substr(second + 1);
    if (path.empty() || path[0] != '/') continue;
    const std::string controllers = line.substr(first + 1, second - first - 1);
    found.push_back(
        {controllers.empty() ? std::vector<std::string>{} : split(controllers, ','), path});
  }
  return found;
}

bool has(const std::vector<std::string>& list, const std::string& item) {
  return std::find(list.begin(), list.end(), item) != list.end();
}

/// The directory of our cgroup inside `mount`, as seen under `root`.
fs::path cgroup_dir(const fs::path& root, const Mount& mount, const std::string& path) {
  fs::path base = root / fs::path(mount.mountpoint).relative_path();
  if (mount.root == "/") return base / fs::path(path).relative_path();
  if (path.rfind(mount.root, 0) == 0) {  // a container sees only its part of the hierarchy
    return base / fs::path(path.substr(mount.root.size())).relative_path();
  }
  return base;
}

/// Our cgroup directory and every ancestor up to the mount point, innermost first.
std::vector<fs::path> up_to_mount(const fs::path& root, const Mount& mount, const fs::path& dir) {
  std::vector<fs::path> dirs;
  const fs::path top = (root / fs::path(mount.mountpoint).relative_path()).lexically_normal();
  for (fs::path at = dir.lexically_normal();; at = at.parent_path()) {
    dirs.push_back(at);
    if (at == top || !at.has_relative_path() || at == at.parent_path()) break;
    if (at.string().size() < top.string().size()) break;
  }
  return dirs;
}

std::optional<Limit> v2_quota(const fs::path& dir) {
  auto text = read_file(dir / "cpu.max");
  if (!text) return std::nullopt;
  std::istringstream fields(*text);
  std::string quota, period;
  if (!(fields >> quota >> period) || quota == "max") return std::nullopt;
  auto q = parse_positive(quota), p = parse_positive(period);
  if (!q || !p) return std::nullopt;
  return Limit{ceil_div(*q, *p), "cpu.max " + quota + " " + period + " in " + dir.string()};
}

std::optional<Limit> v1_quota(const fs::path& dir) {
  auto quota = read_file(dir / "cpu.cfs_quota_us"), period = read_file(dir / "cpu.cfs_period_us");
  if (!quota || !period) return std::nullopt;
  auto q = parse_positive(trim(*quota)), p = parse_positive(trim(*period));  // -1: no quota
  if (!q || !p) return std::nullopt;
  return Limit{ceil_div(*q, *p), "cpu.cfs_quota_us " + trim(*quota) + " / cpu.cfs_period_us " +
                                     trim(*period) + " in " + dir.string()};
}

std::optional<Limit> cpuset_of(const fs::path& dir, const std::vector<std::string>& files) {
  for (const auto& name : files) {
    auto text = read_file(dir / name);
    if (!text) continue;
    if (auto n = detail::count_cpu_list(trim(*text))) {
      return Limit{*n, name + " " + trim(*text) + " in " + dir.string()};
    }
  }
  return std::nullopt;
}

struct CgroupLimits {
  std::optional<Limit> quota;
  std::optional<Limit> cpuset;
};

CgroupLimits cgroup_limits(const fs::path& root) {
  CgroupLimits limits;
  std::set<fs::path> quota_dirs_read;  // v1 mounts may show one hierarchy twice (cpu, cpu,cpuacct)
  const auto mounts = cgroup_mounts(root);
  for (const auto& member : memberships(root)) {
    for (const auto& mount : mounts) {
      const bool v2 = mount.fstype == "cgroup2" && member.controllers.empty();
      const bool v1_cpu =
          mount.fstype == "cgroup" && has(member.controllers, "cpu") && has(mount.options, "cpu");
      const bool v1_cpuset = mount.fstype == "cgroup" && has(member.controllers, "cpuset") &&
                             has(mount.options, "cpuset");
      if (!v2 && !v1_cpu && !v1_cpuset) continue;
      const fs::path dir = cgroup_dir(root, mount, member.path);
      if (v2 || v1_cpu) {
        // A parent's quota binds its children too: take the strictest on the way up.
        for (const auto& level : up_to_mount(root, mount, dir)) {
          if (!quota_dirs_read.insert(level).second) continue;
          keep_min(limits.quota, v2 ? v2_quota(level) : v1_quota(level));
        }
      }
      if (v2) keep_min(limits.cpuset, cpuset_of(dir, {"cpuset.cpus.effective"}));
      if (v1_cpuset) {
        keep_min(limits.cpuset, cpuset_of(dir, {"cpuset.effective_cpus", "cpuset.cpus"}));
      }
    }
  }
  return limits;
}

const char* env(const detail::CpuInputs& in, const char* name) {
  return in.getenv ? in.getenv(name) : std::getenv(name);
}

std::optional<std::uint64_t> env_number(const detail::CpuInputs& in, const char* name) {
  const char* value = env(in, name);
  return value ? parse_positive(value) : std::nullopt;
}

/// Slurm's word on this task's CPUs. SLURM_CPUS_PER_TASK is set only when the
/// job asked for -c/--cpus-per-task, and then it is exactly this task's share.
/// Otherwise, inside a step (srun: SLURM_STEP_ID is set) SLURM_CPUS_ON_NODE
/// counts the CPUs allocated on this node, shared by the step's tasks on the
/// node (SLURM_STEP_TASKS_PER_NODE, indexed by SLURM_NODEID); in a batch
/// script, outside any step, the script alone owns SLURM_CPUS_ON_NODE.
std::optional<Limit> slurm_limit(const detail::CpuInputs& in) {
  if (!env(in, "SLURM_JOB_ID") && !env(in, "SLURM_JOBID")) return std::nullopt;
  if (auto per_task = env_number(in, "SLURM_CPUS_PER_TASK")) {
    return Limit{static_cast<unsigned>(*per_task),
                 "SLURM_CPUS_PER_TASK=" + std::to_string(*per_task)};
  }
  auto on_node = env_number(in, "SLURM_CPUS_ON_NODE");
  if (!on_node) return std::nullopt;
  const std::string cpus = "SLURM_CPUS_ON_NODE=" + std::to_string(*on_node);
  if (!env(in, "SLURM_STEP_ID")) return Limit{static_cast<unsigned>(*on_node), cpus};
  const char* list = env(in, "SLURM_STEP_TASKS_PER_NODE");
  if (!list) list = env(in, "SLURM_TASKS_PER_NODE");
  const auto node = env_number(in, "SLURM_NODEID");  // 0 does not parse as positive
  const auto tasks =
      list ? detail::slurm_tasks_on_node(list, node ? static_cast<unsigned>(*node) : 0)
           : std::nullopt;
  if (!tasks || *tasks <= 1) return Limit{static_cast<unsigned>(*on_node), cpus};
  return Limit{std::max(1u, static_cast<unsigned>(*on_node) / *tasks),
               cpus + " shared by " + std::to_string(*tasks) + " tasks on this node"};
}

std::optional<unsigned> override_cpus(const detail::CpuInputs& in) {
  const char* value = env(in, "PROCPOOL_CPUS");
  if (!value) return std::nullopt;
  auto n = parse_positive(trim(value));
  if (!n || *n > 1u << 20) {
    throw Error(std::string("procpool: PROCPOOL_CPUS='") + value +
                "' is not a positive whole number of CPUs; set it to e.g. 4, or unset it");
  }
  return static_cast<unsigned>(*n);
}

unsigned affinity_cpus() {
  cpu_set_t set;
  CPU_ZERO(&set);
  if (::sched_getaffinity(0, sizeof set, &set) == 0 && CPU_COUNT(&set) > 0) {
    return static_cast<unsigned>(CPU_COUNT(&set));
  }
  return 0;
}

std::string show(const std::optional<unsigned>& n) {
  return n ? std::to_string(*n) : "none";
}

}  // namespace

namespace detail {

std::optional<unsigned> count_cpu_list(const std::string& list) {
  if (list.empty()) return std::nullopt;
  unsigned count = 0;
  for (const auto& range : split(list, ',')) {
    const auto dash = range.find('-');
    auto lo = dash == std::string::npos ? range : range.substr(0, dash);
    auto hi = dash == std::string::npos ? range : range.substr(dash + 1);
    if (lo.empty() || hi.empty() || !std::all_of(lo.begin(), lo.end(), ::isdigit) ||
        !std::all_of(hi.begin(), hi.end(), ::isdigit)) {
      return std::nullopt;
    }
    const unsigned long a = std::stoul(lo), b = std::stoul(hi);
    if (b < a || b - a > 1u << 20) return std::nullopt;
    count += static_cast<unsigned>(b - a + 1);
  }
  return count;
}

std::optional<unsigned> slurm_tasks_on_node(const std::string& tasks_per_node, unsigned node_id) {
  unsigned node = 0;
  for (const auto& entry : split(tasks_per_node, ',')) {
    // "N" or "N(xR)": N tasks on each of the next R nodes.
    unsigned tasks = 0, repeat = 1;
    char x = 0, close = 0;
    std::istringstream in(entry);
    if (!(in >> tasks)) return std::nullopt;
    if (in.peek() == '(') {
      in.get();
      if (!(in >> x >> repeat >> close) || x != 'x' || close != ')') return std::nullopt;
    }
    if (node_id < node + repeat) return tasks;
    node += repeat;
  }
  return std::nullopt;
}

CpuReport cpu_report(const CpuInputs& in) {
  CpuReport report;
  const long online = ::sysconf(_SC_NPROCESSORS_ONLN);
  report.online = in.online.value_or(online > 0 ? static_cast<unsigned>(online) : 1u);
  const unsigned affinity = in.affinity.value_or(affinity_cpus());
  if (affinity != 0) report.affinity = affinity;
  const CgroupLimits cgroup = cgroup_limits(in.root);
  if (cgroup.quota) report.cgroup_quota = cgroup.quota->cpus;
  if (cgroup.cpuset) report.cgroup_cpuset = cgroup.cpuset->cpus;
  const auto slurm = slurm_limit(in);
  if (slurm) report.slurm = slurm->cpus;
  report.override_cpus = override_cpus(in);

  if (report.override_cpus) {
    report.usable = *report.override_cpus;
    report.decided_by = "PROCPOOL_CPUS";
    report.detail = "PROCPOOL_CPUS=" + std::to_string(report.usable);
    return report;
  }
  // On a tie the most telling explanation wins: Slurm, the quota, affinity, the cpuset.
  std::optional<Limit> best;
  std::string by;
  auto consider = [&](const std::optional<Limit>& limit, const char* name) {
    if (limit && (!best || limit->cpus < best->cpus)) {
      best = limit;
      by = name;
    }
  };
  consider(slurm, "Slurm");
  consider(cgroup.quota, "cgroup quota");
  if (report.affinity) consider(Limit{*report.affinity, "sched_getaffinity"}, "affinity");
  consider(cgroup.cpuset, "cgroup cpuset");  // usually mirrored by affinity already
  if (!best) {
    best = Limit{report.online, "online CPUs"};
    by = "online";
  }
  report.usable = std::min(best->cpus, std::max(1u, report.online * 64));
  report.decided_by = by;
  report.detail = best->detail;
  return report;
}

}  // namespace detail

std::string CpuReport::to_string() const {
  std::string others;
  auto add = [&](const char* name, const std::string& value) {
    if (decided_by == name) return;
    others += std::string(others.empty() ? "" : ", ") + name + " " + value;
  };
  add("affinity", show(affinity));
  add("cgroup quota", show(cgroup_quota));
  add("cgroup cpuset", show(cgroup_cpuset));
  add("Slurm", show(slurm));
  add("online", std::to_string(online));
  return "usable CPUs: " + std::to_string(usable) + " (decided by " + decided_by + ": " + detail +
         "; " + others + ")";
}

CpuReport cpu_report() {
  return detail::cpu_report(detail::CpuInputs{});
}

unsigned usable_cpu_count() {
  return cpu_report().usable;
}

}  // namespace procpool
