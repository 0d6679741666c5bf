// The RAM tier: a thread-safe, byte-budgeted cache of whole blocks in host memory.
//
// Each entry holds the decoded bytes of one block (typically one decoder layer, up to hundreds
// of MB) in one buffer obtained from a pluggable HostAllocator (page-aligned host memory by
// default). The engine's tier gives it a RegionAllocator (host_memory.hpp): one region of the
// tier's capacity, allocated once — CUDA-pinned on a GPU, so a hit is one DMA, no CPU copy —
// of which each entry is a range, so that no fill or eviction asks the system or the driver
// for memory. The charge of an entry is its size in bytes rounded up to the allocator's
// granularity() (1 by default, kSlotAlignment for a region); the sum of the charges never
// exceeds the capacity given to the constructor — an invariant, not a hint
// (Stats::bytes_in_use and Stats::peak_bytes_in_use let tests assert it).
//
// Typical use, once per use of a block (a lookup is what counts as an access):
//
//   BlockCache cache(16ull << 30, Policy::kAuto, pinned_allocator);
//   if (auto hit = cache.lookup(key)) {
//     copy_to_device(hit->data(), hit->size());          // pinned while `hit` lives
//   } else if (auto fill = cache.insert(key, size)) {
//     read_block(fill->mutable_data(), fill->size());    // invisible to others until...
//     fill->publish();                                   // ...now
//     copy_to_device(fill->data(), fill->size());
//   } else {
//     stream_without_caching(key);                       // not admitted, or no room
//   }
//
// Entries that are in use are pinned: every live BlockHandle holds a reference, and an entry
// with a reference is never evicted (as leveldb's Cache keeps in-use entries off its LRU list).
// insert() makes room only by evicting unpinned entries; if that cannot make enough room it
// returns nullopt at once — it never exceeds the budget and never blocks waiting for room.
// An allocator that sub-allocates may have the bytes free but not in one piece
// (HostAllocator::try_allocate returns nullptr): insert() then evicts further unpinned entries
// in the policy's order, one at a time, until the entry fits, and declines it (nullopt) when
// nothing more may go (Stats::fragmented counts such inserts).
//
// Allocation and deallocation (which for pinned memory are slow and may synchronise the
// device) run outside the cache's lock. Bytes being freed stay charged until the allocator has
// taken them back, so the allocator's outstanding bytes never exceed the capacity either.
//
// Thread-safety: every member function of BlockCache is thread-safe (one internal mutex, held
// only for bookkeeping, never across allocation, deallocation or waiting on a fill). A
// BlockHandle is an ordinary value: one handle must not be used by two threads at once, but
// different handles (to the same entry or not) may be used concurrently. The BlockCache object
// itself must outlive the calls made on it; handles may outlive the BlockCache (see
// ~BlockCache).
#pragma once

#include <chrono>
#include <cstddef>
#include <cstdint>
#include <iosfwd>
#include <memory>
#include <optional>
#include <span>
#include <string_view>

#include "tensorstream/host_memory.hpp"

namespace tensorstream::cache {

// ---- keys --------------------------------------------------------------------------------

/// Identifies one block: which source (store or checkpoint file set, numbered by the engine)
/// and which block inside it.
struct BlockKey {
  std::uint32_t source = 0;
  std::uint32_t block = 0;

