#include "procpool/detail/interrupt.hpp"

#include <atomic>
#include <csignal>
#include <mutex>

#include <pthread.h>
#include <unistd.h>

namespace procpool::detail {
namespace {

std::atomic<std::uint64_t> sigint_count{0};
std::atomic<int> open_terminal_lines{0};
struct sigaction previous_action;  // what the program had, restored when the last watch ends
std::mutex install_mutex;
int watches = 0;

/// No fork while install_mutex is held (a call starts or ends on one thread
/// as another pool forks a worker): the worker would inherit it held, and a
/// parallel call of its own would wait for it for ever.
[[maybe_unused]] const int install_mutex_guarded_against_forks = ::pthread_atfork(
    [] { install_mutex.lock(); }, [] { install_mutex.unlock(); }, [] { install_mutex.unlock(); });

void on_sigint(int signal, siginfo_t* info, void* context) {
  const struct sigaction& previous = previous_action;
  if (previous.sa_flags & SA_SIGINFO) {
    sigint_count.fetch_add(1);
    if (previous.sa_sigaction) previous.sa_sigaction(signal, info, context);
  } else if (previous.sa_handler == SIG_IGN) {
    // The program ignores Ctrl-C; so do we.
  } else if (previous.sa_handler == SIG_DFL) {
    // End as Ctrl-C would: SIGINT is blocked inside this handler, so the
    // re-raised signal is delivered, with the default action, when it returns.
    if (open_terminal_lines.load() > 0) (void)!::write(STDERR_FILENO, "\n", 1);
    ::sigaction(SIGINT, &previous, nullptr);
    ::raise(SIGINT);
  } else {
    sigint_count.fetch_add(1);
    previous.sa_handler(signal);
  }
}

}  // namespace

InterruptWatch::InterruptWatch(const InterruptWatch* earlier)
    : start_count_(earlier ? earlier->start_count_ : sigint_count.load()) {
  std::lock_guard lock(install_mutex);
  if (watches++ != 0) return;
  struct sigaction ours {};
  ours.sa_sigaction = &on_sigint;
  ours.sa_flags = SA_SIGINFO | SA_RESTART;
  sigemptyset(&ours.sa_mask);
  ::sigaction(SIGINT, &ours, &previous_action);
}

InterruptWatch::~InterruptWatch() {
  std::lock_guard lock(install_mutex);
  if (--watches != 0) return;
  struct sigaction current {};
  ::sigaction(SIGINT, nullptr, &current);
  // Put the program's handler back, unless it installed another one meanwhile.
  if ((current.sa_flags & SA_SIGINFO) && current.sa_sigaction == &on_sigint) {
    ::sigaction(SIGINT, &previous_action, nullptr);
  }
}

void set_terminal_line_open(bool open) noexcept {
  open_terminal_lines += open ? 1 : -1;
}

bool InterruptWatch::interrupted() const noexcept {
  return sigint_count.load() != start_count_;
}

}  // namespace procpool::detail
