// The unit of work between a call and its workers: a chunk of tasks going
// out, and its outcome coming back. Both are bytes here; types live in call.hpp.
#pragma once

#include <cstddef>
#include <cstdint>
#include <exception>
#include <memory>
#include <utility>
#include <vector>

#include "procpool/detail/buffer.hpp"
#include "procpool/detail/memory_file.hpp"

namespace procpool::detail {

struct Chunk;

/// Encodes a chunk's one input again from the caller's range. A chunk that
/// has one (a large input that the range still holds, see StreamFeed) hands
/// its memory file to the worker for good: the worker gives the file's pages
/// back as it decodes them, so the input is not held a third time while its
/// copy in the worker is built, and a retry encodes it afresh.
class InputSource {
 public:
  virtual ~InputSource() = default;
  /// Fills `chunk`'s payload, offsets and files as the feed did the first time.
  virtual void encode(Chunk& chunk) const = 0;
};

/// Tasks `first` .. `first + count - 1` of one call, sent to a worker as one message.
struct Chunk {
  std::uint64_t call = 0;
  std::uint64_t first = 0;
  std::uint64_t count = 0;
  /// Serialised inputs; empty when the workers read the inputs from inherited memory.
  Buffer payload;
  /// Where each input starts in `payload`, so that a chunk can be split into single tasks.
  std::vector<std::uint64_t> offsets;
  /// When non-zero, every input is this many bytes and `offsets` stays empty.
  std::uint64_t stride = 0;
  /// Times a task of this chunk was charged with its worker's death or a timeout.
  unsigned attempts = 0;
  /// Times a worker died with this chunk sent but not running (a kill between
  /// tasks, or while the reply was on its way): such a chunk is cut in halves
  /// and sent again, and one task lost this way too often fails.
  unsigned orphaned = 0;
  /// One of a call's last chunks (SchedulePolicy::next_chunk said so): it
  /// goes only to a worker with nothing queued.
  bool tail = false;
  /// Sent to a worker whose link a task took, no task told apart (see
  /// LinkWatch): the next worker checks its link before and after it, so
  /// that the task that takes it again is named, not a neighbour.
  bool check_link = false;
  /// The memory files its inputs refer to (SharedBuffer inputs handed over,
  /// not copied), by index. The chunk keeps them: each send hands the worker
  /// duplicates, so a retry or a split part can send them again.
  std::shared_ptr<AttachedFiles> files;
  /// Set for a chunk of one input that can be encoded again (see InputSource).
  std::shared_ptr<const InputSource> source;

  /// The payload went to a worker for good: it must be encoded again before
  /// the chunk is sent again.
  bool handed_over() const noexcept { return source && payload.empty(); }
};

/// Tasks `from` .. `to - 1` (relative to the chunk's first) as a chunk of their own.
Chunk slice(const Chunk& chunk, std::uint64_t from, std::uint64_t to);

/// A chunk's outcome as the engine hands it to the call that submitted it.
struct ChunkDone {
  std::uint64_t first = 0;
  std::uint64_t count = 0;
  /// The encoded outcome of each task (see OutcomeTag), from `offset` on, when `failure` is empty.
  Buffer payload;
  /// Set when the chunk produced no outcomes: its worker died or replied garbage.
  std::exception_ptr failure;
  std::size_t offset = 0;
  /// The outcomes are `count` fixed-size values without tags (see flag_dense).
  bool dense = false;
  /// When the outcomes are in a worker's reply arena instead of `payload`:
  /// where, and what keeps the arena mapped (and hands it back when released).
  const std::byte* external = nullptr;
  std::size_t external_size = 0;
  std::shared_ptr<void> lease;
  /// The external bytes are a memory file's that only this chunk reads:
  /// decoding may give back what it has copied out (Reader::consumed).
  bool give_back = false;
  /// Memory files that came with the reply, for the values that refer to them.
  std::shared_ptr<AttachedFiles> files;

  /// A chunk that produced no outcomes, for `failure`.
  [[nodiscard]] static ChunkDone failed(std::uint64_t first, std::uint64_t count,
                                        std::exception_ptr failure) {
    ChunkDone done;
    done.first = first;
    done.count = count;
    done.failure = std::move(failure);
    return done;
  }

  const std::byte* bytes() const noexcept { return external ? external : payload.data() + offset; }
  std::size_t size() const noexcept { return external ? external_size : payload.size() - offset; }
};

}  // namespace procpool::detail
