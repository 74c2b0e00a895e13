// The caller's side of one call: takes inputs from the range chunk by chunk,
// hands them to the engine, and gives outcomes back in input or completion order.
#pragma once

#include <algorithm>
#include <array>
#include <chrono>
#include <cstdint>
#include <cstring>
#include <exception>
#include <functional>
#include <iterator>
#include <list>
#include <map>
#include <mutex>
#include <optional>
#include <ranges>
#include <span>
#include <tuple>
#include <type_traits>
#include <utility>
#include <vector>

#include "procpool/detail/engine.hpp"
#include "procpool/detail/interrupt.hpp"
#include "procpool/detail/protocol.hpp"
#include "procpool/detail/schedule.hpp"
#include "procpool/errors.hpp"
#include "procpool/options.hpp"
#include "procpool/progress.hpp"
#include "procpool/results.hpp"
#include "procpool/serialize.hpp"

namespace procpool {

namespace detail {

/// Stands in for `void` results.
struct Empty {};

template <class R>
using stored_t = std::conditional_t<std::is_void_v<R>, Empty, R>;

template <Delivery D, class Out>
using delivered_t =
    std::conditional_t<D == Delivery::ordered, Out,
                       std::conditional_t<D == Delivery::unordered, Indexed<Out>, Outcome<Out>>>;

/// Calls `f(args...)`, returning Empty for a void function.
template <class F, class... Args>
decltype(auto) invoke_stored(F& f, Args&&... args) {
  if constexpr (std::is_void_v<std::invoke_result_t<F&, Args&&...>>) {
    std::invoke(f, std::forward<Args>(args)...);
    return Empty{};
  } else {
    return std::invoke(f, std::forward<Args>(args)...);
  }
}

/// A finished chunk whose outcomes are decoded one at a time, straight from
/// the reply's bytes, as the caller takes them: no per-result allocation.
template <class Out>
class ChunkDecoder {
 public:
  explicit ChunkDecoder(ChunkDone done)
      : done_(std::move(done)), in_(done_.bytes(), done_.size()), broken_(done_.failure) {
    if (done_.dense && !broken_) check_dense();
    if (done_.give_back) in_.allow_giving_back();
  }

  bool empty() const noexcept { return taken_ == done_.count; }
  std::uint64_t count() const noexcept { return done_.count; }
  /// Input index of the next outcome.
  std::uint64_t take_index() const noexcept { return done_.first + taken_; }

  /// Appends the successful values from here on to `out`, stopping before the
  /// first failure (left for take()); returns how many were taken.
  std::size_t take_values(std::vector<Out>& out) {
    if (broken_) return 0;
    ScopedPointer<AttachedFiles> files(files_being_decoded(), done_.files.get());
    const std::uint64_t before = taken_;
    if constexpr (dense_capable) {
      if (done_.dense) {
        // All successes, back to back: one copy for the whole chunk.
        const auto n = static_cast<std::size_t>(done_.count - taken_);
        const std::size_t at = out.size();
        out.resize(at + n);
        in_.read(out.data() + at, n * sizeof(Out));
        taken_ += n;
        return n;
      }
    }
    if constexpr (is_raw_v<Out>) {
      // Fixed-size values: a tight loop over the reply, no per-value Outcome.
      constexpr std::size_t step = sizeof(OutcomeTag) + sizeof(Out);
      const std::byte* at = in_.position();
      const std::size_t fit = std::min<std::uint64_t>(done_.count - taken_, in_.remaining() / step);
      std::size_t n = 0;
      for (; n < fit && static_cast<OutcomeTag>(at[n * step]) == OutcomeTag::value; ++n) {
        Out value;
        std::memcpy(&value, at + n * step + sizeof(OutcomeTag), sizeof(Out));
        out.push_back(value);
      }
      in_.take(n * step);
      taken_ += n;
    } else {
      while (taken_ < done_.count) {
        const Reader before_value = in_;
        try {
          if (in_.get<OutcomeTag>() != OutcomeTag::value) {
            in_ = before_value;
            break;
          }
          std::optional<Out> value = load_value_once();
          if (!value) break;  // its failure is kept for take()
          try {
            out.push_back(std::move(*value));
          } catch (...) {
            // The value was read, and a large one's pages given back as it
            // was (Reader::consumed): reading it again would find zeros. So
            // this chunk's outcomes from here on are this error, never a
            // value read twice.
            broken_ = std::current_exception();
            return static_cast<std::size_t>(taken_ - before);
          }
          ++taken_;
        } catch (...) {
          in_ = before_value;  // take() reports it: a corrupt reply, or a load() that threw
          break;
        }
      }
    }
    return static_cast<std::size_t>(taken_ - before);
  }

