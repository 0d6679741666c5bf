// The engine's invariant checks (EngineOptions::check_invariants): each invariant broken on
// purpose is named, and real schedules — concurrent, with failures, copying and in place —
// run under the checks without a false alarm.
#include <gtest/gtest.h>

#include <atomic>
#include <cerrno>
#include <random>
#include <stdexcept>
#include <thread>
#include <vector>

#include "tensorstream/checksum.hpp"
#include "tensorstream/engine/detail/invariants.hpp"
#include "tensorstream/engine/engine.hpp"
#include "tensorstream/store.hpp"
#include "test_helpers.hpp"

namespace ts = tensorstream;
namespace eng = tensorstream::engine;
using eng::detail::UnitState;
using ts::testing::Fault;
using ts::testing::FaultContext;
using ts::testing::FaultInjectionEnv;
using ts::testing::FaultPoint;
using ts::testing::TempDir;

namespace {

constexpr std::uint64_t KiB = 1024;

// Unit 0 resident (4 KiB), units 1–3 streamed through an arena of 8 KiB.
struct Fixture {
  Fixture() {
    eng::ResidencyPlan plan;
    plan.resident = {true, false, false, false};
    plan.arena_bytes = 8 * KiB;
    plan.largest_need = 4 * KiB;
    plan.resident_bytes = 4 * KiB;
    places.emplace(plan, std::vector<std::uint64_t>(4, 4 * KiB), std::vector<std::uint64_t>(4, 0),
                   nullptr, std::nullopt, /*with_memory=*/true, nullptr);
    for (int b = 0; b < 4; ++b)
      blocks.push_back({ts::detail::concat("layers.", b), 4 * KiB, {}, {}, {}, 0});
    stats.device_bytes_in_use = places->device_bytes();
    stats.device_bytes_peak = places->device_bytes();
    budget = places->device_bytes();
  }

  // Gives streamed `unit` a place and `state`, as the engine does.
  void place(std::uint32_t unit, UnitState state) {
    const auto where = places->find(unit, true, 0, nullptr);
    ASSERT_TRUE(where);
    (void)places->take(unit, *where);
    (*places)[unit].state = state;
    places->sync(unit);
  }

  [[nodiscard]] std::string broken() const {
    const auto what = eng::detail::broken_invariant(*places, blocks, budget, stats);
    return what ? *what : std::string();
  }

  std::optional<eng::detail::UnitPlaces> places;
  std::vector<eng::BlockLayout> blocks;
  eng::EngineStats stats;
  std::uint64_t budget = 0;
};

std::string contains(const std::string& text, const std::string& part) {
  return text.find(part) != std::string::npos ? std::string()
                                              : "'" + text + "' lacks '" + part + "'";
}

}  // namespace

TEST(EngineInvariants, HealthyPlacesHoldThemAll) {
  Fixture f;
  EXPECT_EQ(f.broken(), "");
  (*f.places)[0].state = UnitState::kReady;
  f.place(2, UnitState::kFilling);
  (*f.places)[2].pins = 2;
  f.places->sync(2);
  f.place(3, UnitState::kFailed);
  f.stats.acquires = 3;
  f.stats.device_hits = 1;
  f.stats.device_misses = 1;
  f.stats.prefetches_issued = 2;
  f.stats.prefetches_used = 1;
  f.stats.prefetches_wasted = 1;
  EXPECT_EQ(f.broken(), "");
  // A forgotten failure leaves a stale pin of a waiter on an absent unit: legitimate.
  f.places->forget(3);
  (*f.places)[3].pins = 1;
  EXPECT_EQ(f.broken(), "");
}

TEST(EngineInvariants, DeviceBytesOverTheBudget) {
  Fixture f;
  f.budget -= 1;
  EXPECT_EQ(contains(f.broken(), "device bytes in use (12288) exceed the budget of 12287"), "");
  Fixture g;
  g.stats.device_bytes_peak = g.budget + 4096;
  EXPECT_EQ(contains(g.broken(), "peak device bytes (16384) exceed the budget"), "");
  Fixture h;
  h.stats.device_bytes_in_use = 0;
  EXPECT_EQ(contains(h.broken(), "the places hold 12288 bytes but device_bytes_in_use is 0"), "");
  Fixture k;
  k.stats.arena_bytes_peak = 8 * KiB + 4096;
  EXPECT_EQ(contains(k.broken(), "in a capacity of 8192"), "");
}

TEST(EngineInvariants, NegativePins) {
  Fixture f;
  f.place(1, UnitState::kReady);
  (*f.places)[1].pins = -1;
  EXPECT_EQ(contains(f.broken(), "streamed unit 'layers.1' (ready, pins -1) has negative pins"),
            "");
}

TEST(EngineInvariants, AStreamedUnitInUseHasAPlace) {
  Fixture f;
  (*f.places)[2].state = UnitState::kReady;  // ready, but never placed
  EXPECT_EQ(contains(f.broken(), "streamed unit 'layers.2' (ready, pins 0) has no place"), "");
  Fixture g;
  g.place(1, UnitState::kReady);
  (*g.places)[1].memory.reset();
  EXPECT_EQ(contains(g.broken(), "has no place in the arena"), "");
}

