// The residency planner: budgets are never exceeded, the minimum is exact and physical (the
// units that cannot stream plus the largest need), and the plan keeps as many bytes resident
// as fit beside an arena that overlaps loads with compute where the budget allows.
#include <gtest/gtest.h>

#include <algorithm>
#include <numeric>
#include <random>

#include "tensorstream/engine/residency.hpp"

namespace eng = tensorstream::engine;

namespace {
constexpr std::uint64_t MiB = 1 << 20;

void expect_valid(const eng::ResidencyPlan& plan, const std::vector<std::uint64_t>& sizes,
                  std::uint64_t budget, std::uint32_t slots = 1) {
  ASSERT_EQ(plan.resident.size(), sizes.size());
  EXPECT_LE(plan.device_bytes(), budget);
  std::uint64_t resident = 0;
  std::uint64_t streamed = 0;
  for (std::size_t i = 0; i < sizes.size(); ++i) {
    if (plan.resident[i]) {
      resident += (sizes[i] + 4095) / 4096 * 4096;
    } else {
      streamed += sizes[i];
      EXPECT_LE(sizes[i], plan.largest_need) << "streamed unit " << i << " exceeds the largest";
    }
  }
  EXPECT_EQ(resident, plan.resident_bytes);
  EXPECT_EQ(streamed, plan.streamed_bytes);
  if (streamed > 0) {
    EXPECT_GE(plan.arena_bytes, plan.largest_need) << "the arena holds the largest unit";
    EXPECT_EQ(plan.device_bytes(), budget) << "the arena takes what residents leave";
    EXPECT_EQ(plan.overlap, plan.arena_bytes >= 2 * plan.largest_need);
    // The arena holds `slots` largest units whenever a plan with that many fits the budget.
    if (budget >= eng::minimum_budget(sizes, slots)) {
      EXPECT_GE(plan.arena_bytes, std::uint64_t{slots} * plan.largest_need);
    }
  } else {
    EXPECT_EQ(plan.arena_bytes, 0u);
  }
}
}  // namespace

TEST(Residency, EverythingFits) {
  const std::vector<std::uint64_t> sizes{10 * MiB, 20 * MiB, 30 * MiB};
  const auto plan = eng::plan_residency(sizes, 60 * MiB);
  EXPECT_EQ(plan.arena_bytes, 0u);
  EXPECT_EQ(plan.streamed_bytes, 0u);
  EXPECT_EQ(plan.resident, (std::vector<bool>{true, true, true}));
}

TEST(Residency, UniformLayersFillBudgetBesideRing) {
  const std::vector<std::uint64_t> sizes(10, 100 * MiB);
  const auto plan = eng::plan_residency(sizes, 450 * MiB);
  expect_valid(plan, sizes, 450 * MiB, 2);
  EXPECT_TRUE(plan.overlap);
  EXPECT_EQ(plan.largest_need, 100 * MiB);
  EXPECT_EQ(plan.resident_bytes, 200 * MiB);  // 450 - 2 × 100 leaves room for two layers
  EXPECT_EQ(plan.arena_bytes, 250 * MiB);     // the rest of the budget: deeper prefetch
  EXPECT_TRUE(plan.resident[0] && plan.resident[1]) << "ties go to the blocks that come first";
}

TEST(Residency, LargeEmbeddingsStayResidentWhenThatStreamsLess) {
  std::vector<std::uint64_t> sizes{500 * MiB};
  for (int i = 0; i < 8; ++i) sizes.push_back(100 * MiB);
  sizes.push_back(500 * MiB);
  // 1300: both 500s resident + ring of 2×100 + one layer resident = 1300.
  auto plan = eng::plan_residency(sizes, 1300 * MiB);
  expect_valid(plan, sizes, 1300 * MiB, 2);
  EXPECT_TRUE(plan.resident.front() && plan.resident.back());
  EXPECT_EQ(plan.largest_need, 100 * MiB);
  EXPECT_EQ(plan.resident_bytes, 1100 * MiB);
  // 1000: the big blocks cannot be resident beside any arena of two; everything streams
  // through two 500s.
  plan = eng::plan_residency(sizes, 1000 * MiB);
  expect_valid(plan, sizes, 1000 * MiB, 2);
  EXPECT_EQ(plan.largest_need, 500 * MiB);
  EXPECT_EQ(plan.resident_bytes, 0u);
}