  Outcome<Out> take() {
    Outcome<Out> outcome;
    outcome.index = static_cast<std::size_t>(done_.first + taken_++);
    if (value_error_) {
      outcome.error = std::exchange(value_error_, nullptr);
      return outcome;
    }
    if (broken_) {
      outcome.error = broken_;
      return outcome;
    }
    ScopedPointer<AttachedFiles> files(files_being_decoded(), done_.files.get());
    try {
      if constexpr (dense_capable) {
        if (done_.dense) {
          outcome.value.emplace(in_.get<Out>());
          return outcome;
        }
      }
      const auto tag = in_.get<OutcomeTag>();
      if (tag == OutcomeTag::value) {
        if constexpr (std::is_empty_v<Out>) {
          outcome.value.emplace();
        } else if constexpr (runs_user_code_v<Out>) {
          // The frame is taken first: whatever the type's load() does, the
          // next outcome is read from where it starts.
          Reader own = take_frame(in_);
          try {
            outcome.value.emplace(load_value<Out>(own));
          } catch (...) {
            outcome.error = load_error(outcome.index);
          }
        } else {
          outcome.value.emplace(load_value<Out>(in_));
        }
      } else {
        const TaskError::Stage stage = error_stage(tag);
        auto type_name = load_value<std::string>(in_);
        auto what = load_value<std::string>(in_);
        outcome.error = std::make_exception_ptr(
            TaskError(outcome.index, std::move(type_name), std::move(what), stage));
      }
    } catch (const ProtocolError&) {
      broken_ = std::current_exception();  // the rest of this reply cannot be trusted
      outcome.value.reset();
      outcome.error = broken_;
    }
    return outcome;
  }

 private:
  static constexpr bool dense_capable = dense_result_v<Out>;

  /// The TaskError of result `index` whose load() is throwing now (in a catch block).
  static std::exception_ptr load_error(std::size_t index) {
    auto [type_name, what] = current_exception_type_and_what();
    return std::make_exception_ptr(TaskError(index, std::move(type_name), std::move(what),
                                             TaskError::Stage::deserialize_result));
  }

  /// The value after a value tag, for take_values(). A value whose load()
  /// (user code, inside its own frame) throws is never decoded again: its
  /// TaskError is kept for take() (nullopt). Otherwise, if decoding throws,
  /// a reply that is not given back is rewound for take() to report it (the
  /// exception propagates); one that is may have given back the pages read
  /// so far (Reader::consumed), and decoding again would read zeros: the
  /// failure is kept as the chunk's instead.
  std::optional<Out> load_value_once() {
    if constexpr (runs_user_code_v<Out>) {
      Reader own = take_frame(in_);  // before any byte is given back
      try {
        return load_value<Out>(own);
      } catch (...) {
        // Kept, never read again: the pages may be given back by now, and a
        // load() (user code) runs once for each value, whatever it does.
        value_error_ = load_error(static_cast<std::size_t>(done_.first + taken_));
        return std::nullopt;
      }
    } else {
      try {
        return load_value<Out>(in_);
      } catch (...) {
        if (!done_.give_back) throw;
        broken_ = std::current_exception();
        return std::nullopt;
      }
    }
  }

  static TaskError::Stage error_stage(OutcomeTag tag) {
    switch (tag) {
      case OutcomeTag::error:
        return TaskError::Stage::task;
      case OutcomeTag::input_error:
        return TaskError::Stage::deserialize_input;
      case OutcomeTag::result_error:
        return TaskError::Stage::serialize_result;
      case OutcomeTag::value:
        break;
    }
    throw ProtocolError("procpool: corrupt message: unknown outcome tag " +
                        std::to_string(static_cast<unsigned>(tag)));
  }

  /// A dense reply must hold exactly `count` values of a fixed-size type.
  void check_dense() {
    bool fits = false;
    if constexpr (dense_capable) fits = done_.size() == done_.count * sizeof(Out);
    if (!fits) {
      broken_ = std::make_exception_ptr(ProtocolError(
          "procpool: corrupt message: a dense reply of " + std::to_string(done_.size()) +
          " bytes for " + std::to_string(done_.count) + " results of this type"));
    }
  }

