// procpool/serialize.hpp - how values cross the process boundary.
//
// Trivially copyable values, and strings and vectors of them, travel as raw
// bytes with a 64-bit length. Vectors, arrays, pairs, tuples and optionals of
// other types are encoded element by element. Everything else goes through
// cereal's binary archive: give your type a `serialize(Archive&)` member or
// free function (or save/load), as cereal documents, and it works.
//
//     struct Token {
//       std::string text;
//       int id;
//       template <class Archive> void serialize(Archive& ar) { ar(text, id); }
//     };
//     static_assert(procpool::serializable<Token>);
#pragma once

#include <algorithm>
#include <array>
#include <cstdint>
#include <istream>
#include <optional>
#include <ostream>
#include <streambuf>
#include <string>
#include <tuple>
#include <type_traits>
#include <utility>
#include <vector>

#include <cereal/archives/binary.hpp>
#include <cereal/types/array.hpp>
#include <cereal/types/bitset.hpp>
#include <cereal/types/chrono.hpp>
#include <cereal/types/complex.hpp>
#include <cereal/types/deque.hpp>
#include <cereal/types/list.hpp>
#include <cereal/types/map.hpp>
#include <cereal/types/memory.hpp>
#include <cereal/types/optional.hpp>
#include <cereal/types/set.hpp>
#include <cereal/types/string.hpp>
#include <cereal/types/tuple.hpp>
#include <cereal/types/unordered_map.hpp>
#include <cereal/types/unordered_set.hpp>
#include <cereal/types/utility.hpp>
#include <cereal/types/variant.hpp>
#include <cereal/types/vector.hpp>

#include "procpool/detail/buffer.hpp"
#include "procpool/errors.hpp"

namespace procpool::detail {

/// cereal's binary format, read straight from a Reader, with one difference:
/// a container or string length larger than the bytes left is refused with
/// ProtocolError instead of being allocated (cereal's own archive trusts it).
class CheckedInputArchive
    : public cereal::InputArchive<CheckedInputArchive, cereal::AllowEmptyClassElision> {
 public:
  explicit CheckedInputArchive(Reader& in)
      : cereal::InputArchive<CheckedInputArchive, cereal::AllowEmptyClassElision>(this), in_(in) {}
  void loadBinary(void* data, std::size_t size) { in_.read_block(data, size); }
  void check_length(std::uint64_t length) const {
    if (length > in_.remaining()) {
      throw ProtocolError("procpool: corrupt message: a length of " + std::to_string(length) +
                          " does not fit in the " + std::to_string(in_.remaining()) +
                          " bytes left");
    }
  }

 private:
  Reader& in_;
};

template <class T>
requires std::is_arithmetic_v<T>
void CEREAL_LOAD_FUNCTION_NAME(CheckedInputArchive& ar, T& t) {
  ar.loadBinary(std::addressof(t), sizeof(t));
}
template <class T>
void CEREAL_SERIALIZE_FUNCTION_NAME(CheckedInputArchive& ar, cereal::NameValuePair<T>& t) {
  ar(t.value);
}
template <class T>
void CEREAL_SERIALIZE_FUNCTION_NAME(CheckedInputArchive& ar, cereal::SizeTag<T>& t) {
  ar(t.size);
  ar.check_length(static_cast<std::uint64_t>(t.size));
}
template <class T>
void CEREAL_LOAD_FUNCTION_NAME(CheckedInputArchive& ar, cereal::BinaryData<T>& t) {
  ar.loadBinary(t.data, static_cast<std::size_t>(t.size));
}

}  // namespace procpool::detail

namespace cereal::traits::detail {
template <>
struct get_output_from_input<procpool::detail::CheckedInputArchive> {
  using type = cereal::BinaryOutputArchive;
};
}  // namespace cereal::traits::detail

