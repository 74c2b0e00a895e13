// Code that crosses a process boundary by identity, never by raw address.
//
// A function is named by the module it lives in and its offset from that
// module's load base. The same binary loaded at another address (a spawned
// worker under ASLR, an MPI rank on another node) finds the same function at
// its own base plus that offset. Whether "the same binary" really is the same
// is checked once per process with executable_identity(), sent at start.
#pragma once

#include <cstdint>
#include <string>
#include <type_traits>

#include "procpool/detail/buffer.hpp"

namespace procpool::detail {

/// Where a function lives, independent of where its module was loaded.
struct CodeRef {
  /// Empty for the main executable; otherwise the shared object's path as the loader knows it.
  std::string module;
  /// Bytes from the module's load base (its bias: 0 for a non-PIE executable).
  std::uint64_t offset = 0;
  /// For a shared object, what makes it itself where the reference was made
  /// ("build-id:<hex>", else "file:<size>:<mtime ns>"): the receiver checks
  /// that its copy is the same build. Empty for the main executable (checked
  /// once per process, check_executable_identity) or when not to be checked.
  std::string identity;

  friend bool operator==(const CodeRef&, const CodeRef&) = default;
};

/// The identity of the code at `address`; throws Error when no loaded module holds it.
CodeRef code_ref(const void* address);

/// The address of `ref` in this process; loads its shared object if it is not
/// loaded yet. Throws Error when the module cannot be found, is another build
/// than the one `ref` was made in, or the offset lies outside its loaded segments.
const void* code_address(const CodeRef& ref);

/// The identity of a function pointer (casting code to data pointers is
/// conditionally supported in C++; every ELF platform supports it).
template <class F>
CodeRef code_ref_of(F* function) requires std::is_function_v<F> {
  return code_ref(reinterpret_cast<const void*>(function));
}

/// The function of type `F` that `ref` names in this process.
template <class F>
F* function_at(const CodeRef& ref) requires std::is_function_v<F> {
  return reinterpret_cast<F*>(const_cast<void*>(code_address(ref)));
}

void save_code_ref(Writer& out, const CodeRef& ref);
/// Reads what save_code_ref wrote; a corrupt one throws ProtocolError.
CodeRef load_code_ref(Reader& in);

/// What makes this process's main executable itself: "build-id:<hex>" from
/// its NT_GNU_BUILD_ID note, or, for a binary linked without one,
/// "file:<size>:<mtime ns>" of /proc/self/exe (weaker: a copy with the same
/// size and time would pass). Computed once.
const std::string& executable_identity();

/// Throws Error unless `expected` (the parent's executable_identity()) equals
/// this process's: function offsets mean nothing in a different binary.
void check_executable_identity(const std::string& expected);

}  // namespace procpool::detail