TEST(Residency, TooSmallBudgetNamesTheMinimum) {
  const std::vector<std::uint64_t> sizes{300 * MiB, 100 * MiB, 100 * MiB, 100 * MiB};
  // With overlap: 300 resident + 2 × 100, cheaper than 2 × 300.
  EXPECT_EQ(eng::minimum_budget(sizes, 2), 500 * MiB);
  const auto overlapped = eng::plan_residency(sizes, 500 * MiB);
  EXPECT_TRUE(overlapped.overlap);
  EXPECT_TRUE(overlapped.resident[0]);
  // The physical minimum: everything streamed, one unit at a time, the largest 300.
  const auto minimum = eng::minimum_budget(sizes);
  EXPECT_EQ(minimum, 300 * MiB);
  const auto tight = eng::plan_residency(sizes, minimum);
  EXPECT_FALSE(tight.overlap);
  EXPECT_EQ(tight.resident_bytes, 0u);
  EXPECT_EQ(tight.arena_bytes, 300 * MiB);
  try {
    (void)eng::plan_residency(sizes, minimum - 1);
    FAIL() << "a budget below the minimum was accepted";
  } catch (const eng::BudgetTooSmall& e) {
    EXPECT_EQ(e.minimum_budget(), minimum);
    EXPECT_NE(std::string(e.what()).find(std::to_string(minimum)), std::string::npos) << e.what();
  }
  EXPECT_THROW((void)eng::plan_residency(sizes, minimum, 0), std::invalid_argument);
  EXPECT_THROW((void)eng::minimum_budget(sizes, 0), std::invalid_argument);
}

TEST(Residency, MoreSlotsCostMoreBudget) {
  const std::vector<std::uint64_t> sizes(6, 64 * MiB);
  EXPECT_EQ(eng::minimum_budget(sizes, 2), 128 * MiB);
  EXPECT_EQ(eng::minimum_budget(sizes, 4), 256 * MiB);
  const auto plan = eng::plan_residency(sizes, 300 * MiB, 4);
  expect_valid(plan, sizes, 300 * MiB, 4);
  EXPECT_GE(plan.arena_bytes, 4 * plan.largest_need);
}

TEST(Residency, RandomisedPlansNeverExceedBudget) {
  std::mt19937_64 rng(5);
  for (int round = 0; round < 2000; ++round) {
    std::vector<std::uint64_t> sizes(1 + rng() % 12);
    for (auto& s : sizes) s = 1 + rng() % (64 * MiB);
    const std::uint32_t slots = 1 + static_cast<std::uint32_t>(rng() % 4);
    const auto minimum = eng::minimum_budget(sizes);
    const std::uint64_t total = std::accumulate(sizes.begin(), sizes.end(), std::uint64_t{0});
    const std::uint64_t budget = rng() % (total * 2 + 1);
    if (budget < minimum) {  // minimum ≤ total: "all resident" is one of its options
      EXPECT_THROW((void)eng::plan_residency(sizes, budget, slots), eng::BudgetTooSmall);
      continue;
    }
    const auto plan = eng::plan_residency(sizes, budget, slots);
    expect_valid(plan, sizes, budget, slots);
  }
}

TEST(Residency, NeedsOfUnitsHeldTogetherRaiseTheMinimum) {
  // A module's own weights (unit 0, 10) held while its child's (unit 1, 30) load: while
  // unit 0 is used, 40 must be present at once.
  const std::vector<eng::UnitDemand> units{
      {10 * MiB, 40 * MiB, false}, {30 * MiB, 0, false}, {20 * MiB, 0, false}};
  EXPECT_EQ(eng::minimum_budget(units), 40 * MiB);
  EXPECT_EQ(eng::minimum_budget(std::vector<std::uint64_t>{10 * MiB, 30 * MiB, 20 * MiB}),
            30 * MiB);
  EXPECT_THROW((void)eng::plan_residency(units, 40 * MiB - 1), eng::BudgetTooSmall);
  // At 40 the parent is better resident (10) and its children stream through 30.
  const auto plan = eng::plan_residency(units, 40 * MiB);
  EXPECT_TRUE(plan.resident[0]);
  EXPECT_EQ(plan.largest_need, 30 * MiB);
  EXPECT_EQ(plan.arena_bytes, 30 * MiB);
}

