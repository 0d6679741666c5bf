// The prefetcher on its own (engine/detail/prefetcher.hpp): what it answers for each strategy,
// how it learns the order of acquires and the depth from fill and compute times.
#include <gtest/gtest.h>

#include <cstdint>
#include <vector>

#include "tensorstream/engine/detail/prefetcher.hpp"

namespace eng = tensorstream::engine;
using eng::PrefetchStrategy;
using eng::detail::Prefetcher;
using Blocks = std::vector<std::uint32_t>;

namespace {

Blocks next(const Prefetcher& p, std::uint32_t block) {
  Blocks out{99};  // next_blocks replaces whatever is there
  p.next_blocks(block, out);
  return out;
}

std::vector<bool> none_resident(std::size_t n) { return std::vector<bool>(n, false); }

}  // namespace

TEST(Prefetcher, NoneNeverPrefetches) {
  Prefetcher p(PrefetchStrategy::kNone, std::nullopt, none_resident(6), 3);
  for (std::uint32_t b = 0; b < 6; ++b) {
    p.record_acquire(b);
    EXPECT_TRUE(next(p, b).empty());
  }
  EXPECT_FALSE(p.order_learned());
}

TEST(Prefetcher, NextLayerWalksOnCyclicallyAsDeepAsTheRingAllows) {
  Prefetcher p(PrefetchStrategy::kNextLayer, std::nullopt, none_resident(5), 2);
  EXPECT_EQ(p.depth(), 2u);  // 3 slots: one computes, two in flight
  EXPECT_EQ(next(p, 0), (Blocks{1, 2}));
  EXPECT_EQ(next(p, 3), (Blocks{4, 0}));
  EXPECT_EQ(next(p, 4), (Blocks{0, 1}));
}

TEST(Prefetcher, WalkNeverComesBackToTheCurrentBlock) {
  Prefetcher p(PrefetchStrategy::kNextLayer, 10u, none_resident(3), 7);
  EXPECT_EQ(p.depth(), 7u);  // the fixed depth, clamped to slots - 1
  EXPECT_EQ(next(p, 1), (Blocks{2, 0}));
}

TEST(Prefetcher, ResidentBlocksAreWalkedOverButNotCounted) {
  // Blocks 1 and 2 stay in device memory: after 0 the two streamed blocks ahead are 3 and 4.
  Prefetcher p(PrefetchStrategy::kNextLayer, std::nullopt, {false, true, true, false, false, false},
               2);
  EXPECT_EQ(next(p, 0), (Blocks{1, 2, 3, 4}));
  EXPECT_EQ(next(p, 4), (Blocks{5, 0}));
}

TEST(Prefetcher, EverythingResidentMeansNoDepth) {
  Prefetcher p(PrefetchStrategy::kNextLayer, std::nullopt, std::vector<bool>(4, true), 0);
  EXPECT_EQ(p.depth(), 0u);
  EXPECT_TRUE(next(p, 0).empty());
  Prefetcher fixed(PrefetchStrategy::kNextLayer, 3u, std::vector<bool>(4, true), 0);
  EXPECT_EQ(fixed.depth(), 0u);
}

TEST(Prefetcher, FixedDepthIsClampedToTheRing) {
  EXPECT_EQ(Prefetcher(PrefetchStrategy::kAdaptive, 1u, none_resident(8), 3).depth(), 1u);
  EXPECT_EQ(Prefetcher(PrefetchStrategy::kAdaptive, 0u, none_resident(8), 3).depth(), 0u);
  EXPECT_EQ(Prefetcher(PrefetchStrategy::kAdaptive, 9u, none_resident(8), 3).depth(), 3u);
  Prefetcher zero(PrefetchStrategy::kNextLayer, 0u, none_resident(8), 3);
  EXPECT_TRUE(next(zero, 2).empty());
}

TEST(Prefetcher, DepthFollowsFillTimeOverComputeTime) {
  Prefetcher p(PrefetchStrategy::kAdaptive, std::nullopt, none_resident(16), 5);
  EXPECT_EQ(p.depth(), 5u);  // nothing measured yet: as deep as the ring allows
  p.record_fill(0.030);
  EXPECT_EQ(p.depth(), 5u);  // compute time still unknown
  p.record_compute(0.010);
  EXPECT_EQ(p.depth(), 3u);  // ceil(30 ms / 10 ms)
  Prefetcher fast(PrefetchStrategy::kAdaptive, std::nullopt, none_resident(16), 5);
  fast.record_fill(0.001);
  fast.record_compute(0.050);
  EXPECT_EQ(fast.depth(), 1u);  // never below one
  Prefetcher slow(PrefetchStrategy::kAdaptive, std::nullopt, none_resident(16), 5);
  slow.record_fill(1.0);
  slow.record_compute(0.001);
  EXPECT_EQ(slow.depth(), 5u);  // never beyond the ring
}

