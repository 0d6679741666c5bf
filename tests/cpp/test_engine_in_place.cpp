// Reading in place on the CPU (engine.hpp, "In place"; io/block_window.hpp): blocks are the
// page cache's pages mapped into the process, never more of them at once than the budget,
// with the same bytes, errors and placements as the copying paths.
#include <fcntl.h>
#include <unistd.h>

#include <gtest/gtest.h>

#include <algorithm>
#include <cctype>
#include <cstdint>
#include <cstring>
#include <fstream>
#include <random>
#include <sstream>
#include <string>

#include "tensorstream/checksum.hpp"
#include "tensorstream/detail/file.hpp"
#include "tensorstream/engine/engine.hpp"
#include "tensorstream/errors.hpp"
#include "tensorstream/io/block_window.hpp"
#include "tensorstream/store.hpp"
#include "test_helpers.hpp"

namespace ts = tensorstream;
namespace eng = tensorstream::engine;
using ts::testing::TempDir;

namespace {

constexpr std::uint64_t KiB = 1024;

std::filesystem::path make_store(const TempDir& dir, int blocks, std::uint64_t size,
                                 std::uint64_t seed) {
  return ts::testing::make_random_store(dir.path(), blocks, size, size, seed);
}

// Bytes of `path` mapped into this process and resident in it now: the sum of the "Rss:"
// lines of /proc/self/smaps over the mappings of that file. This is what the process holds
// (and what RSS counts), not what the page cache holds.
std::uint64_t mapped_resident_bytes(const std::filesystem::path& path) {
  std::ifstream smaps("/proc/self/smaps");
  const auto target = std::filesystem::canonical(path).string();
  std::string line;
  bool inside = false;
  std::uint64_t total = 0;
  while (std::getline(smaps, line)) {
    // A mapping's header: "start-end perms offset dev inode [path]".
    if (!line.empty() && std::isxdigit(static_cast<unsigned char>(line[0])) &&
        line.find('-') < line.find(' ')) {
      inside = line.size() >= target.size() &&
               line.compare(line.size() - target.size(), target.size(), target) == 0;
      continue;
    }
    if (inside && line.rfind("Rss:", 0) == 0) {
      std::istringstream in(line.substr(4));
      std::uint64_t kib = 0;
      in >> kib;
      total += kib * 1024;
    }
  }
  return total;
}

// The smallest budget for `store` with two slots: nothing resident, everything streams.
std::uint64_t streaming_budget(const std::filesystem::path& store) {
  const auto opened = ts::Store::open(store);
  std::vector<std::uint64_t> sizes;
  for (const auto& b : opened.blocks()) sizes.push_back(b.raw_size);
  return eng::minimum_budget(sizes, 2);
}

eng::EngineOptions in_place_options(std::uint64_t budget) {
  eng::EngineOptions options;
  options.backend = ts::io::BackendType::kMmap;
  options.device_budget = budget;
  options.prefetch = eng::PrefetchStrategy::kNextLayer;
  return options;
}

}  // namespace

TEST(EngineInPlace, SelectedByMmapAndByAutoWhenTheSourceFitsInMemory) {
  TempDir dir;
  const auto path = make_store(dir, 4, 64 * KiB, 1);
  {
    eng::Engine engine(path, in_place_options(1 << 20));
    const auto stats = engine.stats();
    EXPECT_TRUE(stats.in_place);
    EXPECT_EQ(stats.backend, "mmap");
    EXPECT_EQ(stats.io.submitted, 0u) << "no backend reads in place";
  }
  {
    eng::EngineOptions options;
    options.device_budget = 1 << 20;  // backend kAuto, no RAM tier, a 256 KiB store
    eng::Engine engine(path, options);
    const auto stats = engine.stats();
    EXPECT_TRUE(stats.in_place);
    EXPECT_NE(stats.backend_note.find("fits in the page cache"), std::string::npos)
        << stats.backend_note;
  }
  {
    eng::EngineOptions options;
    options.device_budget = 1 << 20;
    options.ram_cache_bytes = 1 << 20;  // a RAM tier: blocks are copied into it
    eng::Engine engine(path, options);
    const auto stats = engine.stats();
    EXPECT_FALSE(stats.in_place);
    EXPECT_NE(stats.backend, "mmap");
    EXPECT_NE(stats.backend_note.find("RAM tier"), std::string::npos) << stats.backend_note;
  }
  {
    auto options = in_place_options(1 << 20);
    options.backend = ts::io::BackendType::kPread;
    eng::Engine engine(path, options);
    EXPECT_FALSE(engine.stats().in_place);
    EXPECT_EQ(engine.stats().backend, "pread");
  }
}

