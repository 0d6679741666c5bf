// The streaming engine on the CPU device: exact bytes under every strategy and tier, hard
// budgets, a randomised multi-threaded schedule, adaptive prefetching, and failures that
// reach the waiter with context.
#include <gtest/gtest.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <cstdlib>
#include <map>
#include <mutex>
#include <random>
#include <thread>

#include "tensorstream/checksum.hpp"
#include "tensorstream/engine/engine.hpp"
#include "tensorstream/errors.hpp"
#include "tensorstream/shim/cuda.hpp"
#include "tensorstream/store.hpp"
#include "test_helpers.hpp"

namespace ts = tensorstream;
namespace eng = tensorstream::engine;
using ts::testing::TempDir;

using ts::testing::Fault;
using ts::testing::FaultContext;
using ts::testing::FaultInjectionEnv;
using ts::testing::FaultPoint;

namespace {

constexpr std::uint64_t KiB = 1024;

std::filesystem::path make_store(const TempDir& dir, int blocks, std::uint64_t min_size,
                                 std::uint64_t max_size, std::uint64_t seed) {
  return ts::testing::make_random_store(dir.path(), blocks, min_size, max_size, seed);
}

// Acquires `block`, checks its bytes against the store's checksum, releases it.
void check_block(eng::Engine& engine, const ts::Store& store, std::uint32_t block) {
  const auto view = engine.acquire(block);
  const auto& info = store.blocks()[block];
  ASSERT_EQ(view.size, info.raw_size);
  ASSERT_NE(view.host, nullptr);
  EXPECT_EQ(ts::checksum64({view.host, view.size}), info.checksum) << info.name;
  engine.release(block);
}

struct Variant {
  eng::PrefetchStrategy prefetch;
  std::uint64_t ram_cache;
  ts::cache::Policy policy;
};

}  // namespace

TEST(Engine, ExactBytesForEveryStrategyTierAndPolicy) {
  TempDir dir;
  const auto path = make_store(dir, 12, 20 * KiB, 300 * KiB, 1);
  const auto store = ts::Store::open(path);
  const std::uint64_t total = [&] {
    std::uint64_t t = 0;
    for (const auto& b : store.blocks()) t += b.raw_size;
    return t;
  }();
  std::vector<Variant> variants;
  for (const auto prefetch : {eng::PrefetchStrategy::kNone, eng::PrefetchStrategy::kNextLayer,
                              eng::PrefetchStrategy::kAdaptive}) {
    variants.push_back({prefetch, 0, ts::cache::Policy::kAuto});
    for (const auto policy : {ts::cache::Policy::kLru, ts::cache::Policy::kLfu,
                              ts::cache::Policy::kFifo, ts::cache::Policy::kAuto}) {
      variants.push_back({prefetch, total / 2, policy});
    }
  }
  for (const auto& v : variants) {
    for (const auto backend : {ts::io::BackendType::kPread, ts::io::BackendType::kMmap}) {
      SCOPED_TRACE(std::string(eng::prefetch_strategy_name(v.prefetch)) +
                   " cache=" + std::to_string(v.ram_cache) + " " +
                   std::string(ts::cache::policy_name(v.policy)) + " " +
                   std::string(ts::io::backend_name(backend)));
      eng::EngineOptions options;
      options.backend = backend;
      options.device_budget =
          eng::minimum_budget(std::vector<std::uint64_t>{store.max_block_size()}, 3) + 600 * KiB;
      options.slots = 3;
      options.prefetch = v.prefetch;
      options.ram_cache_bytes = v.ram_cache;
      options.cache_policy = v.policy;
      options.verify_checksums = true;
      eng::Engine engine(path, options);
      EXPECT_LT(engine.plan().resident_bytes, total) << "the budget must force streaming";
      for (int pass = 0; pass < 3; ++pass) {
        for (std::uint32_t b = 0; b < store.blocks().size(); ++b) check_block(engine, store, b);
      }
      const auto stats = engine.stats();
      EXPECT_LE(stats.device_bytes_peak, options.device_budget);
      EXPECT_LE(stats.ram_tier.peak_bytes_in_use, v.ram_cache);
      EXPECT_EQ(stats.acquires, 3 * store.blocks().size());
      EXPECT_EQ(stats.failures, 0u);
      if (v.prefetch != eng::PrefetchStrategy::kNone) {
        EXPECT_GT(stats.prefetches_used, 0u);
      }
      // The loop of 12 blocks is twice the RAM tier: LRU evicts exactly the block needed next
      // and never hits; the cyclic-aware default keeps a fixed subset and does.
      if (v.ram_cache > 0 && v.policy == ts::cache::Policy::kAuto) {
        EXPECT_GT(stats.ram_tier.hits, 0u);
        EXPECT_GT(stats.bytes_from_ram_tier, 0u);
      }
      if (v.ram_cache > 0 && v.policy == ts::cache::Policy::kLru) {
        EXPECT_EQ(stats.ram_tier.hits, 0u);
      }
      // kMmap reads in place exactly when there is no RAM tier.
      EXPECT_EQ(stats.in_place, backend == ts::io::BackendType::kMmap && v.ram_cache == 0);
    }
  }
}

