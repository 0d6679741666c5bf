// Tests of the RAM-tier block cache: exact stats per policy on small traces, pinning, publish
// visibility, the cyclic pattern, budget invariants with a counting allocator, and a
// randomised multi-threaded run.
#include <gtest/gtest.h>

#include <atomic>
#include <chrono>
#include <cstdio>
#include <cstring>
#include <map>
#include <mutex>
#include <new>
#include <random>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

#include "tensorstream/alignment.hpp"
#include "tensorstream/cache/block_cache.hpp"
#include "tensorstream/host_memory.hpp"
#include "test_helpers.hpp"

namespace tsc = tensorstream::cache;
using tsc::BlockCache;
using tsc::BlockKey;
using tsc::Policy;

namespace {

using namespace std::chrono_literals;

/// Allocator that counts outstanding bytes, remembers the peak, checks that every
/// deallocation matches an allocation, and can be told to fail.
class CountingAllocator final : public tsc::HostAllocator {
 public:
  explicit CountingAllocator(std::uint64_t limit) : limit_(limit) {}

  void* allocate(std::size_t bytes) override {
    if (fail_next_.exchange(false)) throw std::bad_alloc();
    void* pointer = ::operator new(bytes);
    const auto now = outstanding_.fetch_add(bytes) + bytes;
    if (now > limit_) over_limit_ = true;
    auto peak = peak_.load();
    while (now > peak && !peak_.compare_exchange_weak(peak, now)) {
    }
    ++allocations_;
    const std::lock_guard lock(mutex_);
    sizes_.emplace(pointer, bytes);
    return pointer;
  }

  void deallocate(void* pointer, std::size_t bytes) noexcept override {
    {
      const std::lock_guard lock(mutex_);
      const auto it = sizes_.find(pointer);
      if (it == sizes_.end() || it->second != bytes) {
        mismatched_ = true;
      } else {
        sizes_.erase(it);
      }
    }
    outstanding_ -= bytes;
    ::operator delete(pointer);
  }

  std::string_view name() const noexcept override { return "counting"; }

  void fail_next() { fail_next_ = true; }
  std::uint64_t outstanding() const { return outstanding_; }
  std::uint64_t peak() const { return peak_; }
  std::uint64_t allocations() const { return allocations_; }
  bool over_limit() const { return over_limit_; }
  bool mismatched() const { return mismatched_; }

 private:
  const std::uint64_t limit_;
  std::atomic<std::uint64_t> outstanding_{0};
  std::atomic<std::uint64_t> peak_{0};
  std::atomic<std::uint64_t> allocations_{0};
  std::atomic<bool> over_limit_{false};
  std::atomic<bool> mismatched_{false};
  std::atomic<bool> fail_next_{false};
  std::mutex mutex_;
  std::map<void*, std::size_t> sizes_;
};

/// The bytes a filler writes for `key`: a window of a fixed random table chosen by the key.
constexpr std::size_t kMaxBlock = std::size_t{64} * 1024;
const std::byte* pattern(BlockKey key) {
  static const auto table = tensorstream::testing::random_bytes(kMaxBlock + 65536, 7);
  return table.data() + tsc::BlockKeyHash{}(key) % 65536;
}
void fill(tsc::BlockHandle& handle) {
  ASSERT_LE(handle.size(), kMaxBlock);
  std::memcpy(handle.mutable_data(), pattern(handle.key()), handle.size());
}
bool intact(const tsc::BlockHandle& handle) {
  return std::memcmp(handle.data(), pattern(handle.key()), handle.size()) == 0;
}

/// Budget invariants that hold whenever no operation is in flight.
void expect_in_budget(const BlockCache& cache, const CountingAllocator& allocator) {
  const auto stats = cache.stats();
  EXPECT_LE(stats.bytes_in_use, stats.capacity);
  EXPECT_LE(stats.peak_bytes_in_use, stats.capacity);
  EXPECT_EQ(allocator.outstanding(), stats.bytes_in_use);
  EXPECT_FALSE(allocator.over_limit());
  EXPECT_FALSE(allocator.mismatched());
}

/// One use of `key` as the engine makes it: look up; on a miss insert, fill and publish (or
/// stream it uncached if not admitted). Returns whether it hit.
bool use(BlockCache& cache, const CountingAllocator& allocator, BlockKey key, std::size_t size) {
  bool hit = false;
  if (auto handle = cache.lookup(key)) {
    hit = true;
    EXPECT_TRUE(handle->ready());
    EXPECT_TRUE(intact(*handle)) << key;
  } else if (auto filler = cache.insert(key, size)) {
    EXPECT_FALSE(filler->ready());
    fill(*filler);
    filler->publish();
  }
  expect_in_budget(cache, allocator);
  return hit;
}

struct Fixture {
  Fixture(std::uint64_t capacity, Policy policy)
      : allocator(std::make_shared<CountingAllocator>(capacity)),
        cache(std::make_unique<BlockCache>(capacity, policy, allocator)) {}
  ~Fixture() {
    cache.reset();
    EXPECT_EQ(allocator->outstanding(), 0u) << "memory not returned";
    EXPECT_FALSE(allocator->mismatched());
  }
  bool use(std::uint32_t block, std::size_t size = 100) {
    return ::use(*cache, *allocator, BlockKey{0, block}, size);
  }
  std::shared_ptr<CountingAllocator> allocator;
  std::unique_ptr<BlockCache> cache;
};

BlockKey key(std::uint32_t block) { return BlockKey{0, block}; }

// Trace A B C A D B E A on three 100-byte slots, per policy.
enum : std::uint32_t { A = 1, B, C, D, E };
const std::vector<std::uint32_t> kTrace{A, B, C, A, D, B, E, A};

tsc::Stats run_trace(Fixture& setup) {
  for (const auto block : kTrace) setup.use(block);
  return setup.cache->stats();
}

}  // namespace

