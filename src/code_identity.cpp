#include "procpool/detail/code_identity.hpp"

#include <dlfcn.h>
#include <elf.h>
#include <link.h>
#include <pthread.h>
#include <sys/stat.h>

#include <cstdio>
#include <cstring>
#include <map>
#include <mutex>
#include <optional>
#include <string>
#include <tuple>
#include <utility>

#include "procpool/errors.hpp"

namespace procpool::detail {
namespace {

/// A search over the modules dl_iterate_phdr reports.
struct ModuleQuery {
  // In: the address to find (code_ref), or the module to find (code_address).
  std::uintptr_t address = 0;
  const std::string* module = nullptr;
  // Out.
  bool found = false;
  std::string name;
  std::uintptr_t base = 0;
  const ElfW(Phdr) * phdr = nullptr;
  ElfW(Half) phnum = 0;
  unsigned index = 0;  // modules seen so far
};

/// Whether [base + offset] lies in an executable loaded segment of the module.
bool in_code_segment(std::uintptr_t base, const ElfW(Phdr) * phdr, ElfW(Half) phnum,
                     std::uintptr_t address) {
  for (ElfW(Half) i = 0; i < phnum; ++i) {
    if (phdr[i].p_type != PT_LOAD || (phdr[i].p_flags & PF_X) == 0) continue;
    const std::uintptr_t begin = base + phdr[i].p_vaddr;
    if (address >= begin && address - begin < phdr[i].p_memsz) return true;
  }
  return false;
}

int find_module(dl_phdr_info* info, std::size_t, void* data) {
  auto* query = static_cast<ModuleQuery*>(data);
  // glibc reports the main executable first; its dlpi_name is empty or argv[0]-like.
  std::string name = query->index++ == 0 || info->dlpi_name == nullptr ? "" : info->dlpi_name;
  const bool hit = query->module ? *query->module == name
                                 : in_code_segment(info->dlpi_addr, info->dlpi_phdr,
                                                   info->dlpi_phnum, query->address);
  if (!hit) return 0;
  query->found = true;
  query->name = std::move(name);
  query->base = info->dlpi_addr;
  query->phdr = info->dlpi_phdr;
  query->phnum = info->dlpi_phnum;
  return 1;  // stop
}

/// Walks the loaded modules for the one holding `address`, or named `module`.
/// The segment table stays valid after the walk: modules are never unloaded
/// while procpool may call into them.
ModuleQuery query_modules(std::uintptr_t address, const std::string* module) {
  ModuleQuery query;
  query.address = address;
  query.module = module;
  ::dl_iterate_phdr(find_module, &query);
  return query;
}

std::string hex(const unsigned char* bytes, std::size_t n) {
  static constexpr char digits[] = "0123456789abcdef";
  std::string out;
  out.reserve(2 * n);
  for (std::size_t i = 0; i < n; ++i) {
    out += digits[bytes[i] >> 4];
    out += digits[bytes[i] & 15];
  }
  return out;
}

std::size_t align_up(std::size_t n, std::size_t alignment) {
  return (n + alignment - 1) / alignment * alignment;
}

/// The GNU build id of a loaded module ("build-id:<hex>"), or "" if it has none.
std::string build_id(std::uintptr_t base, const ElfW(Phdr) * phdr, ElfW(Half) phnum) {
  for (ElfW(Half) i = 0; i < phnum; ++i) {
    const ElfW(Phdr)& ph = phdr[i];
    if (ph.p_type != PT_NOTE) continue;
    const std::size_t alignment = ph.p_align == 8 ? 8 : 4;
    const auto* at = reinterpret_cast<const unsigned char*>(base + ph.p_vaddr);
    const unsigned char* end = at + ph.p_memsz;
    while (static_cast<std::size_t>(end - at) >= sizeof(ElfW(Nhdr))) {
      ElfW(Nhdr) note;
      std::memcpy(&note, at, sizeof note);
      const unsigned char* name = at + sizeof note;
      const unsigned char* desc = name + align_up(note.n_namesz, alignment);
      const unsigned char* next = desc + align_up(note.n_descsz, alignment);
      if (next > end || next <= at) break;
      if (note.n_type == NT_GNU_BUILD_ID && note.n_namesz == 4 &&
          std::memcmp(name, "GNU", 4) == 0 && note.n_descsz > 0) {
        return "build-id:" + hex(desc, note.n_descsz);
      }
      at = next;
    }
  }
  return "";
}

/// The build id of the module reported first (the main executable), or "".
int find_build_id(dl_phdr_info* info, std::size_t, void* data) {
  *static_cast<std::string*>(data) = build_id(info->dlpi_addr, info->dlpi_phdr, info->dlpi_phnum);
  return 1;  // only the first module, the executable, matters
}

/// A file's size and modification time: the stand-in for a missing build id.
std::string file_identity(const char* path) {
  struct stat st {};
  if (::stat(path, &st) != 0) return "unknown";
  return "file:" + std::to_string(st.st_size) + ":" + std::to_string(st.st_mtim.tv_sec) + "." +
         std::to_string(st.st_mtim.tv_nsec);
}

/// What makes a loaded shared object itself (see CodeRef::identity).
std::string module_identity(const ModuleQuery& module) {
  std::string id = build_id(module.base, module.phdr, module.phnum);
  return id.empty() ? file_identity(module.name.c_str()) : id;
}

std::string compute_executable_identity() {
  std::string id;
  ::dl_iterate_phdr(find_build_id, &id);
  if (!id.empty()) return id;
  // No build-id note (linked with --build-id=none): the file's size and
  // modification time are the best cheap stand-in. /proc/self/exe names the
  // file this process runs even if it was since replaced or deleted.
  return file_identity("/proc/self/exe");
}

/// Identities already looked up, both ways. A walk over the loaded modules
/// costs about a microsecond, as much as a whole submitted task, and the same
/// few functions are named again and again. Modules are never unloaded while
/// procpool may call into them, so an entry never goes stale; the bound only
/// keeps a program that names endless distinct functions from growing it.
class IdentityCache {
 public:
  static IdentityCache& instance() {
    static auto* cache = new IdentityCache();  // never destroyed: used until exit
    return *cache;
  }
  std::optional<CodeRef> ref(std::uintptr_t address) {
    std::lock_guard lock(mutex_);
    auto it = refs_.find(address);
    if (it == refs_.end()) return std::nullopt;
    return it->second;
  }
  std::optional<std::uintptr_t> address(const CodeRef& ref) {
    std::lock_guard lock(mutex_);
    auto it = addresses_.find({ref.module, ref.offset, ref.identity});
    if (it == addresses_.end()) return std::nullopt;
    return it->second;
  }
  void remember(std::uintptr_t address, const CodeRef& ref) {
    std::lock_guard lock(mutex_);
    if (refs_.size() >= limit) refs_.clear();
    if (addresses_.size() >= limit) addresses_.clear();
    refs_.emplace(address, ref);
    addresses_.emplace(std::tuple{ref.module, ref.offset, ref.identity}, address);
  }