namespace procpool {

class SharedBuffer;  // procpool/shared_buffer.hpp
template <class T>
class SharedVector;  // procpool/shared_vector.hpp

namespace detail {

/// A SharedBuffer travels as its memory file where the message can carry
/// one (see files_to_attach), else as bytes (src/shared_buffer.cpp).
void save_shared_buffer(Writer& out, const SharedBuffer& buffer);
void load_shared_buffer(Reader& in, SharedBuffer& buffer);

/// A SharedVector travels as its SharedBuffer (procpool/shared_vector.hpp).
template <class E>
void save_shared_vector(Writer& out, const SharedVector<E>& values);
template <class E>
void load_shared_vector(Reader& in, SharedVector<E>& values);

template <class T>
struct is_shared_vector : std::false_type {};
template <class E>
struct is_shared_vector<SharedVector<E>> : std::true_type {};

/// Types that procpool hands over as memory files where it can.
template <class T>
inline constexpr bool is_shared_memory_v =
    std::is_same_v<T, SharedBuffer> || is_shared_vector<T>::value;

/// procpool's own wire types that write and read their bytes themselves
/// (the MPI backend's results forwarded by a node, procpool/detail/mpi/node.hpp).
/// The tag keeps a user's type with such members from being taken for one.
template <class T>
concept writes_itself = requires(const T& c, T& m, Writer& out, Reader& in) {
  typename T::procpool_writes_itself;
  c.write_to(out);
  m.read_from(in);
};

template <class T>
struct is_std_vector : std::false_type {};
template <class T, class A>
struct is_std_vector<std::vector<T, A>> : std::true_type {};

template <class T>
struct is_std_string : std::false_type {};
template <class C, class Tr, class A>
struct is_std_string<std::basic_string<C, Tr, A>> : std::true_type {};

template <class T>
struct is_std_array : std::false_type {};
template <class T, std::size_t N>
struct is_std_array<std::array<T, N>> : std::true_type {};

template <class T>
struct is_tuple_like : std::false_type {};
template <class... Ts>
struct is_tuple_like<std::tuple<Ts...>> : std::true_type {};
template <class A, class B>
struct is_tuple_like<std::pair<A, B>> : std::true_type {};

template <class T>
struct is_std_optional : std::false_type {};
template <class T>
struct is_std_optional<std::optional<T>> : std::true_type {};

/// Whether class T has serialize/save/load member functions (cereal's names,
/// versioned or not, minimal or not). Non-member ones are not looked for:
/// cereal has them for standard types (std::array, durations) that travel
/// as raw bytes.
template <class T>
constexpr bool has_own_serialization() {
  if constexpr (std::is_class_v<T>) {
    using Out = cereal::BinaryOutputArchive;
    using In = CheckedInputArchive;
    namespace tr = cereal::traits;
    return tr::has_member_serialize<T, Out>::value ||
           tr::has_member_versioned_serialize<T, Out>::value ||
           tr::has_member_save<T, Out>::value || tr::has_member_versioned_save<T, Out>::value ||
           tr::has_member_load<T, In>::value || tr::has_member_versioned_load<T, In>::value ||
           tr::has_member_save_minimal<T, Out>::value ||
           tr::has_member_versioned_save_minimal<T, Out>::value;
  } else {
    return false;
  }
}

/// Raw bytes are right for trivially copyable values; a pointer is trivially
/// copyable but pointing into another process is a bug, so pointers are refused.
/// A type with its own save()/load() travels through them, trivially copyable
/// or not: they may hold what its bytes do not (a pointer's target), or check.
template <class T>
inline constexpr bool is_raw_v = std::is_trivially_copyable_v<T> && !std::is_pointer_v<T> &&
                                 !std::is_member_pointer_v<T> && !has_own_serialization<T>();

template <class T>
inline constexpr bool is_cereal_v =
    cereal::traits::is_output_serializable<T, cereal::BinaryOutputArchive>::value&&
        cereal::traits::is_input_serializable<T, CheckedInputArchive>::value;

/// Strings and vectors of raw values travel as one block of bytes.
template <class T>
constexpr bool is_raw_block() {
  if constexpr (is_std_string<T>::value || is_std_vector<T>::value) {
    using E = typename T::value_type;
    return is_raw_v<E> && !std::is_same_v<E, bool>;
  } else {
    return false;
  }
}
template <class T>
inline constexpr bool is_raw_block_v = is_raw_block<T>();

template <class T>
constexpr bool serializable_impl();

template <class Tuple, std::size_t... I>
constexpr bool all_elements_serializable(std::index_sequence<I...>) {
  return (serializable_impl<std::remove_cv_t<std::tuple_element_t<I, Tuple>>>() && ...);
}

template <class T>
constexpr bool serializable_impl() {
  if constexpr (std::is_pointer_v<T> || std::is_member_pointer_v<T>) {
    return false;
  } else if constexpr (is_raw_v<T> || is_shared_memory_v<T> || writes_itself<T>) {
    return true;
  } else if constexpr (is_std_string<T>::value) {
    return is_raw_v<typename T::value_type>;
  } else if constexpr (is_std_vector<T>::value || is_std_array<T>::value ||
                       is_std_optional<T>::value) {
    return serializable_impl<typename T::value_type>();
  } else if constexpr (is_tuple_like<T>::value) {
    return all_elements_serializable<T>(std::make_index_sequence<std::tuple_size_v<T>>{});
  } else {
    return is_cereal_v<T>;
  }
}

}  // namespace detail

/// True when values of T can be sent between processes.
template <class T>
concept serializable = detail::serializable_impl<std::remove_cv_t<T>>();

namespace detail {

template <class T>
constexpr bool runs_user_code_impl();

template <class Tuple, std::size_t... I>
constexpr bool any_element_runs_user_code(std::index_sequence<I...>) {
  return (runs_user_code_impl<std::remove_cv_t<std::tuple_element_t<I, Tuple>>>() || ...);
}

template <class T>
constexpr bool runs_user_code_impl() {
  if constexpr (is_raw_v<T> || is_raw_block_v<T> || is_shared_memory_v<T> || writes_itself<T>) {
    return false;
  } else if constexpr (is_std_vector<T>::value || is_std_array<T>::value ||
                       is_std_optional<T>::value) {
    return runs_user_code_impl<typename T::value_type>();
  } else if constexpr (is_tuple_like<T>::value) {
    return any_element_runs_user_code<T>(std::make_index_sequence<std::tuple_size_v<T>>{});
  } else {
    return true;  // cereal, and with it the type's own save()/load()
  }
}

/// Whether encoding or decoding a T runs the user's code (a cereal
/// serialize/save/load). Such a value travels framed with its byte length: its
/// load() may throw, or read more or less than its save() wrote, and the
/// frame keeps that to this one value. Everything else is decoded by procpool
/// alone, reads exactly what was written, and can fail only on a corrupt message.
template <class T>
inline constexpr bool runs_user_code_v = runs_user_code_impl<std::remove_cv_t<T>>();

}  // namespace detail

namespace detail {

/// Named so that the compiler's error names the offending type.
template <class T>
struct type_cannot_cross_processes {
  static_assert(serializable<T>,
                "procpool: this type cannot be sent between processes. Make it trivially "
                "copyable, or give it a cereal `template <class Archive> void "
                "serialize(Archive&)` member or free function (see <procpool/serialize.hpp>). "
                "The type is the T in `type_cannot_cross_processes<T>` above.");
  static constexpr bool value = serializable<T>;
};

/// std::streambuf over a Writer / Reader so that cereal writes straight into
/// our message buffer and reads straight out of it, without an extra copy.
class WriterStreambuf : public std::streambuf {
 public:
  explicit WriterStreambuf(Writer& out) : out_(out) {}

