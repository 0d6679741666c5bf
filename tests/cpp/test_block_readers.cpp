// The engine's pieces on their own: the source layout, the block readers (host, in place, the
// GDS decision), the read-path choice, the unit places and the shared thread pool. Real stores
// on a real file system, real threads.
#include <gtest/gtest.h>

#include <atomic>
#include <cerrno>
#include <chrono>
#include <cstring>
#include <mutex>
#include <set>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

#include "tensorstream/checksum.hpp"
#include "tensorstream/detail/thread_pool.hpp"
#include "tensorstream/engine/detail/block_reader.hpp"
#include "tensorstream/engine/detail/device_buffers.hpp"
#include "tensorstream/engine/detail/gds_reader.hpp"
#include "tensorstream/engine/detail/host_reader.hpp"
#include "tensorstream/engine/detail/in_place_reader.hpp"
#include "tensorstream/engine/detail/read_paths.hpp"
#include "tensorstream/engine/detail/unit_places.hpp"
#include "tensorstream/engine/residency.hpp"
#include "tensorstream/engine/source_layout.hpp"
#include "tensorstream/errors.hpp"
#include "tensorstream/store.hpp"
#include "test_helpers.hpp"

namespace ts = tensorstream;
namespace eng = tensorstream::engine;
namespace det = tensorstream::engine::detail;
using namespace std::chrono_literals;
using ts::testing::TempDir;

namespace {

constexpr std::uint64_t KiB = 1024;

// A CPU buffer able to hold any block of `layout`.
det::BlockBuffer cpu_buffer(const eng::Layout& layout) {
  std::uint64_t largest = 0;
  for (const auto& b : layout.blocks) largest = std::max(largest, b.size);
  return det::BlockBuffer::allocate(nullptr, std::nullopt, det::resident_buffer_bytes(largest),
                                    false);
}

void expect_block(const ts::Store& store, std::uint32_t block, const std::byte* bytes) {
  const auto& info = store.blocks()[block];
  EXPECT_EQ(ts::checksum64({bytes, info.raw_size}), info.checksum) << info.name;
}

eng::EngineOptions pread_options() {
  eng::EngineOptions options;
  options.backend = ts::io::BackendType::kPread;
  return options;
}

}  // namespace

// ---- source layout ---------------------------------------------------------------------------

TEST(SourceLayout, StoreBlocksAreOneExtentWithTheirChecksum) {
  TempDir dir;
  const auto path = ts::testing::make_random_store(dir.path(), 3, 5 * KiB, 9 * KiB, 1);
  const auto store = ts::Store::open(path);
  const auto layout = eng::layout_of_store(path);
  EXPECT_EQ(layout.kind, "store");
  ASSERT_EQ(layout.files.size(), 1u);
  ASSERT_EQ(layout.blocks.size(), 3u);
  std::uint64_t total = 0;
  for (std::uint32_t b = 0; b < 3; ++b) {
    const auto& block = layout.blocks[b];
    ASSERT_EQ(block.extents.size(), 1u);
    EXPECT_EQ(block.extents[0].file_offset, store.blocks()[b].offset);
    EXPECT_EQ(block.extents[0].checksum, store.blocks()[b].checksum);
    EXPECT_EQ(block.size, store.blocks()[b].raw_size);
    total += block.size;
  }
  EXPECT_EQ(layout.bytes(), total);
  EXPECT_NE(eng::describe_extent(layout, 1, 0).find("block 'layers.1'"), std::string::npos);
}

