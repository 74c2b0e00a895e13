// The CPU count: fixture trees for cgroup v1/v2 and Slurm's environment, then
// the real thing: taskset and a real cgroup v1 quota.
#include <gtest/gtest.h>
#include <procpool/procpool.hpp>

#include <sys/wait.h>
#include <unistd.h>

#include <cstdio>
#include <filesystem>
#include <fstream>
#include <map>
#include <string>

#include "helpers.hpp"

namespace fs = std::filesystem;

namespace {

/// A fake root with /proc/self/{cgroup,mountinfo} and cgroup files under it.
class Fixture {
 public:
  Fixture()
      : root_(fs::temp_directory_path() /
              ("procpool-cpu-" + std::to_string(::getpid()) + "-" + std::to_string(counter_++))) {
    fs::create_directories(root_ / "proc/self");
  }
  ~Fixture() { fs::remove_all(root_); }
  void write(const std::string& path, const std::string& text) {
    fs::create_directories((root_ / path).parent_path());
    std::ofstream(root_ / path) << text;
  }
  void v1(const std::string& cpu_path) {
    write("proc/self/cgroup", "4:memory:/x\n3:cpuset:/\n2:cpu,cpuacct:" + cpu_path + "\n0::/\n");
    write("proc/self/mountinfo",
          "32 31 0:29 / /sys/fs/cgroup/cpu,cpuacct rw,relatime - cgroup cgroup rw,cpu,cpuacct\n"
          "34 31 0:31 / /sys/fs/cgroup/cpuset rw,relatime - cgroup cgroup rw,cpuset\n");
  }
  void v2(const std::string& path) {
    write("proc/self/cgroup", "0::" + path + "\n");
    write("proc/self/mountinfo", "30 23 0:26 / /sys/fs/cgroup rw shared:4 - cgroup2 cgroup2 rw\n");
  }
  procpool::CpuReport report(std::map<std::string, std::string> env = {}, unsigned affinity = 8) {
    procpool::detail::CpuInputs in;
    in.root = root_;
    in.affinity = affinity;
    in.online = 8;
    env_ = std::move(env);
    in.getenv = [this](const char* name) -> const char* {
      auto it = env_.find(name);
      return it == env_.end() ? nullptr : it->second.c_str();
    };
    return procpool::detail::cpu_report(in);
  }