TEST(Prefetcher, TimesAreMovingAverages) {
  Prefetcher p(PrefetchStrategy::kAdaptive, std::nullopt, none_resident(16), 9);
  p.record_compute(1.0);
  p.record_fill(1.0);
  EXPECT_EQ(p.depth(), 1u);
  p.record_fill(3.0);  // 0.8 * 1 + 0.2 * 3 = 1.4
  EXPECT_EQ(p.depth(), 2u);
  p.record_compute(0.5);  // 0.8 * 1 + 0.2 * 0.5 = 0.9: ceil(1.4 / 0.9) = 2
  EXPECT_EQ(p.depth(), 2u);
  for (int i = 0; i < 40; ++i) p.record_fill(6.0);  // converges to 6: ceil(6 / 0.9) = 7
  EXPECT_EQ(p.depth(), 7u);
}

TEST(Prefetcher, AdaptiveLearnsTheOrderOfOnePassAndWalksIt) {
  Prefetcher p(PrefetchStrategy::kAdaptive, 2u, none_resident(6), 2);
  // The model runs its blocks out of store order: 3, 1, 4, 0 (2 and 5 are never used).
  for (const std::uint32_t b : {3u, 1u, 4u, 0u}) {
    p.record_acquire(b);
    EXPECT_FALSE(p.order_learned());
  }
  EXPECT_EQ(next(p, 1), (Blocks{2, 3}));  // not learned yet: store order
  p.record_acquire(3);                    // the first block again: one pass recorded
  EXPECT_TRUE(p.order_learned());
  EXPECT_EQ(next(p, 3), (Blocks{1, 4}));
  EXPECT_EQ(next(p, 4), (Blocks{0, 3}));  // cyclically
  EXPECT_EQ(next(p, 0), (Blocks{3, 1}));
  // A block outside the learned order falls back to store order.
  EXPECT_EQ(next(p, 2), (Blocks{3, 4}));
  // Later acquires do not change what was learned.
  p.record_acquire(5);
  EXPECT_EQ(next(p, 3), (Blocks{1, 4}));
}

TEST(Prefetcher, AdaptiveOrderStopsBeforeTheCurrentBlockOnShortCycles) {
  Prefetcher p(PrefetchStrategy::kAdaptive, 5u, none_resident(8), 7);
  for (const std::uint32_t b : {6u, 2u, 6u}) p.record_acquire(b);
  ASSERT_TRUE(p.order_learned());
  EXPECT_EQ(next(p, 6), (Blocks{2}));
  EXPECT_EQ(next(p, 2), (Blocks{6}));
}

TEST(Prefetcher, NextLayerDoesNotLearn) {
  Prefetcher p(PrefetchStrategy::kNextLayer, 1u, none_resident(4), 3);
  for (const std::uint32_t b : {2u, 0u, 2u}) p.record_acquire(b);
  EXPECT_FALSE(p.order_learned());
  EXPECT_EQ(next(p, 2), (Blocks{3}));
}

TEST(Prefetcher, DistanceIsAcquiresToTheNextUse) {
  Prefetcher p(PrefetchStrategy::kAdaptive, std::nullopt, none_resident(4), 3);
  // Before an order is learned: the source order, cyclically; the block itself comes back last.
  EXPECT_EQ(p.distance(1, 2), 1u);
  EXPECT_EQ(p.distance(1, 0), 3u);
  EXPECT_EQ(p.distance(1, 1), 4u);
  // The learned order 3, 1, 0, 2.
  for (const std::uint32_t b : {3u, 1u, 0u, 2u, 3u}) p.record_acquire(b);
  ASSERT_TRUE(p.order_learned());
  EXPECT_EQ(p.distance(3, 1), 1u);
  EXPECT_EQ(p.distance(3, 2), 3u);
  EXPECT_EQ(p.distance(2, 3), 1u);
  EXPECT_EQ(p.distance(0, 0), 4u);
}

