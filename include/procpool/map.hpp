// procpool/map.hpp - fork per call: map, imap, imap_unordered, starmap.
//
// Workers are forked when the call starts and reaped when it ends, so the
// function may capture anything by reference: the workers see the caller's
// memory as it is at the call, shared copy-on-write, never copied.
//
//     std::unordered_map<std::string, int> vocab = load_vocab();  // 2 GB, shared
//     auto ids = procpool::map([&](const std::string& w) { return vocab.at(w); }, words);
#pragma once

#include <concepts>
#include <memory>
#include <mutex>
#include <ranges>
#include <type_traits>
#include <utility>
#include <vector>

#include "procpool/cpu_count.hpp"
#include "procpool/detail/call.hpp"
#include "procpool/detail/map_call.hpp"
#include "procpool/options.hpp"
#include "procpool/results.hpp"

namespace procpool {

/// Lazily applies `f` to each input in worker processes and yields the results
/// in input order. Works on endless inputs: only a bounded number are taken ahead.
///
///     for (int sq : procpool::imap([](int x) { return x * x; }, std::views::iota(0)))
///       if (sq > 1000) break;  // the workers are stopped and reaped here
template <class F, std::ranges::input_range R>
[[nodiscard]] auto imap(F&& f, R&& inputs, const Options& options = {}) {
  return detail::make_fork_results<detail::Delivery::ordered>(std::forward<F>(f),
                                                              std::forward<R>(inputs), options);
}

/// Like imap, but yields `Indexed{index, value}` as soon as each result is done.
///
///     for (auto [index, value] : procpool::imap_unordered(f, inputs)) out[index] = value;
template <class F, std::ranges::input_range R>
[[nodiscard]] auto imap_unordered(F&& f, R&& inputs, const Options& options = {}) {
  return detail::make_fork_results<detail::Delivery::unordered>(std::forward<F>(f),
                                                                std::forward<R>(inputs), options);
}

/// Applies `f` to every input in worker processes; results in input order.
/// The first failure stops the call, reaps its workers and is thrown
/// (TaskError, WorkerCrashed, ...).
///
///     std::vector<int> lengths =
///         procpool::map([](const std::string& s) { return int(s.size()); }, words);
template <class F, std::ranges::input_range R>
auto map(F&& f, R&& inputs, const Options& options = {}) {
  return detail::collect(imap(std::forward<F>(f), inputs, options), inputs);
}

/// Like imap, but never throws for a failed input: yields every input's
/// Outcome (value or error) in input order, and the call goes on after failures.
template <class F, std::ranges::input_range R>
[[nodiscard]] auto imap_outcomes(F&& f, R&& inputs, const Options& options = {}) {
  return detail::make_fork_results<detail::Delivery::outcomes>(std::forward<F>(f),
                                                               std::forward<R>(inputs), options);
}

/// Every input's Outcome, in input order: one bad input loses nothing else.
///
///     auto outcomes = procpool::map_outcomes(parse, lines, {.retries = 2});
///     for (auto& o : outcomes) if (!o.ok()) std::cerr << o.what() << '\n';
template <class F, std::ranges::input_range R>
[[nodiscard]] auto map_outcomes(F&& f, R&& inputs, const Options& options = {}) {
  return detail::collect(imap_outcomes(std::forward<F>(f), inputs, options), inputs);
}

/// map for functions of several arguments: each input is a tuple (or pair) unpacked into `f`.
///
///     std::vector<std::pair<int, int>> args{{1, 2}, {3, 4}};
///     auto sums = procpool::starmap([](int a, int b) { return a + b; }, args);  // {3, 7}
template <class F, std::ranges::input_range R>
auto starmap(F&& f, R&& tuples, const Options& options = {}) {
  return map(detail::StarApply<std::decay_t<F>>{std::forward<F>(f)}, std::forward<R>(tuples),
             options);
}

}  // namespace procpool
