// The streaming arena: variable-size places for streamed units inside one range of device
// memory whose size the budget fixes.
//
// A unit (a decoder layer, one module's weights, one expert, the rows of an embedding) that
// is not resident gets a place [offset, offset + size) in [0, capacity) while it is in device
// memory. Sizes and offsets are multiples of `alignment`. A placed unit is in one of three
// states, which decide what may displace it:
//
//   kPinned      held by a caller or being filled: never displaced;
//   kPrefetched  filled ahead of use and not acquired yet: displaced by a demand only;
//   kCached      filled and released: displaced by any request that needs its bytes.
//
// Choosing a place. The caller ranks units by the distance to their next use (0: needed
// now; larger: later; "unknown" is the largest). Among the windows of the arena that overlap
// no unit the request may not displace, find() takes the one whose displaced units are needed
// the latest (the largest smallest distance among them), then the one displacing the fewest
// bytes, then the lowest offset. Under the cyclic order of decoding this keeps the units that
// come round soonest and lets go of the one released last — which is needed last — so a loop
// larger than the arena keeps hitting on a fixed part of it instead of thrashing (plain LRU
// would evict every unit just before its next use).
//
// A prefetch of a unit at distance d displaces only cached units needed after d: it never
// makes room by throwing out something needed sooner than what it brings in.
//
// Units held together. A module's weights may be acquired while its parent's are held: the
// parent is asked for with `together` — the bytes that must fit beside it later (its need,
// engine/residency.hpp). Such a place is cut at an edge of the run it comes from (a stretch
// between units that may not be displaced: its start or its end), never from its middle, so
// the rest of the run stays in one piece; the next unit of the chain does the same inside that
// rest. A chain whose footprints add up to at most the capacity therefore always fits, whatever
// lies in the arena, once the units in its way may be displaced. Prefetches, which may land
// anywhere, are pinned only while they fill: a demand blocked by one waits for that fill,
// after which the prefetched unit may be displaced.
//
// Thread-safety: none. The engine's mutex guards every call.
#pragma once

#include <cstdint>
#include <functional>
#include <limits>
#include <map>
#include <optional>
#include <unordered_map>
#include <vector>

namespace tensorstream::engine::detail {

class Arena {
 public:
  enum class State { kPinned, kPrefetched, kCached };

  /// Distance of a unit to its next use: 0 needed now, larger later.
  using Distance = std::uint64_t;
  static constexpr Distance kUnknown = std::numeric_limits<Distance>::max();
  /// How the caller ranks placed units when a request must displace some.
  using Rank = std::function<Distance(std::uint32_t unit)>;

  /// Where a request can go: its offset, and the placed units it would displace (the caller
  /// erases them, then inserts the request there).
  struct Place {
    std::uint64_t offset = 0;
    std::vector<std::uint32_t> displaced;
  };

  /// A placed unit, for statistics and tests.
  struct Entry {
    std::uint32_t unit = 0;
    std::uint64_t offset = 0;
    std::uint64_t size = 0;
    State state = State::kPinned;
  };

  /// An arena of `capacity` bytes (rounded down to `alignment`, a power of two ≥ 1).
  Arena(std::uint64_t capacity, std::uint64_t alignment);

  [[nodiscard]] std::uint64_t capacity() const noexcept { return capacity_; }
  [[nodiscard]] std::uint64_t alignment() const noexcept { return alignment_; }
  /// `bytes` rounded up to the alignment (what a unit of that size occupies).
  [[nodiscard]] std::uint64_t footprint(std::uint64_t bytes) const noexcept;
  /// Bytes occupied by placed units (always ≤ capacity()).
  [[nodiscard]] std::uint64_t used() const noexcept { return used_; }
  [[nodiscard]] std::size_t size() const noexcept { return by_unit_.size(); }

  /// A place for `bytes` (its footprint) or nullopt when none exists now (units that may not
  /// be displaced are in the way, or the footprint exceeds the capacity). `demand`: a unit
  /// needed now (may displace prefetched units); otherwise a prefetch of a unit at distance
  /// `distance`, which displaces only cached units ranked after it. `together` > the
  /// footprint: more units will be held beside this one, up to that many bytes in all (the
  /// place is cut at a run's edge, see the top of this file).
  [[nodiscard]] std::optional<Place> find(std::uint64_t bytes, bool demand, Distance distance,
                                          const Rank& rank, std::uint64_t together = 0) const;

  /// Places `unit` at `offset` (a place find() returned, its displaced units erased first).
  /// Throws std::logic_error if the unit is already placed, the offset is misaligned, or the
  /// range leaves the arena or overlaps a placed unit.
  void insert(std::uint32_t unit, std::uint64_t offset, std::uint64_t bytes, State state);
  /// Removes `unit` (no effect if it is not placed).
  void erase(std::uint32_t unit) noexcept;
  /// Changes the state of a placed unit (std::logic_error if it is not placed).
  void set_state(std::uint32_t unit, State state);

  [[nodiscard]] bool contains(std::uint32_t unit) const noexcept;
  /// The placed unit (std::logic_error if it is not placed).
  [[nodiscard]] const Entry& entry(std::uint32_t unit) const;
  /// Every placed unit, by offset.
  [[nodiscard]] std::vector<Entry> entries() const;

 private:
  std::uint64_t capacity_;
  std::uint64_t alignment_;
  std::uint64_t used_ = 0;
  std::map<std::uint64_t, Entry> by_offset_;
  std::unordered_map<std::uint32_t, std::uint64_t> by_unit_;  // unit -> offset
};

}  // namespace tensorstream::engine::detail