TEST(Engine, BudgetBelowMinimumIsRefusedWithTheFigure) {
  TempDir dir;
  const auto path = make_store(dir, 4, 100 * KiB, 100 * KiB, 2);
  eng::EngineOptions options;
  options.device_budget = 100 * KiB - 1;
  try {
    eng::Engine engine(path, options);
    FAIL() << "engine accepted a budget below the largest block";
  } catch (const eng::BudgetTooSmall& e) {
    EXPECT_EQ(e.minimum_budget(), 100 * KiB);  // the physical minimum: the largest block
    EXPECT_NE(std::string(e.what()).find(path.string()), std::string::npos) << e.what();
  }
}

TEST(Engine, RunsAtThePhysicalMinimumWithoutOverlapAndOverlapsWithRoomForTwo) {
  TempDir dir;
  const auto path = make_store(dir, 4, 100 * KiB, 100 * KiB, 2);
  const auto store = ts::Store::open(path);
  for (const std::uint64_t budget : {100 * KiB, 150 * KiB, 200 * KiB}) {
    SCOPED_TRACE(budget);
    eng::EngineOptions options;
    options.device_budget = budget;
    options.backend = ts::io::BackendType::kPread;
    eng::Engine engine(path, options);
    for (int pass = 0; pass < 3; ++pass) {
      for (std::uint32_t b = 0; b < 4; ++b) check_block(engine, store, b);
    }
    const auto stats = engine.stats();
    EXPECT_EQ(stats.overlap, budget >= 200 * KiB);
    EXPECT_EQ(engine.plan().overlap, budget >= 200 * KiB);
    EXPECT_LE(stats.arena_bytes_peak, stats.arena_bytes);
    EXPECT_LE(stats.device_bytes_peak, budget);
  }
}

TEST(Engine, EverythingResidentWhenItFits) {
  TempDir dir;
  const auto path = make_store(dir, 5, 10 * KiB, 50 * KiB, 3);
  const auto store = ts::Store::open(path);
  eng::EngineOptions options;
  options.device_budget = 1 << 20;
  eng::Engine engine(path, options);
  EXPECT_EQ(engine.plan().arena_bytes, 0u);
  for (int pass = 0; pass < 3; ++pass) {
    for (std::uint32_t b = 0; b < 5; ++b) check_block(engine, store, b);
  }
  EXPECT_EQ(engine.stats().fills, 5u) << "resident blocks are loaded once";
}

