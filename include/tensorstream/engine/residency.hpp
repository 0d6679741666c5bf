// The residency plan: which blocks stay in device memory for good and which are streamed
// through a ring of slots, within a hard byte budget.
//
// Streaming a block costs its bytes over the slowest link on every pass, so the plan keeps
// as many bytes resident as the budget allows beside the ring. The ring holds `slots`
// buffers, each as large as the largest streamed block; with fewer than two slots nothing
// can load while something computes, so two is the minimum whenever anything streams.
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

struct ResidencyPlan {
  std::vector<bool> resident;   ///< per block: kept in device memory
  std::uint32_t slots = 0;      ///< streaming slots in the ring (0 if nothing streams)
  std::uint64_t slot_size = 0;  ///< bytes per slot (largest streamed block, aligned)
  std::uint64_t resident_bytes = 0;
  std::uint64_t streamed_bytes = 0;  ///< bytes streamed per full pass over all blocks
  /// Device bytes the plan uses: resident_bytes + slots × slot_size (≤ the budget).
  [[nodiscard]] std::uint64_t device_bytes() const noexcept {
    return resident_bytes + std::uint64_t{slots} * slot_size;
  }
};

// Every block size is counted rounded up to kSlotAlignment (alignment.hpp), the granularity
// of device buffers inside the budget.

/// The smallest budget under which some plan with `min_slots` slots exists for blocks of
/// `sizes`: all blocks streamed (min_slots × largest), or the largest resident and the rest
/// streamed, and so on — the cheapest of these.
[[nodiscard]] std::uint64_t minimum_budget(const std::vector<std::uint64_t>& sizes,
                                           std::uint32_t min_slots = 2);

/// Plans residency for blocks of `sizes` under `budget` bytes with up to `slots` streaming
/// slots (at least 2 whenever a block streams; fewer only if everything is resident).
/// Maximises resident bytes (so the fewest bytes stream per pass); ties prefer blocks that
/// come first. Throws BudgetTooSmall, naming the minimum budget, if no plan fits.
[[nodiscard]] ResidencyPlan plan_residency(const std::vector<std::uint64_t>& sizes,
                                           std::uint64_t budget, std::uint32_t slots = 2);

}  // namespace tensorstream::engine
