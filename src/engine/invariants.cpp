#include "tensorstream/engine/detail/invariants.hpp"

#include <mutex>

#include "tensorstream/engine/detail/engine_impl.hpp"
#include "tensorstream/errors.hpp"

namespace tensorstream::engine {

using tensorstream::detail::concat;

namespace detail {

namespace {

std::string_view state_name(SlotState state) {
  switch (state) {
    case SlotState::kEmpty:
      return "empty";
    case SlotState::kFilling:
      return "filling";
    case SlotState::kReady:
      return "ready";
    case SlotState::kFailed:
      return "failed";
  }
  return "?";
}

std::string place_text(const SlotRing& ring, std::size_t place) {
  const Slot& s = ring[place];
  return concat(s.resident ? "resident place " : "slot place ", place, " (", state_name(s.state),
                ", block ", s.block, ", pins ", s.pins, ")");
}

}  // namespace

std::optional<std::string> broken_invariant(const SlotRing& ring,
                                            const std::vector<BlockLayout>& blocks,
                                            std::uint64_t budget, const EngineStats& stats) {
  const std::uint64_t bytes = ring.bytes();
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
  const auto n = static_cast<std::int64_t>(blocks.size());
  for (std::size_t p = 0; p < ring.size(); ++p) {
    const Slot& s = ring[p];
    if (s.pins < 0) return concat(place_text(ring, p), " has negative pins");
    if (s.block >= n) return concat(place_text(ring, p), " holds no block of the source");
    if (s.state != SlotState::kEmpty) {
      if (s.block < 0) return concat(place_text(ring, p), " is not empty but holds no block");
      const auto block = static_cast<std::uint32_t>(s.block);
      const auto found = ring.find(block);
      if (found != p) {
        return concat(place_text(ring, p), " holds block '", blocks[block].name,
                      "', whose place is ", found ? concat(*found) : std::string("none"));
      }
    }
    if (s.resident && s.block >= 0) {
      const auto own = ring.resident_place(static_cast<std::uint32_t>(s.block));
      if (own != p) {
        return concat(place_text(ring, p), " holds block '",
                      blocks[static_cast<std::size_t>(s.block)].name,
                      "', which is not the block it is reserved for");
      }
    }
  }
  for (std::uint32_t b = 0; b < blocks.size(); ++b) {
    const auto place = ring.find(b);
    if (!place) continue;
    if (*place >= ring.size() || ring[*place].block != static_cast<std::int64_t>(b)) {
      return concat("block '", blocks[b].name, "' is recorded in place ", *place,
                    *place < ring.size() ? concat(", ", place_text(ring, *place)) : "",
                    ", which does not hold it");
    }
    const auto own = ring.resident_place(b);
    if (own && *own != *place) {
      return concat("resident block '", blocks[b].name, "' is in ", place_text(ring, *place),
                    " instead of its own place ", *own);
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
  if (!ring_) return;  // closed: nothing is held any more
  ++stats_.invariant_checks;
  const auto broken =
      detail::broken_invariant(*ring_, layout_.blocks, options_.device_budget, stats_);
  if (!broken) return;
  const std::string name =
      block < layout_.blocks.size() ? layout_.blocks[block].name : concat("#", block);
  throw Error(concat("engine invariant broken after ", call, " of block '", name, "' of ",
                     layout_.kind, " '", layout_.source.string(), "': ", *broken));
}

}  // namespace tensorstream::engine