TEST(Engine, AdaptiveLearnsTheOrderAndHidesIo) {
  TempDir dir;
  const auto path = make_store(dir, 10, 64 * KiB, 64 * KiB, 4);
  const auto store = ts::Store::open(path);
  eng::EngineOptions options;
  options.device_budget = 4 * 68 * KiB;  // four slots, nothing resident
  options.slots = 4;
  options.prefetch = eng::PrefetchStrategy::kAdaptive;
  eng::Engine engine(path, options);
  // A non-monotonic execution order (as with encoder-decoder models).
  const std::vector<std::uint32_t> order{0, 5, 1, 6, 2, 7, 3, 8, 4, 9};
  for (int pass = 0; pass < 6; ++pass) {
    for (const auto b : order) {
      const auto view = engine.acquire(b);
      // "Compute" long enough that a 64 KiB read finishes behind it even under sanitizers.
      std::this_thread::sleep_for(std::chrono::milliseconds(10));
      EXPECT_EQ(ts::checksum64({view.host, view.size}), store.blocks()[b].checksum);
      engine.release(b);
    }
  }
  const auto stats = engine.stats();
  EXPECT_TRUE(stats.order_learned);
  EXPECT_GT(stats.prefetches_used, 40u) << "prefetching followed the learned order";
  EXPECT_GT(stats.device_hits, 30u) << "most acquires found their block ready";
  EXPECT_LE(stats.device_bytes_peak, options.device_budget);
}

TEST(Engine, RandomisedConcurrentScheduleKeepsBudgetsAndBytes) {
  std::mt19937_64 rng(99);
  for (int round = 0; round < 6; ++round) {
    TempDir dir;
    const int blocks = 6 + static_cast<int>(rng() % 10);
    const auto path = make_store(dir, blocks, 4 * KiB, 200 * KiB, rng());
    const auto store = ts::Store::open(path);
    std::vector<std::uint64_t> sizes;
    for (const auto& b : store.blocks()) sizes.push_back(b.raw_size);
    eng::EngineOptions options;
    // Rounds alternate between the copying path and reading in place.
    options.backend = round % 2 ? ts::io::BackendType::kMmap : ts::io::BackendType::kPread;
    options.slots = 4 + static_cast<unsigned>(rng() % 3);
    const auto minimum = eng::minimum_budget(sizes, options.slots);
    options.device_budget = minimum + rng() % (minimum + 1);
    options.ram_cache_bytes = rng() % 2 ? rng() % (1 << 20) : 0;
    options.prefetch = static_cast<eng::PrefetchStrategy>(rng() % 3);
    options.verify_checksums = rng() % 2;
    options.wait_timeout = std::chrono::seconds(30);
    eng::Engine engine(path, options);
    std::atomic<int> errors{0};
    std::vector<std::thread> threads;
    for (int t = 0; t < 3; ++t) {  // fewer threads than slots: no thread can starve another
      threads.emplace_back([&, seed = rng()] {
        std::mt19937_64 local(seed);
        for (int op = 0; op < 400; ++op) {
          const auto b = static_cast<std::uint32_t>(local() % store.blocks().size());
          if (local() % 4 == 0) {
            engine.prefetch(b);
            continue;
          }
          const auto view = engine.acquire(b);
          if (ts::checksum64({view.host, view.size}) != store.blocks()[b].checksum) ++errors;
          engine.release(b);
        }
      });
    }
    for (auto& th : threads) th.join();
    const auto stats = engine.stats();
    EXPECT_EQ(errors.load(), 0);
    EXPECT_LE(stats.device_bytes_peak, options.device_budget);
    EXPECT_LE(stats.ram_tier.peak_bytes_in_use, options.ram_cache_bytes);
    EXPECT_EQ(stats.failures, 0u);
  }
}

TEST(Engine, IoErrorReachesTheWaiterAndTheBlockCanBeRetried) {
  TempDir dir;
  const auto path = make_store(dir, 4, 64 * KiB, 64 * KiB, 5);
  const auto store = ts::Store::open(path);
  std::atomic<bool> fail{true};
  eng::EngineOptions options;
  options.device_budget = 2 * 68 * KiB;
  options.prefetch = eng::PrefetchStrategy::kNone;
  options.backend = ts::io::BackendType::kPread;
  FaultInjectionEnv env([&](const FaultContext& ctx) {
    Fault fault;
    if (ctx.point == FaultPoint::kRead && fail.load() && ctx.offset == store.blocks()[2].offset) {
      fault.error = EIO;
    }
    return fault;
  });
  options.env = &env;
  eng::Engine engine(path, options);
  check_block(engine, store, 0);
  try {
    (void)engine.acquire(2);
    FAIL() << "EIO was not reported";
  } catch (const ts::IoError& e) {
    const std::string what = e.what();
    EXPECT_EQ(e.code(), EIO);
    EXPECT_NE(what.find(path.string()), std::string::npos) << what;
    EXPECT_NE(what.find(std::to_string(store.blocks()[2].offset)), std::string::npos) << what;
  }
  fail = false;
  check_block(engine, store, 2);
  check_block(engine, store, 3);
  EXPECT_EQ(engine.stats().failures, 1u);
  engine.close();
}

