// Tests of RangeAllocator (ranges of one region: best fit, coalescing, alignment) against a
// model of the live allocations, and of RegionAllocator (the RAM tier's memory: ranges of one
// buffer) from several threads, with the bytes of every allocation checked for overlap.
#include <gtest/gtest.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstring>
#include <iterator>
#include <map>
#include <new>
#include <optional>
#include <random>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

#include "tensorstream/host_memory.hpp"
#include "tensorstream/range_allocator.hpp"

namespace ts = tensorstream;
using ts::RangeAllocator;

namespace {

constexpr std::uint64_t kUnit = ts::kSlotAlignment;

/// The free ranges implied by the live allocations `taken` (offset -> rounded size) of an
/// allocator of `capacity` bytes: maximal gaps, in offset order.
std::vector<std::pair<std::uint64_t, std::uint64_t>> gaps(
    const std::map<std::uint64_t, std::uint64_t>& taken, std::uint64_t capacity) {
  std::vector<std::pair<std::uint64_t, std::uint64_t>> out;
  std::uint64_t at = 0;
  for (const auto& [offset, size] : taken) {
    if (offset > at) out.emplace_back(at, offset - at);
    at = offset + size;
  }
  if (capacity > at) out.emplace_back(at, capacity - at);
  return out;
}

}  // namespace

TEST(RangeAllocator, RoundsToTheAlignment) {
  RangeAllocator ranges(10 * kUnit + 123);
  EXPECT_EQ(ranges.capacity(), 10 * kUnit);  // rounded down
  EXPECT_EQ(ranges.alignment(), kUnit);
  EXPECT_EQ(ranges.rounded(1), kUnit);
  EXPECT_EQ(ranges.rounded(kUnit), kUnit);
  EXPECT_EQ(ranges.rounded(kUnit + 1), 2 * kUnit);
  EXPECT_EQ(ranges.rounded(~std::uint64_t{0}) % kUnit, 0u);  // saturates, does not wrap
  EXPECT_GT(ranges.rounded(~std::uint64_t{0}), ranges.capacity());

  const auto a = ranges.allocate(1);
  const auto b = ranges.allocate(kUnit + 1);
  ASSERT_TRUE(a && b);
  EXPECT_EQ(*a, 0u);
  EXPECT_EQ(*b, kUnit);
  EXPECT_EQ(ranges.allocated_bytes(), 3 * kUnit);
  EXPECT_EQ(ranges.free_bytes(), 7 * kUnit);
  EXPECT_EQ(ranges.allocations(), 2u);
  EXPECT_EQ(ranges.largest_free_range(), 7 * kUnit);

  // Larger than what is free, or than the whole capacity: declined, nothing changes.
  EXPECT_FALSE(ranges.allocate(7 * kUnit + 1).has_value());
  EXPECT_FALSE(ranges.allocate(~std::uint64_t{0}).has_value());
  EXPECT_EQ(ranges.allocated_bytes(), 3 * kUnit);
  EXPECT_THROW((void)ranges.allocate(0), std::invalid_argument);

  RangeAllocator empty(kUnit - 1);  // rounds down to nothing
  EXPECT_EQ(empty.capacity(), 0u);
  EXPECT_EQ(empty.free_ranges(), 0u);
  EXPECT_FALSE(empty.allocate(1).has_value());
  EXPECT_THROW(RangeAllocator(100, 0), std::invalid_argument);

  RangeAllocator bytes(100, 1);  // alignment 1: exact sizes
  EXPECT_EQ(bytes.allocate(37), 0u);
  EXPECT_EQ(bytes.allocate(63), 37u);
  EXPECT_FALSE(bytes.allocate(1).has_value());
}

