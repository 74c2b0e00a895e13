// procpool::mpi::Session: MPI start-up, the same-binary check, the serve
// loop of every rank but the root, and the job's orderly end.
#include <mpi.h>
#include <pthread.h>
#include <sched.h>
#include <spawn.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cerrno>
#include <csignal>

#include <algorithm>
#include <chrono>
#include <condition_variable>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <deque>
#include <initializer_list>
#include <mutex>
#include <new>
#include <optional>
#include <string>
#include <thread>
#include <vector>

#include "hub.hpp"
#include "layout.hpp"
#include "node_server.hpp"
#include "procpool/cpu_count.hpp"
#include "procpool/detail/code_identity.hpp"
#include "procpool/mpi.hpp"
#include "wire.hpp"

namespace procpool::mpi {
namespace detail {

/// mpirun (its environment, read before MPI_Init, which may set the same
/// under other launchers) started this process.
bool started_by_mpirun = false;

namespace {

/// How long MPI_Abort may take to end the job before this rank ends it some
/// other way. Open MPI's abort waits for its launcher's answer (PMIx_Abort,
/// which has deadlocked before: open-mpi/ompi#3225), and under mpirun it
/// deadlocked now and then with a rank stopped (end_job_without). Under srun,
/// once in ~30 CI runs, mpi.slurm_failures' stop_rank job did not end after
/// the root had given up on the stopped rank (where it hung was not seen).
constexpr unsigned abort_grace_seconds = 10;

/// "JOB.STEP" of the Slurm step that srun started this rank in, with every
/// rank of the job in it; "" otherwise (mpirun, whose ranks inherit the
/// variables of the step or shell it runs in, a heterogeneous job, a plain
/// ./app): cancelling any other step could end what is not this job.
std::string own_slurm_step() {
  const char* job = std::getenv("SLURM_JOB_ID");
  const char* step = std::getenv("SLURM_STEP_ID");
  const char* tasks = std::getenv("SLURM_STEP_NUM_TASKS");
  if (started_by_mpirun || job == nullptr || step == nullptr || tasks == nullptr ||
      std::getenv("SLURM_HET_JOB_ID") != nullptr) {
    return "";
  }
  int ranks = 0;
  if (MPI_Comm_size(MPI_COMM_WORLD, &ranks) != MPI_SUCCESS || std::to_string(ranks) != tasks)
    return "";
  return std::string(job) + "." + step;
}

/// Cancels Slurm step `step` with Slurm's own scancel, which kills every task
/// of it, a stopped one too (srun does not end a step whose rank 0 exited
/// while another is stopped: mpi.slurm_failures). False if scancel cannot be
/// run, fails, or has not finished within 10 s (its controller unreachable).
bool cancel_slurm_step(const std::string& step) noexcept {
  char program[] = "scancel";
  std::string id = step;
  char* argv[] = {program, id.data(), nullptr};
  pid_t pid = 0;
  if (::posix_spawnp(&pid, program, nullptr, nullptr, argv, environ) != 0) return false;
  int status = 0;
  for (int waited_ms = 0;; waited_ms += 50) {
    const pid_t done = ::waitpid(pid, &status, WNOHANG);
    if (done == pid) return WIFEXITED(status) && WEXITSTATUS(status) == 0;
    if ((done < 0 && errno != EINTR) || waited_ms >= 10000) break;
    ::usleep(50000);
  }
  ::kill(pid, SIGKILL);
  ::waitpid(pid, &status, 0);
  return false;
}

void say(const std::string& text) noexcept {
  // write(2), not stdio: the thread in MPI_Abort may hold stderr's lock.
  (void)!::write(STDERR_FILENO, text.data(), text.size());
}

/// From a thread of its own: if the process still runs after
/// abort_grace_seconds, cancels `step` (own_slurm_step) if there is one, and
/// failing that (or if that does not end it either) exits with `code`, which
/// ends the job under mpirun. Best effort: without a thread to be had,
/// MPI_Abort is on its own.
void end_job_if_abort_hangs(int code, std::string step) noexcept {
  try {
    std::thread([code, step = std::move(step)] {
      std::this_thread::sleep_for(std::chrono::seconds(abort_grace_seconds));
      const std::string late = "procpool::mpi: MPI_Abort did not end the job within " +
                               std::to_string(abort_grace_seconds) + " s; ";
      const std::string exits = "this rank exits with status " + std::to_string(code) + "\n";
      if (step.empty()) {
        say(late + exits);
      } else {
        say(late + "cancelling Slurm step " + step + " (scancel)\n");
        if (cancel_slurm_step(step)) std::this_thread::sleep_for(std::chrono::seconds(10));
        say("procpool::mpi: scancel did not end step " + step + "; " + exits);
      }
      std::_Exit(code);
    }).detach();
  } catch (...) {  // no thread (std::system_error), or no memory for its state
  }
}

}  // namespace

[[noreturn]] void abort_job(const std::string& message, int code) {
  std::fprintf(stderr, "%s\n", message.c_str());
  std::fflush(stderr);
  try {
    end_job_if_abort_hangs(code, own_slurm_step());
  } catch (const std::bad_alloc&) {
  }
  MPI_Abort(MPI_COMM_WORLD, code);
  std::_Exit(code);
}

[[noreturn]] void end_job_without(const std::string& message, int code) {
  // A rank that exits non-zero without MPI_Finalize makes mpirun end the
  // job. MPI_Abort would too, but with a rank stopped (the node given up
  // on), Open MPI 4.1's mpirun deadlocked in its abort now and then (4 of
  // about 45 runs of mpi.stop_rank and mpi.stop_rank_idle, and once it
  // crashed; 0 of 70 this way). Other launchers (srun) need MPI_Abort to
  // end the other ranks.
  if (!started_by_mpirun) abort_job(message, code);
  std::fflush(stdout);  // what the program printed so far (its results, say)
  std::fprintf(stderr, "%s\n", message.c_str());
  std::fflush(stderr);
  std::_Exit(code);
}

namespace {

constexpr int host_length = 256;

bool session_uses_mpi = false;
bool session_exists = false;
int session_rank = 0;
int session_size = 1;
int session_nodes = 1;

/// Whether a launcher (mpirun, srun --mpi=pmix) started this process. A
/// plain `./app` does not initialise MPI at all: Open MPI's singleton start
/// would fork a daemon for a job that is one node anyway.
bool launched_by_mpi() {
  for (const char* v : {"OMPI_COMM_WORLD_SIZE", "PMIX_RANK", "PMI_RANK", "PMI_SIZE"}) {
    if (std::getenv(v) != nullptr) return true;
  }
  return false;
}

/// The fatal signals whose handlers MPI_Init may replace (Open MPI's
/// `opal_signal`: a backtrace printer for the rank).
constexpr int fatal_signals[] = {SIGSEGV, SIGBUS, SIGFPE, SIGILL, SIGABRT};
constexpr std::size_t fatal_count = std::size(fatal_signals);
struct sigaction before_mpi[fatal_count];
bool replaced_by_mpi[fatal_count] = {};

bool same_handler(const struct sigaction& a, const struct sigaction& b) {
  if ((a.sa_flags & SA_SIGINFO) != (b.sa_flags & SA_SIGINFO)) return false;
  return (a.sa_flags & SA_SIGINFO) != 0 ? a.sa_sigaction == b.sa_sigaction
                                        : a.sa_handler == b.sa_handler;
}

void remember_fatal_handlers() {
  for (std::size_t i = 0; i < fatal_count; ++i)
    ::sigaction(fatal_signals[i], nullptr, &before_mpi[i]);
}

/// A task that crashes in a worker forked from a rank is procpool's to
/// report (WorkerCrashed, naming the task and the node), not a crash of the
/// MPI job: a child forked after MPI_Init gets back the handlers the program
/// had before it, so that a segfaulting task does not print Open MPI's
/// backtrace of the rank it was forked from (30 lines, "Process received
/// signal"). The rank itself keeps Open MPI's.
void give_forked_children_their_handlers_back() {
  bool any = false;
  for (std::size_t i = 0; i < fatal_count; ++i) {
    struct sigaction now {};
    ::sigaction(fatal_signals[i], nullptr, &now);
    replaced_by_mpi[i] = !same_handler(now, before_mpi[i]);
    any = any || replaced_by_mpi[i];
  }
  if (!any) return;
  ::pthread_atfork(nullptr, nullptr, [] {
    for (std::size_t i = 0; i < fatal_count; ++i) {
      if (replaced_by_mpi[i]) ::sigaction(fatal_signals[i], &before_mpi[i], nullptr);
    }
  });
}

/// Answers the root's pings; whether there was any.
bool answer_pings(Transport& transport) {
  bool any = false;
  while (auto signal = transport.receive_signal()) {
    if (signal->second == Signal::ping) transport.signal(signal->first, Signal::pong);
    any = true;
  }
  return any;
}

/// How long the root may stay silent before its nodes end the job, unless
/// PROCPOOL_MPI_ROOT_TIMEOUT says otherwise. The root answers a node's ping at
/// once (on its pump's thread, whatever its caller does), so only a root that
/// has stopped (a frozen machine, SIGSTOP) or is cut off is silent this long,
/// and neither mpirun nor srun notices that (they end the job when the root
/// dies); a pause in a debugger of a few minutes is not.
constexpr double default_root_silence_seconds = 300;

/// A node's watch over the root: it asks a root silent for a quarter of the
/// limit whether it is there (a ping), and gives up on it once it has been
/// silent for the whole limit with that ping unanswered.
class RootWatch {
 public:
  RootWatch()
      : limit_(limit_from_environment("PROCPOOL_MPI_ROOT_TIMEOUT", default_root_silence_seconds)) {}

