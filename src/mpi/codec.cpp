// How options, insights and errors cross between the root and the nodes.
#include <cstdio>
#include <cstring>
#include <exception>
#include <string>
#include <typeinfo>
#include <vector>

#include "codec.hpp"
#include "layout.hpp"
#include "procpool/detail/protocol.hpp"
#include "procpool/mpi.hpp"

namespace procpool::mpi::detail {
namespace {

enum class ErrorKind : std::uint8_t {
  task = 1,
  crashed,
  timeout,
  closed,
  protocol,
  interrupted,
  procpool,
  other,
};

/// A bundle holds messages of at most this size, and at most this much in all:
/// under the size below which the transport receives a message at once
/// (Open MPI's TCP eager limit, 64 KiB), as it did each chunk of that size.
constexpr std::size_t bundled_message_at_most = std::size_t{8} << 10;
constexpr std::size_t bundle_at_most = std::size_t{56} << 10;

}  // namespace

bool Bundle::takes(const Parts& message) noexcept {
  if (message.size() != 1 || message.front().size() > bundled_message_at_most) return false;
  if (message.front().size() < message_header + 1) return false;
  const auto type = static_cast<Msg>(message.front().data()[message_header]);
  return type == Msg::chunk || type == Msg::open_call || type == Msg::close_call ||
         type == Msg::chunk_done;
}

bool Bundle::has_room_for(const Buffer& message) const noexcept {
  return bytes_ + sizeof(std::uint64_t) + message.size() <= bundle_at_most;
}

void Bundle::add(Buffer message) {
  bytes_ += sizeof(std::uint64_t) + message.size();
  messages_.push_back(std::move(message));
}

Buffer Bundle::message() const {
  if (messages_.size() == 1) {
    Buffer one(messages_.front().size());
    std::memcpy(one.data(), messages_.front().data(), one.size());
    return one;
  }
  Buffer out = new_message(Msg::bundle);
  out.reserve(out.size() + sizeof(std::uint64_t) + bytes_);
  Writer w(out);
  w.put(static_cast<std::uint64_t>(messages_.size()));
  for (const Buffer& m : messages_) {
    w.put(static_cast<std::uint64_t>(m.size()));
    w.write(m.data(), m.size());
  }
  return out;
}

void Bundle::clear() noexcept {
  messages_.clear();
  bytes_ = 0;
}

std::vector<Buffer> unbundle(Reader in) {
  const auto count = in.get<std::uint64_t>();
  // Each message takes its size and a header at least: a count beyond that is corrupt.
  if (count > in.remaining() / (sizeof(std::uint64_t) + message_header + 1)) {
    throw ProtocolError("procpool::mpi: corrupt bundle (message count)");
  }
  std::vector<Buffer> messages;
  messages.reserve(static_cast<std::size_t>(count));
  for (std::uint64_t i = 0; i < count; ++i) {
    const auto size = in.get<std::uint64_t>();
    if (size < message_header + 1 || size > in.remaining()) {
      throw ProtocolError("procpool::mpi: corrupt bundle (message size)");
    }
    Buffer m(static_cast<std::size_t>(size));
    in.read(m.data(), m.size());
    if (static_cast<Msg>(m.data()[message_header]) == Msg::bundle) {
      throw ProtocolError("procpool::mpi: corrupt bundle (a bundle inside)");
    }
    messages.push_back(std::move(m));
  }
  if (in.remaining() != 0) throw ProtocolError("procpool::mpi: corrupt bundle (trailing bytes)");
  return messages;
}

void save_options(Writer& out, const Options& o) {
  out.put(static_cast<std::uint32_t>(o.processes));
  out.put(static_cast<std::uint64_t>(o.chunksize));
  out.put(static_cast<std::uint8_t>(o.start));
  out.put(static_cast<std::uint32_t>(o.retries));
  out.put(static_cast<std::int64_t>(o.task_timeout.count()));
  out.put(static_cast<std::uint64_t>(o.max_tasks_per_child));
  out.put(static_cast<std::uint8_t>(o.warn_oversubscription));
  out.put(static_cast<std::uint8_t>(o.limit_inner_threads));
}

Options load_options(Reader& in) {
  Options o;
  o.processes = in.get<std::uint32_t>();
  o.chunksize = static_cast<std::size_t>(in.get<std::uint64_t>());
  o.start = static_cast<Start>(in.get<std::uint8_t>());
  o.retries = in.get<std::uint32_t>();
  o.task_timeout = std::chrono::milliseconds(in.get<std::int64_t>());
  o.max_tasks_per_child = static_cast<std::size_t>(in.get<std::uint64_t>());
  o.warn_oversubscription = in.get<std::uint8_t>() != 0;
  o.limit_inner_threads = in.get<std::uint8_t>() != 0;
  return o;
}

void save_insights(Writer& out, const procpool::Insights& s) {
  out.put(s.wall_seconds);
  out.put(static_cast<std::uint32_t>(s.processes));
  out.put(static_cast<std::uint32_t>(s.usable_cpus));
  put_string(out, s.cpu_reason);
  out.put(s.tasks);
  out.put(s.parent_input_seconds);
  out.put(s.parent_decode_seconds);
  out.put(s.starting_seconds);
  out.put(s.caller_anonymous_kb);
  out.put(s.efficiency);
  out.put(static_cast<std::uint64_t>(s.workers.size()));
  for (const WorkerInsights& w : s.workers)
    out.put(w);
  out.put(static_cast<std::uint64_t>(s.slowest_tasks.size()));
  for (const SlowTaskInsight& t : s.slowest_tasks)
    out.put(t);
  out.put(s.unobserved_errors);
  put_string(out, s.diagnosis);
}

procpool::Insights load_insights(Reader& in) {
  procpool::Insights s;
  s.wall_seconds = in.get<double>();
  s.processes = in.get<std::uint32_t>();
  s.usable_cpus = in.get<std::uint32_t>();
  s.cpu_reason = get_string(in);
  s.tasks = in.get<std::uint64_t>();
  s.parent_input_seconds = in.get<double>();
  s.parent_decode_seconds = in.get<double>();
  s.starting_seconds = in.get<double>();
  s.caller_anonymous_kb = in.get<std::uint64_t>();
  s.efficiency = in.get<double>();
  const auto workers = in.get<std::uint64_t>();
  if (workers > in.remaining() / sizeof(WorkerInsights)) {
    throw ProtocolError("procpool::mpi: corrupt insights");
  }
  for (std::uint64_t i = 0; i < workers; ++i)
    s.workers.push_back(in.get<WorkerInsights>());
  const auto slow = in.get<std::uint64_t>();
  if (slow > in.remaining() / sizeof(SlowTaskInsight)) {
    throw ProtocolError("procpool::mpi: corrupt insights");
  }
  for (std::uint64_t i = 0; i < slow; ++i)
    s.slowest_tasks.push_back(in.get<SlowTaskInsight>());
  s.unobserved_errors = in.get<std::uint64_t>();
  s.diagnosis = get_string(in);
  return s;
}

void save_error(Writer& out, const std::exception_ptr& error) {
  try {
    std::rethrow_exception(error);
  } catch (const TaskError& e) {
    out.put(ErrorKind::task);
    out.put(static_cast<std::uint8_t>(e.stage()));
    put_string(out, e.type_name());
    put_string(out, e.remote_what());
  } catch (const WorkerCrashed& e) {
    out.put(ErrorKind::crashed);
    out.put(static_cast<std::int32_t>(e.pid()));
    out.put(static_cast<std::int32_t>(e.signal()));
    out.put(static_cast<std::int32_t>(e.exit_status()));
    // How the node told its death (the OOM killer's, with the memory limit
    // and peak it saw): the root's error says the same.
    out.put(static_cast<std::uint8_t>(e.out_of_memory()));
    put_string(out, e.observed());
  } catch (const TaskTimeout& e) {
    out.put(ErrorKind::timeout);
    out.put(static_cast<std::int64_t>(e.limit().count()));
  } catch (const PoolClosed& e) {
    out.put(ErrorKind::closed);
    put_string(out, e.what());
  } catch (const ProtocolError& e) {
    out.put(ErrorKind::protocol);
    put_string(out, e.what());
  } catch (const Interrupted& e) {
    out.put(ErrorKind::interrupted);
    put_string(out, e.what());
  } catch (const Error& e) {
    out.put(ErrorKind::procpool);
    put_string(out, e.what());
  } catch (const std::exception& e) {
    out.put(ErrorKind::other);
    put_string(out, procpool::detail::demangle(typeid(e).name()) + ": " + e.what());
  } catch (...) {
    out.put(ErrorKind::other);
    put_string(out, "an exception not derived from std::exception");
  }
}

std::exception_ptr load_error(Reader& in, std::size_t index, int rank, const std::string& host) {
  switch (in.get<ErrorKind>()) {
    case ErrorKind::task: {
      const auto stage = static_cast<TaskError::Stage>(in.get<std::uint8_t>());
      std::string type = get_string(in);
      std::string what = get_string(in);
      return std::make_exception_ptr(
          OnNode<TaskError>(rank, host, index, std::move(type), std::move(what), stage));
    }
    case ErrorKind::crashed: {
      const auto pid = in.get<std::int32_t>();
      const auto signal = in.get<std::int32_t>();
      const auto status = in.get<std::int32_t>();
      const bool out_of_memory = in.get<std::uint8_t>() != 0;
      const std::string observed = get_string(in);
      if (out_of_memory) {
        return std::make_exception_ptr(OnNode<WorkerCrashed>(
            rank, host, WorkerCrashed::out_of_memory(index, static_cast<pid_t>(pid), observed)));
      }
      if (!observed.empty()) {
        return std::make_exception_ptr(OnNode<WorkerCrashed>(
            rank, host, index, static_cast<pid_t>(pid), signal, status, observed));
      }
      return std::make_exception_ptr(
          OnNode<WorkerCrashed>(rank, host, index, static_cast<pid_t>(pid), signal, status));
    }
    case ErrorKind::timeout:
      return std::make_exception_ptr(OnNode<TaskTimeout>(
          rank, host, index, std::chrono::milliseconds(in.get<std::int64_t>())));
    case ErrorKind::closed:
      return std::make_exception_ptr(OnNode<PoolClosed>(rank, host, get_string(in)));
    case ErrorKind::protocol:
      return std::make_exception_ptr(OnNode<ProtocolError>(rank, host, get_string(in)));
    case ErrorKind::interrupted:
      return std::make_exception_ptr(OnNode<Interrupted>(rank, host, get_string(in)));
    case ErrorKind::procpool:
      return std::make_exception_ptr(OnNode<Error>(rank, host, get_string(in)));
    case ErrorKind::other:
      return std::make_exception_ptr(OnNode<Error>(
          rank, host,
          "procpool::mpi: task " + std::to_string(index) + " failed: " + get_string(in)));
  }
  throw ProtocolError("procpool::mpi: corrupt error record from rank " + std::to_string(rank));
}

std::exception_ptr current_serialize_input_error(std::size_t index) {
  // The input failed on the root (rank 0), before it went anywhere.
  const std::string host = this_host_name();
  try {
    throw;
  } catch (const std::exception& e) {
    return std::make_exception_ptr(OnNode<TaskError>(0, host, index,
                                                     procpool::detail::demangle(typeid(e).name()),
                                                     e.what(), TaskError::Stage::serialize_input));
  } catch (...) {
    return std::make_exception_ptr(OnNode<TaskError>(0, host, index, "unknown",
                                                     "an exception not derived from std::exception",
                                                     TaskError::Stage::serialize_input));
  }
}

}  // namespace procpool::mpi::detail