TEST(Engine, CorruptBlockIsCaughtWhenVerifying) {
  TempDir dir;
  const auto path = make_store(dir, 3, 64 * KiB, 64 * KiB, 6);
  const auto offset = ts::Store::open(path).blocks()[1].offset;
  auto bytes = ts::testing::read_file(path);
  bytes[offset + 100] ^= std::byte{1};
  ts::testing::write_file(path, bytes);
  eng::EngineOptions options;
  options.device_budget = 1 << 20;
  options.verify_checksums = true;
  eng::Engine engine(path, options);
  try {
    (void)engine.acquire(1);
    FAIL() << "corruption not detected";
  } catch (const ts::ChecksumError& e) {
    EXPECT_NE(std::string(e.what()).find("layers.1"), std::string::npos) << e.what();
  }
}

TEST(Engine, SlowIoTimesOutWithinTheBoundAndClosesCleanly) {
  TempDir dir;
  const auto path = make_store(dir, 3, 64 * KiB, 64 * KiB, 7);
  eng::EngineOptions options;
  options.device_budget = 1 << 20;
  options.backend = ts::io::BackendType::kPread;
  options.wait_timeout = std::chrono::milliseconds(200);
  FaultInjectionEnv env([](const FaultContext& ctx) {
    Fault fault;
    if (ctx.point == FaultPoint::kRead) fault.delay = std::chrono::seconds(5);
    return fault;
  });
  options.env = &env;
  eng::Engine engine(path, options);
  const auto start = std::chrono::steady_clock::now();
  EXPECT_THROW((void)engine.acquire(0), ts::Error);
  const auto waited = std::chrono::steady_clock::now() - start;
  EXPECT_LT(waited, std::chrono::seconds(3)) << "the wait was not bounded";
  engine.close();
  EXPECT_LT(std::chrono::steady_clock::now() - start, std::chrono::seconds(4))
      << "close() waited for the slow read";
  EXPECT_THROW((void)engine.acquire(0), ts::Error);
}

// Every file the engine reads, it opens through EngineOptions::env, whichever path reads it;
// an environment is not a reason to choose another path.
TEST(Engine, OpensEveryFileThroughItsEnvironment) {
  class CountingEnv final : public ts::io::EnvWrapper {
   public:
    CountingEnv() : ts::io::EnvWrapper(ts::io::Env::posix()) {}
    ts::detail::FileDescriptor open(const std::filesystem::path& path, int flags) override {
      std::lock_guard lock(mutex);
      opened.push_back(path.filename().string());
      return target().open(path, flags);
    }
    std::mutex mutex;
    std::vector<std::string> opened;
  };
  TempDir dir;
  const auto path = make_store(dir, 3, 16 * KiB, 16 * KiB, 30);
  const auto store = ts::Store::open(path);
  for (const auto backend :
       {ts::io::BackendType::kAuto, ts::io::BackendType::kPread, ts::io::BackendType::kMmap}) {
    SCOPED_TRACE(ts::io::backend_name(backend));
    CountingEnv env;
    eng::EngineOptions options;
    options.device_budget = 1 << 20;
    options.backend = backend;
    options.env = &env;
    eng::Engine engine(path, options);
    for (std::uint32_t b = 0; b < 3; ++b) check_block(engine, store, b);
    {
      std::lock_guard lock(env.mutex);
      EXPECT_NE(std::find(env.opened.begin(), env.opened.end(), path.filename().string()),
                env.opened.end());
    }
    // The same choice of path as without an environment of its own.
    options.env = &ts::io::Env::posix();
    eng::Engine plain(path, options);
    EXPECT_EQ(engine.stats().in_place, plain.stats().in_place) << engine.stats().backend_note;
    EXPECT_EQ(engine.stats().backend, plain.stats().backend);
  }
}