  /// How long the root has been silent, once that is too long; pings it on
  /// the way. Time this rank did not run (stopped itself) is not the root's.
  std::optional<double> root_lost(Transport& transport) {
    const Clock::time_point now = Clock::now();
    if (limit_ == Clock::duration::zero() || now - looked_ < look_interval) return std::nullopt;
    const Clock::duration unwatched = now - looked_;
    looked_ = now;
    heard_ = std::max(heard_, transport.last_heard(0));
    if (unwatched > stall) {
      heard_ = std::min(now, heard_ + unwatched);
      pinged_ = std::min(now, pinged_ + unwatched);
    }
    const Clock::duration silent = now - heard_;
    const bool ping_unanswered = pinged_ > heard_;
    if (silent >= limit_ && ping_unanswered && now - pinged_ >= limit_ / 4)
      return std::chrono::duration<double>(silent).count();
    if (silent >= limit_ / 4 && now - pinged_ >= limit_ / 4) {
      transport.signal(0, Signal::ping);
      pinged_ = now;
    }
    return std::nullopt;
  }

 private:
  using Clock = std::chrono::steady_clock;
  static constexpr auto look_interval = std::chrono::milliseconds(100);
  /// A gap between two looks this long means this rank itself did not run.
  static constexpr auto stall = std::chrono::seconds(1);