TEST(EngineInPlace, ViewsAreTheFilesBytesWithoutACopy) {
  TempDir dir;
  const auto path = make_store(dir, 6, 100 * KiB, 2);
  const auto store = ts::Store::open(path);
  eng::Engine engine(path, in_place_options(streaming_budget(path)));
  for (int pass = 0; pass < 2; ++pass) {
    for (std::uint32_t b = 0; b < store.blocks().size(); ++b) {
      const auto view = engine.acquire(b);
      EXPECT_EQ(ts::checksum64({view.host, view.size}), store.blocks()[b].checksum);
      EXPECT_EQ(reinterpret_cast<std::uintptr_t>(view.host) % 4096, 0u);
      engine.release(b);
    }
  }
  const auto stats = engine.stats();
  // Every fill is counted once, from storage or from the page cache (a prefetch evicted
  // before use makes one fill more than the 12 acquires).
  EXPECT_GE(stats.fills, 12u - 2u);  // two blocks may stay in their slots between passes
  EXPECT_EQ(stats.bytes_from_storage + stats.bytes_from_page_cache, stats.fills * 100 * KiB);
  EXPECT_EQ(stats.failures, 0u);
}

// The budget bounds what the process holds: at no point are more weight bytes of the store
// resident in this process than the budget, although every block is read many times.
TEST(EngineInPlace, ProcessHoldsNoMoreThanTheBudget) {
  TempDir dir;
  const std::uint64_t block = 256 * KiB;
  const auto path = make_store(dir, 10, block, 3);
  const auto store = ts::Store::open(path);
  const auto budget = streaming_budget(path);
  auto options = in_place_options(budget);
  eng::Engine engine(path, options);
  ASSERT_GE(engine.plan().arena_bytes, 2 * engine.plan().largest_need);
  ASSERT_TRUE(engine.stats().in_place);
  std::uint64_t peak = 0;
  for (int pass = 0; pass < 3; ++pass) {
    for (std::uint32_t b = 0; b < store.blocks().size(); ++b) {
      const auto view = engine.acquire(b);
      EXPECT_EQ(ts::checksum64({view.host, view.size}), store.blocks()[b].checksum);
      peak = std::max(peak, mapped_resident_bytes(path));
      engine.release(b);
    }
  }
  EXPECT_GT(peak, 0u) << "the mapped blocks must show in smaps";
  EXPECT_LE(peak, budget);
  EXPECT_LE(engine.stats().device_bytes_peak, budget);
  engine.close();
  EXPECT_EQ(mapped_resident_bytes(path), 0u) << "close() unmaps every window";
}

TEST(EngineInPlace, WritesIntoAViewNeverReachTheFile) {
  TempDir dir;
  const auto path = make_store(dir, 4, 64 * KiB, 4);
  const auto before = ts::testing::read_file(path);
  const auto store = ts::Store::open(path);
  eng::Engine engine(path, in_place_options(streaming_budget(path)));
  auto view = engine.acquire(1);
  view.host[10] = ~view.host[10];  // a stray in-place op on a weight
  engine.release(1);
  for (std::uint32_t b = 0; b < 4; ++b) {  // the slot goes to other blocks: the copy is dropped
    engine.acquire(b);
    engine.release(b);
  }
  view = engine.acquire(1);
  EXPECT_EQ(ts::checksum64({view.host, view.size}), store.blocks()[1].checksum);
  engine.release(1);
  EXPECT_EQ(ts::testing::read_file(path), before);
}

