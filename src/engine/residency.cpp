#include "tensorstream/engine/residency.hpp"

#include <algorithm>
#include <numeric>
#include <optional>

#include "tensorstream/errors.hpp"

namespace tensorstream::engine {
namespace {

struct Units {
  std::vector<std::uint64_t> raw;   // sizes as given
  std::vector<std::uint64_t> size;  // footprints
  std::vector<std::uint64_t> need;  // footprints
  std::vector<bool> partial;
  std::vector<double> rate;
  std::uint64_t total = 0;
};

Units units_of(const std::vector<UnitDemand>& units) {
  Units u;
  for (const auto& d : units) {
    u.raw.push_back(d.size);
    u.size.push_back(device_footprint(d.size));
    u.need.push_back(device_footprint(d.need == 0 ? d.size : d.need));
    u.partial.push_back(d.partial);
    u.rate.push_back(d.rate);
    u.total += u.size.back();
  }
  return u;
}

std::vector<UnitDemand> whole(const std::vector<std::uint64_t>& sizes) {
  std::vector<UnitDemand> out;
  out.reserve(sizes.size());
  for (const auto s : sizes) out.push_back(UnitDemand{s, s, false, 1.0});
  return out;
}

// Distinct need footprints: the largest streamed need of any plan is one of them.
std::vector<std::uint64_t> caps_of(const Units& u) {
  std::vector<std::uint64_t> caps = u.need;
  std::sort(caps.begin(), caps.end());
  caps.erase(std::unique(caps.begin(), caps.end()), caps.end());
  return caps;
}

// The best plan in which every unit needing more than `cap` is resident and the others
// compete for what the budget leaves beside an arena of `slots` × cap; nullopt if the forced
// residents do not fit.
std::optional<ResidencyPlan> plan_with_cap(const Units& u, std::uint64_t budget,
                                           std::uint32_t slots, std::uint64_t cap) {
  const std::uint64_t arena = std::uint64_t{slots} * cap;
  if (arena > budget) return std::nullopt;
  std::uint64_t left = budget - arena;
  ResidencyPlan plan;
  plan.resident.assign(u.size.size(), false);
  std::vector<std::size_t> optional;
  for (std::size_t i = 0; i < u.size.size(); ++i) {
    if (u.need[i] > cap) {
      if (u.size[i] > left) return std::nullopt;
      left -= u.size[i];
      plan.resident[i] = true;
      plan.resident_bytes += u.size[i];
    } else {
      optional.push_back(i);
    }
  }
  // Largest first fills the budget with the most bytes (first-fit decreasing) — partial
  // units, which stream only what is asked of them, last; stable, so equal sizes go to the
  // units that come first. Routed units are left to the arena (see the header).
  std::stable_sort(optional.begin(), optional.end(), [&](std::size_t a, std::size_t b) {
    if (u.partial[a] != u.partial[b]) return !u.partial[a];
    return u.size[a] > u.size[b];
  });
  for (const auto i : optional) {
    if (u.rate[i] < 1) continue;
    if (u.size[i] <= left) {
      left -= u.size[i];
      plan.resident[i] = true;
      plan.resident_bytes += u.size[i];
    }
  }
  for (std::size_t i = 0; i < u.size.size(); ++i) {
    if (!plan.resident[i]) {
      plan.largest_need = std::max(plan.largest_need, u.need[i]);
      plan.streamed_bytes += u.raw[i];
    }
  }
  if (plan.largest_need > 0) {
    plan.arena_bytes = budget - plan.resident_bytes;  // ≥ slots × cap ≥ slots × largest_need
    plan.overlap = plan.arena_bytes / plan.largest_need >= 2;
  }
  return plan;
}

// Bytes a plan keeps from streaming on an average pass.
double saved_per_pass(const Units& u, const ResidencyPlan& plan) {
  double saved = 0;
  for (std::size_t i = 0; i < u.size.size(); ++i) {
    if (plan.resident[i]) saved += static_cast<double>(u.size[i]) * u.rate[i];
  }
  return saved;
}

}  // namespace

std::uint64_t minimum_budget(const std::vector<UnitDemand>& units, std::uint32_t slots) {
  TS_EXPECT(slots >= 1, std::invalid_argument, "the arena must hold at least 1 unit, got ", slots);
  const auto u = units_of(units);
  std::uint64_t best = u.total;  // everything resident
  for (const auto cap : caps_of(u)) {
    std::uint64_t forced = 0;
    for (std::size_t i = 0; i < u.size.size(); ++i) {
      if (u.need[i] > cap) forced += u.size[i];
    }
    best = std::min(best, forced + std::uint64_t{slots} * cap);
  }
  return best;
}

std::uint64_t minimum_budget(const std::vector<std::uint64_t>& sizes, std::uint32_t slots) {
  return minimum_budget(whole(sizes), slots);
}

ResidencyPlan plan_residency(const std::vector<std::uint64_t>& sizes, std::uint64_t budget,
                             std::uint32_t slots) {
  return plan_residency(whole(sizes), budget, slots);
}

ResidencyPlan plan_residency(const std::vector<UnitDemand>& units, std::uint64_t budget,
                             std::uint32_t slots) {
  TS_EXPECT(slots >= 1, std::invalid_argument, "the arena must hold at least 1 unit, got ", slots);
  const auto u = units_of(units);
  if (u.total <= budget) {
    ResidencyPlan all;
    all.resident.assign(units.size(), true);
    all.resident_bytes = u.total;
    return all;
  }
  const auto caps = caps_of(u);
  for (std::uint32_t k = slots; k >= 1; --k) {
    std::optional<ResidencyPlan> best;
    double best_saved = 0;
    for (const auto cap : caps) {
      auto plan = plan_with_cap(u, budget, k, cap);
      if (!plan) continue;
      const double saved = saved_per_pass(u, *plan);
      if (!best || saved > best_saved ||
          (saved == best_saved && plan->resident_bytes > best->resident_bytes)) {
        best = std::move(plan);
        best_saved = saved;
      }
    }
    if (best) return *std::move(best);
  }
  const auto minimum = minimum_budget(units, 1);
  throw BudgetTooSmall(
      detail::concat("budget of ", budget, " bytes is too small: at least ", minimum,
                     " bytes are needed (the units that cannot ",
                     "stream, plus room for the largest unit that must be ", "present at once)"),
      minimum);
}

}  // namespace tensorstream::engine