TEST(BlockCache, PolicyNamesRoundTrip) {
  for (const auto policy : {Policy::kLru, Policy::kLfu, Policy::kFifo, Policy::kAuto}) {
    EXPECT_EQ(tsc::policy_from_name(tsc::policy_name(policy)), policy);
    EXPECT_EQ(tsc::parse_policy(tsc::policy_name(policy)), policy);
  }
  EXPECT_EQ(tsc::policy_name(Policy::kAuto), "auto");
  EXPECT_EQ(tsc::policy_name(Policy::kLru), "lru");
  EXPECT_FALSE(tsc::policy_from_name("LRU").has_value());
  EXPECT_FALSE(tsc::policy_from_name("").has_value());
  try {
    (void)tsc::parse_policy("mru");
    FAIL() << "expected std::invalid_argument";
  } catch (const std::invalid_argument& e) {
    EXPECT_NE(std::string(e.what()).find("'mru'"), std::string::npos) << e.what();
    EXPECT_NE(std::string(e.what()).find("lru, lfu, fifo, auto"), std::string::npos) << e.what();
  }
}

TEST(BlockCache, LruTraceExactStats) {
  // A B C | A hit | D evicts B | B evicts C | E evicts A | A evicts D -> {B, E, A}
  Fixture setup(300, Policy::kLru);
  const auto stats = run_trace(setup);
  EXPECT_EQ(stats.hits, 1u);
  EXPECT_EQ(stats.misses, 7u);
  EXPECT_EQ(stats.insertions, 7u);
  EXPECT_EQ(stats.evictions, 4u);
  EXPECT_EQ(stats.rejections, 0u);
  EXPECT_EQ(stats.entries, 3u);
  EXPECT_EQ(stats.bytes_in_use, 300u);
  EXPECT_EQ(stats.peak_bytes_in_use, 300u);
  EXPECT_EQ(stats.pinned_entries, 0u);
  EXPECT_TRUE(setup.cache->contains(key(B)));
  EXPECT_TRUE(setup.cache->contains(key(E)));
  EXPECT_TRUE(setup.cache->contains(key(A)));
}

TEST(BlockCache, FifoTraceExactStats) {
  // A B C | A hit (order unchanged) | D evicts A | B hit | E evicts B | A evicts C -> {D, E, A}
  Fixture setup(300, Policy::kFifo);
  const auto stats = run_trace(setup);
  EXPECT_EQ(stats.hits, 2u);
  EXPECT_EQ(stats.misses, 6u);
  EXPECT_EQ(stats.insertions, 6u);
  EXPECT_EQ(stats.evictions, 3u);
  EXPECT_EQ(stats.rejections, 0u);
  EXPECT_TRUE(setup.cache->contains(key(D)));
  EXPECT_TRUE(setup.cache->contains(key(E)));
  EXPECT_TRUE(setup.cache->contains(key(A)));
}

TEST(BlockCache, LfuTraceExactStats) {
  // A B C | A hit (A:2) | D evicts B (1, older than C) | B evicts C | E evicts D | A hit
  Fixture setup(300, Policy::kLfu);
  const auto stats = run_trace(setup);
  EXPECT_EQ(stats.hits, 2u);
  EXPECT_EQ(stats.misses, 6u);
  EXPECT_EQ(stats.insertions, 6u);
  EXPECT_EQ(stats.evictions, 3u);
  EXPECT_TRUE(setup.cache->contains(key(A)));
  EXPECT_TRUE(setup.cache->contains(key(B)));
  EXPECT_TRUE(setup.cache->contains(key(E)));
}

TEST(BlockCache, AutoTraceExactStats) {
  // Byte clock at each lookup start: A0 B100 C200 A300 D400 B500 E600 A700 (100-byte blocks).
  // A hit (interval 300). D: never reused, nobody dead (B and C age <= 300) -> declined.
  // B hit (interval 400). E: C is dead (never reused, age 400 > capacity 300) -> E takes its
  // room. A hit. Resident {A, B, E}.
  Fixture setup(300, Policy::kAuto);
  const auto stats = run_trace(setup);
  EXPECT_EQ(stats.hits, 3u);
  EXPECT_EQ(stats.misses, 5u);
  EXPECT_EQ(stats.insertions, 4u);
  EXPECT_EQ(stats.rejections, 1u);
  EXPECT_EQ(stats.evictions, 1u);
  EXPECT_TRUE(setup.cache->contains(key(A)));
  EXPECT_TRUE(setup.cache->contains(key(B)));
  EXPECT_TRUE(setup.cache->contains(key(E)));
  EXPECT_FALSE(setup.cache->contains(key(D)));
}

