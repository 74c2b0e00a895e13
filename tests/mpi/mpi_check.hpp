// A check for the MPI test programs: they run under mpirun, where a test
// framework on the root alone is awkward, so each program checks its own
// results and exits non-zero with a message at the first failure.
#pragma once

#include <cstdio>
#include <cstdlib>
#include <string>

#define MPI_CHECK(cond)                                                      \
  do {                                                                       \
    if (!(cond)) {                                                           \
      std::fprintf(stderr, "FAILED %s:%d: %s\n", __FILE__, __LINE__, #cond); \
      std::fflush(stderr);                                                   \
      std::_Exit(1);                                                         \
    }                                                                        \
  } while (0)

#define MPI_CHECK_MSG(cond, msg)                                                \
  do {                                                                          \
    if (!(cond)) {                                                              \
      std::fprintf(stderr, "FAILED %s:%d: %s: %s\n", __FILE__, __LINE__, #cond, \
                   std::string(msg).c_str());                                   \
      std::fflush(stderr);                                                      \
      std::_Exit(1);                                                            \
    }                                                                           \
  } while (0)