TEST(SourceLayout, TensorsMergeIntoExtentsWhereAdjacent) {
  using ts::DType;
  // Given out of order: b (file 0, right after a), c (file 1), a (file 0, unaligned).
  const std::vector<eng::SourceTensor> tensors = {
      {"b", DType::kUInt8, {10}, 0, 5000 + 100, 10},
      {"c", DType::kUInt8, {7}, 1, 8192, 7},
      {"a", DType::kUInt8, {100}, 0, 5000, 100},
  };
  const auto block = eng::layout_of_tensors("blk", tensors);
  EXPECT_EQ(block.name, "blk");
  ASSERT_EQ(block.extents.size(), 2u);
  const auto& first = block.extents[0];  // a .. b, file 0
  EXPECT_EQ(first.file, 0u);
  EXPECT_EQ(first.file_offset, 5000u);
  EXPECT_EQ(first.length, 110u);
  EXPECT_EQ(first.buffer_offset, 0u);
  EXPECT_EQ(first.skip, 5000u % ts::kIoAlignment);
  EXPECT_EQ(first.label, "a .. b");
  const auto& second = block.extents[1];  // c, file 1, aligned
  EXPECT_EQ(second.buffer_offset % ts::kIoAlignment, 0u);
  EXPECT_EQ(second.buffer_offset, ts::kIoAlignment);  // after the first region
  EXPECT_EQ(second.skip, 0u);
  EXPECT_EQ(second.label, "c");
  EXPECT_EQ(block.size, 2u * ts::kIoAlignment);
  // Placements keep the order given; each tensor keeps its file alignment.
  ASSERT_EQ(block.tensors.size(), 3u);
  EXPECT_EQ(block.tensors[0].name, "b");
  EXPECT_EQ(block.tensors[0].offset, first.skip + 100);
  EXPECT_EQ(block.tensors[1].offset, ts::kIoAlignment);
  EXPECT_EQ(block.tensors[2].offset, first.skip);
}

// ---- host reader -----------------------------------------------------------------------------

TEST(HostReader, ReadsEachBlockExactlyAndCountsIt) {
  TempDir dir;
  const auto path = ts::testing::make_random_store(dir.path(), 4, 10 * KiB, 70 * KiB, 2);
  const auto store = ts::Store::open(path);
  const auto layout = eng::layout_of_store(path);
  auto options = pread_options();
  options.verify_checksums = true;
  eng::TraceLog trace;
  det::HostReader reader(layout, options, ts::io::Env::posix(), nullptr, nullptr, trace);
  EXPECT_EQ(reader.backend().name(), "pread");
  auto buffer = cpu_buffer(layout);
  std::uint64_t expected = 0;
  for (std::uint32_t b = 0; b < 4; ++b) {
    det::FillReport report;
    reader.fill(det::FillOrder{b, b % 2 == 0}, buffer, report);
    expect_block(store, b, reader.host_bytes(b, buffer));
    EXPECT_EQ(reader.host_bytes(b, buffer), buffer.host());  // read into the buffer itself
    EXPECT_EQ(report.bytes_from_storage, store.blocks()[b].stored_size);
    EXPECT_EQ(report.bytes_from_ram_tier, 0u);
    expected += store.blocks()[b].stored_size;
  }
  EXPECT_GE(reader.io_stats().bytes_read, expected);
  reader.close();
  EXPECT_EQ(reader.io_stats().bytes_read, 0u);  // closed: zeros
}

TEST(HostReader, RamTierServesTheSecondFill) {
  TempDir dir;
  const auto path = ts::testing::make_random_store(dir.path(), 2, 20 * KiB, 30 * KiB, 3);
  const auto store = ts::Store::open(path);
  const auto layout = eng::layout_of_store(path);
  auto options = pread_options();
  options.ram_cache_bytes = 1 << 20;
  eng::TraceLog trace;
  det::HostReader reader(layout, options, ts::io::Env::posix(), nullptr, nullptr, trace);
  auto buffer = cpu_buffer(layout);
  det::FillReport first;
  reader.fill(det::FillOrder{1, true}, buffer, first);
  EXPECT_EQ(first.bytes_from_storage, store.blocks()[1].stored_size);
  std::memset(buffer.host(), 0, buffer.size());
  det::FillReport second;
  reader.fill(det::FillOrder{1, true}, buffer, second);
  EXPECT_EQ(second.bytes_from_storage, 0u);
  EXPECT_EQ(second.bytes_from_ram_tier, store.blocks()[1].raw_size);
  expect_block(store, 1, buffer.host());
  EXPECT_EQ(reader.ram_tier_stats().hits, 1u);
}

