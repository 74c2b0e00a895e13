#include "procpool/detail/protocol.hpp"

#include <cxxabi.h>

#include <cstdlib>
#include <memory>
#include <typeinfo>

namespace procpool::detail {

std::string demangle(const char* mangled) {
  int status = 0;
  std::unique_ptr<char, decltype(&std::free)> name(
      abi::__cxa_demangle(mangled, nullptr, nullptr, &status), &std::free);
  return status == 0 && name ? std::string(name.get()) : std::string(mangled);
}

void write_current_exception(Writer& out) {
  std::string type_name = "unknown exception";
  std::string what = "(an exception not derived from std::exception)";
  try {
    throw;
  } catch (const std::exception& e) {
    type_name = demangle(typeid(e).name());
    what = e.what();
  } catch (...) {
    if (const std::type_info* type = abi::__cxa_current_exception_type()) {
      type_name = demangle(type->name());
    }
  }
  out.put(OutcomeTag::error);
  save(out, type_name);
  save(out, what);
}

}  // namespace procpool::detail
