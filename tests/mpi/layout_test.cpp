// How ranks share their nodes' CPUs (src/mpi/layout.cpp), without MPI: the
// layouts mpirun and srun produce, as each rank would report them.
#include "../../src/mpi/layout.hpp"

#include <gtest/gtest.h>

#include <algorithm>
#include <bit>
#include <numeric>

namespace procpool::mpi::detail {
namespace {

/// A CPU set of `first`..`first + count - 1`.
std::vector<std::uint64_t> cpus(unsigned first, unsigned count) {
  std::vector<std::uint64_t> words((first + count + 63) / 64, 0);
  for (unsigned c = first; c < first + count; ++c)
    words[c / 64] |= std::uint64_t{1} << (c % 64);
  return words;
}

RankPlace rank_on(const std::string& node, unsigned usable, std::vector<std::uint64_t> affinity) {
  RankPlace p;
  p.host = node;
  p.node = node;
  p.usable_cpus = usable;
  p.affinity = std::move(affinity);
  return p;
}

std::vector<unsigned> automatic(const std::vector<RankPlace>& ranks) {
  std::vector<unsigned> out;
  for (const RankShare& s : share_nodes(ranks))
    out.push_back(s.automatic);
  return out;
}

unsigned total(const std::vector<unsigned>& v) {
  return std::accumulate(v.begin(), v.end(), 0u);
}

TEST(Layout, OneRankPerNodeKeepsItsOwnCpus) {
  const auto a = automatic({rank_on("a", 32, cpus(0, 32)), rank_on("b", 16, cpus(0, 16))});
  EXPECT_EQ(a, (std::vector<unsigned>{32, 16}));
}

TEST(Layout, RanksThatSeeTheSameCpusShareThem) {
  // mpirun -n 3 --bind-to none on a 2-core box: 2 workers in all, not 6; the
  // root, which also schedules, is the one left without.
  const auto a = automatic(
      {rank_on("vm", 2, cpus(0, 2)), rank_on("vm", 2, cpus(0, 2)), rank_on("vm", 2, cpus(0, 2))});
  EXPECT_EQ(a, (std::vector<unsigned>{0, 1, 1}));
  // Four ranks on 10 CPUs: 3, 3, 2, 2, the root last.
  std::vector<RankPlace> four(4, rank_on("n", 10, cpus(0, 10)));
  EXPECT_EQ(automatic(four), (std::vector<unsigned>{2, 3, 3, 2}));
}

TEST(Layout, RanksBoundToTheirOwnCoresKeepThem) {
  // mpirun's default binding (or srun -c 4): disjoint CPU sets, each its own.
  const auto a = automatic(
      {rank_on("n", 4, cpus(0, 4)), rank_on("n", 4, cpus(4, 4)), rank_on("n", 4, cpus(8, 4))});
  EXPECT_EQ(a, (std::vector<unsigned>{4, 4, 4}));
}

TEST(Layout, ACgroupLimitSharedByRanksIsSharedToo) {
  // Both ranks see 8 CPUs but their cgroup allows 3: 3 in all.
  const auto a = automatic({rank_on("n", 3, cpus(0, 8)), rank_on("n", 3, cpus(0, 8))});
  EXPECT_EQ(total(a), 3u);
}

TEST(Layout, OverlappingSetsShareTheirUnion) {
  // {0,1,2,3} and {2,3,4,5}: six CPUs between them, not eight.
  const auto a = automatic({rank_on("n", 4, cpus(0, 4)), rank_on("n", 4, cpus(2, 4))});
  EXPECT_EQ(total(a), 6u);
}

TEST(Layout, UnknownAffinityCountsAsShared) {
  const auto a = automatic({rank_on("n", 4, {}), rank_on("n", 4, {})});
  EXPECT_EQ(total(a), 4u);
}

TEST(Layout, NodesAreTellApartByName) {
  // Two Slurm nodes faked on one host: different SLURMD_NODENAMEs, two nodes.
  const std::vector<RankPlace> ranks{rank_on("node1", 2, cpus(0, 2)),
                                     rank_on("node2", 2, cpus(0, 2))};
  EXPECT_EQ(count_nodes(ranks), 2u);
  EXPECT_EQ(automatic(ranks), (std::vector<unsigned>{2, 2}));
}

TEST(Layout, ProcessesPerNodeAreSharedOutAmongItsRanks) {
  const std::vector<RankPlace> ranks{rank_on("a", 8, cpus(0, 8)), rank_on("a", 8, cpus(0, 8)),
                                     rank_on("a", 8, cpus(0, 8)), rank_on("b", 8, cpus(0, 8))};
  const std::vector<RankShare> shares = share_nodes(ranks);
  EXPECT_EQ(count_nodes(ranks), 2u);
  // 5 per node: node a's three ranks get 2, 2, 1 (root last), node b's one rank 5.
  EXPECT_EQ(split_workers(5, shares[1]), 2u);
  EXPECT_EQ(split_workers(5, shares[2]), 2u);
  EXPECT_EQ(split_workers(5, shares[0]), 1u);
  EXPECT_EQ(split_workers(5, shares[3]), 5u);
  // One per node: one of node a's ranks runs it, never the root first.
  EXPECT_EQ(split_workers(1, shares[0]) + split_workers(1, shares[1]) + split_workers(1, shares[2]),
            1u);
  EXPECT_EQ(split_workers(1, shares[0]), 0u);
}

TEST(Layout, EveryNodeRunsAtLeastOneWorker) {
  for (unsigned ranks = 1; ranks <= 6; ++ranks) {
    for (unsigned cpus_on_node = 1; cpus_on_node <= 4; ++cpus_on_node) {
      std::vector<RankPlace> places(ranks, rank_on("n", cpus_on_node, cpus(0, cpus_on_node)));
      const auto a = automatic(places);
      EXPECT_EQ(total(a), cpus_on_node) << ranks << " ranks on " << cpus_on_node << " CPUs";
    }
  }
}

TEST(Layout, ThisProcessReportsItsPlace) {
  EXPECT_FALSE(this_node_name().empty());
  const auto mine = this_affinity();
  ASSERT_FALSE(mine.empty());
  unsigned n = 0;
  for (std::uint64_t w : mine)
    n += static_cast<unsigned>(__builtin_popcountll(w));
  EXPECT_GE(n, 1u);
}

/// A rank as mpirun places it: bound at launch or not, on a node that would
/// give it `unbound` CPUs.
RankPlace placed(const std::string& node, std::vector<std::uint64_t> affinity, unsigned unbound,
                 bool bound) {
  unsigned usable = 0;
  for (std::uint64_t w : affinity)
    usable += static_cast<unsigned>(std::popcount(w));
  RankPlace p = rank_on(node, std::max(usable, 1u), std::move(affinity));
  p.cpus_unbound = unbound;
  p.bound_by_mpirun = bound;
  return p;
}

TEST(NarrowBinding, MpirunsCorePerRankOnABigNodeIsSaidWithWhatToDo) {
  // mpirun -n 2 on two 16-CPU nodes: each rank bound to one core.
  const auto lines = narrow_binding_warnings(
      {placed("n1", cpus(0, 1), 16, true), placed("n2", cpus(0, 1), 16, true)});
  ASSERT_EQ(lines.size(), 2u);
  EXPECT_NE(lines[0].find("node n1 to 1 of the 16 CPUs they could use"), std::string::npos)
      << lines[0];
  EXPECT_NE(lines[0].find("--bind-to none"), std::string::npos) << lines[0];
  EXPECT_NE(lines[1].find("node n2"), std::string::npos) << lines[1];
}

TEST(NarrowBinding, RanksThatTogetherCoverTheNodeAreFine) {
  // mpirun -n 2 on one 2-CPU node: a core each, both cores used.
  EXPECT_TRUE(narrow_binding_warnings(
                  {placed("n1", cpus(0, 1), 2, true), placed("n1", cpus(1, 1), 2, true)})
                  .empty());
  // Two of four cores used: said, counting the node's ranks together.
  const auto lines = narrow_binding_warnings(
      {placed("n1", cpus(0, 1), 4, true), placed("n1", cpus(1, 1), 4, true)});
  ASSERT_EQ(lines.size(), 1u);
  EXPECT_NE(lines[0].find("2 rank(s) on node n1 to 2 of the 4 CPUs"), std::string::npos)
      << lines[0];
}

TEST(NarrowBinding, ABindingThatMpirunDidNotMakeIsTheUsersChoice) {
  // srun -c 4, taskset, or --bind-to none: nothing to say.
  EXPECT_TRUE(narrow_binding_warnings({placed("n1", cpus(0, 4), 32, false)}).empty());
  EXPECT_TRUE(narrow_binding_warnings({placed("n1", cpus(0, 16), 16, true)}).empty());
  // The node's cgroup or Slurm share is what bounds it: the binding takes nothing.
  EXPECT_TRUE(narrow_binding_warnings({placed("n1", cpus(0, 2), 2, true)}).empty());
  // Unknown affinity or CPU count: nothing said rather than a wrong line.
  EXPECT_TRUE(narrow_binding_warnings({placed("n1", {}, 16, true)}).empty());
  EXPECT_TRUE(narrow_binding_warnings({placed("n1", cpus(0, 1), 0, true)}).empty());
}

}  // namespace
}  // namespace procpool::mpi::detail