  ChunkDone done_;
  Reader in_;
  std::exception_ptr broken_;
  /// The next outcome's error, from a value take_values() could not decode.
  std::exception_ptr value_error_;
  std::uint64_t taken_ = 0;
};

/// An input that failed in the caller, before it could be sent: its index and error.
struct FailedInput {
  std::uint64_t index = 0;
  std::exception_ptr error;
};

/// Inputs that the workers read from memory they inherited at the fork:
/// a chunk is just a range of indices, nothing is copied.
template <class View>
class IndexFeed {
 public:
  explicit IndexFeed(const View& view) : size_(static_cast<std::size_t>(std::ranges::size(view))) {}
  bool done() const noexcept { return next_ >= size_; }
  std::optional<std::size_t> total() const noexcept { return size_; }
  Chunk next(std::uint64_t call, std::size_t max_items) {
    Chunk chunk;
    chunk.call = call;
    chunk.first = next_;
    chunk.count = std::min(max_items, size_ - next_);
    next_ += static_cast<std::size_t>(chunk.count);
    return chunk;
  }
  /// Nothing is read or serialised in the caller, so nothing fails here (see StreamFeed).
  std::optional<FailedInput> take_failed_input() noexcept { return std::nullopt; }
  std::exception_ptr failure() const noexcept { return nullptr; }

 private:
  std::size_t size_;
  std::size_t next_ = 0;
};

/// A range whose elements are objects it keeps, each where it is while the
/// range lives and is not changed: an allocator-aware container (vector,
/// deque, list, set, map...), a std::array, a std::span, or a view of one.
template <class R>
    struct keeps_its_elements : std::bool_constant < requires {
  typename R::allocator_type;
} > {};
template <class T, std::size_t N>
struct keeps_its_elements<std::array<T, N>> : std::true_type {};
template <class T, std::size_t N>
struct keeps_its_elements<std::span<T, N>> : std::true_type {};
template <class R>
struct keeps_its_elements<std::ranges::ref_view<R>> : keeps_its_elements<std::remove_cv_t<R>> {};
template <class R>
struct keeps_its_elements<std::ranges::owning_view<R>> : keeps_its_elements<R> {};
template <class R>
inline constexpr bool keeps_its_elements_v = keeps_its_elements<std::remove_cv_t<R>>::value;

/// The TaskError of input `index` whose save() is throwing now (in a catch block).
inline TaskError serialize_input_error(std::uint64_t index) {
  auto [type_name, what] = current_exception_type_and_what();
  return TaskError(static_cast<std::size_t>(index), std::move(type_name), std::move(what),
                   TaskError::Stage::serialize_input);
}

/// A large input that the caller's range still holds, where the chunk that
/// carries it can encode it again (see InputSource). The call keeps its range
/// alive while the engine knows the call, and the engine encodes only for a
/// call it knows.
template <class Item>
class ElementSource final : public InputSource {
 public:
  explicit ElementSource(const Item& item) noexcept : item_(item) {}
  void encode(Chunk& chunk) const override {
    Buffer payload;
    payload.share_when_large();
    std::vector<int> files;
    try {
      ScopedPointer<std::vector<int>> attaching(files_to_attach(), &files);
      Writer out(payload);
      save_framed(out, item_);
    } catch (...) {
      close_all(files);
      throw serialize_input_error(chunk.first);
    }
    chunk.payload = std::move(payload);
    chunk.offsets.assign(1, 0);
    chunk.files = files.empty() ? nullptr : std::make_shared<AttachedFiles>(std::move(files));
  }

 private:
  const Item& item_;
};

/// Inputs that must travel: taken lazily from any input range and serialised.
template <class View, class Item>
class StreamFeed {
 public:
  explicit StreamFeed(View& view) : it_(std::ranges::begin(view)), end_(std::ranges::end(view)) {
    if constexpr (std::ranges::sized_range<View>) {
      total_ = static_cast<std::size_t>(std::ranges::size(view));
    }
  }
  /// Done at the end of the range, or once the range threw.
  bool done() const { return failure_ || it_ == end_; }
  std::optional<std::size_t> total() const noexcept { return total_; }

  /// The next inputs, up to the first that fails. The range throwing ends the
  /// feed (failure() has it, the inputs read before it still go out); an
  /// input's save() throwing ends the chunk before it (take_failed_input()
  /// has it, the feed goes on after it).
  Chunk next(std::uint64_t call, std::size_t max_items) {
    Chunk chunk;
    chunk.call = call;
    chunk.first = next_;
    try {
      if constexpr (is_raw_v<Item>) {
        take_raw(chunk, std::min(max_items, std::max<std::size_t>(1, chunk_bytes / sizeof(Item))));
      } else {
        take_serialised(chunk, max_items);
      }
    } catch (...) {
      failure_ = std::current_exception();
    }
    next_ += chunk.count + (failed_input_ ? 1 : 0);
    return chunk;
  }

  /// The input whose save() threw in the last next(), if any: it gets that error as its outcome.
  std::optional<FailedInput> take_failed_input() noexcept {
    return std::exchange(failed_input_, {});
  }
  /// What the input range threw, once it has.
  std::exception_ptr failure() const noexcept { return failure_; }

