// Decodes a whole chunk's outcomes at once: for tests and the fuzzer only,
// which check the reply encoding without a call around it.
#pragma once

#include <deque>
#include <utility>

#include "procpool/detail/call.hpp"

namespace procpool::detail {

/// Every outcome of a chunk at once (tests and the fuzzer).
template <class Out>
std::deque<Outcome<Out>> decode_chunk(const ChunkDone& done) {
  ChunkDone copy = ChunkDone::failed(done.first, done.count, done.failure);
  copy.payload.append(done.bytes(), done.size());
  copy.dense = done.dense;
  ChunkDecoder<Out> decoder(std::move(copy));
  std::deque<Outcome<Out>> outcomes;
  while (!decoder.empty())
    outcomes.push_back(decoder.take());
  return outcomes;
}

}  // namespace procpool::detail