  friend constexpr bool operator==(const BlockKey&, const BlockKey&) = default;
};

/// Hash of a BlockKey (a 64-bit finaliser over both fields, so neighbouring blocks spread).
struct BlockKeyHash {
  [[nodiscard]] std::size_t operator()(const BlockKey& key) const noexcept {
    std::uint64_t x = (std::uint64_t{key.source} << 32) | key.block;
    x ^= x >> 30;
    x *= 0xbf58476d1ce4e5b9ull;
    x ^= x >> 27;
    x *= 0x94d049bb133111ebull;
    x ^= x >> 31;
    return static_cast<std::size_t>(x);
  }
};

/// Writes "source:block" (used in messages and by GoogleTest).
std::ostream& operator<<(std::ostream& out, const BlockKey& key);

// ---- host memory -------------------------------------------------------------------------

// Entries' memory comes from a HostAllocator (host_memory.hpp: PageAlignedAllocator by
// default; the engine's tier uses a RegionAllocator over one page-aligned or, on a GPU,
// pinned region); cache::HostAllocator names the same class.

// ---- policies ----------------------------------------------------------------------------

/// Which unpinned entries make room for a new one, and whether the new one is admitted at all.
enum class Policy : std::uint8_t {
  /// Least recently used is evicted. Every insert is admitted if room can be made.
  kLru,
  /// Lowest access count (since the entry was inserted) is evicted; ties go to the least
  /// recently used. Every insert is admitted if room can be made.
  kLfu,
  /// Oldest insertion is evicted, whatever its use. Every insert is admitted if room can be
  /// made.
  kFifo,
  /// Cyclic-aware (the default). Decoding a transformer touches its blocks in the same order
  /// every step; on a loop longer than the cache, LRU and FIFO evict exactly the block needed
  /// next and hit 0%. kAuto instead keeps a fixed subset resident, so about capacity/loop of
  /// the accesses hit, and behaves like LRU when the working set fits.
  ///
  /// How it decides. The cache keeps a byte clock that advances by a block's size at every
  /// lookup() of it (hit or miss), and for each key seen (resident or not, a bounded history)
  /// its last *reuse interval*: the clock's advance from the start of its previous lookup to
  /// the start of this one, i.e. the bytes accessed in between, counting its own previous
  /// access and counting repeats. A key's interval is the larger of its last two (so one
  /// early duplicate lookup, e.g. by a prefetcher, does not make a block look hot).
  ///  - If the new block fits in free room, it is admitted (the cache fills like any other).
  ///  - Otherwise, if its interval is <= capacity, it would have hit under LRU (the distinct
  ///    bytes between two uses can only be fewer than the interval): it is admitted and
  ///    evicts dead entries first (see below), then least recently used ones.
  ///  - Otherwise (interval > capacity, or never reused so far) it may only take the room of
  ///    *dead* entries, least recently used first; if they do not free enough room the
  ///    insert is declined (insert() returns nullopt and Stats::rejections counts it) and
  ///    the caller streams the block without caching it.
  ///  - A resident entry is dead when it has not been looked up for more than
  ///    max(2 × its interval, capacity) bytes of accesses (capacity alone if it was never
  ///    reused), counted from its last lookup or its insertion, whichever is later. On a
  ///    loop the residents come back every loop-length bytes and never die, so the subset
  ///    stays; after a phase change the old residents die within 2 × their interval and a
  ///    new working set takes over (its blocks are admitted as soon as their second use
  ///    shows an interval <= capacity, or in the room of the dead).
  /// Cost: choosing victims scans the resident entries (O(n log n) with n entries, i.e.
  /// blocks — hundreds, microseconds against a block fill of milliseconds). A non-resident
  /// key's history is forgotten once it has been silent long enough to be dead (swept when
  /// the history grows past 4096 keys, or past twice its size after the previous sweep).
  kAuto,
};

/// "lru", "lfu", "fifo" or "auto" ("" for a value that is not a Policy).
[[nodiscard]] std::string_view policy_name(Policy policy) noexcept;

/// Inverse of policy_name; nullopt for any other string.
[[nodiscard]] std::optional<Policy> policy_from_name(std::string_view name) noexcept;

/// As policy_from_name, for settings: throws std::invalid_argument naming the bad value and
/// the accepted ones.
[[nodiscard]] Policy parse_policy(std::string_view name);

// ---- statistics --------------------------------------------------------------------------

/// A consistent snapshot of a cache's counters (taken under its lock); what each means:
/// for_each_field below, their one description.
struct Stats {
  std::uint64_t capacity = 0;
  std::uint64_t bytes_in_use = 0;
  std::uint64_t peak_bytes_in_use = 0;
  std::uint64_t entries = 0;
  std::uint64_t pinned_entries = 0;
  std::uint64_t hits = 0;
  std::uint64_t misses = 0;
  std::uint64_t insertions = 0;
  std::uint64_t rejections = 0;
  std::uint64_t conflicts = 0;
  std::uint64_t evictions = 0;
  std::uint64_t abandoned = 0;
  std::uint64_t fragmented = 0;