 private:
  using Iterator = std::ranges::iterator_t<View>;
  using Sentinel = std::ranges::sentinel_t<View>;
  // A byte budget as well as a count: in-flight memory stays small and flat
  // however many inputs an endless range yields (large inputs go one per chunk).
  static constexpr std::size_t chunk_bytes = 256 * 1024;

  /// Each input framed if its load() is the user's (save_framed), and its offset noted,
  /// so a chunk can be split and each input is decoded from its own bytes.
  /// Counts are bumped only once an input is complete, so if the range throws,
  /// `chunk` holds exactly the inputs read before.
  void take_serialised(Chunk& chunk, std::size_t max_items) {
    chunk.payload.share_when_large();  // handed to the worker as a file, not copied
    // SharedBuffer inputs go as their memory files, not as bytes.
    std::vector<int> files;
    ScopedPointer<std::vector<int>> attaching(files_to_attach(), &files);
    struct KeepFiles {
      Chunk& chunk;
      std::vector<int>& files;
      ~KeepFiles() {
        if (!files.empty()) chunk.files = std::make_shared<AttachedFiles>(std::move(files));
      }
    } keep{chunk, files};
    Writer out(chunk.payload);
    while (chunk.count < max_items && it_ != end_ && out.size() < chunk_bytes) {
      const std::size_t at = out.size();
      decltype(auto) item = *it_;  // the range's own failure: not caught here
      try {
        save_framed(out, static_cast<const Item&>(item));
      } catch (...) {
        if (out.size() != at) out.truncate(at);
        failed_input_ =
            FailedInput{next_ + chunk.count,
                        std::make_exception_ptr(serialize_input_error(next_ + chunk.count))};
      }
      if (!failed_input_) {
        chunk.offsets.push_back(at);
        ++chunk.count;
        note_source(chunk, item);
      }
      ++it_;
      if (failed_input_) return;  // its outcome goes between this chunk and the next
    }
  }

  /// An input the range keeps where it is (a container's element) can be
  /// encoded again, so a chunk of it alone, too large for the arena, hands
  /// its memory file over for good (see InputSource). The file is the
  /// input's second copy: without this, the caller held it until the reply,
  /// beside the worker's decoded third.
  template <class Ref>
  static void note_source(Chunk& chunk, Ref&& item) {
    if constexpr (re_readable) {
      if (chunk.count == 1 && chunk.payload.shared_fd() >= 0) {
        chunk.source = std::make_shared<ElementSource<Item>>(static_cast<const Item&>(item));
      } else {
        chunk.source = nullptr;
      }
    }
  }
  // The element itself, in a container that keeps it: not a converted
  // temporary (a range of int fed to a function of long), nor what a view
  // refers to now (a transform returning a reused buffer or a cache entry).
  static constexpr bool re_readable =
      keeps_its_elements_v<View> && std::ranges::forward_range<View> &&
      std::is_lvalue_reference_v<std::ranges::range_reference_t<View>> &&
      std::same_as<std::remove_cvref_t<std::ranges::range_reference_t<View>>, Item>;

  /// Fixed-size inputs: no per-input offsets, and one copy for a contiguous range.
  void take_raw(Chunk& chunk, std::size_t max_items) {
    chunk.stride = sizeof(Item);
    if constexpr (std::contiguous_iterator<Iterator> &&
                  std::sized_sentinel_for<Sentinel, Iterator> &&
                  std::same_as<std::iter_value_t<Iterator>, Item>) {
      const auto n = std::min(max_items, static_cast<std::size_t>(end_ - it_));
      chunk.payload.append(std::to_address(it_), n * sizeof(Item));
      it_ += static_cast<std::iter_difference_t<Iterator>>(n);
      chunk.count = n;
    } else {
      chunk.payload.reserve(max_items * sizeof(Item));
      while (chunk.count < max_items && it_ != end_) {
        {
          const Item& item = *it_;
          chunk.payload.append(&item, sizeof(Item));
        }
        ++chunk.count;  // before ++it_, which may throw: this input is complete
        ++it_;
      }
    }
  }