TEST(RangeAllocator, FreedNeighboursCoalesce) {
  RangeAllocator ranges(8 * kUnit);
  std::vector<std::uint64_t> at;
  for (int i = 0; i < 8; ++i) at.push_back(*ranges.allocate(kUnit));
  EXPECT_EQ(ranges.free_ranges(), 0u);
  EXPECT_FALSE(ranges.allocate(1).has_value());

  // Free every other unit: four holes of one unit, none touching.
  for (int i = 0; i < 8; i += 2) ranges.deallocate(at[i], kUnit);
  EXPECT_EQ(ranges.free_ranges(), 4u);
  EXPECT_EQ(ranges.free_bytes(), 4 * kUnit);
  EXPECT_EQ(ranges.largest_free_range(), kUnit);
  EXPECT_FALSE(ranges.allocate(2 * kUnit).has_value());  // free in bytes, not in one piece

  // Freeing unit 1 joins holes 0 and 2 (merge with both neighbours); unit 7 joins hole 6
  // (merge with the previous one only), unit 3 joins 0-2 and 4 (0-4 now).
  ranges.deallocate(at[1], kUnit);
  EXPECT_EQ(ranges.free_ranges(), 3u);
  EXPECT_EQ(ranges.largest_free_range(), 3 * kUnit);
  ranges.deallocate(at[7], kUnit);
  EXPECT_EQ(ranges.free_ranges(), 3u);
  ranges.deallocate(at[3], kUnit);
  EXPECT_EQ(ranges.free_ranges(), 2u);
  EXPECT_EQ(ranges.largest_free_range(), 5 * kUnit);
  EXPECT_EQ(ranges.allocate(5 * kUnit), 0u);
  ranges.deallocate(0, 5 * kUnit);
  ranges.deallocate(at[5], kUnit);  // joins both neighbours: one range again
  EXPECT_EQ(ranges.free_ranges(), 1u);
  EXPECT_EQ(ranges.largest_free_range(), 8 * kUnit);
  EXPECT_EQ(ranges.allocations(), 0u);
  EXPECT_EQ(ranges.allocate(8 * kUnit), 0u);
}

TEST(RangeAllocator, TakesTheBestFit) {
  RangeAllocator ranges(16 * kUnit);
  // Holes of 3, 1 and 2 units between taken units, then the free tail of 6.
  // Layout: [0-2 free][3 taken][4 free][5 taken][6-7 free][8 taken][9 taken][10-15 free]
  const auto hole3 = *ranges.allocate(3 * kUnit);
  (void)*ranges.allocate(kUnit);
  const auto hole1 = *ranges.allocate(kUnit);
  (void)*ranges.allocate(kUnit);
  const auto hole2 = *ranges.allocate(2 * kUnit);
  (void)*ranges.allocate(2 * kUnit);
  ranges.deallocate(hole3, 3 * kUnit);
  ranges.deallocate(hole1, kUnit);
  ranges.deallocate(hole2, 2 * kUnit);
  EXPECT_EQ(ranges.free_ranges(), 4u);

  EXPECT_EQ(ranges.allocate(kUnit), hole1);      // the one-unit hole, not the first one
  EXPECT_EQ(ranges.allocate(2 * kUnit), hole2);  // exact fit
  EXPECT_EQ(ranges.allocate(kUnit), hole3);      // smallest left that holds it: 3 units
  EXPECT_EQ(ranges.allocate(4 * kUnit), 10 * kUnit);
  EXPECT_EQ(ranges.allocate(2 * kUnit), hole3 + kUnit);  // the rest of the 3-unit hole
  EXPECT_EQ(ranges.largest_free_range(), 2 * kUnit);
}

TEST(RangeAllocator, RefusesWhatWasNotAllocated) {
  RangeAllocator ranges(4 * kUnit);
  const auto a = *ranges.allocate(kUnit);
  const auto b = *ranges.allocate(2 * kUnit);
  EXPECT_THROW(ranges.deallocate(a + kUnit / 2, kUnit), std::invalid_argument);  // inside a
  EXPECT_THROW(ranges.deallocate(3 * kUnit, kUnit), std::invalid_argument);      // free
  EXPECT_THROW(ranges.deallocate(b, kUnit), std::invalid_argument);              // wrong size
  EXPECT_EQ(ranges.allocated_bytes(), 3 * kUnit);                                // nothing changed
  ranges.deallocate(b, 2 * kUnit - 5);  // the same rounded size is accepted
  EXPECT_THROW(ranges.deallocate(b, 2 * kUnit), std::invalid_argument);  // double free
  ranges.deallocate(a, kUnit);
  EXPECT_EQ(ranges.free_ranges(), 1u);
  EXPECT_EQ(ranges.allocated_bytes(), 0u);
}

