// mpi_peers modes lifecycle, init_throws and fixed_bugs (see mpi_peers.cpp).
#include "peers.hpp"

namespace peers {

namespace {

// ---- mode lifecycle ------------------------------------------------------------

/// Every Future of a pool terminated while 100 ms tasks were outstanding ends
/// (after at most 20 s each when `wait_first`): its value if its task ran,
/// else PoolClosed, or WorkerCrashed if terminate() killed it as it ran; and
/// terminate() did not let them all finish.
void check_terminated_futures(std::vector<procpool::mpi::Future<int>>& fs, bool wait_first,
                              Clock::time_point start) {
  std::size_t done = 0, closed = 0;
  for (auto& f : fs) {
    if (wait_first) PEER_CHECK(f.wait_for(seconds(20)) == std::future_status::ready);
    try {
      PEER_CHECK(f.get() % 100 == 0);
      ++done;
    } catch (const procpool::PoolClosed&) {
      ++closed;
    } catch (const procpool::WorkerCrashed&) {
      ++closed;
    }
  }
  PEER_CHECK(done + closed == fs.size());
  PEER_CHECK_MSG(closed > 0, "terminate() finished all 101 tasks of 100 ms");
  PEER_CHECK(Clock::now() - start < seconds(8));
}

/// Runs `body(t)` for t = 0..3 in four root threads at once; a thread's
/// exception fails the case, naming what went wrong.
void in_four_threads(const std::function<void(int)>& body) {
  std::vector<std::string> failures(4);
  std::vector<std::thread> threads;
  for (int t = 0; t < 4; ++t) {
    threads.emplace_back([&body, &failures, t] {
      try {
        body(t);
      } catch (const std::exception& e) {
        failures[static_cast<std::size_t>(t)] = e.what();
      }
    });
  }
  for (auto& th : threads)
    th.join();
  for (const auto& f : failures)
    PEER_CHECK_MSG(f.empty(), f);
}

}  // namespace

std::vector<Case> lifecycle_cases(int nodes) {
  std::vector<Case> cases;
  cases.push_back(
      {"run_after_shutdown", "ExecutorShutdownTestMixin.test_run_after_shutdown", [] {
         procpool::mpi::Pool pool(on_busy_ranks({.processes = 1}));
         auto pending = pool.submit(&mul, 2L, 1L);
         const auto& early = EXPECT_THROW_AS(procpool::Error, pool.join());
         PEER_CHECK_MSG(contains(early.what(), "close()"), early.what());
         // (get() before close(): after join() it hit bug A, see fixed_bugs)
         PEER_CHECK(pending.get() == 2);
         pool.close();
         EXPECT_THROW_AS(procpool::PoolClosed, pool.submit(&ipow, 2L, 5L));
         EXPECT_THROW_AS(procpool::PoolClosed, pool.map(&absolute, std::vector<long>{1}));
         pool.join();
         EXPECT_THROW_AS(procpool::PoolClosed, pool.submit(&ipow, 2L, 5L));
         procpool::mpi::Pool gone(on_busy_ranks({.processes = 1}));
         gone.terminate();
         EXPECT_THROW_AS(procpool::PoolClosed, gone.submit(&ipow, 2L, 5L));
         EXPECT_THROW_AS(procpool::PoolClosed, gone.map(&absolute, std::vector<long>{1}));
       }});
  cases.push_back({"repeated_shutdown_calls", "ProcessPoolShutdownTest.test_shutdown_cancel", [] {
                     procpool::mpi::Pool pool(on_busy_ranks({.processes = 1}));
                     PEER_CHECK(pool.submit(&mul, 2L, 3L).get() == 6);
                     pool.close();
                     pool.close();
                     pool.join();
                     pool.join();
                     pool.terminate();
                     pool.terminate();
                     procpool::mpi::Pool other(on_busy_ranks({.processes = 1}));
                     other.terminate();
                     other.close();
                     other.join();
                     procpool::mpi::Pool insighted(on_busy_ranks({.processes = 1}));
                     insighted.close();
                     insighted.join();
                     auto in = insighted.insights();  // after the end: no hang
                     PEER_CHECK(in.tasks == 0);
                   }});
  cases.push_back({"joins_on_two_threads", "(Pool.JoinOnTwoThreadsAtOnceReturnsOnBoth)", [] {
                     // close(), then join() on two threads at once: each returns
                     // once the pool has ended (procpool::Pool hung here before
                     // 8c6ecd8, joining its service thread twice).
                     for (int round = 0; round < 10; ++round) {
                       procpool::mpi::Pool pool(on_busy_ranks({.processes = 1}));
                       auto answer = pool.submit(&mul, 2L, static_cast<long>(round));
                       pool.close();
                       std::atomic<int> joined{0};
                       std::thread first([&] {
                         pool.join();
                         ++joined;
                       });
                       std::thread second([&] {
                         pool.join();
                         ++joined;
                       });
                       const auto until = Clock::now() + seconds(10);
                       while (joined < 2 && Clock::now() < until)
                         std::this_thread::sleep_for(milliseconds(1));
                       if (joined < 2) {  // nothing can end a join() that hangs
                         std::fprintf(stderr, "round %d: a join() did not return within 10 s\n",
                                      round);
                         std::_Exit(1);
                       }
                       first.join();
                       second.join();
                       PEER_CHECK(answer.get() == 2L * round);
                     }
                   }});
  cases.push_back({"terminate_with_work_outstanding",
                   "ProcessPoolShutdownTest.test_submit_shutdown_cancel(_wait)", [] {
                     // Every outstanding Future ends in bounded time: its value if it
                     // ran, else PoolClosed (mpi4py: cancelled). fixed_bugs has the
                     // stricter form (wait_for, a finished task's value).
                     std::vector<procpool::mpi::Future<int>> fs;
                     const auto start = Clock::now();
                     {
                       procpool::mpi::Pool pool(on_busy_ranks({.processes = 1}));
                       PEER_CHECK(pool.submit(&sleep_then_return, 100).get() == 100);
                       for (int i = 0; i < 100; ++i)
                         fs.push_back(pool.submit(&sleep_then_return, 100));
                       fs.push_back(pool.submit(&sleep_then_return, 0));
                       std::this_thread::sleep_for(milliseconds(200));
                       pool.terminate();
                     }
                     check_terminated_futures(fs, false, start);
                   }});
  cases.push_back({"dropped_future_destructor_waits", "(Executor.__del__ with a task running)", [] {
                     const auto start = Clock::now();
                     {
                       procpool::mpi::Pool slow(on_busy_ranks({.processes = 1}));
                       slow.submit(&sleep_for_ms, 1000);
                     }
                     const auto took = Clock::now() - start;
                     PEER_CHECK(took >= milliseconds(900) && took < seconds(15));
                   }});
  cases.push_back({"results_dropped_early", "(imap abandoned mid-way, then the pool reused)", [] {
                     procpool::mpi::Pool pool(on_busy_ranks({.processes = 2, .chunksize = 3}));
                     for (int round = 0; round < 5; ++round) {
                       int seen = 0;
                       for (int v : pool.imap(&sleep_then_return, std::vector<int>(300, 2))) {
                         PEER_CHECK(v == 2);
                         if (++seen == 10) break;
                       }
                       {
                         auto results =
                             pool.imap_unordered(&sleep_then_return, std::vector<int>(300, 3));
                         auto it = results.begin();
                         PEER_CHECK(it->value == 3);
                       }
                       // no stale result of the dropped calls shows up here
                       auto got = pool.map([](int x) { return x + 1000; }, range(200));
                       for (int i = 0; i < 200; ++i)
                         PEER_CHECK(got[static_cast<std::size_t>(i)] == i + 1000);
                     }
                   }});
  cases.push_back({"threads_share_a_pool", "SharedPoolInitTest.test_initializer_4 (threads)", [] {
                     // README: several threads may use one pool at once.
                     procpool::mpi::Pool pool(on_busy_ranks({.processes = 2}));
                     in_four_threads([&pool](int t) {
                       for (int round = 0; round < 5; ++round) {
                         auto got = pool.map(&label_with, range(500), std::to_string(t) + ":");
                         for (int i = 0; i < 500; ++i)
                           if (got[static_cast<std::size_t>(i)] !=
                               std::to_string(t) + ":" + std::to_string(i))
                             throw std::runtime_error("wrong result at " + std::to_string(i));
                         std::vector<procpool::mpi::Future<long>> fs;
                         for (long i = 0; i < 20; ++i)
                           fs.push_back(pool.submit(&mul, i, static_cast<long>(t)));
                         for (long i = 0; i < 20; ++i)
                           if (fs[static_cast<std::size_t>(i)].get() != i * t)
                             throw std::runtime_error("wrong Future result");
                       }
                     });
                   }});
  cases.push_back(
      {"threads_share_a_pool_chunksize_1",
       "SharedPoolInitTest.test_initializer_4 (threads, chunksize 1, two imaps each)", [] {
         // The chunks of up to eight calls at once cross to each node in
         // shared bundles (src/mpi/wire.hpp), and their replies back: each
         // result reaches its own call, in input order.
         procpool::mpi::Pool pool(on_busy_ranks({.processes = 2, .chunksize = 1}));
         in_four_threads([&pool](int t) {
           const std::string prefix = std::to_string(t) + ":";
           for (int round = 0; round < 3; ++round) {
             auto got = pool.map(&label_with, range(400), prefix);
             for (int i = 0; i < 400; ++i)
               if (got[static_cast<std::size_t>(i)] != label_with(i, prefix))
                 throw std::runtime_error("map: wrong result at " + std::to_string(i));
             auto a = pool.imap(&label_with, range(300), prefix + "a");
             auto b = pool.imap(&label_with, range(300), prefix + "b");
             auto ia = a.begin();
             auto ib = b.begin();
             for (int i = 0; i < 300; ++i, ++ia, ++ib)
               if (*ia != label_with(i, prefix + "a") || *ib != label_with(i, prefix + "b"))
                 throw std::runtime_error("imap: wrong result at " + std::to_string(i));
             if (ia != std::default_sentinel || ib != std::default_sentinel)
               throw std::runtime_error("imap: more results than inputs");
           }
         });
       }});
  cases.push_back({"threads_own_pools", "SharedPoolInitTest.test_initializer_4", [] {
                     in_four_threads([](int t) {
                       for (int round = 0; round < 3; ++round) {
                         procpool::mpi::Pool own(on_busy_ranks({.processes = 1}), &make_model);
                         std::vector<procpool::mpi::Future<int>> fs;
                         for (int i = 0; i < static_cast<int>(own.processes()) + t; ++i)
                           fs.push_back(own.submit(&use_model, i));
                         for (std::size_t i = 0; i < fs.size(); ++i)
                           if (fs[i].get() != 3 * static_cast<int>(i))
                             throw std::runtime_error("wrong Future result");
                       }
                     });
                   }});
  cases.push_back(
      {"pools_created_and_destroyed",
       "test_context_manager_shutdown, test_del_shutdown, "
       "SharedPoolInitTest.test_initializer_4",
       [] {
         for (int i = 0; i < 25; ++i) {
           procpool::mpi::Pool pool(on_busy_ranks({.processes = 1}));
           std::vector<long> xs;
           for (long x = -5; x < 5; ++x)
             xs.push_back(x);
           PEER_CHECK(pool.map(&absolute, xs) == (std::vector<long>{5, 4, 3, 2, 1, 0, 1, 2, 3, 4}));
           if (i % 5 == 0) {
             procpool::mpi::Pool stateful(on_busy_ranks({.processes = 1}), &make_model);
             PEER_CHECK(stateful.submit(&use_model, i).get() == 3 * i);
           }
         }
         for (int i = 0; i < 10; ++i) {
           procpool::mpi::Pool unused(on_busy_ranks({.processes = 1}));
         }
       }});
  cases.push_back({"pools_alive_at_once", "ProcessPoolSubmitTest.test_multiple_executors", [] {
                     procpool::mpi::Pool p1(on_busy_ranks({.processes = 1}));
                     procpool::mpi::Pool p2(on_busy_ranks({.processes = 1}), &make_model);
                     procpool::mpi::Pool p3(on_busy_ranks({.processes = 1}), &make_tag);
                     std::vector<procpool::mpi::Future<long>> fs1;
                     std::vector<procpool::mpi::Future<int>> fs2;
                     std::vector<procpool::mpi::Future<std::string>> fs3;
                     for (int i = 0; i < 100; ++i) {
                       fs1.push_back(p1.submit(&absolute, -static_cast<long>(100 + i)));
                       fs2.push_back(p2.submit(&use_model, 200 + i));
                       fs3.push_back(p3.submit(&tagged, 300 + i));
                     }
                     for (int i = 99; i >= 0; --i) {
                       const auto k = static_cast<std::size_t>(i);
                       PEER_CHECK(fs3[k].get() == "tag:" + std::to_string(300 + i));
                       PEER_CHECK(fs2[k].get() == 3 * (200 + i));
                       PEER_CHECK(fs1[k].get() == 100 + i);
                     }
                     // two maps interleaved, lazily, on two pools
                     auto a = p1.imap([](int x) { return x * 2; }, range(2000));
                     auto b = p2.imap(&use_model, range(2000));
                     auto ia = a.begin();
                     auto ib = b.begin();
                     for (int i = 0; i < 2000; ++i, ++ia, ++ib) {
                       PEER_CHECK(*ia == 2 * i);
                       PEER_CHECK(*ib == 3 * i);
                     }
                     PEER_CHECK(ia == std::default_sentinel && ib == std::default_sentinel);
                   }});
  cases.push_back(
      {"sixteen_shared_pools", "ProcessPoolSubmitTest.test_shared_executors", [nodes] {
         std::vector<std::unique_ptr<procpool::mpi::Pool>> pools;
         for (int i = 0; i < 16; ++i)
           pools.push_back(std::make_unique<procpool::mpi::Pool>(on_busy_ranks({.processes = 1})));
         std::vector<procpool::mpi::Future<long>> fs;
         for (long i = 0; i < 128; ++i)
           for (long j = 0; j < 16; ++j)
             fs.push_back(pools[static_cast<std::size_t>(j)]->submit(&absolute, -(i * 16 + j)));
         std::vector<long> got;
         for (auto& f : fs)
           got.push_back(f.get());
         std::ranges::sort(got);
         std::vector<long> want(16 * 128);
         std::iota(want.begin(), want.end(), 0L);
         PEER_CHECK(got == want);
         for (auto& p : pools)
           PEER_CHECK(p->processes() == static_cast<unsigned>(nodes));
         // destroyed in creation order, each while the others live
         pools.clear();
       }});
  return cases;
}

// ---- mode init_throws ------------------------------------------------------------

std::vector<Case> init_throws_cases() {
  std::vector<Case> cases;
  cases.push_back(
      {"initializer_error",
       "ProcessPoolInitTest.test_initializer_error, MPICommExecutorTest."
       "test_initializer_error",
       [] {
         const auto start = Clock::now();
         procpool::mpi::Pool pool({.processes = 1}, &failing_init);
         auto pending = pool.submit(&use_model, 1);
         const auto& e = EXPECT_THROW_AS(procpool::TaskError, pool.submit(&use_model, 2).get());
         PEER_CHECK_MSG(contains(e.remote_what(), "no model file at /nonexistent/model.bin"),
                        e.what());
         PEER_CHECK_MSG(contains(e.remote_what(), "initializer"), e.what());
         check_located(e);
         EXPECT_THROW_AS(procpool::TaskError, pending.get());
         // every input of a map says so, on every node
         auto outcomes = pool.map_outcomes(&use_model, range(50));
         PEER_CHECK(outcomes.size() == 50);
         for (const auto& o : outcomes) {
           const auto& err = error_as<procpool::TaskError>(o);
           PEER_CHECK(err.index() == o.index);
           PEER_CHECK_MSG(contains(err.remote_what(), "no model file"), err.what());
         }
         EXPECT_THROW_AS(procpool::TaskError, pool.map(&use_model, range(50)));
         PEER_CHECK(Clock::now() - start < seconds(20));
       }});
  cases.push_back(
      {"initializer_error_del", "ProcessPoolInitTest.test_initializer_error_del(_nowait)", [] {
         for (int i = 0; i < 3; ++i) {
           procpool::mpi::Pool pool({.processes = 1}, &failing_init);
         }
         procpool::mpi::Pool closed({.processes = 2}, &failing_init);
         auto f = closed.submit(&use_model, 1);
         EXPECT_THROW_AS(procpool::TaskError, f.get());
         closed.close();
         closed.join();
         procpool::mpi::Pool terminated({.processes = 1}, &failing_init);
         (void)terminated.submit(&use_model, 1);
         terminated.terminate();
       }});
  cases.push_back({"good_pool_beside_a_broken_one", "SharedPoolInitTest.test_initializer_1", [] {
                     procpool::mpi::Pool broken({.processes = 1}, &failing_init);
                     procpool::mpi::Pool good({.processes = 1}, &make_model);
                     auto bad = broken.submit(&use_model, 1);
                     auto fine = good.submit(&use_model, 5);
                     PEER_CHECK(fine.get() == 15);
                     EXPECT_THROW_AS(procpool::TaskError, bad.get());
                     PEER_CHECK(good.map(&use_model, range(100))[99] == 297);
                   }});
  return cases;
}

// ---- mode fixed_bugs (each case failed before its bug was fixed) ----------------------
//
// A: a Future whose task finished throws PoolClosed ("the pool was ended")
//    from get()/wait()/wait_for() once its pool was joined, terminated or
//    destroyed, unless it was waited on before: when submit() found no node
//    with room for a second chunk (one rank with one worker, or a busy pool),
//    the call never saw its one-input range end, and CallState::top_up, run
//    again by get(), tries to take more and finds the pool ended.
// B: submit() sends its task only if a node has room at that moment; else
//    it waits for get()/wait() on that very Future. A dropped Future's task
//    then never runs (its error is never counted), join() and ~Pool do not
//    wait for it, and Futures got in reverse order run one at a time.
// C: an input whose save() throws on the root gives a TaskError that is no
//    ErrorLocation (mpi.hpp: every error of an mpi::Pool task is one).
// D: Options::max_inflight does not bound the inputs taken ahead (procpool::Pool
//    on the same range does): auto chunks take thousands of an endless range.
// E: terminate() while a call encodes its inputs (without the hub's lock)
//    lets the chunk go out after the pool ended: the node, which ended its
//    pool, answers "a call arrived for a pool this node does not have", and
//    a submitted task fails with that plain Error instead of PoolClosed.
// F: join() does not wait for a chunk whose inputs are being encoded: a
//    submit() accepted before close() fails with that same Error instead of
//    running, and join() returns before it.
// (Not a bug, so not here: imap_unordered hands over a fast task queued on a
// worker behind a slow one only after the slow one, as procpool::Pool does:
// mpi4py's one-task-per-idle-worker dispatch does not.)

std::vector<Case> fixed_bugs_cases() {
  std::vector<Case> cases;
  cases.push_back({"E_terminate_while_a_submit_is_encoded",
                   "(util.pool test_terminate, test_submit_shutdown_cancel: work outstanding)", [] {
                     // (A map hides it: its next chunk finds the pool ended and throws
                     // PoolClosed before the node's answer comes back.)
                     for (int round = 0; round < 3; ++round) {
                       procpool::mpi::Pool pool(on_busy_ranks({.processes = 1}));
                       SlowSubmit submit(pool, round);
                       const auto start = Clock::now();
                       pool.terminate();
                       submit.join();
                       try {
                         if (submit.refused) std::rethrow_exception(submit.refused);
                         PEER_CHECK(submit.future.has_value());
                         (void)submit.future->get();
                         PEER_CHECK_MSG(false, "the task ran after terminate()");
                       } catch (const procpool::PoolClosed&) {
                       } catch (const std::exception& e) {
                         PEER_CHECK_MSG(false, std::string("not PoolClosed: ") + e.what());
                       }
                       PEER_CHECK(Clock::now() - start < seconds(5));
                     }
                   }});
  cases.push_back({"F_join_waits_for_a_submit_being_encoded",
                   "(ExecutorShutdownTestMixin.test_hang_issue12364: accepted work runs)", [] {
                     for (int round = 0; round < 3; ++round) {
                       procpool::mpi::Pool pool(on_busy_ranks({.processes = 1}));
                       SlowSubmit submit(pool, 100 + round);
                       pool.close();
                       pool.join();  // the submit was accepted before close(): it runs
                       submit.join();
                       PEER_CHECK(submit.refused == nullptr && submit.future.has_value());
                       try {
                         PEER_CHECK(submit.future->get() == 100 + round);
                       } catch (const std::exception& e) {
                         PEER_CHECK_MSG(false,
                                        std::string("the accepted task failed: ") + e.what());
                       }
                     }
                   }});
  cases.push_back(
      {"D_max_inflight_bounds_inputs_taken",
       "ProcessPoolExecutorTest.test_map_buffersize (buffersize bounds the inputs taken)", [] {
         // Options::max_inflight: "upper bound on inputs taken from the input
         // range but not yet handed back". An endless range, counted.
         std::string failures;
         for (std::size_t cs : {std::size_t{0}, std::size_t{1}, std::size_t{64}}) {
           procpool::mpi::Pool pool({.processes = 2, .chunksize = cs, .max_inflight = 16});
           procpool::Pool local({.processes = 2, .chunksize = cs, .max_inflight = 16});
           auto check = [&](auto& p, const char* which) {
             inputs_taken = 0;
             std::size_t handed = 0, worst = 0;
             for (int v : p.imap([](int x) { return x; },
                                 std::views::iota(0) | std::views::transform(&counted))) {
               ++handed;
               worst = std::max(worst, inputs_taken - handed);
               if (v == 3000) break;
             }
             if (worst > 16)
               failures += std::string("[") + which + " chunksize " + std::to_string(cs) + ": " +
                           std::to_string(worst) + " inputs taken ahead] ";
           };
           check(local, "procpool::Pool");
           check(pool, "mpi::Pool");
         }
         PEER_CHECK_MSG(failures.empty(), failures);
       }});
  cases.push_back({"A_future_get_after_join", "ExecutorShutdownTestMixin.test_hang_issue12364", [] {
                     // One task, sent at once (a fresh pool has room), finished by
                     // join(); no wait() before: get() afterwards must give 42.
                     std::string failures;
                     for (auto [processes, cs] :
                          {std::pair<unsigned, std::size_t>{2, 0}, {1, 0}, {2, 1}, {1, 5}}) {
                       const std::string at = "processes " + std::to_string(processes) +
                                              " chunksize " + std::to_string(cs);
                       procpool::mpi::Pool pool({.processes = processes, .chunksize = cs});
                       auto f = pool.submit(&mul, 21L, 2L);
                       pool.close();
                       pool.join();
                       try {
                         PEER_CHECK_MSG(f.get() == 42, at);
                       } catch (const procpool::PoolClosed& e) {
                         failures += "[" + at + ": get() after join() threw: " + e.what() + "] ";
                       }
                     }
                     PEER_CHECK_MSG(failures.empty(), failures);
                   }});
  cases.push_back(
      {"A_future_wait_after_terminate", "ProcessPoolShutdownTest.test_submit_shutdown_cancel_wait",
       [] {
         procpool::mpi::Pool pool({.processes = 1});
         auto done = pool.submit(&mul, 21L, 2L);
         done.wait();  // it ran
         auto stuck = pool.submit(&sleep_then_return, 20000);
         pool.terminate();
         std::future_status st{};
         try {
           st = stuck.wait_for(seconds(10));
         } catch (const std::exception& e) {
           throw CaseFailed(std::string("wait_for() after terminate() threw: ") + e.what());
         }
         PEER_CHECK(st == std::future_status::ready);
         try {
           PEER_CHECK(done.get() == 42);
         } catch (const procpool::PoolClosed& e) {
           throw CaseFailed(std::string("a finished task's get() after terminate() threw: ") +
                            e.what());
         }
       }});
  cases.push_back(
      {"A_future_outlives_pool", "ProcessPoolShutdownTest.test_context_manager_shutdown", [] {
         procpool::mpi::Future<long> f;
         {
           procpool::mpi::Pool pool({.processes = 1});
           f = pool.submit(&mul, 6L, 7L);
         }  // ~Pool waits for the task
         try {
           PEER_CHECK(f.get() == 42);
         } catch (const procpool::PoolClosed& e) {
           throw CaseFailed(std::string("get() after ~Pool threw: ") + e.what());
         }
       }});
  cases.push_back({"B_dropped_futures_run",
                   "(mpi.hpp: a Future dropped before get() leaves its task running)", [] {
                     const int me = static_cast<int>(::getpid());
                     {
                       procpool::mpi::Pool pool({.processes = 1});
                       for (int i = 0; i < 10; ++i)
                         pool.submit(&touch_marker, me, i);
                     }  // ~Pool: "waits for the work already sent (dropped Futures' too)"
                     const int ran = markers_left(10);
                     PEER_CHECK_MSG(ran == 10, std::to_string(ran) + " of 10 dropped tasks ran");
                   }});
  cases.push_back({"B_join_runs_submitted_tasks", "ProcessPoolShutdownTest.test_shutdown", [] {
                     const int me = static_cast<int>(::getpid());
                     std::vector<procpool::mpi::Future<int>> fs;
                     procpool::mpi::Pool pool({.processes = 2});
                     for (int i = 0; i < 10; ++i)
                       fs.push_back(pool.submit(&touch_marker, me, i));
                     pool.close();
                     pool.join();  // "waits for all accepted work"
                     const int ran = markers_left(10);
                     PEER_CHECK_MSG(ran == 10,
                                    std::to_string(ran) + " of 10 submitted tasks ran by join()");
                   }});
  cases.push_back({"AB_futures_outstanding_at_join",
                   "ExecutorShutdownTestMixin.test_hang_issue12364, test_shutdown", [] {
                     std::vector<procpool::mpi::Future<void>> fs;
                     std::vector<procpool::mpi::Future<long>> products;
                     {
                       procpool::mpi::Pool pool({.processes = 1});
                       for (int i = 0; i < 50; ++i)
                         fs.push_back(pool.submit(&sleep_for_ms, 10));
                       products.push_back(pool.submit(&mul, 21L, 2L));
                       products.push_back(pool.submit(&mul, 6L, 7L));
                       products.push_back(pool.submit(&mul, 3L, 14L));
                       pool.close();
                       pool.join();
                     }
                     // the pool is gone: its accepted work finished
                     for (auto& f : fs) {
                       PEER_CHECK(f.wait_for(seconds(0)) == std::future_status::ready);
                       f.get();
                     }
                     for (auto& p : products)
                       PEER_CHECK(p.get() == 42);
                     // the same through the destructor alone
                     std::vector<procpool::mpi::Future<int>> later;
                     {
                       procpool::mpi::Pool pool({.processes = 1});
                       for (int i = 0; i < 30; ++i)
                         later.push_back(pool.submit(&sleep_then_return, i));
                     }
                     for (int i = 0; i < 30; ++i)
                       PEER_CHECK(later[static_cast<std::size_t>(i)].get() == i);
                   }});
  cases.push_back(
      {"B_dropped_future_error_counted", "(Future dropped before result(); Executor.__del__)", [] {
         procpool::mpi::Pool pool({.processes = 1});
         for (int i = 0; i < 20; ++i)
           pool.submit(&sleep_then_return, 20);
         pool.submit(&sleep_and_raise, 50);  // its error is counted, not lost
         (void)pool.submit(&mul, 1L, 1L);
         PEER_CHECK(pool.map(&absolute, std::vector<long>{-4}) == std::vector<long>{4});
         pool.close();
         pool.join();
         PEER_CHECK(pool.insights().unobserved_errors == 1);
         // dropped while long: the destructor waits, in bounded time
         const auto start = Clock::now();
         {
           procpool::mpi::Pool slow({.processes = 1});
           slow.submit(&sleep_for_ms, 1000);
         }
         const auto took = Clock::now() - start;
         PEER_CHECK(took >= milliseconds(900) && took < seconds(15));
       }});
  cases.push_back({"AB_terminate_with_work_outstanding",
                   "ProcessPoolShutdownTest.test_submit_shutdown_cancel(_wait)", [] {
                     std::vector<procpool::mpi::Future<int>> fs;
                     const auto start = Clock::now();
                     {
                       procpool::mpi::Pool pool({.processes = 1});
                       auto first = pool.submit(&sleep_then_return, 100);
                       PEER_CHECK(first.get() == 100);
                       for (int i = 0; i < 100; ++i)
                         fs.push_back(pool.submit(&sleep_then_return, 100));
                       auto last = pool.submit(&sleep_then_return, 0);
                       std::this_thread::sleep_for(milliseconds(200));
                       pool.terminate();
                       fs.push_back(std::move(last));
                     }
                     // every Future ends, now: its value if it ran, else PoolClosed
                     check_terminated_futures(fs, true, start);
                   }});
  cases.push_back(
      {"A_initializer_error_del", "ProcessPoolInitTest.test_initializer_error_del(_nowait)", [] {
         for (int i = 0; i < 3; ++i) {
           procpool::mpi::Pool pool({.processes = 1}, &failing_init);
         }
         procpool::mpi::Pool unused({.processes = 1}, &failing_init);
         auto f = unused.submit(&use_model, 1);
         unused.close();
         unused.join();
         EXPECT_THROW_AS(procpool::TaskError, f.get());
         procpool::mpi::Pool terminated({.processes = 1}, &failing_init);
         (void)terminated.submit(&use_model, 1);
         terminated.terminate();
       }});
  cases.push_back({"C_serialize_input_error_names_node",
                   "(mpi.hpp: every error of an mpi::Pool task derives ErrorLocation)", [] {
                     procpool::mpi::Pool pool({.processes = 1});
                     Picky bad_save;
                     bad_save.fail_save = true;
                     const auto& e =
                         EXPECT_THROW_AS(procpool::TaskError, pool.submit(&inout, bad_save).get());
                     check_located(e);
                   }});
  return cases;
}

}  // namespace peers
