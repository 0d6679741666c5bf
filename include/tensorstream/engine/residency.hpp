// The residency plan: which units stay in device memory for good and which are streamed
// through the arena (engine/detail/arena.hpp), within a hard byte budget.
//
// A unit is what the engine loads and releases as one: a decoder layer when it fits, else
// one module's weights; an expert; the rows of an embedding. Streaming a unit costs its
// bytes over the slowest link on every pass, so the plan keeps as many bytes resident as the
// budget allows beside the arena, and gives the arena everything else.
//
// Each unit has a size (what it occupies when resident) and a *need*: the bytes that must be
// in the arena at once while it is used — by default its size; more when units are held
// together (a module's weights while its parent's are held); less when it is used by parts
// (an embedding read row by row needs room for one row at least). The physical minimum of a
// budget is therefore the units that cannot stream plus the largest need among those that
// do: with that much, every unit is loaded when it is asked for and nothing overlaps.
//
// Overlap. While one unit computes the next can only load if the arena holds both, so the
// plan first looks for the most resident bytes with an arena of at least `slots` (default 2)
// times the largest streamed need; only when no such plan fits does it settle for one
// (`overlap` false: every load then waits in front of the computation, and the engine says so).
//
// Routed units. An expert of a mixture-of-experts layer is used on the passes its router picks
// it only, and which experts are picked is learned while the model runs. The plan therefore
// makes no routed unit resident (unless everything is): what the every-pass units leave is
// the arena, where released experts stay cached, kept or displaced by their learned rate of
// use (engine/detail/prefetcher.hpp) — a resident place would hold whichever expert the plan
// chose before any token was routed.
//
// Thread-safety: pure functions.
#pragma once

#include <cstdint>
#include <stdexcept>
#include <string>
#include <vector>

#include "tensorstream/alignment.hpp"

namespace tensorstream::engine {

/// Raised when no plan fits the budget; `minimum_budget()` is the smallest budget that would.
class BudgetTooSmall : public std::invalid_argument {
 public:
  BudgetTooSmall(const std::string& what, std::uint64_t minimum)
      : std::invalid_argument(what), minimum_(minimum) {}
  [[nodiscard]] std::uint64_t minimum_budget() const noexcept { return minimum_; }

 private:
  std::uint64_t minimum_;
};

/// `bytes` rounded up to kSlotAlignment (alignment.hpp), at least one granule: what a unit
/// occupies in device memory, resident or in the arena, and what the budget counts.
[[nodiscard]] constexpr std::uint64_t device_footprint(std::uint64_t bytes) noexcept {
  return bytes == 0 ? kSlotAlignment : align_up(bytes, kSlotAlignment);
}

struct ResidencyPlan {
  std::vector<bool> resident;  ///< per unit: kept in device memory
  /// Bytes of the streaming arena: the whole budget left beside the resident units (0 when
  /// nothing streams).
  std::uint64_t arena_bytes = 0;
  /// Footprint of the largest need among streamed units (0 when nothing streams).
  std::uint64_t largest_need = 0;
  /// The arena holds two of the largest streamed needs: a unit can load while another
  /// computes. False at budgets below that: every load is waited for.
  bool overlap = false;
  std::uint64_t resident_bytes = 0;  ///< footprints of the resident units
  std::uint64_t streamed_bytes = 0;  ///< bytes streamed per full pass over all units
  /// Device bytes the plan uses: resident_bytes + arena_bytes (≤ the budget).
  [[nodiscard]] std::uint64_t device_bytes() const noexcept { return resident_bytes + arena_bytes; }
};

/// What the planner knows of one unit.
struct UnitDemand {
  std::uint64_t size = 0;  ///< bytes when resident
  /// Bytes that must be in the arena at once while the unit is used (see the top of this
  /// file); 0 means `size`.
  std::uint64_t need = 0;
  /// Used by parts (an embedding read by rows): streaming it moves only the parts asked for,
  /// not `size` bytes per pass, so it is the last to be made resident.
  bool partial = false;
  /// The share of passes that use the unit, in (0, 1]; below 1 the unit is routed (an
  /// expert, used when its router picks it) and is not made resident unless every unit is:
  /// the arena is its cache (see the top of this file).
  double rate = 1.0;
};

/// The smallest budget under which a plan whose arena holds `slots` (≥ 1) times the largest
/// streamed need exists: every unit streamed, or the units of the largest needs resident and
/// the rest streamed, and so on — the cheapest of these. slots = 1 gives the physical
/// minimum. Throws std::invalid_argument for slots = 0.
[[nodiscard]] std::uint64_t minimum_budget(const std::vector<UnitDemand>& units,
                                           std::uint32_t slots = 1);
/// The same for units whose need is their size.
[[nodiscard]] std::uint64_t minimum_budget(const std::vector<std::uint64_t>& sizes,
                                           std::uint32_t slots = 1);

/// Plans residency under `budget` bytes: the most resident bytes (partial units last, routed
/// ones only when everything fits) beside an arena of at least `slots` (≥ 1) largest streamed
/// needs, else beside fewer, down to one; ties prefer units that come first. Throws BudgetTooSmall,
/// naming minimum_budget(units, 1), if no plan fits; std::invalid_argument for slots = 0.
[[nodiscard]] ResidencyPlan plan_residency(const std::vector<UnitDemand>& units,
                                           std::uint64_t budget, std::uint32_t slots = 2);
/// The same for units whose need is their size.
[[nodiscard]] ResidencyPlan plan_residency(const std::vector<std::uint64_t>& sizes,
                                           std::uint64_t budget, std::uint32_t slots = 2);

}  // namespace tensorstream::engine
