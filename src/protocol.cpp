#include "procpool/detail/protocol.hpp"

#include <cxxabi.h>
#include <linux/futex.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <cstdlib>
#include <cstring>
#include <memory>
#include <typeinfo>

namespace procpool::detail {

int ReplyArena::claim() noexcept {
  for (std::size_t region = 0; region < regions; ++region) {
    std::uint32_t free = 0;
    if (busy[region].compare_exchange_strong(free, 1, std::memory_order_acquire)) {
      return static_cast<int>(region);
    }
  }
  return -1;
}

int ReplyArena::claim_waiting(std::chrono::milliseconds patience) noexcept {
  const auto deadline = std::chrono::steady_clock::now() + patience;
  for (;;) {
    const std::uint32_t seen = released.load(std::memory_order_acquire);
    if (int region = claim(); region >= 0) return region;
    const auto left = deadline - std::chrono::steady_clock::now();
    if (left <= left.zero()) return -1;
    const auto nanos = std::chrono::duration_cast<std::chrono::nanoseconds>(left).count();
    timespec wait{static_cast<time_t>(nanos / 1'000'000'000),
                  static_cast<long>(nanos % 1'000'000'000)};
    // Shared between processes: not FUTEX_PRIVATE. Returns at once if a region was freed since
    // `seen`.
    ::syscall(SYS_futex, reinterpret_cast<std::uint32_t*>(&released), FUTEX_WAIT, seen, &wait,
              nullptr, 0);
  }
}

void ReplyArena::release(std::size_t region) noexcept {
  busy[region].store(0, std::memory_order_release);
  released.fetch_add(1, std::memory_order_release);
  ::syscall(SYS_futex, reinterpret_cast<std::uint32_t*>(&released), FUTEX_WAKE, 1, nullptr, nullptr,
            0);
}

std::string demangle(const char* mangled) {
  int status = 0;
  std::unique_ptr<char, decltype(&std::free)> name(
      abi::__cxa_demangle(mangled, nullptr, nullptr, &status), &std::free);
  return status == 0 && name ? std::string(name.get()) : std::string(mangled);
}

void retag_dense_values(Buffer& buffer, std::size_t start, std::uint64_t n, std::size_t size) {
  buffer.grow(static_cast<std::size_t>(n));
  std::byte* base = buffer.data() + start;
  // Back to front: each value moves right by its index, never over one not yet moved.
  for (std::uint64_t k = n; k-- > 0;) {
    std::memmove(base + k * (size + 1) + 1, base + k * size, size);
    base[k * (size + 1)] = static_cast<std::byte>(OutcomeTag::value);
  }
}

std::pair<std::string, std::string> current_exception_type_and_what() {
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
  return {std::move(type_name), std::move(what)};
}

void write_current_exception(Writer& out, OutcomeTag tag) {
  std::pair<std::string, std::string> described;
  try {
    throw;
  } catch (const InputDecodeFailed& failed) {
    tag = OutcomeTag::input_error;
    try {
      std::rethrow_exception(failed.cause);
    } catch (...) {
      described = current_exception_type_and_what();
    }
  } catch (...) {
    described = current_exception_type_and_what();
  }
  out.put(tag);
  save(out, described.first);
  save(out, described.second);
}

}  // namespace procpool::detail
