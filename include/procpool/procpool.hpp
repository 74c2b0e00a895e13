// procpool - map a function over many inputs in parallel worker processes.
//
//     #include <procpool/procpool.hpp>
//     auto squares = procpool::map([](int x) { return x * x; }, std::vector{1, 2, 3});
#pragma once

#include "procpool/cpu_count.hpp"
#include "procpool/errors.hpp"
#include "procpool/huge_pages.hpp"
#include "procpool/insights.hpp"
#include "procpool/map.hpp"
#include "procpool/options.hpp"
#include "procpool/pool.hpp"
#include "procpool/progress.hpp"
#include "procpool/results.hpp"
#include "procpool/serialize.hpp"
#include "procpool/shared_buffer.hpp"
#include "procpool/shared_vector.hpp"
