// snippet: try { procpool::map(parse, records); } catch (const procpool::TaskError& e) {
#include <procpool/procpool.hpp>

#include <iostream>
#include <string>
#include <vector>

int parse(const std::string& record);
std::vector<std::string> records;

void snippet() {
  // @snippet
}
