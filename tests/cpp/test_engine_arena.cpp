// The engine's memory model: units of any size in one arena bounded by the budget — units
// grouped by the caller from a store's tensors, rows of one tensor, units held together, the
// arena under randomised concurrent schedules (run under TSan and ASan in CI), and a cyclic
// loop larger than the arena.
#include <gtest/gtest.h>

#include <algorithm>
#include <atomic>
#include <cstring>
#include <map>
#include <random>
#include <thread>

#include "tensorstream/checksum.hpp"
#include "tensorstream/engine/engine.hpp"
#include "tensorstream/errors.hpp"
#include "tensorstream/store.hpp"
#include "test_helpers.hpp"

namespace ts = tensorstream;
namespace eng = tensorstream::engine;
using ts::testing::TempDir;

namespace {

constexpr std::uint64_t KiB = 1024;

// A store of `layers` blocks "layers.N", each with a float32 matrix "layers.N.w" of `rows`
// rows of 64 floats and a vector "layers.N.b" of 64 floats, plus "embed" (a 2000-row table).
struct TestModel {
  std::filesystem::path path;
  std::map<std::string, std::vector<std::byte>> bytes;
};

TestModel make_model(const TempDir& dir, int layers, std::int64_t rows) {
  TestModel m;
  m.path = dir.path() / "model.tstore";
  ts::StoreWriter writer(m.path, ts::WriterOptions{4096, 256, false});
  std::uint64_t seed = 1;
  const auto add = [&](const std::string& name, std::vector<std::int64_t> shape) {
    std::uint64_t n = 4;
    for (const auto d : shape) n *= static_cast<std::uint64_t>(d);
    auto data = ts::testing::random_bytes(n, seed++);
    writer.add_tensor(name, ts::DType::kFloat32, shape, data);
    m.bytes[name] = std::move(data);
  };
  writer.begin_block("embed");
  add("embed", {2000, 64});
  writer.end_block();
  for (int l = 0; l < layers; ++l) {
    const auto name = "layers." + std::to_string(l);
    writer.begin_block(name);
    add(name + ".w", {rows, 64});
    add(name + ".b", {64});
    writer.end_block();
  }
  writer.commit();
  return m;
}

// Units: every tensor of the layers on its own (the table is not streamed as a unit here).
eng::TensorGroups tensor_units(int layers) {
  eng::TensorGroups groups;
  for (int l = 0; l < layers; ++l) {
    const auto name = "layers." + std::to_string(l);
    groups.push_back({name + ".w", {name + ".w"}});
    groups.push_back({name + ".b", {name + ".b"}});
  }
  return groups;
}

void expect_unit_bytes(eng::Engine& engine, const TestModel& m, std::uint32_t unit) {
  const auto view = engine.acquire(unit);
  for (const auto& t : engine.tensors(unit)) {
    const auto& want = m.bytes.at(t.name);
    ASSERT_EQ(t.nbytes, want.size());
    EXPECT_EQ(t.offset % 256, 0u) << t.name;
    EXPECT_EQ(std::memcmp(view.host + t.offset, want.data(), want.size()), 0) << t.name;
  }
  engine.release(unit);
}

}  // namespace