TEST(HostReader, InjectedErrorNamesTheBlockAndTheFile) {
  TempDir dir;
  const auto path = ts::testing::make_random_store(dir.path(), 2, 20 * KiB, 20 * KiB, 4);
  const auto store = ts::Store::open(path);
  const auto layout = eng::layout_of_store(path);
  std::atomic<bool> fail{true};
  ts::testing::FaultInjectionEnv env([&](const ts::testing::FaultContext& c) {
    ts::testing::Fault fault;
    if (c.point == ts::testing::FaultPoint::kRead && fail) fault.error = EIO;
    return fault;
  });
  eng::TraceLog trace;
  det::HostReader reader(layout, pread_options(), env, nullptr, nullptr, trace);
  auto buffer = cpu_buffer(layout);
  det::FillReport report;
  try {
    reader.fill(det::FillOrder{1, true}, buffer, report);
    FAIL() << "EIO was not reported";
  } catch (const ts::IoError& e) {
    EXPECT_EQ(e.code(), EIO);
    EXPECT_NE(std::string(e.what()).find(path.filename().string()), std::string::npos) << e.what();
  }
  EXPECT_EQ(report.bytes_from_storage, 0u);  // a failed read moved nothing worth counting
  fail = false;
  reader.fill(det::FillOrder{1, true}, buffer, report);
  expect_block(store, 1, buffer.host());
}

TEST(HostReader, CorruptionIsCaughtWhenVerifying) {
  TempDir dir;
  const auto path = ts::testing::make_random_store(dir.path(), 2, 16 * KiB, 16 * KiB, 5);
  const auto offset = ts::Store::open(path).blocks()[0].offset;
  auto bytes = ts::testing::read_file(path);
  bytes[offset + 7] ^= std::byte{0x40};
  ts::testing::write_file(path, bytes);
  const auto layout = eng::layout_of_store(path);
  auto options = pread_options();
  options.verify_checksums = true;
  eng::TraceLog trace;
  det::HostReader reader(layout, options, ts::io::Env::posix(), nullptr, nullptr, trace);
  auto buffer = cpu_buffer(layout);
  det::FillReport report;
  EXPECT_THROW(reader.fill(det::FillOrder{0, true}, buffer, report), ts::ChecksumError);
}

// ---- in place --------------------------------------------------------------------------------

TEST(InPlaceReader, FillsThroughThePageCacheWithoutTheBuffer) {
  TempDir dir;
  const auto path = ts::testing::make_random_store(dir.path(), 3, 40 * KiB, 90 * KiB, 6);
  const auto store = ts::Store::open(path);
  const auto layout = eng::layout_of_store(path);
  eng::EngineOptions options;
  options.backend = ts::io::BackendType::kMmap;
  options.verify_checksums = true;
  eng::TraceLog trace;
  det::InPlaceReader reader(layout, options, ts::io::Env::posix(), trace);
  det::BlockBuffer no_memory(det::resident_buffer_bytes(90 * KiB));
  EXPECT_EQ(no_memory.host(), nullptr);
  for (int pass = 0; pass < 2; ++pass) {
    for (std::uint32_t b = 0; b < 3; ++b) {
      det::FillReport report;
      reader.fill(det::FillOrder{b, true}, no_memory, report);
      const auto* bytes = reader.host_bytes(b, no_memory);
      ASSERT_NE(bytes, nullptr);
      expect_block(store, b, bytes);
      EXPECT_EQ(report.bytes_from_storage + report.bytes_from_page_cache,
                store.blocks()[b].stored_size);
      reader.drop(b);
      expect_block(store, b, reader.host_bytes(b, no_memory));  // dropped pages come back
    }
  }
}

TEST(InPlaceReader, CpuReadPathSaysWhy) {
  TempDir dir;
  const auto path = ts::testing::make_random_store(dir.path(), 2, 4 * KiB, 4 * KiB, 7);
  const auto layout = eng::layout_of_store(path);
  eng::EngineOptions options;
  options.backend = ts::io::BackendType::kPread;
  EXPECT_FALSE(det::choose_cpu_read_path(options, layout).in_place);
  options.backend = ts::io::BackendType::kMmap;
  if (!ts::io::block_windows_unsupported_reason().empty()) GTEST_SKIP() << "no 4 KiB pages";
  auto path_mmap = det::choose_cpu_read_path(options, layout);
  EXPECT_TRUE(path_mmap.in_place);
  EXPECT_TRUE(path_mmap.note.empty()) << path_mmap.note;
  options.ram_cache_bytes = 1 << 20;
  const auto tier = det::choose_cpu_read_path(options, layout);
  EXPECT_FALSE(tier.in_place);
  EXPECT_NE(tier.note.find("RAM tier"), std::string::npos) << tier.note;
  options.ram_cache_bytes = 0;
  options.backend = ts::io::BackendType::kAuto;
  const auto automatic = det::choose_cpu_read_path(options, layout);
  EXPECT_TRUE(automatic.in_place) << automatic.note;  // a tiny store fits the page cache
  EXPECT_NE(automatic.note.find("auto: the store"), std::string::npos) << automatic.note;
}

