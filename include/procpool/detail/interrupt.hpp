// Noticing Ctrl-C while a call runs, without taking SIGINT away from the program.
#pragma once

#include <cstdint>

namespace procpool::detail {

/// While one exists, SIGINT goes through a handler that counts it and then
/// does what the program had set up: the default action (the program ends, as
/// Ctrl-C would: the workers die with it), the program's own handler (and the
/// running call then throws Interrupted), or nothing if it was ignored.
class InterruptWatch {
 public:
  InterruptWatch() : InterruptWatch(nullptr) {}
  /// A watch that counts SIGINTs from when `earlier` began (null: from now):
  /// a fork-per-call call starts watching before it forks its workers, and a
  /// Ctrl-C while it does must stop the call too.
  explicit InterruptWatch(const InterruptWatch* earlier);
  ~InterruptWatch();
  InterruptWatch(const InterruptWatch&) = delete;
  InterruptWatch& operator=(const InterruptWatch&) = delete;

  /// Whether a SIGINT arrived since this watch began.
  bool interrupted() const noexcept;

 private:
  std::uint64_t start_count_;
};

/// Whether a progress bar holds the terminal's line: then a Ctrl-C that ends
/// the program first ends the line, so the shell prompt starts on its own.
void set_terminal_line_open(bool open) noexcept;

}  // namespace procpool::detail