TEST(Engine, MisuseIsRejected) {
  TempDir dir;
  const auto path = make_store(dir, 3, 8 * KiB, 8 * KiB, 8);
  eng::EngineOptions options;
  options.device_budget = 1 << 20;
  eng::Engine engine(path, options);
  EXPECT_THROW((void)engine.acquire(3), std::out_of_range);
  EXPECT_THROW(engine.release(0), std::logic_error);
  options.device = "tpu:0";
  EXPECT_THROW(eng::Engine(path, options), std::invalid_argument);
  options.device = "cpu";
  options.slots = 0;
  EXPECT_THROW(eng::Engine(path, options), std::invalid_argument);
  options.slots = 2;
  options.unit_needs = {1, 2};  // three units
  EXPECT_THROW(eng::Engine(path, options), std::invalid_argument);
}

TEST(Engine, TraceShowsReadsAndStalls) {
  TempDir dir;
  const auto path = make_store(dir, 4, 32 * KiB, 32 * KiB, 9);
  const auto store = ts::Store::open(path);
  eng::EngineOptions options;
  options.device_budget = 2 * 36 * KiB;
  eng::Engine engine(path, options);
  for (std::uint32_t b = 0; b < 4; ++b) check_block(engine, store, b);
  const auto trace = engine.trace_json();
  EXPECT_NE(trace.find("\"cat\":\"read\""), std::string::npos);
  EXPECT_NE(trace.find("\"name\":\"layers.3\""), std::string::npos);
}

TEST(Engine, CallerProvidedMemoryIsUsedAndGivenBack) {
  TempDir dir;
  const auto path = make_store(dir, 6, 40 * KiB, 60 * KiB, 10);
  const auto store = ts::Store::open(path);
  std::mutex mutex;
  std::map<std::uint64_t, std::size_t> outstanding;
  std::size_t allocated = 0;
  eng::EngineOptions options;
  options.device_budget = 200 * KiB;
  options.backend = ts::io::BackendType::kPread;  // reading in place would need no memory
  options.device_memory =
      eng::MemoryProvider{[&](std::size_t bytes) {
                            void* p = std::aligned_alloc(4096, (bytes + 4095) / 4096 * 4096);
                            std::lock_guard lock(mutex);
                            outstanding[reinterpret_cast<std::uint64_t>(p)] = bytes;
                            allocated += bytes;
                            return reinterpret_cast<std::uint64_t>(p);
                          },
                          [&](std::uint64_t address, std::size_t bytes) {
                            std::lock_guard lock(mutex);
                            EXPECT_EQ(outstanding.at(address), bytes);
                            outstanding.erase(address);
                            std::free(reinterpret_cast<void*>(address));
                          }};
  {
    eng::Engine engine(path, options);
    EXPECT_EQ(allocated, engine.plan().device_bytes());
    EXPECT_LE(allocated, options.device_budget);
    for (int pass = 0; pass < 2; ++pass) {
      for (std::uint32_t b = 0; b < 6; ++b) {
        const auto view = engine.acquire(b);
        {
          std::lock_guard lock(mutex);
          bool inside = false;
          for (const auto& [address, bytes] : outstanding) {
            const auto p = reinterpret_cast<std::uint64_t>(view.host);
            inside |= p >= address && p + view.size <= address + bytes;
          }
          EXPECT_TRUE(inside) << "block " << b << " is not in provided memory";
        }
        EXPECT_EQ(ts::checksum64({view.host, view.size}), store.blocks()[b].checksum);
        engine.release(b);
      }
    }
  }
  EXPECT_TRUE(outstanding.empty()) << "memory not given back";
}