TEST(BlockCache, EntriesArePinned) {
  for (const auto policy : {Policy::kLru, Policy::kLfu, Policy::kFifo, Policy::kAuto}) {
    SCOPED_TRACE(tsc::policy_name(policy));
    Fixture setup(300, policy);
    auto& cache = *setup.cache;
    std::vector<tsc::BlockHandle> held;
    for (const auto block : {A, B, C}) {
      auto filler = cache.insert(key(block), 100);
      ASSERT_TRUE(filler.has_value());
      fill(*filler);
      filler->publish();
      held.push_back(std::move(*filler));
    }
    // Everything that could make room is pinned: declined at once, nothing evicted.
    EXPECT_FALSE(cache.insert(key(D), 100).has_value());
    auto stats = cache.stats();
    EXPECT_EQ(stats.rejections, 1u);
    EXPECT_EQ(stats.evictions, 0u);
    EXPECT_EQ(stats.pinned_entries, 3u);
    EXPECT_EQ(stats.entries, 3u);
    expect_in_budget(cache, *setup.allocator);

    // A reader's pin counts the same: unpin A's filler, pin A by lookup.
    held[0] = std::move(*cache.lookup(key(A)));
    EXPECT_FALSE(cache.insert(key(D), 100).has_value());
    for (auto& handle : held) EXPECT_TRUE(intact(handle));

    // Unpinning B (least recently used, oldest, least frequent) makes it the only victim.
    held[1].reset();
    EXPECT_EQ(cache.stats().pinned_entries, 2u);
    if (policy == Policy::kAuto) {
      // kAuto admits a never-reused block only into dead room: B (inserted at byte clock 0,
      // never looked up) dies once more than `capacity` bytes have been looked up since.
      for (int i = 0; i < 3; ++i) (void)cache.lookup(key(C));  // clock 100 (A) -> 400
      EXPECT_FALSE(cache.lookup(key(D)).has_value());          // the engine's miss: 500
    }
    auto filler = cache.insert(key(D), 100);
    ASSERT_TRUE(filler.has_value());
    EXPECT_FALSE(cache.contains(key(B)));
    EXPECT_TRUE(cache.contains(key(A)));
    EXPECT_TRUE(cache.contains(key(C)));
    stats = cache.stats();
    EXPECT_EQ(stats.evictions, 1u);
    EXPECT_EQ(stats.bytes_in_use, 300u);
    expect_in_budget(cache, *setup.allocator);

    // Larger than the whole capacity: declined without touching anything.
    EXPECT_FALSE(cache.insert(key(E), 301).has_value());
    EXPECT_THROW((void)cache.insert(key(E), 0), std::invalid_argument);
  }
}

TEST(BlockCache, PublishVisibility) {
  Fixture setup(1000, Policy::kLru);
  auto& cache = *setup.cache;
  auto filler = cache.insert(key(A), 100);
  ASSERT_TRUE(filler.has_value());
  EXPECT_FALSE(filler->ready());
  EXPECT_EQ(filler->size(), 100u);
  EXPECT_EQ(filler->key(), key(A));

  // Being filled: a miss for readers, a conflict for a second filler.
  EXPECT_FALSE(cache.lookup(key(A)).has_value());
  EXPECT_FALSE(cache.contains(key(A)));
  EXPECT_FALSE(cache.insert(key(A), 100).has_value());
  auto stats = cache.stats();
  EXPECT_EQ(stats.entries, 1u);
  EXPECT_EQ(stats.misses, 1u);
  EXPECT_EQ(stats.conflicts, 1u);
  EXPECT_EQ(stats.rejections, 0u);
  expect_in_budget(cache, *setup.allocator);

  fill(*filler);
  filler->publish();
  EXPECT_TRUE(filler->ready());
  EXPECT_THROW((void)filler->mutable_data(), std::logic_error);
  EXPECT_THROW(filler->publish(), std::logic_error);
  EXPECT_TRUE(cache.contains(key(A)));
  {
    auto reader = cache.lookup(key(A));
    ASSERT_TRUE(reader.has_value());
    EXPECT_TRUE(reader->ready());
    EXPECT_TRUE(intact(*reader));
    EXPECT_EQ(reader->data(), filler->data());
    EXPECT_THROW((void)reader->mutable_bytes(), std::logic_error);
    EXPECT_THROW(reader->publish(), std::logic_error);
    EXPECT_EQ(cache.stats().pinned_entries, 1u);  // one entry, two handles
  }

  // An abandoned fill (handle dropped before publish) disappears with its memory.
  {
    auto partial = cache.insert(key(B), 200);
    ASSERT_TRUE(partial.has_value());
    std::memset(partial->mutable_data(), 0, 50);
    EXPECT_EQ(cache.stats().bytes_in_use, 300u);
  }
  stats = cache.stats();
  EXPECT_EQ(stats.abandoned, 1u);
  EXPECT_EQ(stats.entries, 1u);
  EXPECT_EQ(stats.bytes_in_use, 100u);
  EXPECT_FALSE(cache.lookup(key(B)).has_value());
  expect_in_budget(cache, *setup.allocator);

  // Empty handles.
  tsc::BlockHandle empty;
  EXPECT_FALSE(empty.valid());
  EXPECT_FALSE(empty.ready());
  EXPECT_THROW(empty.publish(), std::logic_error);
  tsc::BlockHandle moved = std::move(*filler);
  EXPECT_FALSE(filler->valid());
  EXPECT_TRUE(moved.ready());
}

