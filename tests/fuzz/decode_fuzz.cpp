// libFuzzer harness: arbitrary bytes as a worker's reply stream. The parent
// must only ever answer with procpool errors: ProtocolError for a corrupt
// reply, a TaskError for one garbled framed value (Record travels framed,
// the other types do not): no crash, no hang, no huge allocation.
#include <procpool/procpool.hpp>

#include "../decode_chunk.hpp"

#include <cstddef>
#include <cstdint>
#include <cstring>
#include <map>
#include <string>
#include <vector>

namespace {

struct Record {
  std::string name;
  std::map<std::string, std::vector<int>> groups;
  template <class Archive>
  void serialize(Archive& ar) {
    ar(name, groups);
  }
};

constexpr std::uint64_t max_payload = std::uint64_t{1} << 20;

template <class Out>
void decode(const procpool::detail::FrameHeader& header, const std::byte* payload) {
  procpool::detail::ChunkDone done;
  done.first = header.first;
  done.count = header.count % 4096;  // the parent only decodes counts it asked for
  done.payload.append(payload, header.size);
  done.dense = (header.flags & procpool::detail::flag_dense) != 0;  // bare values, no tags
  auto outcomes = procpool::detail::decode_chunk<Out>(done);
  if (outcomes.size() != done.count) __builtin_trap();  // every task gets an outcome
  for (const auto& outcome : outcomes) {
    if (!outcome.error) continue;
    try {
      std::rethrow_exception(outcome.error);
    } catch (const procpool::Error&) {
      // what the caller is promised
    } catch (...) {
      __builtin_trap();
    }
  }
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  const auto* bytes = reinterpret_cast<const std::byte*>(data);
  std::size_t at = 0;
  while (size - at >= sizeof(procpool::detail::FrameHeader)) {
    procpool::detail::FrameHeader header;
    std::memcpy(&header, bytes + at, sizeof header);
    header.magic = procpool::detail::frame_magic;  // let the fuzzer past the first check
    if (!procpool::detail::valid_reply_header(header, max_payload)) return 0;
    at += sizeof header;
    if (size - at < header.size) return 0;  // truncated: the parent waits for more
    switch (header.nanos % 4) {
      case 3:
        decode<std::int64_t>(header, bytes + at);  // fixed-size: tagged or dense
        break;
      case 0:
        decode<std::vector<std::string>>(header, bytes + at);
        break;
      case 1:
        decode<std::pair<int, std::optional<std::string>>>(header, bytes + at);
        break;
      default:
        decode<Record>(header, bytes + at);
        break;
    }
    at += header.size;
  }
  return 0;
}