  Iterator it_;
  Sentinel end_;
  std::optional<std::size_t> total_;
  std::uint64_t next_ = 0;
  std::exception_ptr failure_;
  std::optional<FailedInput> failed_input_;
};

/// Takes the next outcome from `driver` in the shape `D` asks for. Except for
/// outcomes, the first failure stops the call and is thrown.
template <Delivery D, class Out, class Driver>
std::optional<delivered_t<D, Out>> deliver(Driver& driver) {
  auto outcome = driver.next();
  if (!outcome) return std::nullopt;
  if constexpr (D == Delivery::outcomes) {
    return std::move(*outcome);
  } else {
    if (outcome->error) {
      driver.stop_with(outcome->error);  // fork per call: kills and reaps the workers first
      std::rethrow_exception(outcome->error);
    }
    if constexpr (D == Delivery::ordered) {
      return std::move(*outcome->value);
    } else {
      return Indexed<Out>{outcome->index, std::move(*outcome->value)};
    }
  }
}

/// Maps the pages of `out`'s reserved, unused capacity in one system call
/// rather than one fault each. A result vector often reuses heap memory that
/// was free when the workers were forked; a worker hands such pages back
/// (give_back_inherited_free_heap), after which the parent reuses them as
/// they are, so this waits for the first result. Pages a worker still
/// shares are replaced by fresh ones rather than copied (see
/// prefault_heap_for_writing).
template <class T>
void prefault_reserved(std::vector<T>& out) {
  if constexpr (!std::is_same_v<T, bool>) {  // vector<bool> packs bits and has no data()
    prefault_heap_for_writing(out.data() + out.size(), (out.capacity() - out.size()) * sizeof(T));
  }
}

/// Appends every remaining result to `out`. Ordered successes go in bulk;
/// results are taken one at a time only around waits and failures (which
/// throw as deliver does).
template <Delivery D, class Out, class Driver>
void drain(Driver& driver, std::vector<delivered_t<D, Out>>& out) {
  bool prefaulted = false;
  for (;;) {
    if constexpr (D == Delivery::ordered) driver.take_values(out);
    auto value = deliver<D, Out>(driver);
    if (!value) return;
    out.push_back(std::move(*value));
    if (!prefaulted) prefault_reserved(out);
    prefaulted = true;
  }
}

/// What to do with the workers when a call stops early (an error, or the
/// caller dropped a lazy range): kill them (fork per call) or leave them to
/// serve other calls (a Pool).
enum class StopMode { kill_workers, close_call };

/// How long one fill() may spend reading the caller's range (see there).
inline constexpr std::int64_t fill_reading_ns = 10'000'000;

/// Drives one call through the engine. `Feed` is IndexFeed or StreamFeed.
template <class Out, class Feed>
class CallDriver {
 public:
  /// `interrupted_since`: a watch begun earlier, whose SIGINTs stop this
  /// call too (a fork-per-call call's, begun before it forked its workers).
  CallDriver(Engine& engine, std::mutex& mutex, Buffer setup, Feed feed, const Options& options,
             bool ordered, StopMode stop_mode,
             Engine::SetupScope setup_scope = Engine::SetupScope::every_worker,
             const InterruptWatch* interrupted_since = nullptr)
      : engine_(engine),
        mutex_(mutex),
        interrupt_(interrupted_since),
        feed_(std::move(feed)),
        policy_(engine.processes(), options.chunksize, options.max_inflight),
        ordered_(ordered),
        stop_mode_(stop_mode),
        progress_(options.progress, feed_.total()) {
    std::lock_guard lock(mutex_);
    call_ = engine_.open_call(std::move(setup), setup_scope);
  }
  /// For Pool::submit: a call of one task, whose chunk is posted to the engine
  /// (Engine::post) rather than opened and submitted under the pool's lock.
  /// Throws PoolClosed if the pool was closed first.
  struct OneTaskPosted {};
  CallDriver(OneTaskPosted, Engine& engine, std::mutex& mutex, Buffer setup, Feed feed,
             const Options& options)
      : engine_(engine),
        mutex_(mutex),
        call_(engine.reserve_call()),
        feed_(std::move(feed)),
        policy_(engine.processes(), options.chunksize, options.max_inflight),
        ordered_(true),
        stop_mode_(StopMode::close_call),
        progress_(options.progress, feed_.total()) {
    if (feed_.total() != std::optional<std::size_t>(1)) {
      throw std::logic_error("procpool: a posted call has one task");
    }
    const std::int64_t started = steady_now_ns();
    Chunk chunk = feed_.next(call_, 1);
    in_flight_ = sent_ = static_cast<std::size_t>(chunk.count);
    if (auto failed = feed_.take_failed_input()) {
      // Its save() threw: that is its outcome, and the call is posted without a chunk.
      ++in_flight_;
      ++sent_;
      failed_inputs_.push_back(ChunkDone::failed(failed->index, 1, std::move(failed->error)));
    }
    const auto input_ns = static_cast<std::uint64_t>(steady_now_ns() - started);
    if (!engine_.post(call_, std::move(setup), std::move(chunk), input_ns)) {
      throw PoolClosed("procpool::Pool: the pool was closed; no more work is accepted");
    }
  }
  ~CallDriver() { stop(); }
  CallDriver(const CallDriver&) = delete;
  CallDriver& operator=(const CallDriver&) = delete;

