// snippet: procpool::Options opts{
#include <procpool/procpool.hpp>

void snippet() {
  // @snippet
}