  /// hits / (hits + misses), 0 when there was no lookup.
  [[nodiscard]] double hit_rate() const noexcept {
    const auto lookups = hits + misses;
    return lookups == 0 ? 0.0 : static_cast<double>(hits) / static_cast<double>(lookups);
  }
};

/// Calls `visit(name, value, meaning)` for each field of `s`, and for the derived hit_rate.
template <class Visit>
void for_each_field(const Stats& s, Visit&& visit) {
  visit("capacity", s.capacity, "budget in bytes, as constructed");
  visit("bytes_in_use", s.bytes_in_use,
        "charged bytes: entries (filled, being filled, erased but still pinned) + bytes being "
        "freed; always <= capacity");
  visit("peak_bytes_in_use", s.peak_bytes_in_use, "highest bytes_in_use since construction");
  visit("entries", s.entries, "entries findable by key (published or being filled)");
  visit("pinned_entries", s.pinned_entries,
        "entries with at least one live handle (erased ones included)");
  visit("hits", s.hits, "lookups that returned a handle");
  visit("misses", s.misses, "lookups that returned nothing");
  visit("hit_rate", s.hit_rate(), "hits / (hits + misses), 0 when there was no lookup");
  visit("insertions", s.insertions, "inserts that returned a handle");
  visit("rejections", s.rejections,
        "inserts declined: by the policy, for lack of unpinned room, or larger than the "
        "capacity");
  visit("conflicts", s.conflicts, "inserts of a key already present");
  visit("evictions", s.evictions, "entries evicted to make room (not erase/clear)");
  visit("abandoned", s.abandoned, "fills whose handle died before publish()");
  visit("fragmented", s.fragmented,
        "inserts whose room was free in bytes but not in one piece: they evicted more, or were "
        "declined");
}

// ---- handles -----------------------------------------------------------------------------

namespace detail {
struct CacheEntry;
class BlockCacheState;
}  // namespace detail

/// A pinned reference to one cache entry; unpins when destroyed (or reset()). Move-only.
///
/// Two kinds exist. A *reader* handle (from lookup) sees a published entry: ready() is true
/// and data() may be read. A *filler* handle (from insert) owns the entry's only pin while the
/// buffer is filled through mutable_data(); the entry is invisible to lookup() until
/// publish(). If a filler handle dies without publishing (an I/O error, an exception), the
/// fill is *abandoned*: the entry is removed, its memory freed, and waiting lookups return
/// nullopt.
///
/// A handle keeps the cache's shared state alive, so it stays valid after its BlockCache has
/// been destroyed. A default-constructed or moved-from handle is empty (valid() is false).
class BlockHandle {
 public:
  BlockHandle() noexcept = default;
  BlockHandle(BlockHandle&& other) noexcept;
  BlockHandle& operator=(BlockHandle&& other) noexcept;
  BlockHandle(const BlockHandle&) = delete;
  BlockHandle& operator=(const BlockHandle&) = delete;
  ~BlockHandle();

  [[nodiscard]] bool valid() const noexcept { return entry_ != nullptr; }
  explicit operator bool() const noexcept { return valid(); }

  [[nodiscard]] BlockKey key() const noexcept { return key_; }
  /// The entry's size in bytes (as given to insert()); 0 for an empty handle.
  [[nodiscard]] std::size_t size() const noexcept { return size_; }
  /// The entry's bytes; stable for the handle's lifetime. Only meaningful once ready() (or,
  /// for the filler, for what it has written).
  [[nodiscard]] const std::byte* data() const noexcept { return data_; }
  [[nodiscard]] std::span<const std::byte> bytes() const noexcept { return {data_, size_}; }

  /// True for reader handles, and for a filler handle once it has published.
  [[nodiscard]] bool ready() const noexcept { return valid() && !filling_; }

  /// The buffer to fill. Only a filler handle that has not published yet may write; any
  /// other call throws std::logic_error (published bytes are shared with readers).
  [[nodiscard]] std::byte* mutable_data() const;
  [[nodiscard]] std::span<std::byte> mutable_bytes() const { return {mutable_data(), size_}; }

  /// Makes the filled entry visible to lookup() and wakes the lookups waiting for it. The
  /// writes made before publish() happen-before any reader's access. If the entry was erased
  /// (erase/clear) while being filled, publishing has no visible effect: the entry stays
  /// unreachable and is freed when this handle dies. Throws std::logic_error unless this is
  /// a filler handle that has not published yet.
  void publish();

  /// Unpins now; the handle becomes empty. Abandons an unpublished fill (see above).
  void reset() noexcept;

 private:
  friend class detail::BlockCacheState;
  BlockHandle(std::shared_ptr<detail::BlockCacheState> state, detail::CacheEntry* entry,
              bool filling) noexcept;