// ---- GPUDirect Storage decision, read paths ---------------------------------------------------

TEST(GdsFiles, ACpuDeviceKeepsEveryFileOffWithOneReason) {
  TempDir dir;
  const auto path = ts::testing::make_random_store(dir.path(), 2, 4 * KiB, 4 * KiB, 8);
  const auto layout = eng::layout_of_store(path);
  eng::EngineOptions options;
  const det::GdsFiles files(layout, options, ts::io::Env::posix(), nullptr);
  EXPECT_EQ(files.used_files(), 0u);
  EXPECT_NE(files.reason().find("device 'cpu'"), std::string::npos) << files.reason();
  ASSERT_EQ(files.outcome().size(), 1u);
  EXPECT_FALSE(files.outcome()[0].used);
  EXPECT_EQ(files.outcome()[0].reason, files.reason());
  for (const auto& b : layout.blocks) EXPECT_FALSE(files.covers(b));
}

TEST(ReadPaths, OneReaderPerBlockAndTheReasons) {
  TempDir dir;
  const auto path = ts::testing::make_random_store(dir.path(), 3, 8 * KiB, 8 * KiB, 9);
  const auto layout = eng::layout_of_store(path);
  eng::TraceLog trace;
  const det::ReadPaths copying(layout, pread_options(), nullptr, nullptr, trace);
  EXPECT_FALSE(copying.in_place());
  EXPECT_TRUE(copying.buffers_need_memory());
  EXPECT_EQ(copying.backend_name(), "pread");
  EXPECT_EQ(&copying.reader(0), &copying.reader(2));
  if (!ts::io::block_windows_unsupported_reason().empty()) GTEST_SKIP() << "no 4 KiB pages";
  eng::EngineOptions mapped;
  mapped.backend = ts::io::BackendType::kMmap;
  const det::ReadPaths in_place(layout, mapped, nullptr, nullptr, trace);
  EXPECT_TRUE(in_place.in_place());
  EXPECT_FALSE(in_place.buffers_need_memory());
  EXPECT_EQ(in_place.backend_name(), "mmap");
  EXPECT_EQ(in_place.io_stats().bytes_read, 0u);  // no backend
}

// ---- unit places -----------------------------------------------------------------------------

TEST(UnitPlaces, PlacesStreamedUnitsAndSparesHeldUnitsAndUnusedPrefetches) {
  // Unit 0 resident, units 1..4 streamed through an arena of 3 of them.
  eng::ResidencyPlan plan;
  plan.resident = {true, false, false, false, false};
  plan.arena_bytes = 3 * 4096;
  plan.largest_need = 4096;
  det::UnitPlaces places(plan, std::vector<std::uint64_t>(5, 4096),
                         std::vector<std::uint64_t>(5, 0), nullptr, std::nullopt,
                         /*with_memory=*/true, nullptr);
  ASSERT_EQ(places.size(), 5u);
  EXPECT_TRUE(places.is_resident(0));
  EXPECT_TRUE(places[0].memory.has_value()) << "a resident unit has its buffer from the start";
  EXPECT_FALSE(places[1].memory.has_value());
  EXPECT_EQ(places.device_bytes(), 4u * 4096);

  // Unit u's next use is u acquires away (the engine asks its prefetcher).
  const det::Arena::Rank rank = [](std::uint32_t u) { return det::Arena::Distance{u}; };
  const auto fill = [&](std::uint32_t unit) {
    const auto where = places.find(unit, true, 0, rank);
    ASSERT_TRUE(where);
    EXPECT_TRUE(places.take(unit, *where).empty());
    places[unit].state = det::UnitState::kReady;
    places.sync(unit);
  };
  fill(1);
  fill(2);
  fill(3);
  EXPECT_EQ(places.arena().used(), 3u * 4096);
  // Distinct, non-overlapping places of their own in the arena's memory.
  EXPECT_NE(places[1].memory->host(), places[2].memory->host());
  places[3].pins = 1;  // held: never displaced
  places.sync(3);
  places[2].prefetched_unused = true;  // a prefetch not used yet: only a demand may take it
  places.sync(2);
  // A prefetch of unit 4 (needed at distance 4) may only displace unit 1, needed sooner (1):
  // none.
  EXPECT_FALSE(places.find(4, false, 4, rank));
  // A demand displaces unit 2 (needed at 2) before unit 1 (needed at 1).
  const auto where = places.find(4, true, 0, rank);
  ASSERT_TRUE(where);
  const auto displaced = places.take(4, *where);
  ASSERT_EQ(displaced.size(), 1u);
  EXPECT_EQ(displaced[0].unit, 2u);
  EXPECT_TRUE(displaced[0].prefetch_wasted);
  EXPECT_EQ(places[2].state, det::UnitState::kAbsent);
  EXPECT_FALSE(places[2].memory.has_value());
  EXPECT_TRUE(places[4].memory.has_value());

  places[4].state = det::UnitState::kFailed;
  places.forget(4);
  EXPECT_FALSE(places.arena().contains(4));
  EXPECT_EQ(places[4].state, det::UnitState::kAbsent);
}

