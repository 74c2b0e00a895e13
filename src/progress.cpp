#include "procpool/progress.hpp"

#include <sys/ioctl.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>

#include "procpool/detail/interrupt.hpp"

namespace procpool::detail {
namespace {

constexpr double redraw_interval = 0.1;  // seconds: at most ~10 frames a second
constexpr double log_interval = 5.0;
constexpr double smoothing = 0.3;  // tqdm's default weight for the newest rate

double now_seconds() {
  return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch()).count();
}

void write_stderr(const std::string& s) {
  std::size_t at = 0;
  while (at < s.size()) {
    ssize_t n = ::write(STDERR_FILENO, s.data() + at, s.size() - at);
    if (n <= 0) return;
    at += static_cast<std::size_t>(n);
  }
}

std::string clock_text(double seconds) {
  const long s = static_cast<long>(seconds + 0.5);
  char buf[32];
  if (s >= 3600) {
    std::snprintf(buf, sizeof buf, "%ld:%02ld:%02ld", s / 3600, s / 60 % 60, s % 60);
  } else {
    std::snprintf(buf, sizeof buf, "%02ld:%02ld", s / 60, s % 60);
  }
  return buf;
}

std::string rate_text(double rate) {
  char buf[32];
  if (rate <= 0) return "?it/s";
  if (rate < 1) {
    std::snprintf(buf, sizeof buf, "%.2fs/it", 1 / rate);
  } else if (rate < 1e6) {
    std::snprintf(buf, sizeof buf, "%.1fit/s", rate);
  } else {
    std::snprintf(buf, sizeof buf, "%.2fMit/s", rate / 1e6);
  }
  return buf;
}

int terminal_width() {
  winsize ws{};
  if (::ioctl(STDERR_FILENO, TIOCGWINSZ, &ws) == 0 && ws.ws_col > 0) return ws.ws_col;
  return 80;
}

bool utf8_locale() {
  for (const char* name : {"LC_ALL", "LC_CTYPE", "LANG"}) {
    const char* v = std::getenv(name);
    if (v && *v) return std::strstr(v, "UTF-8") || std::strstr(v, "utf8");
  }
  return false;
}

/// `fraction` of `width` cells, with eighth-cell precision when Unicode is available.
std::string bar(double fraction, int width, bool unicode) {
  std::string out;
  const double cells = std::clamp(fraction, 0.0, 1.0) * width;
  const int full = static_cast<int>(cells);
  if (unicode) {
    static const char* eighths[] = {"", "▏", "▎", "▍", "▌", "▋", "▊", "▉"};
    for (int i = 0; i < full; ++i)
      out += "█";
    int used = full;
    const int part = static_cast<int>((cells - full) * 8);
    if (full < width && part > 0) {
      out += eighths[part];
      ++used;
    }
    out.append(static_cast<std::size_t>(width - used), ' ');
  } else {
    out.append(static_cast<std::size_t>(full), '#');
    out.append(static_cast<std::size_t>(width - full), ' ');
  }
  return out;
}

}  // namespace

ProgressReporter::ProgressReporter(const Progress& progress, std::optional<std::size_t> total)
    : total_(total) {
  switch (progress.mode()) {
    case Progress::Mode::off:
      return;
    case Progress::Mode::callback:
      kind_ = Kind::callback;
      callback_ = progress.callback();
      break;
    case Progress::Mode::automatic:
      if (!::isatty(STDERR_FILENO)) return;
      kind_ = Kind::terminal;
      break;
    case Progress::Mode::on:
      kind_ = ::isatty(STDERR_FILENO) ? Kind::terminal : Kind::log;
      break;
  }
  start_ = last_draw_ = last_log_ = now_seconds();
  unicode_ = utf8_locale();
  if (kind_ == Kind::terminal) {
    set_terminal_line_open(true);
    draw(false, nullptr);
  }
}

ProgressReporter::~ProgressReporter() {
  if (active() && !finished_) finish("stopped");
}

void ProgressReporter::advance(std::size_t tasks) {
  count(tasks);
  if (draw_due()) draw(false, nullptr);
}

bool ProgressReporter::draw_due() const noexcept {
  return kind_ != Kind::none && now_seconds() - last_draw_ >= redraw_interval;
}