// A file cut short behind the engine's back fails the acquire with the file's name, instead
// of a SIGBUS on the first touch.
TEST(EngineInPlace, TruncatedFileIsAnErrorNotACrash) {
  TempDir dir;
  const auto path = make_store(dir, 4, 64 * KiB, 5);
  const auto store = ts::Store::open(path);
  eng::Engine engine(path, in_place_options(streaming_budget(path)));
  ASSERT_EQ(::truncate(path.c_str(), static_cast<off_t>(store.blocks()[2].offset)), 0);
  try {
    (void)engine.acquire(3);
    FAIL() << "truncation not detected";
  } catch (const ts::FormatError& e) {
    const std::string what = e.what();
    EXPECT_NE(what.find("layers.3"), std::string::npos) << what;
    EXPECT_NE(what.find(path.string()), std::string::npos) << what;
    EXPECT_NE(what.find("shrank"), std::string::npos) << what;
  }
  const auto view = engine.acquire(0);  // blocks before the cut still read
  EXPECT_EQ(ts::checksum64({view.host, view.size}), store.blocks()[0].checksum);
  engine.release(0);
}

TEST(EngineInPlace, CorruptionIsCaughtWhenVerifying) {
  TempDir dir;
  const auto path = make_store(dir, 3, 64 * KiB, 6);
  const auto offset = ts::Store::open(path).blocks()[2].offset;
  auto bytes = ts::testing::read_file(path);
  bytes[offset + 4097] ^= std::byte{0x40};
  ts::testing::write_file(path, bytes);
  auto options = in_place_options(1 << 20);
  options.verify_checksums = true;
  eng::Engine engine(path, options);
  ASSERT_TRUE(engine.stats().in_place);
  EXPECT_THROW((void)engine.acquire(2), ts::ChecksumError);
  const auto view = engine.acquire(0);
  engine.release(0);
  EXPECT_NE(view.host, nullptr);
}

// The largest region's addresses agree with its file offsets modulo 2 MiB, so the kernel can
// map large page-cache folios with one entry per 2 MiB.
TEST(BlockWindow, LargestRegionIsCongruentWithItsFileOffsetModulo2MiB) {
  TempDir dir;
  const auto path = dir / "data.bin";
  ts::testing::write_file(path, ts::testing::random_bytes(6 << 20, 8));
  ts::detail::FileDescriptor fd(path, O_RDONLY);
  constexpr std::uint64_t kTwoMiB = 2 << 20;
  for (const std::uint64_t offset : {std::uint64_t{0}, std::uint64_t{4096}, 3 * kTwoMiB / 2}) {
    const std::vector<ts::io::WindowRegion> regions{
        {fd.get(), &path, 6 << 20, 0, 4096, 0},             // small, first
        {fd.get(), &path, 6 << 20, offset, kTwoMiB, 8192},  // the largest
    };
    ts::io::BlockWindow window(8192 + kTwoMiB, regions);
    const auto address = reinterpret_cast<std::uintptr_t>(window.data()) + 8192;
    EXPECT_EQ(address % kTwoMiB, offset % kTwoMiB) << offset;
  }
}

TEST(BlockWindow, MapsRegionsAtTheirPlacesAndLeavesThePastTheEndUnmapped) {
  TempDir dir;
  const auto path = dir / "data.bin";
  const auto data = ts::testing::random_bytes(3 * 4096 + 100, 7);
  ts::testing::write_file(path, data);
  ts::detail::FileDescriptor fd(path, O_RDONLY);
  // The file's second page and its last (partial) page, swapped in the window; the second
  // region asks for two pages although the file has one and 100 bytes left.
  const std::vector<ts::io::WindowRegion> regions{
      {fd.get(), &path, data.size(), 3 * 4096, 2 * 4096, 0},
      {fd.get(), &path, data.size(), 4096, 4096, 2 * 4096},
  };
  ts::io::BlockWindow window(3 * 4096, regions);
  EXPECT_EQ(window.mapped_bytes(), 2 * 4096u);  // the page wholly past the end is not mapped
  window.populate();
  EXPECT_EQ(std::memcmp(window.data(), data.data() + 3 * 4096, 100), 0);
  EXPECT_EQ(std::memcmp(window.data() + 2 * 4096, data.data() + 4096, 4096), 0);
  window.drop();
  EXPECT_EQ(std::memcmp(window.data() + 2 * 4096, data.data() + 4096, 4096), 0)
      << "a dropped page reads the same bytes again";
  EXPECT_THROW(
      ts::io::BlockWindow(
          4096, std::vector<ts::io::WindowRegion>{{fd.get(), &path, data.size(), 100, 4096, 0}}),
      std::invalid_argument);
}