// ---- the shared thread pool ------------------------------------------------------------------

TEST(ThreadPool, FansOutAndJoins) {
  ts::detail::ThreadPool pool(3);
  EXPECT_EQ(pool.size(), 3u);
  std::atomic<int> next{0};
  std::mutex mutex;
  std::set<std::thread::id> threads;
  std::vector<int> done(64, 0);
  const std::function<void()> work = [&] {
    for (int k; (k = next++) < 64;) {
      {
        std::lock_guard lock(mutex);
        threads.insert(std::this_thread::get_id());
      }
      std::this_thread::sleep_for(2ms);
      done[static_cast<std::size_t>(k)] = 1;
    }
  };
  pool.run(3, work);
  for (const int d : done) EXPECT_EQ(d, 1);  // every piece done when run() returns
  EXPECT_GE(threads.size(), 2u);             // the caller had help
  EXPECT_LE(threads.size(), 4u);
}

TEST(ThreadPool, ABusyPoolDoesNotHoldACallerUp) {
  ts::detail::ThreadPool pool(1);
  std::atomic<bool> release{false};
  std::atomic<bool> started{false};
  const std::function<void()> long_work = [&] {
    started = true;
    while (!release) std::this_thread::sleep_for(1ms);
  };
  std::thread other([&] { pool.run(1, long_work); });  // the caller and the one thread
  while (!started) std::this_thread::sleep_for(1ms);
  std::this_thread::sleep_for(20ms);  // both copies of long_work are running by now
  std::atomic<int> runs{0};
  const std::function<void()> short_work = [&] { ++runs; };
  const auto start = std::chrono::steady_clock::now();
  pool.run(1, short_work);  // its helper cannot start: the caller does it alone
  EXPECT_LT(std::chrono::steady_clock::now() - start, 1s);
  EXPECT_EQ(runs.load(), 1);
  release = true;
  other.join();
  EXPECT_EQ(runs.load(), 1);  // the skipped helper never ran later
}

TEST(ThreadPool, NoThreadsMeansTheCallerDoesItAll) {
  ts::detail::ThreadPool pool(0);
  int runs = 0;
  pool.run(5, [&] { ++runs; });
  EXPECT_EQ(runs, 1);
}

TEST(ThreadPool, TheCallersExceptionPropagatesAfterTheHelpers) {
  ts::detail::ThreadPool pool(2);
  std::atomic<int> helpers_done{0};
  const auto caller = std::this_thread::get_id();
  const std::function<void()> work = [&] {
    if (std::this_thread::get_id() == caller) {
      std::this_thread::sleep_for(30ms);
      throw std::runtime_error("caller failed");
    }
    std::this_thread::sleep_for(10ms);
    ++helpers_done;
  };
  EXPECT_THROW(pool.run(2, work), std::runtime_error);
  // Whatever helpers started have finished by the time run() threw.
  const int finished = helpers_done.load();
  std::this_thread::sleep_for(50ms);
  EXPECT_EQ(helpers_done.load(), finished);
}
