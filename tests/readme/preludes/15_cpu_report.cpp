// snippet: std::cout << procpool::cpu_report().to_string() << '\n';
#include <procpool/procpool.hpp>

#include <iostream>

void snippet() {
  // @snippet
}
