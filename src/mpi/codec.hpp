// The root's side of error records (the node's is save_error in node.hpp).
#pragma once

#include <cstddef>
#include <exception>
#include <string>

#include "wire.hpp"

namespace procpool::mpi::detail {

/// Rebuilds the procpool error a node recorded, as OnNode<E> with the global
/// input index and the node's rank and host.
std::exception_ptr load_error(Reader& in, std::size_t index, int rank, const std::string& host);

}  // namespace procpool::mpi::detail