TEST(EngineArena, UnitsAreTheCallersGroupsOfAStoresTensors) {
  TempDir dir;
  const auto m = make_model(dir, 4, 300);
  // Each backend, with the units of layers 3..5 routed (use rate learned, prefetched by the
  // caller) or not.
  for (const auto& [backend, routed] :
       {std::pair{ts::io::BackendType::kPread, false}, std::pair{ts::io::BackendType::kMmap, false},
        std::pair{ts::io::BackendType::kPread, true}}) {
    SCOPED_TRACE(std::string(ts::io::backend_name(backend)) + (routed ? " routed" : ""));
    eng::EngineOptions options;
    options.backend = backend;
    options.verify_checksums = true;
    options.device_budget = 200 * KiB;  // far below the 4 × 77 KiB of the layers
    auto engine = eng::Engine::from_store(m.path, options, tensor_units(4));
    ASSERT_EQ(engine.block_count(), 8u);
    EXPECT_EQ(engine.block_name(0), "layers.0.w");
    for (int pass = 0; pass < 3; ++pass) {
      for (std::uint32_t u = 0; u < 8; ++u) expect_unit_bytes(engine, m, u);
    }
    const auto stats = engine.stats();
    EXPECT_LE(stats.device_bytes_peak, options.device_budget);
    EXPECT_LE(stats.arena_bytes_peak, stats.arena_bytes);
    // A fill of one tensor's unit reads that tensor, not its whole store block: on average
    // less than the larger tensor of a block.
    ASSERT_GT(stats.fills, 0u);
    EXPECT_LE((stats.bytes_from_storage + stats.bytes_from_page_cache) / stats.fills,
              300u * 64 * 4);
  }
  // Bad groups are the caller's mistake, named.
  eng::EngineOptions options;
  options.device_budget = 1 << 20;
  try {
    (void)eng::Engine::from_store(m.path, options, {{"u", {"layers.9.w"}}});
    FAIL() << "an unknown tensor was accepted";
  } catch (const std::invalid_argument& e) {
    EXPECT_NE(std::string(e.what()).find("layers.9.w"), std::string::npos) << e.what();
  }
  EXPECT_THROW((void)eng::Engine::from_store(m.path, options,
                                             {{"u", {"layers.0.w"}}, {"v", {"layers.0.w"}}}),
               std::invalid_argument);
}

TEST(EngineArena, AUnitOfAStoreIsVerifiedByItsTensorsChecksums) {
  TempDir dir;
  const auto m = make_model(dir, 2, 100);
  const auto store = ts::Store::open(m.path);
  const auto& t = store.tensors()[*store.find_tensor("layers.1.w")];
  const auto offset = store.blocks()[t.block].offset + t.offset_in_block + 17;
  auto file = ts::testing::read_file(m.path);
  file[offset] ^= std::byte{0x40};
  ts::testing::write_file(m.path, file);
  eng::EngineOptions options;
  options.backend = ts::io::BackendType::kPread;
  options.verify_checksums = true;
  options.device_budget = 1 << 20;
  auto engine = eng::Engine::from_store(m.path, options, tensor_units(2));
  expect_unit_bytes(engine, m, 0);
  try {
    (void)engine.acquire(2);
    FAIL() << "a corrupt tensor was read without complaint";
  } catch (const ts::ChecksumError& e) {
    EXPECT_NE(std::string(e.what()).find("layers.1.w"), std::string::npos) << e.what();
    EXPECT_NE(std::string(e.what()).find(m.path.string()), std::string::npos) << e.what();
  }
}