 private:
  static inline int counter_ = 0;
  fs::path root_;
  std::map<std::string, std::string> env_;
};

TEST(CpuFixture, NoLimitsMeansAffinity) {
  Fixture f;
  auto r = f.report({}, 6);
  EXPECT_EQ(r.usable, 6u);
  EXPECT_EQ(r.decided_by, "affinity");
  EXPECT_FALSE(r.cgroup_quota);
}

TEST(CpuFixture, CgroupV1QuotaRoundsUp) {
  Fixture f;
  f.v1("/job");
  f.write("sys/fs/cgroup/cpu,cpuacct/job/cpu.cfs_quota_us", "250000\n");
  f.write("sys/fs/cgroup/cpu,cpuacct/job/cpu.cfs_period_us", "100000\n");
  auto r = f.report();
  EXPECT_EQ(r.usable, 3u);
  EXPECT_EQ(r.decided_by, "cgroup quota");
  EXPECT_NE(r.detail.find("cpu.cfs_quota_us 250000"), std::string::npos) << r.detail;
}

TEST(CpuFixture, QuotaBelowOneCpuCountsAsOne) {
  Fixture f;
  f.v2("/tiny");
  f.write("sys/fs/cgroup/tiny/cpu.max", "20000 100000\n");
  EXPECT_EQ(f.report().usable, 1u);
}

TEST(CpuFixture, CgroupV2MaxMeansNoQuota) {
  Fixture f;
  f.v2("/user.slice");
  f.write("sys/fs/cgroup/user.slice/cpu.max", "max 100000\n");
  auto r = f.report({}, 4);
  EXPECT_FALSE(r.cgroup_quota);
  EXPECT_EQ(r.usable, 4u);
}

TEST(CpuFixture, StricterParentGroupWins) {
  Fixture f;
  f.v2("/outer/inner");
  f.write("sys/fs/cgroup/outer/cpu.max", "200000 100000\n");
  f.write("sys/fs/cgroup/outer/inner/cpu.max", "500000 100000\n");
  auto r = f.report();
  EXPECT_EQ(r.usable, 2u);
  EXPECT_NE(r.detail.find("outer"), std::string::npos);
  EXPECT_EQ(r.detail.find("inner"), std::string::npos) << r.detail;
}

TEST(CpuFixture, V1MinusOneQuotaMeansNone) {
  Fixture f;
  f.v1("/");
  f.write("sys/fs/cgroup/cpu,cpuacct/cpu.cfs_quota_us", "-1\n");
  f.write("sys/fs/cgroup/cpu,cpuacct/cpu.cfs_period_us", "100000\n");
  EXPECT_FALSE(f.report().cgroup_quota);
}

TEST(CpuFixture, CpusetNarrowerThanAffinity) {
  Fixture f;
  f.v2("/pinned");
  f.write("sys/fs/cgroup/pinned/cpuset.cpus.effective", "0-1,4\n");
  auto r = f.report({}, 8);
  EXPECT_EQ(r.usable, 3u);
  EXPECT_EQ(r.decided_by, "cgroup cpuset");
}

TEST(CpuFixture, MissingUnreadableAndOddFilesAreIgnored) {
  Fixture f;
  f.write("proc/self/cgroup", "garbage\n::\n12:cpu:relative/path\n\n0::/ok\n");
  f.write("proc/self/mountinfo",
          "nonsense line\n30 23 0:26 / /sys/fs/cgroup rw - cgroup2 cgroup2 rw\n");
  f.write("sys/fs/cgroup/ok/cpu.max/x", "");  // cpu.max is a directory: unreadable as a file
  auto r = f.report({}, 5);
  EXPECT_FALSE(r.cgroup_quota);
  EXPECT_EQ(r.usable, 5u);
  Fixture empty;  // no /proc/self files at all
  EXPECT_EQ(empty.report({}, 3).usable, 3u);
}

TEST(CpuFixture, SlurmCpusPerTaskDecides) {
  Fixture f;
  auto r = f.report(
      {{"SLURM_JOB_ID", "7"}, {"SLURM_CPUS_PER_TASK", "1"}, {"SLURM_CPUS_ON_NODE", "2"}}, 2);
  EXPECT_EQ(r.usable, 1u);
  EXPECT_EQ(
      r.to_string(),
      "usable CPUs: 1 (decided by Slurm: SLURM_CPUS_PER_TASK=1; affinity 2, cgroup quota none, "
      "cgroup cpuset none, online 8)");
}

TEST(CpuFixture, SlurmStepSharesTheNodesCpusAmongItsTasks) {
  Fixture f;
  auto r = f.report({{"SLURM_JOB_ID", "7"},
                     {"SLURM_STEP_ID", "0"},
                     {"SLURM_CPUS_ON_NODE", "8"},
                     {"SLURM_STEP_TASKS_PER_NODE", "4(x2),1"},
                     {"SLURM_NODEID", "1"}});
  EXPECT_EQ(r.usable, 2u);
  EXPECT_NE(r.detail.find("shared by 4 tasks"), std::string::npos) << r.detail;
  EXPECT_EQ(procpool::detail::slurm_tasks_on_node("4(x2),1", 2), 1u);
  EXPECT_EQ(procpool::detail::slurm_tasks_on_node("3", 0), 3u);
  EXPECT_FALSE(procpool::detail::slurm_tasks_on_node("2(x", 0));
}

TEST(CpuFixture, SlurmVariablesOutsideAJobAreIgnored) {
  Fixture f;
  EXPECT_EQ(f.report({{"SLURM_CPUS_PER_TASK", "1"}}, 4).usable, 4u);
}

TEST(CpuFixture, OverrideWinsAndAMalformedOneIsAClearError) {
  Fixture f;
  auto r = f.report({{"PROCPOOL_CPUS", "3"}, {"SLURM_JOB_ID", "1"}, {"SLURM_CPUS_PER_TASK", "1"}});
  EXPECT_EQ(r.usable, 3u);
  EXPECT_EQ(r.decided_by, "PROCPOOL_CPUS");
  for (const char* bad : {"", "zero", "0", "-2", "2.5", "99999999999"}) {
    try {
      f.report({{"PROCPOOL_CPUS", bad}});
      FAIL() << "accepted PROCPOOL_CPUS=" << bad;
    } catch (const procpool::Error& e) {
      EXPECT_NE(std::string(e.what()).find("PROCPOOL_CPUS"), std::string::npos);
    }
  }
}

TEST(CpuFixture, CpuListCounting) {
  EXPECT_EQ(procpool::detail::count_cpu_list("0-3,8,10-11"), 7u);
  EXPECT_FALSE(procpool::detail::count_cpu_list("3-1"));
  EXPECT_FALSE(procpool::detail::count_cpu_list("a"));
}

/// Runs a command line, returns its trimmed stdout.
std::string run(const std::string& command) {
  std::string out;
  FILE* p = ::popen(command.c_str(), "r");
  char buf[512];
  while (p && std::fgets(buf, sizeof buf, p))
    out += buf;
  if (p) ::pclose(p);
  while (!out.empty() && (out.back() == '\n' || out.back() == ' '))
    out.pop_back();
  return out;
}

TEST(CpuReality, TasksetToOneCpu) {
  const std::string report = run(std::string("taskset -c 0 ") + PROCPOOL_CPUS_TOOL);
  std::printf("taskset -c 0: %s\n", report.c_str());
  EXPECT_EQ(run(std::string("taskset -c 0 ") + PROCPOOL_CPUS_TOOL + " --count"), "1");
  EXPECT_NE(report.find("decided by affinity"), std::string::npos) << report;
}

TEST(CpuReality, RealCgroupV1Quota) {
  const fs::path cpu = "/sys/fs/cgroup/cpu";
  const fs::path group = cpu / ("procpool-test-" + std::to_string(::getpid()));
  std::error_code ec;
  if (!fs::exists(cpu / "cpu.cfs_quota_us") || !fs::create_directory(group, ec) || ec) {
    GTEST_SKIP() << "no writable cgroup v1 cpu hierarchy at " << cpu << " (needs root)";
  }
  std::ofstream(group / "cpu.cfs_period_us") << "100000";
  std::ofstream(group / "cpu.cfs_quota_us") << "50000";
  const std::string out = test_helpers::output_of(STDOUT_FILENO, [&group] {
    std::ofstream(group / "cgroup.procs") << ::getpid() << std::flush;  // join the group
    ::execl(PROCPOOL_CPUS_TOOL, PROCPOOL_CPUS_TOOL, nullptr);
  });
  fs::remove(group, ec);
  std::printf("cgroup v1 quota 50000/100000: %s", out.c_str());
  EXPECT_EQ(out.rfind("usable CPUs: 1 (decided by cgroup quota", 0), 0u) << out;
}

}  // namespace