TEST(BlockCache, LookupWaitsForFill) {
  Fixture setup(1000, Policy::kAuto);
  auto& cache = *setup.cache;

  // Published while a reader waits: the reader gets the bytes.
  auto filler = cache.insert(key(A), 100);
  ASSERT_TRUE(filler.has_value());
  bool got = false;
  std::thread waiter([&] {
    auto handle = cache.lookup(key(A), 10s);
    got = handle.has_value() && intact(*handle);
  });
  std::this_thread::sleep_for(20ms);
  fill(*filler);
  filler->publish();
  waiter.join();
  EXPECT_TRUE(got);

  // Never published: the wait is bounded.
  auto stuck = cache.insert(key(C), 100);
  ASSERT_TRUE(stuck.has_value());
  auto start = std::chrono::steady_clock::now();
  EXPECT_FALSE(cache.lookup(key(C), 30ms).has_value());
  EXPECT_GE(std::chrono::steady_clock::now() - start, 30ms);

  // An absent key does not wait at all.
  start = std::chrono::steady_clock::now();
  EXPECT_FALSE(cache.lookup(key(D), 10s).has_value());
  EXPECT_LT(std::chrono::steady_clock::now() - start, 5s);

  // Abandoning the fill, or erasing it, wakes the waiters with a miss.
  for (const bool abandon : {true, false}) {
    if (!stuck) stuck = cache.insert(key(C), 100);
    ASSERT_TRUE(stuck.has_value());
    std::chrono::steady_clock::duration waited{};
    bool hit = true;
    std::thread blocked([&] {
      const auto begin = std::chrono::steady_clock::now();
      hit = cache.lookup(key(C), 10s).has_value();
      waited = std::chrono::steady_clock::now() - begin;
    });
    std::this_thread::sleep_for(20ms);
    if (abandon) {
      stuck.reset();
    } else {
      EXPECT_TRUE(cache.erase(key(C)));
      fill(*stuck);
      stuck->publish();  // erased meanwhile: no visible effect
      EXPECT_FALSE(cache.contains(key(C)));
      stuck.reset();
    }
    blocked.join();
    EXPECT_FALSE(hit);
    EXPECT_LT(waited, 5s);
  }
  const auto stats = cache.stats();
  EXPECT_EQ(stats.hits, 1u);
  EXPECT_EQ(stats.misses, 4u);
  EXPECT_EQ(stats.abandoned, 1u);
  expect_in_budget(cache, *setup.allocator);
}

TEST(BlockCache, ErasePinnedDefersFree) {
  Fixture setup(1000, Policy::kLru);
  auto& cache = *setup.cache;
  auto& allocator = *setup.allocator;
  {
    auto filler = cache.insert(key(A), 100);
    fill(*filler);
    filler->publish();
  }
  auto reader = cache.lookup(key(A));
  ASSERT_TRUE(reader.has_value());
  EXPECT_TRUE(cache.erase(key(A)));
  EXPECT_FALSE(cache.erase(key(A)));
  EXPECT_FALSE(cache.contains(key(A)));
  EXPECT_FALSE(cache.lookup(key(A)).has_value());
  auto stats = cache.stats();
  EXPECT_EQ(stats.entries, 0u);
  EXPECT_EQ(stats.pinned_entries, 1u);
  EXPECT_EQ(stats.bytes_in_use, 100u);  // still charged: the reader uses it
  EXPECT_EQ(allocator.outstanding(), 100u);
  EXPECT_TRUE(intact(*reader));

  // The key may be cached again while the old bytes are still pinned; both are charged.
  auto again = cache.insert(key(A), 200);
  ASSERT_TRUE(again.has_value());
  EXPECT_EQ(cache.stats().bytes_in_use, 300u);
  reader.reset();
  EXPECT_EQ(cache.stats().bytes_in_use, 200u);
  EXPECT_EQ(allocator.outstanding(), 200u);

  // clear() with pinned entries: unpinned ones go now, pinned ones at their last release.
  fill(*again);
  again->publish();
  for (const auto block : {B, C}) {
    auto filler = cache.insert(key(block), 100);
    fill(*filler);
    filler->publish();
  }
  EXPECT_EQ(cache.stats().bytes_in_use, 400u);
  cache.clear();
  stats = cache.stats();
  EXPECT_EQ(stats.entries, 0u);
  EXPECT_EQ(stats.bytes_in_use, 200u);
  EXPECT_EQ(allocator.outstanding(), 200u);
  EXPECT_TRUE(intact(*again));
  again.reset();
  EXPECT_EQ(cache.stats().bytes_in_use, 0u);
  EXPECT_EQ(cache.stats().pinned_entries, 0u);
  expect_in_budget(cache, allocator);
}

TEST(BlockCache, HandlesOutliveTheCache) {
  auto allocator = std::make_shared<CountingAllocator>(1000);
  std::optional<tsc::BlockHandle> published;
  std::optional<tsc::BlockHandle> unpublished;
  {
    BlockCache cache(1000, Policy::kAuto, allocator);
    for (const auto block : {A, B}) {
      auto filler = cache.insert(key(block), 100);
      fill(*filler);
      filler->publish();
      if (block == A) published = std::move(filler);
    }
    unpublished = cache.insert(key(C), 100);
    ASSERT_TRUE(unpublished.has_value());
  }
  EXPECT_EQ(allocator->outstanding(), 200u);  // B freed with the cache; A and C pinned
  EXPECT_TRUE(intact(*published));
  published.reset();
  EXPECT_EQ(allocator->outstanding(), 100u);
  fill(*unpublished);
  unpublished->publish();
  unpublished.reset();
  EXPECT_EQ(allocator->outstanding(), 0u);
  EXPECT_FALSE(allocator->mismatched());
}

TEST(BlockCache, AllocatorFailureLeavesConsistentState) {
  Fixture setup(300, Policy::kLru);
  auto& cache = *setup.cache;
  for (const auto block : {A, B, C}) setup.use(block);
  setup.allocator->fail_next();
  EXPECT_THROW((void)cache.insert(key(D), 100), std::bad_alloc);
  auto stats = cache.stats();
  EXPECT_EQ(stats.entries, 2u);  // A was evicted for D before the allocation failed
  EXPECT_EQ(stats.evictions, 1u);
  EXPECT_EQ(stats.insertions, 3u);
  EXPECT_EQ(stats.pinned_entries, 0u);
  EXPECT_EQ(stats.bytes_in_use, 200u);
  EXPECT_FALSE(cache.contains(key(D)));
  expect_in_budget(cache, *setup.allocator);
  EXPECT_FALSE(setup.use(D));
  EXPECT_TRUE(setup.use(D));
}