TEST(EngineArena, RowsReadOnlyTheRowsAskedFor) {
  TempDir dir;
  const auto m = make_model(dir, 2, 100);
  const auto& table = m.bytes.at("embed");
  constexpr std::uint64_t kRow = 64 * 4;
  // Each backend, with the units of layers 3..5 routed (use rate learned, prefetched by the
  // caller) or not.
  for (const auto& [backend, routed] :
       {std::pair{ts::io::BackendType::kPread, false}, std::pair{ts::io::BackendType::kMmap, false},
        std::pair{ts::io::BackendType::kPread, true}}) {
    SCOPED_TRACE(std::string(ts::io::backend_name(backend)) + (routed ? " routed" : ""));
    eng::EngineOptions options;
    options.backend = backend;
    options.device_budget = 120 * KiB;  // the 500 KiB table never fits whole
    options.unit_needs = {kRow, 0, 0};
    options.unit_partial = {true, false, false};
    auto engine = eng::Engine::from_store(m.path, options);  // units: the store's blocks
    ASSERT_EQ(engine.block_name(0), "embed");
    EXPECT_FALSE(engine.plan().resident[0]);
    std::mt19937_64 rng(3);
    std::uint64_t asked = 0;
    for (int call = 0; call < 20; ++call) {
      std::vector<std::int64_t> rows;
      for (std::int64_t r = 0; r < 2000; ++r) {
        if (rng() % 40 == 0) rows.push_back(r);
      }
      if (call == 0) rows = {0, 1, 2, 1999};
      const auto view = engine.acquire_rows(0, 0, rows);
      ASSERT_EQ(view.rows, rows.size());
      ASSERT_EQ(view.row_bytes, kRow);
      ASSERT_NE(view.host, nullptr);
      for (std::size_t i = 0; i < rows.size(); ++i) {
        EXPECT_EQ(std::memcmp(view.host + i * kRow,
                              table.data() + static_cast<std::size_t>(rows[i]) * kRow, kRow),
                  0)
            << "row " << rows[i];
      }
      engine.release_rows(view.handle);
      asked += rows.size();
      // Layers stream beside the rows.
      expect_unit_bytes(engine, m, 1 + static_cast<std::uint32_t>(call % 2));
    }
    const auto stats = engine.stats();
    EXPECT_EQ(stats.rows_read, asked);
    EXPECT_EQ(stats.bytes_of_rows, asked * kRow) << "only the rows asked for are read";
    EXPECT_LE(stats.device_bytes_peak, options.device_budget);
    EXPECT_EQ(engine.max_rows(0, 0), engine.plan().arena_bytes / kRow);
    const std::vector<std::int64_t> bad{5, 2000};
    EXPECT_THROW((void)engine.acquire_rows(0, 0, bad), std::invalid_argument);
    std::vector<std::int64_t> too_many(engine.max_rows(0, 0) + 1);
    for (std::size_t i = 0; i < too_many.size(); ++i) too_many[i] = static_cast<std::int64_t>(i);
    EXPECT_THROW((void)engine.acquire_rows(0, 0, too_many), std::invalid_argument);
    EXPECT_THROW(engine.release_rows(12345), std::logic_error);
    // A failed read leaves nothing held: the arena is still usable whole.
    const auto whole = engine.acquire_rows(
        0, 0, std::span<const std::int64_t>(too_many.data(), too_many.size() - 1));
    engine.release_rows(whole.handle);
  }
}

TEST(EngineArena, UnitsHeldTogetherRunAtTheMinimum) {
  // A parent unit (the bias) held while its child (the matrix) loads, as a module whose own
  // weights are acquired around a child's forward: its need is both.
  TempDir dir;
  const auto m = make_model(dir, 3, 200);
  const std::uint64_t w = 200 * 64 * 4;  // 51,200: 13 granules
  const std::uint64_t b = 64 * 4;        // one granule
  std::vector<std::uint64_t> needs;
  for (int l = 0; l < 3; ++l) {
    needs.push_back(0);
    needs.push_back(eng::device_footprint(w) + eng::device_footprint(b));  // the bias + its matrix
  }
  eng::EngineOptions options;
  options.backend = ts::io::BackendType::kPread;
  options.unit_needs = needs;
  options.wait_timeout = std::chrono::milliseconds(5000);
  options.device_budget = 1;
  std::uint64_t minimum = 0;
  try {
    (void)eng::Engine::from_store(m.path, options, tensor_units(3));
  } catch (const eng::BudgetTooSmall& e) {
    minimum = e.minimum_budget();
  }
  ASSERT_EQ(minimum, eng::device_footprint(w) + eng::device_footprint(b));
  options.device_budget = minimum;
  auto engine = eng::Engine::from_store(m.path, options, tensor_units(3));
  EXPECT_FALSE(engine.stats().overlap) << "at the minimum nothing overlaps";
  for (int pass = 0; pass < 4; ++pass) {
    for (std::uint32_t l = 0; l < 3; ++l) {
      (void)engine.acquire(2 * l + 1);      // the bias, held ...
      expect_unit_bytes(engine, m, 2 * l);  // ... while the matrix loads beside it
      engine.release(2 * l + 1);
    }
  }
  EXPECT_LE(engine.stats().device_bytes_peak, minimum);
}