// Blocks 0, 2, 4 every pass; 1, 3, 5, 6 routed (experts, prior rate 1/4).
std::vector<double> routed_rates() { return {1, 0.25, 1, 0.25, 1, 0.25, 0.25}; }

TEST(Prefetcher, RoutedBlocksStayOutOfTheOrderAndTheWalk) {
  Prefetcher p(PrefetchStrategy::kAdaptive, 6u, none_resident(7), 6, routed_rates());
  EXPECT_TRUE(p.routed(1));
  EXPECT_FALSE(p.routed(2));
  // Before an order is learned the walk in source order passes over the routed blocks.
  EXPECT_EQ(next(p, 0), (Blocks{2, 4}));
  // The first pass uses experts 1 and 5: the order learned is the every-pass blocks only.
  for (const std::uint32_t b : {0u, 1u, 2u, 5u, 4u, 0u}) p.record_acquire(b);
  ASSERT_TRUE(p.order_learned());
  EXPECT_EQ(next(p, 0), (Blocks{2, 4}));
  EXPECT_EQ(next(p, 4), (Blocks{0, 2}));
  EXPECT_EQ(p.distance(0, 4), 2u);  // the pass is 3 long, experts not counted
}

TEST(Prefetcher, RoutedRatesAreLearnedFromThePassesThatUseThem) {
  Prefetcher p(PrefetchStrategy::kAdaptive, std::nullopt, none_resident(7), 6, routed_rates());
  EXPECT_DOUBLE_EQ(p.use_rate(0), 1.0);
  EXPECT_DOUBLE_EQ(p.use_rate(1), 0.25);  // the prior until passes are seen
  // 40 passes: expert 1 in every pass (twice in some), expert 3 in every fourth, 5 never.
  for (int pass = 0; pass < 40; ++pass) {
    p.record_acquire(0);
    p.record_acquire(1);
    if (pass % 2 == 0) p.record_acquire(1);  // used twice in a pass: counts once
    p.record_acquire(2);
    if (pass % 4 == 0) p.record_acquire(3);
    p.record_acquire(4);
  }
  EXPECT_GT(p.use_rate(1), 0.9);
  EXPECT_LE(p.use_rate(1), 1.0);
  EXPECT_GT(p.use_rate(3), 0.15);
  EXPECT_LT(p.use_rate(3), 0.4);
  EXPECT_LT(p.use_rate(5), 0.05);
  // Unused for a while, a rate decays: about the last 20 passes count.
  for (int pass = 0; pass < 40; ++pass) {
    for (const std::uint32_t b : {0u, 2u, 4u}) p.record_acquire(b);
  }
  EXPECT_LT(p.use_rate(1), 0.2);
}

TEST(Prefetcher, RoutedDistanceIsTheExpectedNextUse) {
  Prefetcher p(PrefetchStrategy::kAdaptive, std::nullopt, none_resident(7), 6, routed_rates());
  for (int pass = 0; pass < 30; ++pass) {
    p.record_acquire(0);
    p.record_acquire(1);  // every pass, after block 0
    p.record_acquire(2);
    if (pass % 5 == 0) p.record_acquire(3);  // one pass in five, after block 2
    p.record_acquire(4);
  }
  ASSERT_TRUE(p.order_learned());
  // At block 4: expert 1 is next used after block 0 (1 acquire away), expert 3 after block 2,
  // expected some passes later; the rarely used one ranks after every every-pass block.
  const auto frequent = p.distance(4, 1);
  const auto rare = p.distance(4, 3);
  EXPECT_LE(frequent, 2u);
  EXPECT_GT(rare, p.distance(4, 2) + 3);
  EXPECT_GT(rare, frequent);
  // Never used: further still.
  EXPECT_GT(p.distance(4, 5), rare);
  // Asked for by the caller: expected in this pass, where it was used before (expert 3,
  // after block 2), or now if that is not known, until it is used or the pass after next.
  p.record_prefetch(3);
  EXPECT_EQ(p.distance(4, 3), p.distance(4, 2));
  EXPECT_EQ(p.distance(2, 3), 1u);
  p.record_prefetch(5);
  EXPECT_EQ(p.distance(4, 5), 1u);
  p.record_acquire(0);
  EXPECT_EQ(p.distance(0, 5), 1u);
  p.record_acquire(0);
  p.record_acquire(0);
  EXPECT_GT(p.distance(0, 5), 1u);
  p.record_prefetch(6);
  p.record_acquire(6);
  EXPECT_GT(p.distance(0, 6), 1u);
}
