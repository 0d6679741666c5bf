// The residency planner: budgets are never exceeded, the minimum is exact, and the plan keeps
// as many bytes resident as fit beside the streaming ring.
#include <gtest/gtest.h>

#include <numeric>
#include <random>

#include "tensorstream/engine/residency.hpp"

namespace eng = tensorstream::engine;

namespace {
constexpr std::uint64_t MiB = 1 << 20;

void expect_valid(const eng::ResidencyPlan& plan, const std::vector<std::uint64_t>& sizes,
                  std::uint64_t budget) {
  ASSERT_EQ(plan.resident.size(), sizes.size());
  EXPECT_LE(plan.device_bytes(), budget);
  std::uint64_t resident = 0;
  std::uint64_t streamed = 0;
  for (std::size_t i = 0; i < sizes.size(); ++i) {
    if (plan.resident[i]) {
      resident += (sizes[i] + 4095) / 4096 * 4096;
    } else {
      streamed += sizes[i];
      EXPECT_LE(sizes[i], plan.slot_size) << "streamed block " << i << " does not fit a slot";
    }
  }
  EXPECT_EQ(resident, plan.resident_bytes);
  EXPECT_EQ(streamed, plan.streamed_bytes);
  if (streamed > 0) {
    EXPECT_GE(plan.slots, 2u);
  }
}
}  // namespace

TEST(Residency, EverythingFits) {
  const std::vector<std::uint64_t> sizes{10 * MiB, 20 * MiB, 30 * MiB};
  const auto plan = eng::plan_residency(sizes, 60 * MiB);
  EXPECT_EQ(plan.slots, 0u);
  EXPECT_EQ(plan.streamed_bytes, 0u);
  EXPECT_EQ(plan.resident, (std::vector<bool>{true, true, true}));
}

TEST(Residency, UniformLayersFillBudgetBesideRing) {
  const std::vector<std::uint64_t> sizes(10, 100 * MiB);
  const auto plan = eng::plan_residency(sizes, 450 * MiB);
  expect_valid(plan, sizes, 450 * MiB);
  EXPECT_EQ(plan.slots, 2u);
  EXPECT_EQ(plan.slot_size, 100 * MiB);
  EXPECT_EQ(plan.resident_bytes, 200 * MiB);  // 450 - 2 × 100 leaves room for two layers
  EXPECT_TRUE(plan.resident[0] && plan.resident[1]) << "ties go to the blocks that come first";
}

TEST(Residency, LargeEmbeddingsStayResidentWhenThatStreamsLess) {
  std::vector<std::uint64_t> sizes{500 * MiB};
  for (int i = 0; i < 8; ++i) sizes.push_back(100 * MiB);
  sizes.push_back(500 * MiB);
  // 1300: both 500s resident + ring of 2×100 + one layer resident = 1300.
  auto plan = eng::plan_residency(sizes, 1300 * MiB);
  expect_valid(plan, sizes, 1300 * MiB);
  EXPECT_TRUE(plan.resident.front() && plan.resident.back());
  EXPECT_EQ(plan.slot_size, 100 * MiB);
  EXPECT_EQ(plan.resident_bytes, 1100 * MiB);
  // 1000: the big blocks cannot be resident beside any ring; everything streams in 500s.
  plan = eng::plan_residency(sizes, 1000 * MiB);
  expect_valid(plan, sizes, 1000 * MiB);
  EXPECT_EQ(plan.slot_size, 500 * MiB);
  EXPECT_EQ(plan.resident_bytes, 0u);
}

TEST(Residency, TooSmallBudgetNamesTheMinimum) {
  const std::vector<std::uint64_t> sizes{300 * MiB, 100 * MiB, 100 * MiB, 100 * MiB};
  const auto minimum = eng::minimum_budget(sizes);
  EXPECT_EQ(minimum, 500 * MiB);  // 300 resident + 2 × 100, cheaper than 2 × 300
  EXPECT_NO_THROW((void)eng::plan_residency(sizes, minimum));
  try {
    (void)eng::plan_residency(sizes, minimum - 1);
    FAIL() << "a budget below the minimum was accepted";
  } catch (const eng::BudgetTooSmall& e) {
    EXPECT_EQ(e.minimum_budget(), minimum);
    EXPECT_NE(std::string(e.what()).find(std::to_string(minimum)), std::string::npos) << e.what();
  }
  EXPECT_THROW((void)eng::plan_residency(sizes, minimum, 1), std::invalid_argument);
}

TEST(Residency, MoreSlotsCostMoreBudget) {
  const std::vector<std::uint64_t> sizes(6, 64 * MiB);
  EXPECT_EQ(eng::minimum_budget(sizes, 2), 128 * MiB);
  EXPECT_EQ(eng::minimum_budget(sizes, 4), 256 * MiB);
  const auto plan = eng::plan_residency(sizes, 300 * MiB, 4);
  expect_valid(plan, sizes, 300 * MiB);
  EXPECT_EQ(plan.slots, 4u);
}

TEST(Residency, RandomisedPlansNeverExceedBudget) {
  std::mt19937_64 rng(5);
  for (int round = 0; round < 2000; ++round) {
    std::vector<std::uint64_t> sizes(1 + rng() % 12);
    for (auto& s : sizes) s = 1 + rng() % (64 * MiB);
    const std::uint32_t slots = 2 + static_cast<std::uint32_t>(rng() % 3);
    const auto minimum = eng::minimum_budget(sizes, slots);
    const std::uint64_t total = std::accumulate(sizes.begin(), sizes.end(), std::uint64_t{0});
    const std::uint64_t budget = rng() % (total * 2 + 1);
    if (budget < minimum) {  // minimum ≤ total: "all resident" is one of its options
      EXPECT_THROW((void)eng::plan_residency(sizes, budget, slots), eng::BudgetTooSmall);
      continue;
    }
    const auto plan = eng::plan_residency(sizes, budget, slots);
    expect_valid(plan, sizes, budget);
  }
}