TEST(EngineArena, CyclicLoopLargerThanTheArenaKeepsHittingWithoutPrefetch) {
  TempDir dir;
  const auto path = ts::testing::make_random_store(dir.path(), 6, 40 * KiB, 40 * KiB, 9);
  const auto store = ts::Store::open(path);
  eng::EngineOptions options;
  options.backend = ts::io::BackendType::kPread;
  options.prefetch = eng::PrefetchStrategy::kNone;
  options.device_budget = 3 * 40 * KiB;  // 3 of the 6 blocks
  options.slots = 3;                     // all three in the arena, none resident
  eng::Engine engine(path, options);
  ASSERT_EQ(engine.plan().resident_bytes, 0u);
  for (int pass = 0; pass < 5; ++pass) {
    for (std::uint32_t b = 0; b < 6; ++b) {
      const auto view = engine.acquire(b);
      EXPECT_EQ(ts::checksum64({view.host, view.size}), store.blocks()[b].checksum);
      engine.release(b);
    }
  }
  // LRU would miss on every acquire; keeping what comes back soonest hits on 2 of 6 per pass.
  EXPECT_GE(engine.stats().device_hits, 4u * 2u);
}

// Misses on acquires of the hot expert (7) after `warm` passes of: every-pass units 0..3
// (resident), with the hot expert after unit 0 and one of the cold experts {4, 5, 6, 8, ...,
// 11}, drawn at random, after unit 1. The arena holds two experts.
std::uint64_t hot_expert_misses(const std::filesystem::path& path, bool rates, int passes,
                                int warm) {
  constexpr std::uint32_t kHot = 7;
  const auto store = ts::Store::open(path);
  eng::EngineOptions options;
  options.backend = ts::io::BackendType::kPread;
  options.device_budget = 6 * 16 * KiB;
  if (rates) {
    options.unit_use_rate = {1, 1, 1, 1};
    options.unit_use_rate.resize(12, 0.25);
  }
  eng::Engine engine(path, options);
  for (std::uint32_t b = 0; b < 12; ++b) EXPECT_EQ(engine.plan().resident[b], b < 4) << b;
  EXPECT_EQ(engine.plan().arena_bytes, 2 * 16 * KiB);
  std::mt19937 random(5);
  const std::vector<std::uint32_t> cold{4, 5, 6, 8, 9, 10, 11};
  std::uint64_t misses = 0;
  const auto use = [&](std::uint32_t b) {
    const auto view = engine.acquire(b);
    EXPECT_EQ(ts::checksum64({view.host, view.size}), store.blocks()[b].checksum) << b;
    engine.release(b);
  };
  for (int pass = 0; pass < passes; ++pass) {
    use(0);
    const auto before = engine.stats().device_misses;
    use(kHot);
    if (pass >= warm) misses += engine.stats().device_misses - before;
    use(1);
    use(cold[random() % cold.size()]);
    use(2);
    use(3);
  }
  const auto stats = engine.stats();
  EXPECT_LE(stats.device_bytes_peak, options.device_budget);
  if (rates) {
    EXPECT_GT(stats.use_rates[kHot], 0.9);
    EXPECT_LT(stats.use_rates[5], 0.5);
    EXPECT_DOUBLE_EQ(stats.use_rates[0], 1.0);
  }
  return misses;
}

TEST(EngineArena, AFrequentlyRoutedExpertStaysInTheArena) {
  TempDir dir;
  const auto path = ts::testing::make_random_store(dir.path(), 12, 16 * KiB, 16 * KiB, 3);
  // Ranked by its learned rate the expert used every pass is never displaced by the cold
  // ones; ranked by the order of the first pass it is, whenever a cold expert that comes
  // sooner in the source order than it needs its place.
  EXPECT_EQ(hot_expert_misses(path, /*rates=*/true, 40, 3), 0u);
  EXPECT_GT(hot_expert_misses(path, /*rates=*/false, 40, 3), 0u);
}

TEST(EngineArena, UseRatesAreValidated) {
  TempDir dir;
  const auto path = ts::testing::make_random_store(dir.path(), 3, 16 * KiB, 16 * KiB, 3);
  eng::EngineOptions options;
  options.device_budget = 1 << 20;
  options.unit_use_rate = {1, 0.5};
  EXPECT_THROW(eng::Engine(path, options), std::invalid_argument);
  options.unit_use_rate = {1, 0, 1};
  try {
    eng::Engine engine(path, options);
    FAIL() << "a rate of 0 was accepted";
  } catch (const std::invalid_argument& e) {
    EXPECT_NE(std::string(e.what()).find("unit_use_rate of unit 1"), std::string::npos) << e.what();
  }
}