TEST(BlockCache, DefaultAllocatorIsPageAligned) {
  tsc::PageAlignedAllocator allocator;
  const std::size_t page = tsc::PageAlignedAllocator::alignment();
  EXPECT_GE(page, 4096u);
  for (const std::size_t size : {std::size_t{1}, page, page + 1, 3 * page}) {
    void* pointer = allocator.allocate(size);
    EXPECT_EQ(reinterpret_cast<std::uintptr_t>(pointer) % page, 0u);
    std::memset(pointer, 0xab, size);
    allocator.deallocate(pointer, size);
  }
  EXPECT_EQ(tsc::default_host_allocator()->name(), "page-aligned");

  BlockCache cache(1 << 20, Policy::kAuto);  // null allocator: the default one
  auto filler = cache.insert(key(A), 5000);
  ASSERT_TRUE(filler.has_value());
  EXPECT_EQ(reinterpret_cast<std::uintptr_t>(filler->data()) % page, 0u);
  fill(*filler);
  filler->publish();
  filler.reset();
  auto reader = cache.lookup(key(A));
  ASSERT_TRUE(reader.has_value());
  EXPECT_TRUE(intact(*reader));
}

namespace {

/// Hits per cycle of `cycles` passes over blocks [first, first + loop), each `size` bytes.
std::vector<int> run_loop(Fixture& setup, std::uint32_t first, std::uint32_t loop, int cycles,
                          std::size_t size) {
  std::vector<int> hits;
  for (int cycle = 0; cycle < cycles; ++cycle) {
    int count = 0;
    for (std::uint32_t block = first; block < first + loop; ++block) {
      count += setup.use(block, size) ? 1 : 0;
    }
    hits.push_back(count);
  }
  return hits;
}

int sum(const std::vector<int>& values, std::size_t from = 0) {
  int total = 0;
  for (std::size_t i = from; i < values.size(); ++i) total += values[i];
  return total;
}

constexpr std::size_t kBlock = 1024;

}  // namespace

TEST(BlockCache, CyclicLoopLongerThanTheCache) {
  // A loop of 10 equal blocks, capacity 4 blocks, 50 cycles = 500 accesses. Measured:
  //   lru  0 hits (0.0)      fifo 0 hits (0.0)      lfu 0 hits (0.0)
  //   auto 192 hits (0.384 overall), 4 per cycle from cycle 3 on (0.40 after warm-up).
  // kAuto: cycle 1 admits 0-3 into free room, then 5-8 into the room of 0-3 (never reused
  // and older than the capacity: dead); cycle 2 re-admits 0-3 (now reused, their rivals
  // never) and declines 4-9 (interval 10 blocks > capacity, residents alive); from then on
  // 0-3 stay resident and hit every cycle.
  constexpr std::uint32_t kLoop = 10;
  constexpr int kCycles = 50;
  const std::map<Policy, int> expected_hits{
      {Policy::kLru, 0}, {Policy::kFifo, 0}, {Policy::kLfu, 0}, {Policy::kAuto, 192}};
  for (const auto& [policy, expected] : expected_hits) {
    SCOPED_TRACE(tsc::policy_name(policy));
    Fixture setup(4 * kBlock, policy);
    const auto hits = run_loop(setup, 0, kLoop, kCycles, kBlock);
    const auto stats = setup.cache->stats();
    EXPECT_EQ(sum(hits), expected);
    EXPECT_EQ(stats.hits, static_cast<std::uint64_t>(expected));
    EXPECT_EQ(stats.hits + stats.misses, kLoop * kCycles);
    if (policy == Policy::kAuto) {
      const double after_warmup = sum(hits, 2) / double(kLoop * (kCycles - 2));
      EXPECT_DOUBLE_EQ(after_warmup, 0.4);
      EXPECT_GE(stats.hit_rate(), 0.35);
      EXPECT_EQ(hits.back(), 4);
      // Scan resistance: once the subset is fixed, nothing churns.
      EXPECT_EQ(stats.evictions, 8u);
    } else {
      EXPECT_EQ(sum(hits, 1), 0);  // after warm-up: 0%, the textbook LRU failure
    }
  }
}

TEST(BlockCache, AutoMatchesLruWhenTheWorkingSetFits) {
  // Each trace touches at most `capacity` bytes in total; kAuto must then be LRU exactly.
  struct Trace {
    const char* name;
    std::vector<std::size_t> sizes;  // of blocks 0..n-1
    bool cyclic;
  };
  const std::vector<Trace> traces{
      {"loop of 4 in 4", {kBlock, kBlock, kBlock, kBlock}, true},
      {"loop of 3 in 4", {kBlock, kBlock, kBlock}, true},
      {"random over 4 in 4", {kBlock, kBlock, kBlock, kBlock}, false},
      {"random over mixed sizes", {512, 1536, 1024, 1024}, false},
  };
  for (const auto& trace : traces) {
    SCOPED_TRACE(trace.name);
    std::map<Policy, tsc::Stats> results;
    for (const auto policy : {Policy::kLru, Policy::kAuto}) {
      Fixture setup(4 * kBlock, policy);
      std::mt19937 rng(11);
      for (int i = 0; i < 2000; ++i) {
        const auto n = static_cast<std::uint32_t>(trace.sizes.size());
        const std::uint32_t block = trace.cyclic ? i % n : rng() % n;
        setup.use(block, trace.sizes[block]);
      }
      results[policy] = setup.cache->stats();
    }
    const auto& lru = results[Policy::kLru];
    const auto& aut = results[Policy::kAuto];
    EXPECT_EQ(aut.hits, lru.hits);
    EXPECT_EQ(aut.misses, lru.misses);
    EXPECT_EQ(aut.insertions, lru.insertions);
    EXPECT_EQ(aut.evictions, lru.evictions);
    EXPECT_EQ(aut.rejections, 0u);
    EXPECT_EQ(lru.misses, trace.sizes.size());  // compulsory misses only
  }
}