  /// The next outcome, in input order if ordered; nullopt once every input is done.
  /// Throws what the input range threw once the outcomes of the inputs it
  /// yielded before are handed over, and what a progress callback threw; the
  /// call is stopped (its workers, for fork per call) before either reaches the caller.
  std::optional<Outcome<Out>> next() {
    if (stopped_) throw_stopped();
    // Decoded outcomes belong to this driver alone: no need to lock the engine.
    if (!current_.empty()) return pop_current();
    return stopping_on_error([&] { return next_locked(); });
  }

  /// Appends the successes already decoded (no waiting) to `out`, in order.
  void take_values(std::vector<Out>& out) {
    while (!current_.empty()) {
      ChunkDecoder<Out>& decoder = current_.front();
      const std::int64_t started = steady_now_ns();
      const std::size_t n = decoder.take_values(out);
      decode_ns_ += static_cast<std::uint64_t>(steady_now_ns() - started);
      next_index_ += n;
      in_flight_ -= n;
      if (!decoder.empty()) return;  // a failure: next() hands it over
      current_.pop_front();          // releases its arena lease
    }
  }

  /// Queues the first inputs for the workers; whoever drives the engine next sends them.
  void start() {
    stopping_on_error([&] {
      std::unique_lock lock(mutex_);
      fill(lock);
    });
  }

  /// Drives the call until an outcome is ready or the deadline passes.
  bool wait_until(std::chrono::steady_clock::time_point deadline) {
    return stopping_on_error([&] { return wait_until_locked(deadline); });
  }

  /// With the engine's lock held: whether next() would return without waiting.
  [[nodiscard]] bool ready_locked() {
    if (stopped_) return true;  // next() throws what stopped it
    collect();
    return has_ready() || finished() || cut_off();
  }

  /// Stops the call because of `error` (a task's, on its way to the
  /// caller): reading the call again throws it again.
  void stop_with(std::exception_ptr error) {
    if (!stopped_by_) stopped_by_ = std::move(error);
    stop("failed");
  }

  /// Stops the call early (`how` ends the progress line); safe to call more
  /// than once. The workers are stopped first; a progress callback that
  /// throws on this last call is not heard (this runs from destructors too).
  void stop(const char* how = "stopped") {
    if (stopped_) return;
    stopped_ = true;
    {
      std::lock_guard lock(mutex_);
      const bool all_done = feed_.done() && in_flight_ == 0;
      if (stop_mode_ == StopMode::kill_workers && !all_done) engine_.kill_workers();
      engine_.close_call(call_, !all_done);
    }
    try {
      progress_.finish(how);
    } catch (...) {  // NOLINT(bugprone-empty-catch): see above
    }
  }

 private:
  /// Runs `body`; if it throws, stops the call before the exception goes on,
  /// so that no worker outlives it and no later cleanup calls back into the
  /// code that threw (a progress callback, the input range).
  template <class Body>
  decltype(auto) stopping_on_error(Body&& body) {
    try {
      return std::forward<Body>(body)();
    } catch (...) {
      stop_with(std::current_exception());
      throw;
    }
  }

  /// A stopped call has nothing more to give: reading it again (a second
  /// begin() after it threw) gets what stopped it, never a wait for results
  /// that will not come.
  [[noreturn]] void throw_stopped() const {
    if (stopped_by_) std::rethrow_exception(stopped_by_);
    throw Error("procpool: this call was stopped; it gives no more results");
  }

  std::optional<Outcome<Out>> next_locked() {
    std::unique_lock lock(mutex_);
    // Between chunks, when the workers have at most one chunk each left: send
    // what the bound allows now, so that they do not sit idle while the caller
    // works through results already here. (With more queued, waiting for the
    // next round saves a system call per chunk.)
    const bool running_dry = engine_.outstanding() <= engine_.processes();
    if (running_dry && fill(lock))
      engine_.pump(lock, std::chrono::milliseconds(0), Engine::Driver::caller, call_);
    for (;;) {
      if (auto outcome = take_ready()) {
        if (progress_.draw_due()) {
          lock.unlock();  // a callback may use the pool
          progress_.advance(0);
        }
        return outcome;
      }
      if (finished()) {
        // The range threw: everything it yielded before has been handed over.
        if (auto failure = feed_.failure()) std::rethrow_exception(failure);
        lock.unlock();
        progress_.finish("done");
        return std::nullopt;
      }
      if (cut_off()) throw cut_off_error();
      draw_progress_unlocked(lock);
      step(lock, std::chrono::milliseconds(100));
    }
  }