void ProgressReporter::finish(const char* how) {
  if (kind_ == Kind::none || finished_) return;
  finished_ = true;
  draw(true, how);
  if (kind_ == Kind::terminal) set_terminal_line_open(false);
}

void ProgressReporter::draw(bool final, const char* how) {
  const double now = now_seconds();
  const double since = now - last_draw_;
  if (since > 0 && done_ >= done_at_last_draw_) {
    const double instant = static_cast<double>(done_ - done_at_last_draw_) / since;
    rate_ = rate_ == 0 ? instant : smoothing * instant + (1 - smoothing) * rate_;
  }
  if (final && now > start_) rate_ = static_cast<double>(done_) / (now - start_);
  last_draw_ = now;
  done_at_last_draw_ = done_;
  ProgressInfo info{done_, total_, now - start_, rate_, final};
  switch (kind_) {
    case Kind::terminal:
      draw_terminal(info, final ? how : nullptr);
      break;
    case Kind::log:
      draw_log(info, final ? how : nullptr);
      break;
    case Kind::callback:
      try {
        callback_(info);
      } catch (...) {
        // Never call it again, not even for the final line when the call
        // stops: the exception goes to the caller (see CallDriver).
        kind_ = Kind::none;
        throw;
      }
      break;
    case Kind::none:
      break;
  }
}

void ProgressReporter::draw_terminal(const ProgressInfo& info, const char* how) {
  const int width = terminal_width();
  std::string left, right;
  const std::string elapsed = clock_text(info.elapsed_seconds);
  if (info.total) {
    const double fraction =
        *info.total == 0 ? 1.0 : static_cast<double>(info.done) / static_cast<double>(*info.total);
    char pct[16];
    std::snprintf(pct, sizeof pct, "%3.0f%%|", fraction * 100);
    left = pct;
    const double left_tasks = static_cast<double>(*info.total - std::min(*info.total, info.done));
    const std::string eta = info.rate > 0 ? clock_text(left_tasks / info.rate) : "?";
    right = "| " + std::to_string(info.done) + "/" + std::to_string(*info.total) + " [" + elapsed +
            "<" + eta + ", " + rate_text(info.rate) + "]";
    if (how && std::strcmp(how, "done") != 0) right += std::string(" ") + how;
    const int bar_width = width - 1 - static_cast<int>(left.size() + right.size());
    std::string line = "\r" + left;
    if (bar_width >= 4) {
      line += bar(fraction, bar_width, unicode_);
    } else {
      line = "\r" + left.substr(0, left.size() - 1) + " ";  // too narrow for a bar
      right = right.substr(2);
    }
    line += right;
    write_stderr(line + "\x1b[K" + (how ? "\n" : ""));
  } else {
    std::string line =
        "\r" + std::to_string(info.done) + " [" + elapsed + ", " + rate_text(info.rate) + "]";
    if (how && std::strcmp(how, "done") != 0) line += std::string(" ") + how;
    if (static_cast<int>(line.size()) > width) line.resize(static_cast<std::size_t>(width));
    write_stderr(line + "\x1b[K" + (how ? "\n" : ""));
  }
}

void ProgressReporter::draw_log(const ProgressInfo& info, const char* how) {
  const double now = now_seconds();
  int decile = 0;
  if (info.total && *info.total > 0) {
    decile =
        static_cast<int>(10 * static_cast<double>(info.done) / static_cast<double>(*info.total));
  }
  if (!how && now - last_log_ < log_interval && decile <= last_log_decile_) return;
  last_log_ = now;
  last_log_decile_ = decile;
  char line[256];
  if (info.total) {
    const double pct = *info.total == 0 ? 100.0
                                        : 100.0 * static_cast<double>(info.done) /
                                              static_cast<double>(*info.total);
    std::snprintf(line, sizeof line, "procpool: %zu/%zu tasks (%.0f%%), %s, elapsed %s%s%s\n",
                  info.done, *info.total, pct, rate_text(info.rate).c_str(),
                  clock_text(info.elapsed_seconds).c_str(), how ? ", " : "", how ? how : "");
  } else {
    std::snprintf(line, sizeof line, "procpool: %zu tasks, %s, elapsed %s%s%s\n", info.done,
                  rate_text(info.rate).c_str(), clock_text(info.elapsed_seconds).c_str(),
                  how ? ", " : "", how ? how : "");
  }
  write_stderr(line);
}

}  // namespace procpool::detail