  std::shared_ptr<detail::BlockCacheState> state_;
  detail::CacheEntry* entry_ = nullptr;
  BlockKey key_;
  std::byte* data_ = nullptr;
  std::size_t size_ = 0;
  bool filling_ = false;
};

// ---- the cache ---------------------------------------------------------------------------

/// See the top of this file. Not copyable or movable (handles refer to its shared state).
class BlockCache {
 public:
  using Handle = BlockHandle;

  /// A cache of at most `capacity_bytes` bytes (0 is allowed: nothing is ever admitted).
  /// A null `allocator` means default_host_allocator().
  explicit BlockCache(std::uint64_t capacity_bytes, Policy policy = Policy::kAuto,
                      std::shared_ptr<HostAllocator> allocator = nullptr);

  /// Removes every entry (as clear()). Handles still alive keep the shared state and their
  /// entry alive; each entry's memory goes back to the allocator when its last handle dies,
  /// and the allocator (held by shared_ptr) lives until then. No other thread may be inside
  /// a member function of this cache while it is destroyed.
  ~BlockCache();

  BlockCache(const BlockCache&) = delete;
  BlockCache& operator=(const BlockCache&) = delete;
  BlockCache(BlockCache&&) = delete;
  BlockCache& operator=(BlockCache&&) = delete;

  /// One access to `key`. A hit (the entry exists and is published) returns a pinned reader
  /// handle and counts a hit; anything else counts a miss and returns nullopt, at once —
  /// including an entry still being filled by another thread (see the waiting overload).
  /// Thread-safe; never blocks beyond the internal lock.
  [[nodiscard]] std::optional<Handle> lookup(BlockKey key);

  /// As lookup(key), but if the entry exists and is being filled, waits up to `max_wait`
  /// for it to be published. Returns the reader handle if it was published in time; nullopt
  /// (a miss) if the key is absent, the fill was abandoned or erased, or `max_wait` passed.
  /// Counts one access, one hit or one miss. Thread-safe; waits without holding the lock.
  [[nodiscard]] std::optional<Handle> lookup(BlockKey key, std::chrono::nanoseconds max_wait);

  /// Whether `key` is present and published. Not an access: no stats, no pin, no effect on
  /// the policy (for a prefetcher deciding whether to fetch). The answer may be stale by the
  /// time it is used. Thread-safe.
  [[nodiscard]] bool contains(BlockKey key) const;

  /// Reserves an entry of `bytes` bytes for `key` and returns a pinned filler handle to its
  /// (uninitialised) buffer; the entry becomes a hit for lookup() after handle.publish().
  /// Returns nullopt, having changed nothing, when:
  ///  - `key` is already present, published or being filled (Stats::conflicts; look it up,
  ///    or wait for it with lookup(key, max_wait));
  ///  - the policy declines to admit it, or room cannot be made because the entries that
  ///    would have to go are pinned, or `bytes` (rounded up to the allocator's granularity)
  ///    > capacity, or the allocator has the bytes but not in one piece and no unpinned entry
  ///    the policy may evict is left (Stats::rejections).
  /// Making room evicts unpinned entries chosen by the policy. An insert is not an access:
  /// the lookup() that missed before it was (an insert with no lookup, e.g. a prefetch, is
  /// not counted for kAuto's intervals). Throws std::invalid_argument if `bytes` is 0, and
  /// whatever the allocator throws (then the entry is gone again; entries evicted for it stay
  /// evicted). Thread-safe; allocates and frees outside the lock.
  [[nodiscard]] std::optional<Handle> insert(BlockKey key, std::size_t bytes);

  /// Removes `key` so that lookup() misses. If handles to it are alive, its memory is freed
  /// when the last one dies (until then it stays charged). Returns whether the key was
  /// present. Erasing an entry being filled makes its publish() a no-op and wakes waiters.
  /// Thread-safe.
  bool erase(BlockKey key);

  /// erase() of every key. Thread-safe.
  void clear();

  /// A consistent snapshot of the counters. Thread-safe.
  [[nodiscard]] Stats stats() const;

  [[nodiscard]] std::uint64_t capacity() const noexcept { return capacity_; }
  [[nodiscard]] Policy policy() const noexcept { return policy_; }

 private:
  std::uint64_t capacity_;
  Policy policy_;
  std::shared_ptr<detail::BlockCacheState> state_;
};

}  // namespace tensorstream::cache