TEST(RangeAllocator, RandomisedSequencesMatchTheModel) {
  // Random allocate/deallocate sequences with sizes from one byte to a quarter of the
  // capacity, checked after every step against a model of the live allocations: no overlap,
  // inside the capacity, aligned, the byte counts, the free ranges are exactly the maximal
  // gaps (coalescing), allocate() succeeds exactly when some gap holds the request and then
  // takes the smallest such gap at its start (best fit).
  for (const std::uint64_t alignment : {std::uint64_t{1}, std::uint64_t{64}, kUnit}) {
    for (unsigned seed = 0; seed < 20; ++seed) {
      SCOPED_TRACE("alignment " + std::to_string(alignment) + " seed " + std::to_string(seed));
      std::mt19937_64 rng(seed);
      const std::uint64_t capacity = alignment * (64 + rng() % 192) + rng() % alignment;
      RangeAllocator ranges(capacity, alignment);
      const std::uint64_t usable = capacity / alignment * alignment;
      ASSERT_EQ(ranges.capacity(), usable);
      std::map<std::uint64_t, std::uint64_t> model;  // offset -> rounded size
      std::map<std::uint64_t, std::uint64_t> asked;  // offset -> requested size
      std::uint64_t taken = 0;
      int failures = 0;
      for (int step = 0; step < 3000; ++step) {
        const bool allocate = model.empty() || rng() % 100 < 55;
        if (allocate) {
          const std::uint64_t bytes = 1 + rng() % (usable / 4);
          const std::uint64_t size = (bytes + alignment - 1) / alignment * alignment;
          const auto holes = gaps(model, usable);
          std::optional<std::pair<std::uint64_t, std::uint64_t>> best;
          for (const auto& hole : holes) {
            if (hole.second >= size && (!best || hole.second < best->second)) best = hole;
          }
          const auto offset = ranges.allocate(bytes);
          ASSERT_EQ(offset.has_value(), best.has_value()) << "step " << step;
          if (!offset) {
            ++failures;
            continue;
          }
          ASSERT_EQ(*offset % alignment, 0u);
          ASSERT_LE(*offset + size, usable);
          // Best fit: the gap it went into is as small as the smallest that holds it.
          const auto gap = std::find_if(holes.begin(), holes.end(), [&](const auto& hole) {
            return hole.first <= *offset && *offset < hole.first + hole.second;
          });
          ASSERT_NE(gap, holes.end());
          ASSERT_EQ(gap->first, *offset);
          ASSERT_EQ(gap->second, best->second);
          // No overlap with the neighbours in the model.
          const auto next = model.lower_bound(*offset);
          if (next != model.end()) {
            ASSERT_LE(*offset + size, next->first);
          }
          if (next != model.begin()) {
            const auto prev = std::prev(next);
            ASSERT_LE(prev->first + prev->second, *offset);
          }
          model.emplace(*offset, size);
          asked.emplace(*offset, bytes);
          taken += size;
        } else {
          auto it = model.begin();
          std::advance(it, static_cast<long>(rng() % model.size()));
          ranges.deallocate(it->first, asked.at(it->first));
          taken -= it->second;
          asked.erase(it->first);
          model.erase(it);
        }
        ASSERT_EQ(ranges.allocated_bytes(), taken);
        ASSERT_LE(taken, usable);
        ASSERT_EQ(ranges.allocations(), model.size());
        const auto holes = gaps(model, usable);
        ASSERT_EQ(ranges.free_ranges(), holes.size()) << "free ranges not coalesced";
        std::uint64_t largest = 0;
        for (const auto& hole : holes) largest = std::max(largest, hole.second);
        ASSERT_EQ(ranges.largest_free_range(), largest);
      }
      EXPECT_GT(failures, 0) << "the sequence never filled the allocator";
      for (const auto& [offset, size] : asked) ranges.deallocate(offset, size);
      EXPECT_EQ(ranges.free_ranges(), 1u);
      EXPECT_EQ(ranges.largest_free_range(), usable);
      EXPECT_EQ(ranges.allocated_bytes(), 0u);
    }
  }
}