 protected:
  std::streamsize xsputn(const char* s, std::streamsize n) override {
    const auto bytes = static_cast<std::size_t>(n);
    // A large block (cereal's binary data: a vector's or a string's bytes)
    // is copied as save() copies one of its own.
    if (bytes >= large_block) {
      out_.write_block(s, bytes);
    } else {
      out_.write(s, bytes);
    }
    return n;
  }
  int_type overflow(int_type c) override {
    if (traits_type::eq_int_type(c, traits_type::eof())) return traits_type::not_eof(c);
    char ch = traits_type::to_char_type(c);
    out_.write(&ch, 1);
    return c;
  }

 private:
  static constexpr std::size_t large_block = std::size_t{1} << 20;
  Writer& out_;
};

template <class T>
void save(Writer& out, const T& value);
template <class T>
void load(Reader& in, T& value);

template <class Tuple, std::size_t... I>
void save_elements(Writer& out, const Tuple& t, std::index_sequence<I...>) {
  (save(out, std::get<I>(t)), ...);
}
template <class Tuple, std::size_t... I>
void load_elements(Reader& in, Tuple& t, std::index_sequence<I...>) {
  (load(in, std::get<I>(t)), ...);
}

/// A call's extra arguments, each as save() writes it: none, no bytes. (As
/// one std::tuple<> they would be its one raw byte, never set: the MPI
/// backend keys a call's task-time estimate by a hash of these bytes, and
/// found no estimate from an earlier call of the same code.)
template <class... Extra>
void save_extra_args(Writer& out, const Extra&... extra) {
  (save(out, extra), ...);
}
template <class... Extra>
void load_extra_args(Reader& in, std::tuple<Extra...>& extra) {
  load_elements(in, extra, std::index_sequence_for<Extra...>{});
}

/// Reads a 64-bit element count and refuses one that the remaining bytes
/// cannot hold, so a corrupt length never turns into a huge allocation.
inline std::size_t load_count(Reader& in, std::size_t min_bytes_per_element) {
  auto count = in.get<std::uint64_t>();
  if (min_bytes_per_element != 0 && count > in.remaining() / min_bytes_per_element) {
    throw ProtocolError("procpool: corrupt message: a length of " + std::to_string(count) +
                        " elements does not fit in the " + std::to_string(in.remaining()) +
                        " bytes left");
  }
  return static_cast<std::size_t>(count);
}

template <class T>
void save(Writer& out, const T& value) {
  static_assert(type_cannot_cross_processes<T>::value);
  if constexpr (is_raw_v<T>) {
    out.put(value);
  } else if constexpr (is_raw_block_v<T>) {
    const std::size_t bytes = value.size() * sizeof(typename T::value_type);
    out.put(static_cast<std::uint64_t>(value.size()));
    // The bytes of the very value given (a sub-object of what save() was
    // called with, never a temporary of its own), so they may be lent.
    out.write_lasting_block(value.data(), bytes);
  } else if constexpr (is_std_vector<T>::value) {
    out.put(static_cast<std::uint64_t>(value.size()));
    for (const auto& element : value) {
      if constexpr (std::is_same_v<typename T::value_type, bool>) {
        save(out, static_cast<bool>(element));  // vector<bool> hands out proxies
      } else {
        save(out, element);
      }
    }
  } else if constexpr (is_std_array<T>::value) {
    for (const auto& element : value)
      save(out, element);
  } else if constexpr (is_std_optional<T>::value) {
    out.put(static_cast<std::uint8_t>(value.has_value()));
    if (value) save(out, *value);
  } else if constexpr (is_tuple_like<T>::value) {
    save_elements(out, value, std::make_index_sequence<std::tuple_size_v<T>>{});
  } else if constexpr (std::is_same_v<T, SharedBuffer>) {
    save_shared_buffer(out, value);
  } else if constexpr (is_shared_vector<T>::value) {
    detail::save_shared_vector(out, value);
  } else if constexpr (writes_itself<T>) {
    value.write_to(out);
  } else {
    WriterStreambuf buf(out);
    std::ostream stream(&buf);
    cereal::BinaryOutputArchive archive(stream);
    archive(value);
  }
}

template <class T>
void load(Reader& in, T& value) {
  static_assert(type_cannot_cross_processes<T>::value);
  if constexpr (is_raw_v<T>) {
    in.read(&value, sizeof value);
  } else if constexpr (is_raw_block_v<T>) {
    using E = typename T::value_type;
    std::size_t count = load_count(in, sizeof(E));
    value.clear();
    value.reserve(count);
    // In pieces: each piece's pages are mapped in one call just before it is
    // written, and the message's pages behind it given back, so that a
    // result of N bytes never costs 2N while it is decoded.
    const std::byte* from = in.take(count * sizeof(E));
    const std::size_t piece = std::max<std::size_t>(1, PrefaultAhead::piece / sizeof(E));
    // A large one's pages are mapped on a helper thread, ahead of the copy.
    PrefaultAhead ahead(reinterpret_cast<std::byte*>(value.data()), count * sizeof(E), true);
    const bool mapped_ahead = count * sizeof(E) >= PrefaultAhead::worth_a_thread;
    for (std::size_t done = 0; done < count;) {
      const std::size_t n = std::min(count - done, piece);
      if (mapped_ahead) {
        ahead.wait_until_mapped((done + n) * sizeof(E));
      } else {
        prefault_heap_for_writing(value.data() + done, n * sizeof(E));
      }
      if constexpr (alignof(E) == 1) {
        // One pass over fresh memory (resize would zero it first, then copy).
        const auto* values = reinterpret_cast<const E*>(from) + done;
        value.insert(value.end(), values, values + n);
      } else {
        value.resize(done + n);
        std::memcpy(value.data() + done, from + done * sizeof(E), n * sizeof(E));
      }
      in.consumed(from + done * sizeof(E), n * sizeof(E));
      done += n;
    }
  } else if constexpr (is_std_vector<T>::value) {
    std::size_t count = load_count(in, 1);
    value.clear();
    value.reserve(count);
    for (std::size_t i = 0; i < count; ++i) {
      typename T::value_type element{};
      load(in, element);
      value.push_back(std::move(element));
    }
  } else if constexpr (is_std_array<T>::value) {
    for (auto& element : value)
      load(in, element);
  } else if constexpr (is_std_optional<T>::value) {
    if (in.get<std::uint8_t>() != 0) {
      value.emplace();
      load(in, *value);
    } else {
      value.reset();
    }
  } else if constexpr (is_tuple_like<T>::value) {
    load_elements(in, value, std::make_index_sequence<std::tuple_size_v<T>>{});
  } else if constexpr (std::is_same_v<T, SharedBuffer>) {
    load_shared_buffer(in, value);
  } else if constexpr (is_shared_vector<T>::value) {
    detail::load_shared_vector(in, value);
  } else if constexpr (writes_itself<T>) {
    value.read_from(in);
  } else {
    CheckedInputArchive archive(in);
    try {
      archive(value);
    } catch (const cereal::Exception& e) {
      throw ProtocolError(std::string("procpool: corrupt or truncated message: ") + e.what());
    }
  }
}

/// Decodes a value that must be default-constructible or is built in place.
template <class T>
T load_value(Reader& in) {
  if constexpr (std::is_default_constructible_v<T>) {
    T value{};
    load(in, value);
    return value;
  } else {
    static_assert(std::is_default_constructible_v<T>,
                  "procpool: values received from another process are built by default "
                  "construction and then filled in; give the type a default constructor");
  }
}

}  // namespace detail
}  // namespace procpool