TEST(EngineInvariants, ResidentUnitsStayInTheirOwnBuffers) {
  Fixture f;
  (*f.places)[0].memory.reset();
  EXPECT_EQ(contains(f.broken(), "resident unit 'layers.0' (absent, pins 0) has no buffer"), "");
}

TEST(EngineInvariants, TheArenaTreatsAUnitAsItsStateSays) {
  Fixture f;
  f.place(1, UnitState::kReady);
  (*f.places)[1].pins = 1;  // held, but the arena was not told: it could displace it
  EXPECT_EQ(contains(f.broken(), "is cached in the arena instead of pinned"), "");
}

TEST(EngineInvariants, CountersStayConsistent) {
  Fixture f;
  f.stats.acquires = 1;
  f.stats.device_hits = 1;
  f.stats.device_misses = 1;
  EXPECT_EQ(contains(f.broken(), "device hits (1) + misses (1) exceed acquires (1)"), "");
  Fixture g;
  g.stats.prefetches_issued = 1;
  g.stats.prefetches_used = 1;
  g.stats.prefetches_cancelled = 1;
  EXPECT_EQ(contains(g.broken(), "exceed prefetches issued (1)"), "");
}

// A real engine under the checks: concurrent acquires, prefetches and injected read errors,
// copying (pread) and in place (mmap). Every call is checked; none raises a false alarm.
TEST(EngineInvariants, ConcurrentSchedulesPassEveryCheck) {
  std::mt19937_64 rng(7);
  for (int round = 0; round < 4; ++round) {
    TempDir dir;
    const int n = 8 + static_cast<int>(rng() % 6);
    const auto path = ts::testing::make_random_store(dir.path(), n, 4 * KiB, 150 * KiB, rng());
    const auto store = ts::Store::open(path);
    std::vector<std::uint64_t> sizes;
    for (const auto& b : store.blocks()) sizes.push_back(b.raw_size);
    const auto bad_offset = store.blocks()[static_cast<std::size_t>(n / 2)].offset;
    std::atomic<int> faults_left{round % 2 == 0 ? 3 : 0};
    FaultInjectionEnv env([&](const FaultContext& ctx) {
      Fault fault;
      if (ctx.point == FaultPoint::kRead && ctx.offset == bad_offset &&
          faults_left.fetch_sub(1) > 0) {
        fault.error = EIO;
      }
      return fault;
    });
    eng::EngineOptions options;
    options.backend = round < 2 ? ts::io::BackendType::kPread : ts::io::BackendType::kMmap;
    options.env = &env;
    options.slots = 4;
    options.device_budget = eng::minimum_budget(sizes, 1) + rng() % (256 * KiB);
    options.prefetch = static_cast<eng::PrefetchStrategy>(round % 3);
    options.check_invariants = true;
    eng::Engine engine(path, options);
    std::atomic<std::uint64_t> calls{0};
    std::atomic<int> wrong_bytes{0};
    std::vector<std::thread> threads;
    for (int t = 0; t < 3; ++t) {
      threads.emplace_back([&, seed = rng()] {
        std::mt19937_64 local(seed);
        for (int op = 0; op < 200; ++op) {
          const auto b = static_cast<std::uint32_t>(local() % store.blocks().size());
          if (local() % 4 == 0) {
            engine.prefetch(b);
            ++calls;
            continue;
          }
          try {
            const auto view = engine.acquire(b);
            ++calls;
            if (ts::checksum64({view.host, view.size}) != store.blocks()[b].checksum) ++wrong_bytes;
            engine.release(b);
            ++calls;
          } catch (const ts::IoError&) {
            ++calls;  // an injected read error: the failed acquire was checked too
          }
        }
      });
    }
    for (auto& th : threads) th.join();
    const auto stats = engine.stats();
    EXPECT_EQ(wrong_bytes.load(), 0);
    EXPECT_EQ(stats.invariant_checks, calls.load());
    EXPECT_LE(stats.device_bytes_peak, options.device_budget);
    engine.close();
  }
}

TEST(EngineInvariants, FailedCallsAreCheckedAndNothingIsCheckedWhenOff) {
  TempDir dir;
  const auto path = ts::testing::make_random_store(dir.path(), 4, 16 * KiB, 16 * KiB, 3);
  eng::EngineOptions options;
  options.device_budget = 1 << 20;
  options.check_invariants = true;
  eng::Engine engine(path, options);
  EXPECT_THROW((void)engine.acquire(99), std::out_of_range);
  EXPECT_THROW(engine.release(1), std::logic_error);  // not acquired
  EXPECT_EQ(engine.stats().invariant_checks, 2u);
  (void)engine.acquire(1);
  engine.release(1);
  EXPECT_EQ(engine.stats().invariant_checks, 4u);
  engine.close();

  options.check_invariants = false;
  eng::Engine quiet(path, options);
  (void)quiet.acquire(1);
  quiet.release(1);
  quiet.prefetch(2);
  EXPECT_EQ(quiet.stats().invariant_checks, 0u);
}