  bool wait_until_locked(std::chrono::steady_clock::time_point deadline) {
    if (stopped_) return true;  // next() throws what stopped it
    std::unique_lock lock(mutex_);
    for (;;) {
      collect();
      if (has_ready() || finished() || cut_off()) return true;
      auto left = std::chrono::duration_cast<std::chrono::milliseconds>(
          deadline - std::chrono::steady_clock::now());
      if (left.count() <= 0) return false;
      draw_progress_unlocked(lock);
      step(lock, std::min(left, std::chrono::milliseconds(100)));
    }
  }

  bool finished() const { return feed_.done() && in_flight_ == 0; }

  /// Whether the pool's workers were stopped (join(), terminate()) before the
  /// call took all its inputs, and every input it took has been handed over:
  /// it ends there. The inputs not taken stay unread (a single-pass range
  /// loses none to a pool that could not run them).
  bool cut_off() const { return !feed_.done() && in_flight_ == 0 && engine_.workers_stopped(); }

  static PoolClosed cut_off_error() {
    return PoolClosed(
        "procpool: the pool's workers were stopped (join() or terminate()) before this call "
        "had taken all its inputs; those it took have had their outcomes, the rest were left "
        "unread: consume a call's results before join(), or start it on a new pool");
  }

  void step(std::unique_lock<std::mutex>& lock, std::chrono::milliseconds timeout) {
    engine_.add_parent_time(0, std::exchange(decode_ns_, 0));
    fill(lock);
    // fill() reads the range without the lock: an outcome of this call that
    // another thread's round collected meanwhile is here already, and that
    // round told no one (this thread was not waiting yet).
    collect();
    engine_.pump(lock, has_ready() || finished() ? std::chrono::milliseconds(0) : timeout,
                 Engine::Driver::caller, call_);
    collect();
    if (interrupt_.interrupted()) {
      // The program handles Ctrl-C: stop every worker now, then let it know.
      engine_.kill_workers(std::make_exception_ptr(
          PoolClosed("procpool: the pool's workers were stopped by Ctrl-C (SIGINT)")));
      engine_.close_call(call_);
      stopped_ = true;
      lock.unlock();  // a callback may use the pool
      progress_.finish("interrupted");
      throw Interrupted("procpool: interrupted by Ctrl-C (SIGINT); the workers were stopped");
    }
  }

  /// The next chunk's size, from the schedule: how long tasks take, how many are left.
  ChunkPlan next_chunk_plan() const {
    std::optional<std::size_t> remaining;
    if (auto total = feed_.total()) remaining = *total - sent_;
    return policy_.next_chunk(engine_.nanos_per_task(call_), remaining);
  }

  /// Takes inputs from the feed and submits them as far as the bound allows;
  /// true if anything was submitted. The range is read without the pool's
  /// lock (`lock`, held on entry and on return).
  bool fill(std::unique_lock<std::mutex>& lock) {
    bool submitted = false;
    std::int64_t reading_ns = 0;
    // A stopped pool would fail each input it was given: leave them unread.
    while (!feed_.done() && !engine_.workers_stopped()) {
      // A range slow to read (a stream, a query per input) is not read to
      // the end of the bound at once: after 10 ms the chunks read go, and
      // the results back are handed over, before it is read on. (Quick
      // tasks allow a large bound: 60 inputs of 20 ms were all read, once,
      // before the first result; a fast range fills it in far less.)
      if (submitted && reading_ns > fill_reading_ns) return submitted;
      const ChunkPlan plan = next_chunk_plan();
      std::size_t n = plan.tasks;
      // The bound counts chunks as the feed really cut them (a byte budget
      // may make them smaller than asked).
      const std::size_t typical = last_chunk_items_ != 0 ? std::min(n, last_chunk_items_) : n;
      const std::size_t limit = policy_.inflight_limit(engine_.nanos_per_task(call_), typical);
      // Wait for room for a whole chunk: cutting a short one to fill the gap
      // would shrink `typical`, then the bound, and chunk sizes would wander
      // (and with them the sizes of the buffers a long imap keeps warm).
      if (in_flight_ >= limit || (in_flight_ != 0 && limit - in_flight_ < typical)) {
        return submitted;
      }
      n = std::min(n, limit - in_flight_);
      const std::int64_t started = steady_now_ns();
      Chunk chunk = read_unlocked(lock, n);
      reading_ns += steady_now_ns() - started;
      engine_.add_parent_time(static_cast<std::uint64_t>(steady_now_ns() - started), 0);
      if (chunk.count != 0) {
        chunk.tail = plan.tail;
        last_chunk_items_ = static_cast<std::size_t>(chunk.count);
        in_flight_ += static_cast<std::size_t>(chunk.count);
        sent_ += static_cast<std::size_t>(chunk.count);
        engine_.submit(std::move(chunk));
        submitted = true;
      }
      if (auto failed = feed_.take_failed_input()) {
        // An input that could not be serialised never reaches a worker: its
        // outcome is its error, in its place among the others.
        ++in_flight_;
        ++sent_;
        failed_inputs_.push_back(ChunkDone::failed(failed->index, 1, std::move(failed->error)));
      } else if (chunk.count == 0) {
        return submitted;
      }
    }
    return submitted;
  }

