// snippet: struct Token {
#include <procpool/procpool.hpp>

#include <string>

// @snippet
