// snippet: procpool::SharedBuffer table = load_table();
#include <procpool/procpool.hpp>

#include <cstddef>
#include <span>

procpool::SharedBuffer load_table();
std::size_t search(const procpool::SharedBuffer& table);

void snippet() {
  procpool::Pool pool;
  // @snippet
}
