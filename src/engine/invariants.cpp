#include "tensorstream/engine/detail/invariants.hpp"

#include <mutex>

#include "tensorstream/engine/detail/engine_impl.hpp"
#include "tensorstream/errors.hpp"

namespace tensorstream::engine {

using tensorstream::detail::concat;

namespace detail {

namespace {

std::string_view state_name(UnitState state) {
  switch (state) {
    case UnitState::kAbsent:
      return "absent";
    case UnitState::kFilling:
      return "filling";
    case UnitState::kReady:
      return "ready";
    case UnitState::kFailed:
      return "failed";
  }
  return "?";
}

std::string_view arena_state_name(Arena::State state) {
  switch (state) {
    case Arena::State::kPinned:
      return "pinned";
    case Arena::State::kPrefetched:
      return "prefetched";
    case Arena::State::kCached:
      return "cached";
  }
  return "?";
}

std::string unit_text(const UnitPlaces& places, const std::vector<BlockLayout>& blocks,
                      std::uint32_t u) {
  const Unit& unit = places[u];
  return concat(unit.resident ? "resident unit '" : "streamed unit '",
                u < blocks.size() ? blocks[u].name : concat("#", u), "' (",
                state_name(unit.state), ", pins ", unit.pins, ")");
}

}  // namespace

std::optional<std::string> broken_invariant(const UnitPlaces& places,
                                            const std::vector<BlockLayout>& blocks,
                                            std::uint64_t budget, const EngineStats& stats) {
  const std::uint64_t bytes = places.device_bytes();
  if (bytes != stats.device_bytes_in_use) {
    return concat("the places hold ", bytes, " bytes but device_bytes_in_use is ",
                  stats.device_bytes_in_use);
  }
  if (bytes > budget) {
    return concat("device bytes in use (", bytes, ") exceed the budget of ", budget);
  }
  if (stats.device_bytes_peak > budget) {
    return concat("peak device bytes (", stats.device_bytes_peak, ") exceed the budget of ",
                  budget);
  }
  const auto& arena = places.arena();
  if (arena.used() > arena.capacity() || stats.arena_bytes_peak > arena.capacity()) {
    return concat("the arena holds ", arena.used(), " bytes (peak ", stats.arena_bytes_peak,
                  ") in a capacity of ", arena.capacity());
  }
  for (std::uint32_t u = 0; u < places.size(); ++u) {
    const Unit& unit = places[u];
    if (unit.pins < 0) return concat(unit_text(places, blocks, u), " has negative pins");
    const bool placed = arena.contains(u);
    if (unit.resident) {
      if (!unit.memory) return concat(unit_text(places, blocks, u), " has no buffer");
      if (placed) return concat(unit_text(places, blocks, u), " has a place in the arena");
      continue;
    }
    if (unit.state != UnitState::kAbsent && (!placed || !unit.memory)) {
      return concat(unit_text(places, blocks, u), " has no place in the arena");
    }
    if (!placed && unit.memory) {
      return concat(unit_text(places, blocks, u), " keeps memory without a place");
    }
    if (placed) {
      const auto want = UnitPlaces::arena_state(unit);
      const auto got = arena.entry(u).state;
      if (want != got) {
        return concat(unit_text(places, blocks, u), " is ", arena_state_name(got),
                      " in the arena instead of ", arena_state_name(want));
      }
    }
  }
  if (stats.device_hits + stats.device_misses > stats.acquires) {
    return concat("device hits (", stats.device_hits, ") + misses (", stats.device_misses,
                  ") exceed acquires (", stats.acquires, ")");
  }
  if (stats.prefetches_used + stats.prefetches_wasted + stats.prefetches_cancelled >
      stats.prefetches_issued) {
    return concat("prefetches used (", stats.prefetches_used, ") + wasted (",
                  stats.prefetches_wasted, ") + cancelled (", stats.prefetches_cancelled,
                  ") exceed prefetches issued (", stats.prefetches_issued, ")");
  }
  return std::nullopt;
}

}  // namespace detail

void Engine::Impl::check_after(std::string_view call, std::uint32_t block) {
  std::lock_guard lock(mutex_);
  if (!places_) return;  // closed: nothing is held any more
  ++stats_.invariant_checks;
  const auto broken =
      detail::broken_invariant(*places_, layout_.blocks, options_.device_budget, stats_);
  if (!broken) return;
  const std::string name =
      block < layout_.blocks.size() ? layout_.blocks[block].name : concat("#", block);
  throw Error(concat("engine invariant broken after ", call, " of block '", name, "' of ",
                     layout_.kind, " '", layout_.source.string(), "': ", *broken));
}

}  // namespace tensorstream::engine