namespace {

std::string worker_env(const char* name, procpool::Options options) {
  auto seen = procpool::map(
      [name](int) {
        const char* v = std::getenv(name);
        return std::string(v ? v : "(unset)");
      },
      std::vector{1, 2}, options);
  return seen[0];
}

TEST(InnerThreads, WorkersGetUsableOverProcessesUnlessTheCallerSetIt) {
  ::unsetenv("OMP_NUM_THREADS");
  ::setenv("PROCPOOL_CPUS", "4", 1);
  EXPECT_EQ(worker_env("OMP_NUM_THREADS", {.processes = 2}), "2");
  EXPECT_EQ(worker_env("OPENBLAS_NUM_THREADS", {.processes = 2}), "2");
  EXPECT_EQ(worker_env("OMP_NUM_THREADS", {.processes = 2, .limit_inner_threads = false}),
            "(unset)");
  ::setenv("OMP_NUM_THREADS", "7", 1);
  EXPECT_EQ(worker_env("OMP_NUM_THREADS", {.processes = 2}), "7");
  ::unsetenv("OMP_NUM_THREADS");
  ::unsetenv("PROCPOOL_CPUS");
  EXPECT_EQ(std::getenv("OPENBLAS_NUM_THREADS"), nullptr) << "the parent's environment changed";
}

TEST(Oversubscription, WarnsOncePerProcessNamingTheReason) {
  std::string err = test_helpers::output_of(STDERR_FILENO, [] {
    ::setenv("PROCPOOL_CPUS", "2", 1);
    for (int i = 0; i < 3; ++i)
      procpool::map([](int x) { return x; }, std::vector<int>(16), {.processes = 8});
  });
  EXPECT_NE(err.find("procpool: warning: 8 processes requested but only 2 CPUs are usable "
                     "(PROCPOOL_CPUS: PROCPOOL_CPUS=2)"),
            std::string::npos)
      << err;
  EXPECT_EQ(err.find("warning", err.find("warning") + 1), std::string::npos) << "warned twice";
  std::string quiet = test_helpers::output_of(STDERR_FILENO, [] {
    ::setenv("PROCPOOL_CPUS", "2", 1);
    procpool::map([](int x) { return x; }, std::vector<int>(16),
                  {.processes = 8, .warn_oversubscription = false});
  });
  EXPECT_EQ(quiet, "");
}

}  // namespace