  Clock::duration limit_;
  Clock::time_point heard_ = Clock::now();
  Clock::time_point pinged_{};
  Clock::time_point looked_ = Clock::now();
};

[[noreturn]] void give_up_on_root(int rank, const std::string& host, double silent) {
  char said[96];
  std::snprintf(said, sizeof said, "%.1f s", silent);
  end_job_without("procpool::mpi: rank " + std::to_string(rank) + " on " + host +
                      ": the root (rank 0) has not answered for " + said +
                      " (it died, stopped, or is cut off from this node; "
                      "PROCPOOL_MPI_ROOT_TIMEOUT sets how long is too long, 0: wait for ever); "
                      "ending the job",
                  1);
}

/// Sends the replies `out` to the root in order, the small ones of chunks
/// finished together in bundles: one MPI message for many replies.
void send_bundled(Transport& transport, std::deque<Parts>& out) {
  Bundle bundle;
  for (Parts& m : out) {
    const bool small = Bundle::takes(m);
    if (!bundle.empty() && (!small || !bundle.has_room_for(m.front())))
      transport.send(0, bundle.take());  // what was before it goes before it
    if (small) {
      bundle.add(std::move(m.front()));
    } else {
      transport.send(0, std::move(m));
    }
  }
  if (!bundle.empty()) transport.send(0, bundle.take());
}

[[noreturn]] void cannot_serve(int rank, const std::string& host, const std::exception& e) {
  abort_job("procpool::mpi: rank " + std::to_string(rank) + " on " + host +
                " cannot go on serving the root: " + e.what() + "; ending the job",
            1);
}

/// Every rank but the root: serve the root's pools until it says shutdown.
[[noreturn]] void serve_rank(int rank, const std::string& host) {
  try {
    poll_precisely();
    Transport transport;
    std::mutex mutex;
    std::condition_variable ready;
    std::deque<Parts> outbox;
    bool torn_down = false;  // guarded by `mutex`
    auto server = std::make_unique<NodeServer>([&](Parts m) {
      {
        std::lock_guard lock(mutex);
        outbox.push_back(std::move(m));
      }
      ready.notify_one();
    });
    // On shutdown the server finishes its chunks and ends its pools on a
    // thread of its own: this one goes on sending their replies, and
    // answering the root's pings (a node that takes long to finish is not
    // a node that has stopped).
    std::thread teardown;
    RootWatch watch;
    PollPace pace;
    bool was_on_the_way = false;
    // (Ended here if it fails, not after unwinding: the teardown thread uses
    // what is above.)
    try {
      for (bool running = true; running;) {
        bool active = answer_pings(transport);
        if (const std::optional<double> silent = watch.root_lost(transport))
          give_up_on_root(rank, host, *silent);
        while (!teardown.joinable()) {
          auto m = transport.receive(0);
          if (!m) break;
          active = true;
          Msg type{};
          message_body(m->second, type);
          if (type == Msg::shutdown) {
            teardown = std::thread([&] {
              server.reset();
              std::lock_guard lock(mutex);
              torn_down = true;
              ready.notify_one();
            });
            break;
          }
          server->handle(std::move(m->second));
        }
        std::deque<Parts> out;
        {
          std::lock_guard lock(mutex);
          out.swap(outbox);
          running = !torn_down;
        }
        send_bundled(transport, out);
        active = active || !out.empty();
        const bool sent = transport.progress();
        if (active) {
          pace.active();
          continue;
        }
        if (transport.moving_large()) {
          // A large message moves (over TCP, say) only while MPI is called:
          // call it often until it is through, but sleeping between calls (the
          // socket's buffer drains meanwhile), not spinning on a core that
          // the node's workers need.
          std::this_thread::sleep_for(std::chrono::microseconds(20));
          continue;
        }
        // A small message on its way is through in a moment; one on its way
        // for long has stalled (PollPace::on_the_way_fast).
        const bool on_the_way = !sent || transport.receiving();
        if (on_the_way && !was_on_the_way) pace.active();  // it began to move now
        was_on_the_way = on_the_way;
        if (on_the_way && pace.on_the_way_fast()) {
          std::this_thread::yield();
          continue;
        }
        // MPI cannot wake a thread: poll fast just after activity, then
        // slowly (PollPace), so an idle rank costs its node's workers nothing.
        const auto wait = pace.next_wait(std::chrono::milliseconds(1));
        std::unique_lock lock(mutex);
        ready.wait_for(lock, wait, [&] { return !outbox.empty() || torn_down; });
      }
    } catch (const std::exception& e) {
      cannot_serve(rank, host, e);
    }
    teardown.join();
    for (Parts& m : outbox)
      transport.send(0, std::move(m));
    transport.send(0, new_message(Msg::bye));
    while (!transport.progress()) {
      while (transport.receive_signal()) {
      }  // a late ping: received, not left pending at MPI_Finalize
      std::this_thread::sleep_for(std::chrono::microseconds(50));
    }
    while (transport.receive_signal()) {
    }
  } catch (const std::exception& e) {
    cannot_serve(rank, host, e);
  }
  MPI_Finalize();
  std::exit(0);
}

/// A fixed-size text field of a gathered record.
void put_text(char* field, const std::string& text) {
  std::snprintf(field, host_length, "%s", text.c_str());
}

std::string get_text(const char* field) {
  return std::string(field, strnlen(field, host_length));
}

/// The CPUs this process could use were it not for its affinity mask.
unsigned cpus_without_affinity(const CpuReport& r) {
  unsigned n = r.online;
  for (const std::optional<unsigned>& limit :
       {r.cgroup_quota, r.cgroup_cpuset, r.slurm, r.override_cpus}) {
    if (limit) n = std::min(n, *limit);
  }
  return n;
}

/// Every rank's place, on every rank (an allgather of fixed-size records).
std::vector<RankPlace> gather_places(const std::string& host) {
  constexpr int affinity_words = CPU_SETSIZE / 64;
  struct Record {
    char host[host_length];
    char node[host_length];
    std::uint64_t usable_cpus;
    std::uint64_t cpus_unbound;
    std::uint64_t bound_by_mpirun;
    std::uint64_t affinity[affinity_words];
  };
  Record mine{};
  put_text(mine.host, host);
  put_text(mine.node, this_node_name());
  const CpuReport cpus = cpu_report();
  mine.usable_cpus = cpus.usable;
  mine.cpus_unbound = cpus_without_affinity(cpus);
  const char* bound = std::getenv("OMPI_MCA_orte_bound_at_launch");
  mine.bound_by_mpirun = bound != nullptr && std::string(bound) == "1";
  const std::vector<std::uint64_t> affinity = this_affinity();
  std::copy(affinity.begin(), affinity.end(), mine.affinity);
  std::vector<Record> all(static_cast<std::size_t>(session_size));
  MPI_Allgather(&mine, sizeof(Record), MPI_BYTE, all.data(), sizeof(Record), MPI_BYTE,
                MPI_COMM_WORLD);
  std::vector<RankPlace> places;
  for (const Record& r : all) {
    RankPlace& p = places.emplace_back();
    p.host = get_text(r.host);
    p.node = get_text(r.node);
    p.usable_cpus = static_cast<unsigned>(r.usable_cpus);
    p.cpus_unbound = static_cast<unsigned>(r.cpus_unbound);
    p.bound_by_mpirun = r.bound_by_mpirun != 0;
    p.affinity.assign(std::begin(r.affinity), std::end(r.affinity));
    while (!p.affinity.empty() && p.affinity.back() == 0)
      p.affinity.pop_back();
  }
  return places;
}

}  // namespace

std::optional<std::string> identity_mismatch(int rank, const std::string& host,
                                             const std::string& mine, const std::string& root_host,
                                             const std::string& roots) {
  if (mine == roots) return std::nullopt;
  return "procpool::mpi: rank " + std::to_string(rank) + " on " + host +
         " runs a different executable than the root (rank 0 on " + root_host +
         "): its identity is " + mine + ", the root's " + roots +
         ". Functions cross ranks by their offset in the executable, so every rank must run the "
         "very same build: copy the binary to every node (or use a shared file system) and "
         "relaunch. Ending the job.";
}

}  // namespace detail

Session::Session(int& argc, char**& argv) {
  if (detail::session_exists) throw Error("procpool::mpi::Session: only one Session per process");
  detail::session_exists = true;
  if (!detail::launched_by_mpi()) {
    detail::Hub::install(nullptr);  // a one-node hub is made on first use
    return;
  }
  int provided = 0;
  detail::started_by_mpirun = std::getenv("OMPI_COMM_WORLD_SIZE") != nullptr;
  detail::remember_fatal_handlers();
  MPI_Init_thread(&argc, &argv, MPI_THREAD_MULTIPLE, &provided);
  detail::give_forked_children_their_handlers_back();
  detail::session_uses_mpi = true;
  MPI_Comm_rank(MPI_COMM_WORLD, &detail::session_rank);
  MPI_Comm_size(MPI_COMM_WORLD, &detail::session_size);
  const int rank = detail::session_rank;
  const std::string host = detail::this_host_name();

  // Root's identity and host to every rank; every rank compares its own.
  std::string identity = procpool::detail::executable_identity();
  char root_host[detail::host_length] = {};
  std::snprintf(root_host, sizeof root_host, "%s", host.c_str());
  MPI_Bcast(root_host, detail::host_length, MPI_CHAR, 0, MPI_COMM_WORLD);
  int length = static_cast<int>(identity.size());
  MPI_Bcast(&length, 1, MPI_INT, 0, MPI_COMM_WORLD);
  std::string roots(static_cast<std::size_t>(length), '\0');
  if (rank == 0) roots = identity;
  MPI_Bcast(roots.data(), length, MPI_CHAR, 0, MPI_COMM_WORLD);
  if (auto mismatch = detail::identity_mismatch(rank, host, identity, root_host, roots)) {
    detail::abort_job(*mismatch, 3);
  }

  // Where each rank runs (host, node, usable CPUs, affinity) to every rank:
  // the root shares each node's CPUs out among its ranks; every rank learns
  // how many nodes the job has.
  std::vector<detail::RankPlace> places = detail::gather_places(host);
  detail::session_nodes = static_cast<int>(detail::count_nodes(places));
  if (rank == 0) {
    for (const std::string& line : detail::narrow_binding_warnings(places))
      std::fprintf(stderr, "%s\n", line.c_str());
  }

  if (rank != 0) {
    if (provided < MPI_THREAD_FUNNELED) {
      detail::abort_job("procpool::mpi: rank " + std::to_string(rank) + " on " + host +
                            ": this MPI library does not support threads (MPI_THREAD_FUNNELED)",
                        2);
    }
    detail::serve_rank(rank, host);
  }
  if (provided < MPI_THREAD_SERIALIZED) {
    detail::abort_job(
        "procpool::mpi: the MPI library gives only thread level " + std::to_string(provided) +
            "; procpool needs MPI_THREAD_SERIALIZED (Open MPI built with thread support)",
        2);
  }
  std::vector<detail::NodeSlot> nodes = detail::node_slots(places);
  try {
    detail::Hub::install(std::make_shared<detail::Hub>(true, std::move(nodes)));
  } catch (const Error& e) {
    // The other ranks already serve the root: only ending the job ends them.
    detail::abort_job(e.what(), 2);
  }
}

Session::~Session() {
  std::shared_ptr<detail::Hub> hub = detail::Hub::current();
  detail::Hub::install(nullptr);
  try {
    hub->shutdown();
  } catch (const std::exception& e) {
    std::fprintf(stderr, "procpool::mpi::Session: ending the job: %s\n", e.what());
  }
  hub.reset();
  if (detail::session_uses_mpi) MPI_Finalize();
  detail::session_exists = false;
}

int Session::rank() const noexcept {
  return detail::session_rank;
}

int Session::size() const noexcept {
  return detail::session_size;
}

int Session::nodes() const noexcept {
  return detail::session_nodes;
}

}  // namespace procpool::mpi