TEST(EngineArena, NeverExceedsItsBudgetUnderRandomConcurrentSchedules) {
  TempDir dir;
  const auto m = make_model(dir, 6, 120);
  constexpr std::uint64_t kRow = 64 * 4;
  // Each backend, with the units of layers 3..5 routed (use rate learned, prefetched by the
  // caller) or not.
  for (const auto& [backend, routed] :
       {std::pair{ts::io::BackendType::kPread, false}, std::pair{ts::io::BackendType::kMmap, false},
        std::pair{ts::io::BackendType::kPread, true}}) {
    SCOPED_TRACE(std::string(ts::io::backend_name(backend)) + (routed ? " routed" : ""));
    eng::EngineOptions options;
    options.backend = backend;
    options.verify_checksums = true;
    options.wait_timeout = std::chrono::milliseconds(20'000);
    auto groups = tensor_units(6);
    groups.insert(groups.begin(), {"embed", {"embed"}});
    std::vector<std::uint64_t> needs(groups.size(), 0);
    std::vector<bool> partial(groups.size(), false);
    needs[0] = kRow;
    partial[0] = true;
    options.unit_needs = needs;
    options.unit_partial = partial;
    if (routed) {
      options.unit_use_rate.assign(groups.size(), 1.0);
      for (std::size_t u = 7; u < groups.size(); ++u) options.unit_use_rate[u] = 0.3;
    }
    options.device_budget = 3 * eng::device_footprint(120 * 64 * 4);  // less than 4 threads hold
    auto engine = eng::Engine::from_store(m.path, options, groups);
    ASSERT_FALSE(engine.plan().resident[0]);
    std::atomic<bool> stop{false};
    std::atomic<int> failures{0};
    std::atomic<std::uint64_t> worst{0};
    std::thread monitor([&] {
      while (!stop) {
        const auto s = engine.stats();
        if (s.arena_bytes_in_use > s.arena_bytes || s.device_bytes_in_use > s.device_budget) {
          ++failures;
        }
        worst = std::max<std::uint64_t>(worst, s.arena_bytes_in_use);
        std::this_thread::yield();
      }
    });
    std::vector<std::thread> threads;
    for (int t = 0; t < 4; ++t) {
      threads.emplace_back([&, t] {
        std::mt19937_64 rng(100 + static_cast<std::uint64_t>(t));
        for (int i = 0; i < 60; ++i) {
          if (rng() % 4 == 0) {
            std::vector<std::int64_t> rows;
            const auto n = 1 + rng() % 50;
            for (std::uint64_t k = 0; k < n; ++k)
              rows.push_back(static_cast<std::int64_t>(rng() % 2000));
            std::sort(rows.begin(), rows.end());
            rows.erase(std::unique(rows.begin(), rows.end()), rows.end());
            const auto view = engine.acquire_rows(0, 0, rows);
            for (std::size_t k = 0; k < rows.size(); ++k) {
              if (std::memcmp(view.host + k * kRow,
                              m.bytes.at("embed").data() + static_cast<std::size_t>(rows[k]) * kRow,
                              kRow) != 0) {
                ++failures;
              }
            }
            engine.release_rows(view.handle);
            continue;
          }
          const auto unit = 1 + static_cast<std::uint32_t>(rng() % 12);
          if (routed && unit >= 7 && rng() % 2 == 0) engine.prefetch(unit);
          const auto view = engine.acquire(unit);
          for (const auto& tp : engine.tensors(unit)) {
            if (std::memcmp(view.host + tp.offset, m.bytes.at(tp.name).data(), tp.nbytes) != 0) {
              ++failures;
            }
          }
          if (rng() % 3 == 0) std::this_thread::sleep_for(std::chrono::microseconds(rng() % 500));
          engine.release(unit);
        }
      });
    }
    for (auto& th : threads) th.join();
    stop = true;
    monitor.join();
    EXPECT_EQ(failures.load(), 0);
    EXPECT_GT(worst.load(), 0u);
    const auto s = engine.stats();
    EXPECT_LE(s.arena_bytes_peak, s.arena_bytes);
    EXPECT_LE(s.device_bytes_peak, options.device_budget);
  }
}
