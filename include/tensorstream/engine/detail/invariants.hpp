// The engine's invariants, checked after every acquire, release and prefetch when
// EngineOptions::check_invariants is on (Engine::Impl::check_after, engine_impl.hpp).
//
// broken_invariant() is a pure function of what it is given, so that a test can hand it a
// place table with one invariant broken on purpose and see that one named.
//
// Thread-safety: pure; the engine calls it with its mutex held (the ring and the statistics
// are guarded by it).
#pragma once

#include <cstdint>
#include <optional>
#include <string>
#include <vector>

#include "tensorstream/engine/detail/slot_ring.hpp"
#include "tensorstream/engine/source_layout.hpp"
#include "tensorstream/engine/stats.hpp"

namespace tensorstream::engine::detail {

/// The first invariant that does not hold, described (which place or block, which values),
/// or nullopt when all hold. In order:
///   1. device memory: the places' bytes (ring.bytes()) are what `stats` counts as in use,
///      and they and the peak are within `budget`;
///   2. no place has negative pins;
///   3. a place that is filling, ready or failed holds a block of the source, and that
///      block's place is this one (a ready block's place is its own);
///   4. a resident place holds nothing but its own block, and a resident block is in no
///      place but its own;
///   5. every block that a place is recorded for is held by that place;
///   6. counters: device hits + misses ≤ acquires; prefetches used + wasted + cancelled ≤
///      prefetches issued.
/// `blocks` are the source's blocks (for their names and count).
[[nodiscard]] std::optional<std::string> broken_invariant(const SlotRing& ring,
                                                          const std::vector<BlockLayout>& blocks,
                                                          std::uint64_t budget,
                                                          const EngineStats& stats);

}  // namespace tensorstream::engine::detail
