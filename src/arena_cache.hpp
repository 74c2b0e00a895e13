// Arenas: the shared pages through which large inputs and replies travel
// (ReplyArena, protocol.hpp), mapped for each local worker and kept warm
// across workers, calls and pools.
#pragma once

#include <memory>

#include "procpool/detail/protocol.hpp"

namespace procpool::detail {

/// A worker's arena, shared with it once it is forked; back to the cache when
/// the last user lets go. Null if it cannot be mapped.
[[nodiscard]] std::shared_ptr<ReplyArena> map_arena();

}  // namespace procpool::detail