TEST(BlockCache, AutoAdaptsToAPhaseChange) {
  // Phase 1: loop of 10 blocks in a 4-block cache (kAuto keeps 0-3 resident).
  // Phase 2a: a new working set of 3 blocks that fits. LRU hits from access 3 on; kAuto
  //   declines the first pass (never reused, residents alive), admits the second (interval
  //   3 blocks <= capacity, evicting the least recently used old residents) and hits from
  //   access 6 on.
  for (const auto policy : {Policy::kLru, Policy::kAuto}) {
    SCOPED_TRACE(tsc::policy_name(policy));
    Fixture setup(4 * kBlock, policy);
    (void)run_loop(setup, 0, 10, 10, kBlock);
    std::vector<bool> hits;
    hits.reserve(60);
    for (int i = 0; i < 60; ++i) hits.push_back(setup.use(100 + i % 3, kBlock));
    std::size_t settled = hits.size();
    while (settled > 0 && hits[settled - 1]) --settled;
    EXPECT_EQ(settled, policy == Policy::kLru ? 3u : 6u);
  }

  // Phase 2b: a new loop of 8 blocks, also longer than the cache. The old residents
  // (interval 10 blocks) die after 20 blocks of silence; the new blocks (interval 8 > 4)
  // take the room of the dead only, and a new fixed subset forms: from the third pass on,
  // 4 of 8 hit per pass (LRU: none).
  for (const auto policy : {Policy::kLru, Policy::kAuto}) {
    SCOPED_TRACE(tsc::policy_name(policy));
    Fixture setup(4 * kBlock, policy);
    (void)run_loop(setup, 0, 10, 10, kBlock);
    const auto hits = run_loop(setup, 100, 8, 10, kBlock);
    for (std::size_t pass = 2; pass < hits.size(); ++pass) {
      EXPECT_EQ(hits[pass], policy == Policy::kLru ? 0 : 4) << "pass " << pass;
    }
  }
}

TEST(BlockCache, ConcurrentRandomOperations) {
  // 4 threads x kOps random lookups (some waiting), inserts (filled, published or
  // abandoned), erases, clears and held handles, on a cache that holds about 6 blocks.
  // Checked: budget (stats and the allocator's outstanding bytes) at every step, data
  // integrity of every hit, no deadlock (the test ends), all memory returned.
  constexpr std::uint64_t kCapacity = std::uint64_t{32} * 1024;
  constexpr int kThreads = 4;
  constexpr int kOps = 10000;
  for (const auto policy : {Policy::kLru, Policy::kLfu, Policy::kFifo, Policy::kAuto}) {
    SCOPED_TRACE(tsc::policy_name(policy));
    auto allocator = std::make_shared<CountingAllocator>(kCapacity);
    {
      BlockCache cache(kCapacity, policy, allocator);
      std::atomic<int> corrupt{0};
      std::atomic<int> over_budget{0};
      std::atomic<std::uint64_t> verified{0};
      auto check_budget = [&] {
        const auto stats = cache.stats();
        if (stats.bytes_in_use > kCapacity || stats.peak_bytes_in_use > kCapacity ||
            allocator->outstanding() > kCapacity) {
          ++over_budget;
        }
      };
      auto verify = [&](const tsc::BlockHandle& handle) {
        if (intact(handle)) {
          ++verified;
        } else {
          ++corrupt;
        }
      };
      std::vector<std::thread> threads;
      threads.reserve(kThreads);
      for (int t = 0; t < kThreads; ++t) {
        threads.emplace_back([&, t] {
          std::mt19937_64 rng(1000 + t);
          std::vector<tsc::BlockHandle> held;
          auto fill_and_maybe_publish = [&](tsc::BlockHandle handle) {
            std::memcpy(handle.mutable_data(), pattern(handle.key()), handle.size());
            if (rng() % 10 == 0) return;  // abandoned
            handle.publish();
            verify(handle);
            if (held.size() < 3 && rng() % 3 == 0) held.push_back(std::move(handle));
          };
          for (int op = 0; op < kOps; ++op) {
            const BlockKey k{static_cast<std::uint32_t>(rng() % 2),
                             static_cast<std::uint32_t>(rng() % 24)};
            const std::size_t size = 256 + rng() % 8192;
            const auto dice = rng() % 100;
            if (dice < 50) {
              auto handle = dice < 5 ? cache.lookup(k, 200us) : cache.lookup(k);
              if (handle) {
                verify(*handle);
                if (held.size() < 3 && dice % 3 == 0) held.push_back(std::move(*handle));
              } else if (dice % 2 == 0) {
                if (auto filler = cache.insert(k, size)) fill_and_maybe_publish(std::move(*filler));
              }
            } else if (dice < 80) {
              if (auto filler = cache.insert(k, size)) fill_and_maybe_publish(std::move(*filler));
            } else if (dice < 90) {
              (void)cache.erase(k);
            } else if (dice < 91) {
              cache.clear();
            } else if (!held.empty()) {
              verify(held.back());
              held.pop_back();
            }
            check_budget();
          }
          for (const auto& handle : held) verify(handle);
        });
      }
      for (auto& thread : threads) thread.join();

      EXPECT_EQ(corrupt.load(), 0);
      EXPECT_EQ(over_budget.load(), 0);
      const auto stats = cache.stats();
      EXPECT_LE(stats.peak_bytes_in_use, kCapacity);
      EXPECT_EQ(stats.pinned_entries, 0u);
      EXPECT_EQ(allocator->outstanding(), stats.bytes_in_use);
      EXPECT_GT(stats.hits, 0u);
      EXPECT_GT(stats.insertions, 0u);
      EXPECT_GT(verified.load(), 0u);
      std::printf(
          "[%s] hits %llu misses %llu insertions %llu rejections %llu conflicts %llu "
          "evictions %llu abandoned %llu peak %llu/%llu verified %llu\n",
          std::string(tsc::policy_name(policy)).c_str(),
          static_cast<unsigned long long>(stats.hits),
          static_cast<unsigned long long>(stats.misses),
          static_cast<unsigned long long>(stats.insertions),
          static_cast<unsigned long long>(stats.rejections),
          static_cast<unsigned long long>(stats.conflicts),
          static_cast<unsigned long long>(stats.evictions),
          static_cast<unsigned long long>(stats.abandoned),
          static_cast<unsigned long long>(stats.peak_bytes_in_use),
          static_cast<unsigned long long>(kCapacity),
          static_cast<unsigned long long>(verified.load()));
    }
    EXPECT_EQ(allocator->outstanding(), 0u);
    EXPECT_LE(allocator->peak(), kCapacity);
    EXPECT_FALSE(allocator->over_limit());
    EXPECT_FALSE(allocator->mismatched());
  }
}

