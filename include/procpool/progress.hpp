// procpool/progress.hpp - a progress bar (or your own callback) for any call.
#pragma once

#include <concepts>
#include <cstddef>
#include <functional>
#include <optional>
#include <utility>

namespace procpool {

/// What a progress callback receives, at most ~10 times a second and once at the end.
struct ProgressInfo {
  std::size_t done = 0;
  std::optional<std::size_t> total;  // empty for an endless or unsized input
  double elapsed_seconds = 0;
  double rate = 0;  // tasks per second, exponentially smoothed
  bool finished = false;
};

/// `Options::progress`: off (default), on, automatic (on when stderr is a
/// terminal), or a callback for your own UI.
///
///     procpool::map(f, inputs, {.progress = procpool::Progress::on});
///     procpool::map(f, inputs, {.progress = [](const procpool::ProgressInfo& p) { ui.set(p.done);
///     }});
///
/// On a terminal: one line on stderr with count, percent, bar, rate, elapsed
/// and ETA, redrawn at most 10 times a second and sized to the terminal.
/// Elsewhere (a log file, CI): a plain line every 5 s or 10 %, and a final line.
class Progress {
 public:
  enum class Mode { off, on, automatic, callback };
  using Callback = std::function<void(const ProgressInfo&)>;

  Progress() = default;
  Progress(Mode mode) : mode_(mode) {}  // NOLINT: Progress::on reads naturally
  // clang-format 14 glues this requires-clause to the constructor: left as written.
  // clang-format off
  template <class F>
  requires std::invocable<F&, const ProgressInfo&> && (!std::same_as<std::decay_t<F>, Progress>)
  Progress(F callback)  // NOLINT: a lambda converts
      : mode_(Mode::callback), callback_(std::move(callback)) {}
  // clang-format on

  static const Progress off;
  static const Progress on;
  static const Progress automatic;

  Mode mode() const noexcept { return mode_; }
  const Callback& callback() const noexcept { return callback_; }

 private:
  Mode mode_ = Mode::off;
  Callback callback_;
};

inline const Progress Progress::off{Progress::Mode::off};
inline const Progress Progress::on{Progress::Mode::on};
inline const Progress Progress::automatic{Progress::Mode::automatic};

namespace detail {

/// Draws one call's progress from the parent; cheap to call per finished chunk.
class ProgressReporter {
 public:
  ProgressReporter(const Progress& progress, std::optional<std::size_t> total);
  ~ProgressReporter();
  ProgressReporter(const ProgressReporter&) = delete;
  ProgressReporter& operator=(const ProgressReporter&) = delete;

  bool active() const noexcept { return kind_ != Kind::none; }
  /// Counts `tasks` more done and draws if a frame is due.
  void advance(std::size_t tasks);
  /// Counts `tasks` more done without drawing: for a caller holding a lock
  /// that the callback must not run under (it may use the pool).
  void count(std::size_t tasks) noexcept {
    if (kind_ != Kind::none) done_ += tasks;
  }
  /// Whether advance(0) would draw now.
  bool draw_due() const noexcept;
  /// The final line: "done", "failed", "interrupted" or "stopped".
  void finish(const char* how);

 private:
  enum class Kind { none, terminal, log, callback };
  void draw(bool final, const char* how);
  void draw_terminal(const ProgressInfo& info, const char* how);
  void draw_log(const ProgressInfo& info, const char* how);

  Kind kind_ = Kind::none;
  Progress::Callback callback_;
  std::optional<std::size_t> total_;
  std::size_t done_ = 0;
  bool finished_ = false;
  double start_ = 0;
  double last_draw_ = 0;
  std::size_t done_at_last_draw_ = 0;
  double rate_ = 0;
  double last_log_ = 0;
  int last_log_decile_ = 0;
  bool unicode_ = false;
};

}  // namespace detail
}  // namespace procpool