TEST(Engine, ShortReadIsReportedNotHidden) {
  TempDir dir;
  const auto path = make_store(dir, 3, 64 * KiB, 64 * KiB, 11);
  const auto store = ts::Store::open(path);
  eng::EngineOptions options;
  options.device_budget = 1 << 20;
  options.prefetch = eng::PrefetchStrategy::kNone;
  options.backend = ts::io::BackendType::kPread;
  FaultInjectionEnv env([&](const FaultContext& ctx) {
    Fault fault;
    if (ctx.point == FaultPoint::kRead && ctx.offset == store.blocks()[1].offset) {
      fault.eof_after = 1000;  // the file "ends" inside the block
    }
    return fault;
  });
  options.env = &env;
  eng::Engine engine(path, options);
  check_block(engine, store, 0);
  try {
    (void)engine.acquire(1);
    FAIL() << "a short read was not reported";
  } catch (const ts::Error& e) {
    EXPECT_NE(std::string(e.what()).find(path.string()), std::string::npos) << e.what();
  }
  check_block(engine, store, 2);
}

TEST(Engine, DemandCancelsQueuedPrefetches) {
  TempDir dir;
  const auto path = make_store(dir, 8, 64 * KiB, 64 * KiB, 12);
  const auto store = ts::Store::open(path);
  std::atomic<bool> slow{true};
  eng::EngineOptions options;
  options.device_budget = 3 * 64 * KiB;
  options.slots = 3;
  options.prefetch = eng::PrefetchStrategy::kNone;
  options.backend = ts::io::BackendType::kPread;
  options.io.num_threads = 1;
  FaultInjectionEnv env([&](const FaultContext& ctx) {
    Fault fault;
    if (ctx.point == FaultPoint::kRead && slow.load()) {
      fault.delay = std::chrono::milliseconds(100);
    }
    return fault;
  });
  options.env = &env;
  eng::Engine engine(path, options);
  // Three prefetches fill every slot's queue; the demand for another block must not wait
  // for all of them.
  engine.prefetch(1);
  engine.prefetch(2);
  engine.prefetch(3);
  slow = false;
  check_block(engine, store, 6);
  const auto stats = engine.stats();
  EXPECT_GE(stats.prefetches_cancelled, 1u) << "the queued prefetch of block 3 was not dropped";
}

namespace {

// 8 blocks of 64 KiB; a budget of 6 blocks: 4 resident, 4 streamed through 2 slots; a RAM
// tier that could hold twice the model, LRU (it admits whatever fits).
eng::EngineOptions resident_and_tier_options(const std::string& device) {
  eng::EngineOptions options;
  options.device = device;
  options.backend = ts::io::BackendType::kPread;
  options.device_budget = 6 * 64 * KiB;
  options.slots = 2;
  options.prefetch = eng::PrefetchStrategy::kNone;
  options.ram_cache_bytes = 16 * 64 * KiB;
  options.cache_policy = ts::cache::Policy::kLru;
  options.verify_checksums = true;
  return options;
}

}  // namespace

TEST(Engine, ResidentBlocksStayOutOfTheRamTier) {
  // A resident block is read once, into its own buffer, and kept: the tier does not admit it
  // (nor look it up), so it takes no room from streamed blocks and, on a GPU, leaves no tier
  // entry pinned for the engine's life (the pin of a copy source lasts until the buffer's
  // next fill, which a resident buffer never has). The same code decides on the CPU.
  TempDir dir;
  const auto path = make_store(dir, 8, 64 * KiB, 64 * KiB, 21);
  const auto store = ts::Store::open(path);
  const auto options = resident_and_tier_options("cpu");
  eng::Engine engine(path, options);
  const auto& plan = engine.plan();
  const auto resident =
      static_cast<std::uint64_t>(std::count(plan.resident.begin(), plan.resident.end(), true));
  ASSERT_EQ(resident, 4u);
  for (int pass = 0; pass < 3; ++pass) {
    for (std::uint32_t b = 0; b < store.blocks().size(); ++b) check_block(engine, store, b);
  }
  const auto stats = engine.stats();
  const auto& tier = stats.ram_tier;
  EXPECT_EQ(tier.capacity, 8 * 64 * KiB) << "the tier's region: never more than every block";
  EXPECT_EQ(tier.insertions, 4u) << "only the streamed blocks are admitted";
  EXPECT_EQ(tier.entries, 4u);
  EXPECT_EQ(tier.misses, 4u) << "resident blocks are not looked up";
  EXPECT_EQ(tier.pinned_entries, 0u);
  EXPECT_EQ(tier.bytes_in_use, 4 * 64 * KiB);
  // Passes 2 and 3 find a streamed block either still cached in the arena (a device hit) or
  // in the tier: every fill after the first eight (4 resident + 4 streamed) is a tier hit.
  EXPECT_EQ(stats.fills + stats.device_hits, 24u);
  EXPECT_GE(stats.fills, 8u);
  EXPECT_EQ(tier.hits, stats.fills - 8u);
  EXPECT_EQ(stats.bytes_from_ram_tier, tier.hits * 64 * KiB);
  EXPECT_EQ(stats.failures, 0u);
}