// ---- the tier's memory: ranges of one region ----------------------------------------------

namespace {

constexpr std::uint64_t kUnit = tensorstream::kSlotAlignment;

std::shared_ptr<tensorstream::RegionAllocator> region_of(std::uint64_t bytes) {
  return std::make_shared<tensorstream::RegionAllocator>(
      tensorstream::AlignedBuffer(static_cast<std::size_t>(bytes)));
}

bool inside(const tsc::BlockHandle& handle, const tensorstream::RegionAllocator& region) {
  return handle.data() >= region.base() &&
         handle.data() + handle.size() <= region.base() + region.capacity();
}

}  // namespace

TEST(BlockCache, RegionEntriesAreChargedWholeUnits) {
  auto region = region_of(4 * kUnit);
  BlockCache cache(4 * kUnit, Policy::kLru, region);
  auto filler = cache.insert(key(A), 100);
  ASSERT_TRUE(filler.has_value());
  EXPECT_EQ(filler->size(), 100u);
  EXPECT_TRUE(inside(*filler, *region));
  EXPECT_EQ(reinterpret_cast<std::uintptr_t>(filler->data()) % kUnit, 0u);
  EXPECT_EQ(cache.stats().bytes_in_use, kUnit);  // 100 bytes take one unit of the region
  EXPECT_EQ(region->allocated_bytes(), kUnit);
  // 3 units + 1 byte is four units: more than the three left, and A is pinned.
  EXPECT_FALSE(cache.insert(key(B), 3 * kUnit + 1).has_value());
  // Within the capacity in bytes, larger once rounded: declined without touching anything.
  EXPECT_FALSE(cache.insert(key(C), 4 * kUnit + 1).has_value());
  EXPECT_EQ(cache.stats().rejections, 2u);
  EXPECT_EQ(cache.stats().evictions, 0u);
  fill(*filler);
  filler->publish();
  filler.reset();
  // A unpinned: the four units are made by evicting it.
  auto whole = cache.insert(key(B), 3 * kUnit + 1);
  ASSERT_TRUE(whole.has_value());
  EXPECT_EQ(whole->data(), region->base());
  const auto stats = cache.stats();
  EXPECT_EQ(stats.evictions, 1u);
  EXPECT_EQ(stats.bytes_in_use, 4 * kUnit);
  EXPECT_LE(stats.peak_bytes_in_use, stats.capacity);
  EXPECT_EQ(region->allocated_bytes(), stats.bytes_in_use);
}

