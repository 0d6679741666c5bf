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
using eng::detail::SlotState;
using ts::testing::Fault;
using ts::testing::FaultContext;
using ts::testing::FaultInjectionEnv;
using ts::testing::FaultPoint;
using ts::testing::TempDir;

namespace {

constexpr std::uint64_t KiB = 1024;

// Block 0 resident (4 KiB), blocks 1–3 streamed through two 8 KiB slots: places 0 (resident),
// 1 and 2 (slots).
struct Fixture {
  Fixture() {
    eng::ResidencyPlan plan;
    plan.resident = {true, false, false, false};
    plan.slots = 2;
    plan.slot_size = 8 * KiB;
    plan.resident_bytes = 4 * KiB;
    std::vector<eng::detail::BlockBuffer> buffers;
    buffers.emplace_back(4 * KiB);
    buffers.emplace_back(8 * KiB);
    buffers.emplace_back(8 * KiB);
    ring.emplace(plan, std::move(buffers));
    for (int b = 0; b < 4; ++b)
      blocks.push_back({ts::detail::concat("layers.", b), 4 * KiB, {}, {}});
    stats.device_bytes_in_use = ring->bytes();
    stats.device_bytes_peak = ring->bytes();
    budget = ring->bytes();
  }

  [[nodiscard]] std::string broken() const {
    const auto what = eng::detail::broken_invariant(*ring, blocks, budget, stats);
    return what ? *what : std::string();
  }

  std::optional<eng::detail::SlotRing> ring;
  std::vector<eng::BlockLayout> blocks;
  eng::EngineStats stats;
  std::uint64_t budget = 0;
};

std::string contains(const std::string& text, const std::string& part) {
  return text.find(part) != std::string::npos ? std::string()
                                              : "'" + text + "' lacks '" + part + "'";
}

}  // namespace

TEST(EngineInvariants, AHealthyRingHoldsThemAll) {
  Fixture f;
  EXPECT_EQ(f.broken(), "");
  (void)f.ring->assign(0, 0);
  (*f.ring)[0].state = SlotState::kReady;
  (void)f.ring->assign(1, 2);
  (*f.ring)[1].state = SlotState::kFilling;
  (*f.ring)[1].pins = 2;
  (void)f.ring->assign(2, 3);
  (*f.ring)[2].state = SlotState::kFailed;
  f.stats.acquires = 3;
  f.stats.device_hits = 1;
  f.stats.device_misses = 1;
  f.stats.prefetches_issued = 2;
  f.stats.prefetches_used = 1;
  f.stats.prefetches_wasted = 1;
  EXPECT_EQ(f.broken(), "");
  // A forgotten failure leaves a stale pin of a waiter on an empty place: legitimate.
  f.ring->forget(2, 3);
  (*f.ring)[2].pins = 1;
  EXPECT_EQ(f.broken(), "");
}

TEST(EngineInvariants, DeviceBytesOverTheBudget) {
  Fixture f;
  f.budget -= 1;
  EXPECT_EQ(contains(f.broken(), "device bytes in use (20480) exceed the budget of 20479"), "");
  Fixture g;
  g.stats.device_bytes_peak = g.budget + 4096;
  EXPECT_EQ(contains(g.broken(), "peak device bytes (24576) exceed the budget"), "");
  Fixture h;
  h.stats.device_bytes_in_use = 0;
  EXPECT_EQ(contains(h.broken(), "the places hold 20480 bytes but device_bytes_in_use is 0"), "");
}

TEST(EngineInvariants, NegativePins) {
  Fixture f;
  (void)f.ring->assign(1, 1);
  (*f.ring)[1].state = SlotState::kReady;
  (*f.ring)[1].pins = -1;
  EXPECT_EQ(contains(f.broken(), "slot place 1 (ready, block 1, pins -1) has negative pins"), "");
}

TEST(EngineInvariants, AReadyPlaceMustBeItsBlocksPlace) {
  Fixture f;
  (void)f.ring->assign(1, 2);
  (*f.ring)[1].state = SlotState::kReady;
  (*f.ring)[2].block = 2;  // a second place claims block 2 without being its place
  (*f.ring)[2].state = SlotState::kReady;
  EXPECT_EQ(contains(f.broken(),
                     "slot place 2 (ready, block 2, pins 0) holds block 'layers.2', "
                     "whose place is 1"),
            "");
  Fixture g;
  (*g.ring)[1].state = SlotState::kReady;  // ready, but for no block
  EXPECT_EQ(contains(g.broken(),
                     "slot place 1 (ready, block -1, pins 0) is not empty but holds "
                     "no block"),
            "");
  Fixture h;
  (*h.ring)[2].block = 9;
  EXPECT_EQ(contains(h.broken(), "holds no block of the source"), "");
}

TEST(EngineInvariants, ResidentBlocksStayInTheirOwnPlace) {
  Fixture f;
  (void)f.ring->assign(1, 0);  // resident block 0 given a streaming slot
  (*f.ring)[1].state = SlotState::kReady;
  EXPECT_EQ(contains(f.broken(), "resident block 'layers.0' is in slot place 1"), "");
  Fixture g;
  (*g.ring)[0].block = 3;  // the resident place holding another block
  EXPECT_EQ(contains(g.broken(),
                     "resident place 0 (empty, block 3, pins 0) holds block "
                     "'layers.3', which is not the block it is reserved for"),
            "");
}

TEST(EngineInvariants, ABlocksRecordedPlaceHoldsIt) {
  Fixture f;
  (void)f.ring->assign(1, 1);
  (*f.ring)[1].block = 2;  // the place moved on without the block's record
  EXPECT_EQ(contains(f.broken(), "block 'layers.1' is recorded in place 1"), "");
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
    options.device_budget = eng::minimum_budget(sizes, options.slots) + rng() % (256 * KiB);
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
