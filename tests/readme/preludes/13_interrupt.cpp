// snippet: std::signal(SIGINT, on_sigint);
#include <procpool/procpool.hpp>

#include <csignal>
#include <vector>

void on_sigint(int signal);
int work(int input);
std::vector<int> inputs;

void snippet() {
  // @snippet
}
