// procpool_cpus: prints how many CPUs procpool would use here, and why.
//   procpool_cpus          the report, e.g. "usable CPUs: 1 (decided by Slurm: ...)"
//   procpool_cpus --count  just the number
#include <procpool/procpool.hpp>

#include <cstdio>
#include <cstring>

int main(int argc, char** argv) {
  try {
    const procpool::CpuReport report = procpool::cpu_report();
    if (argc > 1 && std::strcmp(argv[1], "--count") == 0) {
      std::printf("%u\n", report.usable);
    } else {
      std::printf("%s\n", report.to_string().c_str());
    }
  } catch (const procpool::Error& e) {
    std::fprintf(stderr, "%s\n", e.what());
    return 1;
  }
}
