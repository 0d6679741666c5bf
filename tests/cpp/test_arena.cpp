// The streaming arena: places never overlap or leave the arena, pinned units are never
// displaced, prefetches never displace what is needed sooner, units held together always fit
// when their sizes add up to the capacity, and a cyclic loop larger than the arena keeps
// hitting instead of thrashing.
#include <gtest/gtest.h>

#include <algorithm>
#include <map>
#include <numeric>
#include <random>

#include "tensorstream/engine/detail/arena.hpp"

namespace {

using tensorstream::engine::detail::Arena;
using State = Arena::State;
constexpr std::uint64_t K = 4096;

Arena::Rank by(const std::map<std::uint32_t, Arena::Distance>& distance) {
  return [distance](std::uint32_t unit) {
    const auto it = distance.find(unit);
    return it == distance.end() ? Arena::kUnknown : it->second;
  };
}

// Places `unit` as the engine does: find, erase the displaced, insert.
std::optional<Arena::Place> place(Arena& arena, std::uint32_t unit, std::uint64_t bytes,
                                  bool demand, Arena::Distance distance, const Arena::Rank& rank,
                                  State state = State::kPinned, std::uint64_t together = 0) {
  auto where = arena.find(bytes, demand, distance, rank, together);
  if (!where) return where;
  for (const auto u : where->displaced) arena.erase(u);
  arena.insert(unit, where->offset, bytes, state);
  return where;
}

void expect_consistent(const Arena& arena) {
  std::uint64_t end = 0;
  std::uint64_t used = 0;
  for (const auto& e : arena.entries()) {
    EXPECT_GE(e.offset, end) << "unit " << e.unit << " overlaps its predecessor";
    EXPECT_EQ(e.offset % arena.alignment(), 0u);
    end = e.offset + e.size;
    used += e.size;
  }
  EXPECT_LE(end, arena.capacity());
  EXPECT_EQ(used, arena.used());
  EXPECT_LE(arena.used(), arena.capacity());
}

}  // namespace

TEST(Arena, SizesAreRoundedToTheAlignment) {
  const Arena arena(10 * K + 17, K);
  EXPECT_EQ(arena.capacity(), 10 * K);
  EXPECT_EQ(arena.footprint(1), K);
  EXPECT_EQ(arena.footprint(0), K);
  EXPECT_EQ(arena.footprint(K), K);
  EXPECT_EQ(arena.footprint(K + 1), 2 * K);
  EXPECT_THROW(Arena(10 * K, 3000), std::invalid_argument);
}

TEST(Arena, FreeSpaceIsUsedBeforeAnythingIsDisplaced) {
  Arena arena(10 * K, K);
  const auto rank = by({});
  for (std::uint32_t u = 0; u < 5; ++u) {
    const auto where = place(arena, u, 2 * K, u % 2 == 0, 1, rank, State::kCached);
    ASSERT_TRUE(where);
    EXPECT_TRUE(where->displaced.empty());
  }
  EXPECT_EQ(arena.used(), 10 * K);
  expect_consistent(arena);
  EXPECT_FALSE(arena.find(11 * K, true, 0, rank)) << "larger than the arena";
}

TEST(Arena, PinnedUnitsAreNeverDisplaced) {
  Arena arena(6 * K, K);
  const auto rank = by({});
  ASSERT_TRUE(place(arena, 0, 2 * K, true, 0, rank, State::kPinned));
  ASSERT_TRUE(place(arena, 1, 2 * K, true, 0, rank, State::kPinned));
  ASSERT_TRUE(place(arena, 2, 2 * K, true, 0, rank, State::kPinned));
  EXPECT_FALSE(arena.find(K, true, 0, rank)) << "every byte is held";
  arena.set_state(1, State::kCached);
  const auto where = arena.find(2 * K, true, 0, rank);
  ASSERT_TRUE(where);
  EXPECT_EQ(where->offset, 2 * K);
  EXPECT_EQ(where->displaced, std::vector<std::uint32_t>{1});
  EXPECT_FALSE(arena.find(3 * K, true, 0, rank)) << "3 contiguous granules cross a pinned unit";
}

TEST(Arena, PrefetchesDisplaceOnlyCachedUnitsNeededLater) {
  Arena arena(4 * K, K);
  // Unit 0 cached, needed at distance 5; unit 1 prefetched (not used yet), distance 1.
  auto rank = by({{0, 5}, {1, 1}});
  ASSERT_TRUE(place(arena, 0, 2 * K, true, 0, rank, State::kCached));
  ASSERT_TRUE(place(arena, 1, 2 * K, false, 1, rank, State::kPrefetched));
  // A prefetch of a unit needed at distance 3 may displace unit 0 (needed at 5) ...
  auto where = arena.find(2 * K, false, 3, rank);
  ASSERT_TRUE(where);
  EXPECT_EQ(where->displaced, std::vector<std::uint32_t>{0});
  // ... but not one needed at distance 6 (unit 0 comes back sooner), and never unit 1.
  EXPECT_FALSE(arena.find(2 * K, false, 6, rank));
  EXPECT_FALSE(arena.find(4 * K, false, 3, rank));
  // A demand displaces the prefetched unit too when it must.
  where = arena.find(4 * K, true, 0, rank);
  ASSERT_TRUE(where);
  EXPECT_EQ(where->displaced.size(), 2u);
}

