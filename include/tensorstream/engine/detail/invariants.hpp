// The engine's invariants, checked after every acquire, release and prefetch when
// EngineOptions::check_invariants is on (Engine::Impl::check_after, engine_impl.hpp).
//
// broken_invariant() is a pure function of what it is given, so that a test can hand it a
// unit table with one invariant broken on purpose and see that one named.
//
// Thread-safety: pure; the engine calls it with its mutex held (the places and the statistics
// are guarded by it).
#pragma once

#include <cstdint>
#include <optional>
#include <string>
#include <vector>

#include "tensorstream/engine/detail/unit_places.hpp"
#include "tensorstream/engine/source_layout.hpp"
#include "tensorstream/engine/stats.hpp"

namespace tensorstream::engine::detail {

/// The first invariant that does not hold, described (which unit, which values), or nullopt
/// when all hold. In order:
///   1. device memory: the places' bytes (places.device_bytes()) are what `stats` counts as
///      in use, and they and the peak are within `budget`; the arena's placed bytes are within
///      its capacity, now and at the peak;
///   2. no unit has negative pins;
///   3. a resident unit has its buffer and no place in the arena;
///   4. a streamed unit that is filling, ready or failed has a place in the arena and memory
///      there; one without a place has no memory;
///   5. the arena treats every placed unit as its state says (UnitPlaces::arena_state);
///   6. counters: device hits + misses ≤ acquires; prefetches used + wasted + cancelled ≤
///      prefetches issued.
/// `blocks` are the source's units (for their names).
[[nodiscard]] std::optional<std::string> broken_invariant(const UnitPlaces& places,
                                                          const std::vector<BlockLayout>& blocks,
                                                          std::uint64_t budget,
                                                          const EngineStats& stats);

}  // namespace tensorstream::engine::detail
