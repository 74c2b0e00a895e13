// Shared by the benchmark programs: repeat, take median/min/max, print one JSON line.
#pragma once

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <functional>
#include <map>
#include <string>
#include <vector>

namespace bench {

struct Stats {
  double median = 0, min = 0, max = 0;
};

inline Stats stats(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  const std::size_t n = v.size();
  return {n % 2 ? v[n / 2] : (v[n / 2 - 1] + v[n / 2]) / 2, v.front(), v.back()};
}

inline double seconds_since(std::chrono::steady_clock::time_point start) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
}

inline double seconds(const std::function<void()>& body) {
  const auto start = std::chrono::steady_clock::now();
  body();
  return seconds_since(start);
}

/// Runs `body` `reps` times and returns each run's seconds.
inline std::vector<double> repeat(int reps, const std::function<void()>& body) {
  std::vector<double> runs;
  for (int i = 0; i < reps; ++i)
    runs.push_back(seconds(body));
  return runs;
}

/// --name value arguments with defaults.
class Args {
 public:
  Args(int argc, char** argv, int first) {
    for (int i = first; i + 1 < argc; i += 2)
      values_[argv[i]] = argv[i + 1];
  }
  long get(const std::string& name, long fallback) const {
    auto it = values_.find(name);
    return it == values_.end() ? fallback : std::atol(it->second.c_str());
  }

 private:
  std::map<std::string, std::string> values_;
};

/// One JSON object on one line: {"workload": ..., "key": number, ...}.
class Json {
 public:
  explicit Json(const std::string& workload) { text_ = "{\"workload\": \"" + workload + "\""; }
  Json& num(const std::string& key, double value) {
    char buf[64];
    std::snprintf(buf, sizeof buf, "%.6g", value);
    text_ += ", \"" + key + "\": " + buf;
    return *this;
  }
  Json& str(const std::string& key, const std::string& value) {
    text_ += ", \"" + key + "\": \"" + value + "\"";
    return *this;
  }
  Json& stats(const std::string& key, const Stats& s) {
    num(key + "_median", s.median);
    num(key + "_min", s.min);
    return num(key + "_max", s.max);
  }
  void print() const {
    std::printf("%s}\n", text_.c_str());
    std::fflush(stdout);
  }

 private:
  std::string text_;
};

/// A /proc/self/status field in kB (VmRSS, VmHWM).
inline long status_kb(const char* field, const std::string& pid = "self") {
  std::ifstream in("/proc/" + pid + "/status");
  std::string key;
  long value = 0;
  std::string line;
  while (std::getline(in, line)) {
    if (line.rfind(field, 0) == 0) return std::atol(line.c_str() + std::strlen(field) + 1);
  }
  return value;
}

/// A /proc/PID/smaps_rollup field in kB (Pss, Private_Dirty...).
inline long rollup_kb(const char* field, const std::string& pid = "self") {
  std::ifstream in("/proc/" + pid + "/smaps_rollup");
  std::string line;
  while (std::getline(in, line)) {
    if (line.rfind(field, 0) == 0 && line[std::strlen(field)] == ':') {
      return std::atol(line.c_str() + std::strlen(field) + 1);
    }
  }
  return 0;
}

}  // namespace bench