TEST(Engine, ResidentBlocksLeaveNoTierEntryPinnedOnTheGpu) {
  // As ResidentBlocksStayOutOfTheRamTier on a GPU, where copies from the tier's pinned region
  // are asynchronous: after the passes, only the entries the slots' last copies came from
  // may be pinned (at most one per slot), none of a resident block.
  if (!ts::cuda::available()) GTEST_SKIP() << ts::cuda::driver_status().reason;
  TempDir dir;
  const auto path = make_store(dir, 8, 64 * KiB, 64 * KiB, 21);
  const auto store = ts::Store::open(path);
  const auto options = resident_and_tier_options("cuda:0");
  eng::Engine engine(path, options);
  ts::cuda::Device device(0);
  ts::cuda::Stream stream(device);
  ts::cuda::PinnedHostBuffer back(device, 64 * KiB);
  for (int pass = 0; pass < 3; ++pass) {
    for (std::uint32_t b = 0; b < store.blocks().size(); ++b) {
      const auto view = engine.acquire(b, stream.handle());
      ts::cuda::memcpy_dtoh_async(device, back.data(), view.device, view.size, stream.handle());
      engine.release(b, stream.handle());
      stream.synchronize();
      EXPECT_EQ(ts::checksum64({back.data(), view.size}), store.blocks()[b].checksum);
    }
  }
  const auto stats = engine.stats();
  EXPECT_EQ(stats.ram_tier.insertions, 4u);
  EXPECT_LE(stats.ram_tier.pinned_entries, engine.plan().arena_bytes / (64 * KiB));
  EXPECT_EQ(stats.failures, 0u);
}

TEST(Engine, StreamsToTheGpu) {
  if (!ts::cuda::available()) GTEST_SKIP() << ts::cuda::driver_status().reason;
  TempDir dir;
  const auto path = make_store(dir, 10, 1 << 20, 4 << 20, 13);
  const auto store = ts::Store::open(path);
  eng::EngineOptions options;
  options.device = "cuda:0";
  options.device_budget = 3 * (4 << 20);
  options.slots = 3;
  options.ram_cache_bytes = 16 << 20;
  options.verify_checksums = true;
  eng::Engine engine(path, options);
  ts::cuda::Device device(0);
  ts::cuda::Stream stream(device);
  ts::cuda::PinnedHostBuffer back(device, 4 << 20);
  for (int pass = 0; pass < 3; ++pass) {
    for (std::uint32_t b = 0; b < store.blocks().size(); ++b) {
      const auto view = engine.acquire(b, stream.handle());
      ASSERT_NE(view.device, 0u);
      ts::cuda::memcpy_dtoh_async(device, back.data(), view.device, view.size, stream.handle());
      engine.release(b, stream.handle());
      stream.synchronize();
      EXPECT_EQ(ts::checksum64({back.data(), view.size}), store.blocks()[b].checksum);
    }
  }
  const auto stats = engine.stats();
  EXPECT_LE(stats.device_bytes_peak, options.device_budget);
  EXPECT_EQ(stats.failures, 0u);
}