TEST(Arena, DemandsDisplaceTheUnitsNeededLast) {
  Arena arena(6 * K, K);
  auto rank = by({{0, 1}, {1, 9}, {2, 4}});
  for (std::uint32_t u = 0; u < 3; ++u) {
    ASSERT_TRUE(place(arena, u, 2 * K, true, 0, rank, State::kCached));
  }
  // A demand displaces the unit needed last (unit 1, in the middle).
  auto where = arena.find(2 * K, true, 0, rank);
  ASSERT_TRUE(where);
  EXPECT_EQ(where->displaced, std::vector<std::uint32_t>{1});
  // One with more units to be held beside it is cut at an edge of the run (here the whole
  // arena): [0, 2K) displaces unit 0 (needed at 1), [4K, 6K) unit 2 (needed at 4): the
  // later-needed edge wins.
  where = arena.find(2 * K, true, 0, rank, 6 * K);
  ASSERT_TRUE(where);
  EXPECT_EQ(where->displaced, std::vector<std::uint32_t>{2});
  // A prefetch needed at distance 2 displaces unit 1 too (unit 0 comes back before it).
  where = arena.find(2 * K, false, 2, rank);
  ASSERT_TRUE(where);
  EXPECT_EQ(where->displaced, std::vector<std::uint32_t>{1});
}

TEST(Arena, UnitsHeldTogetherFitWhenTheirSizesAddUp) {
  // Whatever prefetched and cached units lie where, a chain of demands each pinned while the
  // next is placed fits as long as the chain's footprints sum to at most the capacity.
  std::mt19937_64 rng(7);
  for (int round = 0; round < 800; ++round) {
    const std::uint64_t granules = 4 + rng() % 60;
    Arena arena(granules * K, K);
    std::map<std::uint32_t, Arena::Distance> distance;
    std::uint32_t next = 0;
    // Random unpinned content.
    for (int i = 0; i < 30; ++i) {
      const auto size = (1 + rng() % 6) * K;
      const bool prefetched = rng() % 2 == 0;
      distance[next] = 1 + rng() % 100;
      if (place(arena, next, size, false, distance[next], by(distance),
                prefetched ? State::kPrefetched : State::kCached)) {
        ++next;
      }
    }
    expect_consistent(arena);
    // A chain of demands summing to at most the capacity, each asked for with what is still
    // to come beside it.
    std::uint64_t left = granules;
    while (left > 0) {
      const std::uint64_t size = 1 + rng() % left;
      const auto where =
          place(arena, next, size * K, true, 0, by(distance), State::kPinned, left * K);
      ASSERT_TRUE(where) << "round " << round << ": " << size << " granules with " << left << " of "
                         << granules << " left";
      left -= size;
      ++next;
      expect_consistent(arena);
    }
  }
}

TEST(Arena, CyclicLoopLargerThanTheArenaKeepsHitting) {
  // 10 units of 2 granules cycled through an arena of 12 granules (6 units' worth), ranked by
  // their distance in the cycle, one prefetch ahead: a fixed subset stays and hits every pass.
  constexpr std::uint32_t kUnits = 10;
  Arena arena(12 * K, K);
  std::uint32_t now = 0;
  const auto rank = [&](std::uint32_t unit) -> Arena::Distance {
    return (unit + kUnits - now) % kUnits;
  };
  int hits = 0;
  int misses = 0;
  for (int pass = 0; pass < 20; ++pass) {
    for (std::uint32_t u = 0; u < kUnits; ++u) {
      now = u;
      if (arena.contains(u)) {
        if (pass > 0) ++hits;
        arena.set_state(u, State::kPinned);
      } else {
        if (pass > 0) ++misses;
        ASSERT_TRUE(place(arena, u, 2 * K, true, 0, rank));
      }
      const auto ahead = (u + 1) % kUnits;
      if (!arena.contains(ahead)) {
        if (place(arena, ahead, 2 * K, false, 1, rank, State::kPinned)) {
          arena.set_state(ahead, State::kPrefetched);
        }
      }
      arena.set_state(u, State::kCached);
      expect_consistent(arena);
    }
  }
  // Everything is found in the arena: by demand-free prefetching and by keeping a fixed part.
  EXPECT_GT(hits, misses * 4) << hits << " hits, " << misses << " misses";
}

TEST(Arena, CyclicLoopWithoutPrefetchKeepsAFixedPart) {
  // Demands only: LRU would miss on every access of a loop larger than the cache. Displacing
  // the unit needed last keeps all but one of the arena's places hitting on every pass.
  constexpr std::uint32_t kUnits = 10;
  Arena arena(12 * K, K);
  std::uint32_t now = 0;
  const auto rank = [&](std::uint32_t unit) -> Arena::Distance {
    return (unit + kUnits - now) % kUnits;
  };
  int hits = 0;
  for (int pass = 0; pass < 20; ++pass) {
    for (std::uint32_t u = 0; u < kUnits; ++u) {
      now = u;
      if (arena.contains(u)) {
        if (pass > 0) ++hits;
      } else {
        ASSERT_TRUE(place(arena, u, 2 * K, true, 0, rank));
      }
      arena.set_state(u, State::kCached);
    }
  }
  EXPECT_GE(hits, 19 * 5) << "5 of the 6 places hit on every pass after the first";
}
