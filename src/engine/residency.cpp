#include "tensorstream/engine/residency.hpp"

#include <algorithm>
#include <numeric>

#include "tensorstream/errors.hpp"

namespace tensorstream::engine {
namespace {

std::uint64_t aligned(std::uint64_t n) { return align_up(n, kSlotAlignment); }

// Best plan in which every block larger than `slot` is resident and the rest compete for
// what the budget leaves beside `slots` slots of `slot` bytes. Returns false if the forced
// residents alone do not fit.
bool plan_with_slot(const std::vector<std::uint64_t>& sizes, std::uint64_t budget,
                    std::uint32_t slots, std::uint64_t slot, ResidencyPlan& out) {
  const std::uint64_t ring = std::uint64_t{slots} * slot;
  if (ring > budget) return false;
  std::uint64_t left = budget - ring;
  ResidencyPlan plan;
  plan.resident.assign(sizes.size(), false);
  std::vector<std::size_t> optional;
  for (std::size_t i = 0; i < sizes.size(); ++i) {
    const auto need = aligned(sizes[i]);
    if (need > slot) {
      if (need > left) return false;
      left -= need;
      plan.resident[i] = true;
      plan.resident_bytes += need;
    } else {
      optional.push_back(i);
    }
  }
  // Largest first fills the budget with the most bytes (first-fit decreasing); stable, so
  // equal sizes go to the blocks that come first.
  std::stable_sort(optional.begin(), optional.end(),
                   [&](std::size_t a, std::size_t b) { return sizes[a] > sizes[b]; });
  for (const auto i : optional) {
    const auto need = aligned(sizes[i]);
    if (need <= left) {
      left -= need;
      plan.resident[i] = true;
      plan.resident_bytes += need;
    }
  }
  std::uint64_t largest_streamed = 0;
  for (std::size_t i = 0; i < sizes.size(); ++i) {
    if (!plan.resident[i]) {
      largest_streamed = std::max(largest_streamed, aligned(sizes[i]));
      plan.streamed_bytes += sizes[i];
    }
  }
  if (largest_streamed == 0) {
    plan.slots = 0;
    plan.slot_size = 0;
  } else {
    plan.slots = slots;
    plan.slot_size = largest_streamed;  // may be below `slot`: the ring shrinks to fit
  }
  out = std::move(plan);
  return true;
}

}  // namespace

std::uint64_t minimum_budget(const std::vector<std::uint64_t>& sizes, std::uint32_t min_slots) {
  std::vector<std::uint64_t> sorted;
  sorted.reserve(sizes.size());
  for (const auto s : sizes) sorted.push_back(aligned(s));
  std::sort(sorted.begin(), sorted.end(), std::greater<>());
  if (sorted.empty()) return 0;
  // Keep the j largest resident and stream the rest through slots of the (j+1)-th size.
  std::uint64_t best = std::accumulate(sorted.begin(), sorted.end(), std::uint64_t{0});
  std::uint64_t prefix = 0;
  for (std::size_t j = 0; j < sorted.size(); ++j) {
    best = std::min(best, prefix + std::uint64_t{min_slots} * sorted[j]);
    prefix += sorted[j];
  }
  return best;
}

ResidencyPlan plan_residency(const std::vector<std::uint64_t>& sizes, std::uint64_t budget,
                             std::uint32_t slots) {
  TS_EXPECT(slots >= 2, std::invalid_argument, "a streaming ring needs at least 2 slots, got ",
            slots);
  const auto total =
      std::accumulate(sizes.begin(), sizes.end(), std::uint64_t{0},
                      [](std::uint64_t acc, std::uint64_t s) { return acc + aligned(s); });
  if (total <= budget) {
    ResidencyPlan all;
    all.resident.assign(sizes.size(), true);
    all.resident_bytes = total;
    return all;
  }
  // The slot size is the size of some block; try each distinct size and keep the plan with
  // the most resident bytes.
  std::vector<std::uint64_t> candidates;
  for (const auto s : sizes) candidates.push_back(aligned(s));
  std::sort(candidates.begin(), candidates.end());
  candidates.erase(std::unique(candidates.begin(), candidates.end()), candidates.end());
  bool found = false;
  ResidencyPlan best;
  for (const auto slot : candidates) {
    ResidencyPlan plan;
    if (!plan_with_slot(sizes, budget, slots, slot, plan)) continue;
    if (!found || plan.resident_bytes > best.resident_bytes) {
      best = std::move(plan);
      found = true;
    }
  }
  if (!found) {
    const auto minimum = minimum_budget(sizes, slots);
    throw BudgetTooSmall(detail::concat("budget of ", budget, " bytes is too small: the largest ",
                                        "blocks need at least ", minimum, " bytes (", slots,
                                        " streaming slots of the largest streamed block)"),
                         minimum);
  }
  return best;
}

}  // namespace tensorstream::engine