TEST(RegionAllocator, HandsOutAlignedRangesOfItsRegion) {
  ts::AlignedBuffer region(8 * kUnit + 100);
  const std::byte* base = region.data();
  ts::RegionAllocator allocator(std::move(region));
  EXPECT_EQ(allocator.capacity(), 8 * kUnit);
  EXPECT_EQ(allocator.granularity(), kUnit);
  EXPECT_EQ(allocator.name(), "region");
  EXPECT_EQ(allocator.base(), base);

  std::vector<std::pair<void*, std::size_t>> live;
  for (const std::size_t size : {std::size_t{1}, kUnit, 3 * kUnit - 7}) {
    void* p = allocator.allocate(size);
    const auto* b = static_cast<const std::byte*>(p);
    EXPECT_GE(b, base);
    EXPECT_LE(b + size, base + 8 * kUnit);
    EXPECT_EQ(reinterpret_cast<std::uintptr_t>(p) % kUnit, 0u);
    std::memset(p, 0x5a, size);
    live.emplace_back(p, size);
  }
  EXPECT_EQ(allocator.allocated_bytes(), 5 * kUnit);
  EXPECT_EQ(allocator.largest_free_range(), 3 * kUnit);
  EXPECT_EQ(allocator.try_allocate(4 * kUnit), nullptr);
  EXPECT_THROW((void)allocator.allocate(4 * kUnit), std::bad_alloc);
  EXPECT_THROW((void)allocator.allocate(0), std::bad_alloc);

  // A pointer it did not hand out is reported and ignored, never freed.
  int outside = 0;
  allocator.deallocate(&outside, sizeof outside);
  allocator.deallocate(static_cast<std::byte*>(live[1].first) + 8, kUnit);
  EXPECT_EQ(allocator.allocated_bytes(), 5 * kUnit);

  for (const auto& [p, size] : live) allocator.deallocate(p, size);
  EXPECT_EQ(allocator.allocated_bytes(), 0u);
  EXPECT_EQ(allocator.largest_free_range(), 8 * kUnit);
  EXPECT_EQ(allocator.allocate(8 * kUnit), base);
  EXPECT_THROW(ts::RegionAllocator(ts::AlignedBuffer(kUnit), 100), std::invalid_argument);
}

TEST(RegionAllocator, ConcurrentAllocationsNeverOverlap) {
  // 4 threads allocate, fill with their own pattern, check and free random sizes from one
  // region. Overlapping allocations would corrupt another thread's pattern; the region's
  // byte count must never exceed its capacity; at the end everything is one free range.
  constexpr std::size_t kCapacity = 64 * kUnit;
  ts::RegionAllocator allocator{ts::AlignedBuffer(kCapacity)};
  std::atomic<int> corrupt{0};
  std::atomic<int> over{0};
  std::atomic<int> placed{0};
  std::atomic<int> refused{0};
  std::vector<std::thread> threads;
  for (int t = 0; t < 4; ++t) {
    threads.emplace_back([&, t] {
      std::mt19937_64 rng(77 + t);
      struct Live {
        std::byte* data;
        std::size_t size;
        std::byte value;
      };
      std::vector<Live> live;
      const auto intact = [](const Live& l) {
        for (std::size_t i = 0; i < l.size; i += 509) {
          if (l.data[i] != l.value) return false;
        }
        return l.data[l.size - 1] == l.value;
      };
      for (int op = 0; op < 4000; ++op) {
        if (live.empty() || rng() % 2 == 0) {
          const std::size_t size = 1 + rng() % (6 * kUnit);
          auto* p = static_cast<std::byte*>(allocator.try_allocate(size));
          if (p == nullptr) {
            ++refused;
          } else {
            ++placed;
            const auto value = static_cast<std::byte>(rng() % 255 + 1);
            std::memset(p, static_cast<int>(value), size);
            live.push_back({p, size, value});
          }
        } else {
          const std::size_t i = rng() % live.size();
          if (!intact(live[i])) ++corrupt;
          allocator.deallocate(live[i].data, live[i].size);
          live[i] = live.back();
          live.pop_back();
        }
        if (allocator.allocated_bytes() > kCapacity) ++over;
      }
      for (const auto& l : live) {
        if (!intact(l)) ++corrupt;
        allocator.deallocate(l.data, l.size);
      }
    });
  }
  for (auto& thread : threads) thread.join();
  EXPECT_EQ(corrupt.load(), 0);
  EXPECT_EQ(over.load(), 0);
  EXPECT_GT(placed.load(), 1000);
  EXPECT_GT(refused.load(), 0);
  EXPECT_EQ(allocator.allocated_bytes(), 0u);
  EXPECT_EQ(allocator.largest_free_range(), kCapacity);
}