  /// The feed's next chunk of at most `most` inputs, read with the pool's
  /// lock released: the range and the inputs' save() are the caller's code.
  /// A range that blocks (a stream waiting for data) then holds up neither
  /// terminate() nor insights() nor the pool's other calls, and it may use
  /// the pool itself. If the workers were stopped meanwhile, the engine fails
  /// the chunk with PoolClosed when it is submitted: every input read has
  /// its outcome.
  Chunk read_unlocked(std::unique_lock<std::mutex>& lock, std::size_t most) {
    lock.unlock();
    Relock relock{lock};
    return feed_.next(call_, most);
  }

  /// Draws the progress counted so far if a frame is due, with the pool's
  /// lock released: a progress callback may use the pool (terminate() it,
  /// ask for its insights), and a terminal's write may block.
  void draw_progress_unlocked(std::unique_lock<std::mutex>& lock) {
    if (!progress_.draw_due()) return;
    lock.unlock();
    Relock relock{lock};
    progress_.advance(0);
  }

  struct Relock {
    std::unique_lock<std::mutex>& lock;
    ~Relock() { lock.lock(); }
  };

  void collect() {
    for (auto* done : {&failed_inputs_, &engine_.completed(call_)}) {
      while (!done->empty()) {
        ChunkDecoder<Out> decoder(std::move(done->front()));
        done->pop_front();
        const auto count = static_cast<std::size_t>(decoder.count());
        if (!decoder.empty()) {
          if (ordered_) {
            const std::uint64_t first = decoder.take_index();
            ready_by_index_.emplace(first, std::move(decoder));
          } else {
            current_.push_back(std::move(decoder));
          }
        }
        // Counted only: this runs under the pool's lock, and the callback
        // is drawn without it (draw_progress_unlocked, next_locked).
        progress_.count(count);
      }
    }
  }

  bool has_ready() const {
    return !current_.empty() || (ordered_ && ready_by_index_.contains(next_index_));
  }

  std::optional<Outcome<Out>> take_ready() {
    collect();
    if (current_.empty() && ordered_) {
      auto it = ready_by_index_.find(next_index_);
      if (it != ready_by_index_.end()) {
        current_.push_back(std::move(it->second));
        ready_by_index_.erase(it);
      }
    }
    if (current_.empty()) return std::nullopt;
    return pop_current();
  }

  std::optional<Outcome<Out>> pop_current() {
    ChunkDecoder<Out>& decoder = current_.front();
    // Decoding time is sampled (one result in 16) so that timing costs less than decoding.
    const bool sample = (next_index_ & 15) == 0;
    const std::int64_t started = sample ? steady_now_ns() : 0;
    std::optional<Outcome<Out>> outcome(decoder.take());
    if (sample)
      decode_ns_ += 16 * static_cast<std::uint64_t>(steady_now_ns() -
                                                    started);  // no lock held: step() hands it over
    if (decoder.empty()) current_.pop_front();                 // releases its arena lease
    ++next_index_;
    --in_flight_;
    return outcome;
  }

  Engine& engine_;
  std::mutex& mutex_;
  InterruptWatch interrupt_;
  std::uint64_t call_ = 0;
  Feed feed_;
  SchedulePolicy policy_;
  bool ordered_;
  StopMode stop_mode_;
  bool stopped_ = false;
  std::exception_ptr stopped_by_;  // what stopped it, if an error did
  std::size_t in_flight_ = 0;      // taken from the feed, not yet handed to the caller
  std::size_t sent_ = 0;
  std::size_t last_chunk_items_ = 0;
  std::uint64_t decode_ns_ = 0;  // sampled time decoding results, not yet given to the engine
  std::uint64_t next_index_ = 0;
  std::map<std::uint64_t, ChunkDecoder<Out>> ready_by_index_;  // ordered: by first index
  // Lists, not deques: a deque allocates as it is made, and every submit
  // makes a call (see Engine's CallState::completed).
  std::list<ChunkDecoder<Out>> current_;
  std::list<ChunkDone> failed_inputs_;  // inputs that failed in the caller, not yet collected
  ProgressReporter progress_;
};

}  // namespace detail
}  // namespace procpool