TEST(BlockCache, FragmentedRegionEvictsMoreOrDeclines) {
  for (const bool neighbours_pinned : {false, true}) {
    SCOPED_TRACE(neighbours_pinned ? "neighbours pinned" : "neighbours unpinned");
    auto region = region_of(4 * kUnit);
    BlockCache cache(4 * kUnit, Policy::kLru, region);
    // A B C D fill the region, one unit each, in that order.
    for (const auto block : {A, B, C, D}) {
      auto filler = cache.insert(key(block), kUnit);
      ASSERT_TRUE(filler.has_value());
      fill(*filler);
      filler->publish();
    }
    EXPECT_EQ(region->largest_free_range(), 0u);
    // Two units free, but apart: A's and C's.
    EXPECT_TRUE(cache.erase(key(A)));
    EXPECT_TRUE(cache.erase(key(C)));
    EXPECT_EQ(cache.stats().bytes_in_use, 2 * kUnit);
    EXPECT_EQ(region->largest_free_range(), kUnit);

    std::vector<tsc::BlockHandle> held;
    if (neighbours_pinned) {
      held.push_back(std::move(*cache.lookup(key(B))));
      held.push_back(std::move(*cache.lookup(key(D))));
      // Free in bytes, not in one piece, and nothing may go: declined, nothing evicted.
      EXPECT_FALSE(cache.insert(key(E), 2 * kUnit).has_value());
      auto stats = cache.stats();
      EXPECT_EQ(stats.fragmented, 1u);
      EXPECT_EQ(stats.rejections, 1u);
      EXPECT_EQ(stats.evictions, 0u);
      EXPECT_EQ(stats.entries, 2u);
      EXPECT_EQ(stats.bytes_in_use, 2 * kUnit);
      EXPECT_EQ(region->allocated_bytes(), 2 * kUnit);
      EXPECT_FALSE(cache.lookup(key(E)).has_value());
      held.erase(held.begin());  // B may go now (D stays pinned)
    }
    // B, least recently used, is evicted as well: A's, B's and C's units join.
    auto filler = cache.insert(key(E), 2 * kUnit);
    ASSERT_TRUE(filler.has_value());
    EXPECT_TRUE(inside(*filler, *region));
    fill(*filler);
    filler->publish();
    auto stats = cache.stats();
    EXPECT_EQ(stats.fragmented, neighbours_pinned ? 2u : 1u);
    EXPECT_EQ(stats.evictions, 1u);
    EXPECT_FALSE(cache.contains(key(B)));
    EXPECT_TRUE(cache.contains(key(D)));
    EXPECT_EQ(stats.bytes_in_use, 3 * kUnit);
    EXPECT_LE(stats.peak_bytes_in_use, 4 * kUnit);
    EXPECT_EQ(region->allocated_bytes(), 3 * kUnit);
    auto d = cache.lookup(key(D));
    ASSERT_TRUE(d.has_value());
    EXPECT_TRUE(intact(*d));  // E's bytes did not land on D's
    EXPECT_TRUE(intact(*filler));
  }
}

TEST(BlockCache, ConcurrentRandomOperationsOnARegion) {
  // As ConcurrentRandomOperations, with the entries' memory ranges of one region (as the
  // engine's tier has it) and sizes of one to three units: fragmentation happens, and an
  // overlap of two entries would show as a corrupted hit. Checked: data integrity, the budget
  // (stats and the region's own count), everything back in one free range at the end.
  constexpr std::uint64_t kCapacity = 8 * kUnit;
  constexpr int kThreads = 4;
  constexpr int kOps = 6000;
  for (const auto policy : {Policy::kLru, Policy::kLfu, Policy::kFifo, Policy::kAuto}) {
    SCOPED_TRACE(tsc::policy_name(policy));
    auto region = region_of(kCapacity);
    {
      BlockCache cache(kCapacity, policy, region);
      std::atomic<int> corrupt{0};
      std::atomic<int> over_budget{0};
      std::atomic<std::uint64_t> verified{0};
      std::vector<std::thread> threads;
      threads.reserve(kThreads);
      for (int t = 0; t < kThreads; ++t) {
        threads.emplace_back([&, t] {
          std::mt19937_64 rng(2000 + t);
          std::vector<tsc::BlockHandle> held;
          const auto verify = [&](const tsc::BlockHandle& handle) {
            if (intact(handle) && inside(handle, *region)) {
              ++verified;
            } else {
              ++corrupt;
            }
          };
          for (int op = 0; op < kOps; ++op) {
            const BlockKey k{0, static_cast<std::uint32_t>(rng() % 16)};
            const std::size_t size = 1 + rng() % (3 * kUnit);
            const auto dice = rng() % 100;
            if (dice < 45) {
              if (auto handle = cache.lookup(k)) {
                verify(*handle);
                if (held.size() < 2 && dice % 4 == 0) held.push_back(std::move(*handle));
              } else if (auto filler = cache.insert(k, size)) {
                fill(*filler);
                if (rng() % 10 != 0) filler->publish();  // else abandoned
              }
            } else if (dice < 85) {
              if (auto filler = cache.insert(k, size)) {
                fill(*filler);
                filler->publish();
                verify(*filler);
              }
            } else if (dice < 95) {
              (void)cache.erase(k);
            } else if (!held.empty()) {
              verify(held.back());
              held.pop_back();
            }
            const auto stats = cache.stats();
            if (stats.bytes_in_use > kCapacity || region->allocated_bytes() > kCapacity) {
              ++over_budget;
            }
          }
          for (const auto& handle : held) verify(handle);
        });
      }
      for (auto& thread : threads) thread.join();
      EXPECT_EQ(corrupt.load(), 0);
      EXPECT_EQ(over_budget.load(), 0);
      const auto stats = cache.stats();
      EXPECT_LE(stats.peak_bytes_in_use, kCapacity);
      EXPECT_EQ(stats.pinned_entries, 0u);
      EXPECT_EQ(region->allocated_bytes(), stats.bytes_in_use);
      EXPECT_GT(stats.hits, 0u);
      EXPECT_GT(stats.insertions, 0u);
      EXPECT_GT(verified.load(), 0u);
      std::printf("[%s on a region] hits %llu insertions %llu rejections %llu fragmented %llu\n",
                  std::string(tsc::policy_name(policy)).c_str(),
                  static_cast<unsigned long long>(stats.hits),
                  static_cast<unsigned long long>(stats.insertions),
                  static_cast<unsigned long long>(stats.rejections),
                  static_cast<unsigned long long>(stats.fragmented));
    }
    EXPECT_EQ(region->allocated_bytes(), 0u);
    EXPECT_EQ(region->largest_free_range(), kCapacity);
  }
}