TEST(Residency, PartialUnitsAreMadeResidentLast) {
  // An embedding read by rows (partial, need one row) beside layers: resident bytes go to the
  // layers, which otherwise stream their whole size every pass.
  std::vector<eng::UnitDemand> units{{400 * MiB, 4096, true}};
  for (int i = 0; i < 4; ++i) units.push_back({100 * MiB, 0, false});
  auto plan = eng::plan_residency(units, 500 * MiB);
  EXPECT_FALSE(plan.resident[0]) << "the embedding streams by rows";
  EXPECT_EQ(plan.resident_bytes, 400 * MiB);  // every layer, beside 100 MiB for the rows
  EXPECT_TRUE(plan.overlap);
  // Of equal size, a whole unit is made resident before a partial one.
  units = {{100 * MiB, 4096, true}, {100 * MiB, 0, false}, {100 * MiB, 0, false}};
  plan = eng::plan_residency(units, 250 * MiB);
  EXPECT_FALSE(plan.resident[0]);
  EXPECT_TRUE(plan.resident[1] && plan.resident[2]);
  // Its minimum is the largest layer: the rows need one granule.
  EXPECT_EQ(eng::minimum_budget(units), 100 * MiB);
}

TEST(Residency, BelowTheOverlapBudgetItRunsWithoutOverlap) {
  const std::vector<std::uint64_t> sizes(4, 100 * MiB);
  for (const std::uint64_t budget : {100 * MiB, 150 * MiB, 199 * MiB}) {
    const auto plan = eng::plan_residency(sizes, budget);
    expect_valid(plan, sizes, budget, 2);
    EXPECT_FALSE(plan.overlap) << budget;
  }
  const auto plan = eng::plan_residency(sizes, 200 * MiB);
  EXPECT_TRUE(plan.overlap);
}

TEST(Residency, RoutedUnitsAreCachedInTheArenaNotMadeResident) {
  // A layer's attention and shared expert (every pass) beside 8 routed experts (rate 1/4)
  // of the same size as the attention: the every-pass units are resident, and the rest of the
  // budget is the arena, which caches experts by their learned rate — no expert is resident,
  // though one would fit.
  std::vector<eng::UnitDemand> units{{100 * MiB, 0, false, 1.0}};
  for (int e = 0; e < 8; ++e) units.push_back({100 * MiB, 0, false, 0.25});
  units.push_back({50 * MiB, 0, false, 1.0});  // the shared expert
  auto plan = eng::plan_residency(units, 450 * MiB);
  EXPECT_TRUE(plan.resident[0]);
  EXPECT_TRUE(plan.resident[9]) << "the shared expert";
  for (int e = 1; e <= 8; ++e) EXPECT_FALSE(plan.resident[e]) << e;
  EXPECT_EQ(plan.resident_bytes, 150 * MiB);
  EXPECT_EQ(plan.arena_bytes, 300 * MiB);
  EXPECT_TRUE(plan.overlap);
  // Below the every-pass units' room, they stream too, beside the experts.
  plan = eng::plan_residency(units, 250 * MiB);
  EXPECT_TRUE(plan.resident[9]);
  EXPECT_FALSE(plan.resident[0]);
  EXPECT_EQ(plan.arena_bytes, 200 * MiB);
  // When everything fits, everything is resident.
  plan = eng::plan_residency(units, 1000 * MiB);
  EXPECT_EQ(std::count(plan.resident.begin(), plan.resident.end(), true), 10);
  // Rates do not change the minimum: the largest need beside what cannot stream.
  EXPECT_EQ(eng::minimum_budget(units), 100 * MiB);
}
