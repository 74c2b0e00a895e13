// snippet: pool.set_error_handler([](std::exception_ptr e) { log_failure(e); });
#include <procpool/procpool.hpp>

#include <exception>
#include <vector>

struct Event {
  int kind = 0;
  double at = 0;
};

std::vector<Event> events;
void record_event(const Event& event);
void log_failure(std::exception_ptr error);

void snippet() {
  procpool::Pool pool;
  // @snippet
}