 private:
  static constexpr std::size_t limit = 1024;

  IdentityCache() {
    // A forked worker looks functions up: it must not inherit the lock held.
    ::pthread_atfork([] { instance().mutex_.lock(); }, [] { instance().mutex_.unlock(); },
                     [] { instance().mutex_.unlock(); });
  }

  std::mutex mutex_;
  std::map<std::uintptr_t, CodeRef> refs_;
  // By the identity too: an address is remembered only once its module was
  // found to be the build the reference names.
  std::map<std::tuple<std::string, std::uint64_t, std::string>, std::uintptr_t> addresses_;
};

/// Made as the library loads, not at first use: its constructor registers
/// fork handlers, and pthread_atfork waits for a fork in progress. A thread
/// making it then while another forked a worker left the worker a guard
/// of this static that never opens: it hung the first time it needed it
/// (four threads making their first map at once: 12 of 100 runs).
[[maybe_unused]] const IdentityCache& identity_cache_made_as_the_library_loads =
    IdentityCache::instance();

/// Throws Error unless the loaded `module` is the build `expected` names: the
/// same path may hold another build here (another node's copy, a library
/// rebuilt while the program ran), where an offset means nothing.
void check_module_identity(const ModuleQuery& module, const std::string& expected) {
  const std::string mine = module_identity(module);
  if (mine == expected) return;
  throw Error("procpool: the shared library " + module.name +
              ", which holds a function sent from the parent process, is another build here "
              "(its identity is " +
              mine + ", the sender's " + expected +
              "); functions cannot be matched by offset. Install the same build of it "
              "everywhere (was it rebuilt or replaced while the program ran?).");
}

}  // namespace

CodeRef code_ref(const void* address) {
  const auto at = reinterpret_cast<std::uintptr_t>(address);
  if (auto known = IdentityCache::instance().ref(at)) return *known;
  const ModuleQuery module = query_modules(at, nullptr);
  if (!module.found) {
    char text[32];
    std::snprintf(text, sizeof text, "%p", address);
    throw Error(std::string("procpool: the function at ") + text +
                " lies in no loaded module's code, so it cannot be named to another process. "
                "Pass a function defined in the program or a shared library it loads.");
  }
  CodeRef ref{module.name, at - module.base, module.name.empty() ? "" : module_identity(module)};
  IdentityCache::instance().remember(at, ref);
  return ref;
}

const void* code_address(const CodeRef& ref) {
  if (auto known = IdentityCache::instance().address(ref)) {
    return reinterpret_cast<const void*>(*known);
  }
  ModuleQuery module = query_modules(0, &ref.module);
  if (!module.found && !ref.module.empty()) {
    // Loaded by the parent with dlopen after start (a plugin): load it here too.
    // Never closed: code from it may run until the process ends.
    if (::dlopen(ref.module.c_str(), RTLD_NOW | RTLD_LOCAL) == nullptr) {
      const char* why = ::dlerror();
      throw Error("procpool: cannot load " + ref.module +
                  ", which holds a function sent from the parent process: " +
                  (why ? why : "dlopen failed"));
    }
    module = query_modules(0, &ref.module);
  }
  if (!module.found) {
    throw Error("procpool: the module '" + ref.module +
                "' that holds a function sent from the parent process is not loaded here");
  }
  if (!ref.identity.empty() && !ref.module.empty()) check_module_identity(module, ref.identity);
  const std::uintptr_t address = module.base + static_cast<std::uintptr_t>(ref.offset);
  if (!in_code_segment(module.base, module.phdr, module.phnum, address)) {
    throw Error("procpool: offset " + std::to_string(ref.offset) + " in " +
                (ref.module.empty() ? std::string("the executable") : ref.module) +
                " is not code here; the two processes run different binaries");
  }
  IdentityCache::instance().remember(address, ref);
  return reinterpret_cast<const void*>(address);
}

void save_code_ref(Writer& out, const CodeRef& ref) {
  out.put(static_cast<std::uint64_t>(ref.module.size()));
  out.write(ref.module.data(), ref.module.size());
  out.put(ref.offset);
  out.put(static_cast<std::uint64_t>(ref.identity.size()));
  out.write(ref.identity.data(), ref.identity.size());
}

CodeRef load_code_ref(Reader& in) {
  CodeRef ref;
  const auto size = in.get<std::uint64_t>();
  if (size > 4096) throw ProtocolError("procpool: corrupt function reference (module name length)");
  ref.module.resize(static_cast<std::size_t>(size));
  in.read(ref.module.data(), ref.module.size());
  ref.offset = in.get<std::uint64_t>();
  const auto identity_size = in.get<std::uint64_t>();
  if (identity_size > 4096)
    throw ProtocolError("procpool: corrupt function reference (module identity length)");
  ref.identity.resize(static_cast<std::size_t>(identity_size));
  in.read(ref.identity.data(), ref.identity.size());
  return ref;
}

const std::string& executable_identity() {
  static const std::string identity = compute_executable_identity();
  return identity;
}

void check_executable_identity(const std::string& expected) {
  const std::string& mine = executable_identity();
  if (mine == expected) return;
  throw Error(
      "procpool: this process runs a different executable than the one that sent it "
      "work (its identity is " +
      mine + ", the sender's " + expected +
      "); functions cannot be matched by offset. Run the same build everywhere "
      "(was the program rebuilt while it ran?).");
}

}  // namespace procpool::detail
