// Arenas: the shared pages through which large inputs and replies travel
// (ReplyArena, protocol.hpp), mapped for each local worker and kept warm
// across workers, calls and pools.
#pragma once

#include <cstdint>
#include <memory>
#include <string>

#include "procpool/detail/protocol.hpp"

namespace procpool::detail {

/// A worker's arena, shared with it once it is forked; back to the cache when
/// the last user lets go. Null if it cannot be mapped.
[[nodiscard]] std::shared_ptr<ReplyArena> map_arena();

/// A worker's two arenas (256 MiB of address space, reserved, not used),
/// unless an address-space limit (ulimit -v, RLIMIT_AS) leaves too little
/// room for them and the program: then none, and its large messages take the
/// socket. Null pointers then, or if mapping fails.
struct WorkerArenas {
  std::shared_ptr<ReplyArena> replies;
  std::shared_ptr<ReplyArena> inputs;
};
[[nodiscard]] WorkerArenas map_worker_arenas();

/// How many workers started without arenas in this process so far.
[[nodiscard]] std::uint64_t workers_without_arenas() noexcept;

/// Why workers go without arenas here, for insights: the limit and the
/// address space in use.
[[nodiscard]] std::string address_space_limit_note();

}  // namespace procpool::detail
