// The engine streaming a safetensors checkpoint in place: hand-built shards with tensors at
// unaligned offsets and odd sizes, exact bytes at every placement under every strategy and
// tier, hard budgets, a randomised multi-threaded schedule, failures naming the file, caller
// groups and bad input.
#include <gtest/gtest.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <cstring>
#include <map>
#include <optional>
#include <random>
#include <thread>

#include "tensorstream/engine/engine.hpp"
#include "tensorstream/errors.hpp"
#include "tensorstream/safetensors.hpp"
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

struct Tensor {
  std::string name;
  std::string dtype;  // safetensors name
  std::vector<std::int64_t> shape;
  std::vector<std::byte> data;
};

void append_text(std::vector<std::byte>& out, std::string_view text) {
  for (const char c : text) out.push_back(static_cast<std::byte>(c));
}

// Writes `tensors` as one safetensors file, data in the given order, header unpadded (so
// the data section, and every tensor, starts at an unaligned offset).
void write_safetensors(const std::filesystem::path& path, const std::vector<Tensor>& tensors) {
  std::string header = "{";
  std::uint64_t offset = 0;
  for (std::size_t i = 0; i < tensors.size(); ++i) {
    const auto& t = tensors[i];
    std::string shape = "[";
    for (std::size_t d = 0; d < t.shape.size(); ++d) {
      shape += (d ? "," : "") + std::to_string(t.shape[d]);
    }
    shape += "]";
    header += (i ? "," : "") + std::string("\"") + t.name + "\":{\"dtype\":\"" + t.dtype +
              "\",\"shape\":" + shape + ",\"data_offsets\":[" + std::to_string(offset) + "," +
              std::to_string(offset + t.data.size()) + "]}";
    offset += t.data.size();
  }
  header += ",\"__metadata__\":{\"format\":\"pt\"}}";
  std::vector<std::byte> out;
  for (int i = 0; i < 8; ++i) {
    out.push_back(static_cast<std::byte>((header.size() >> (8 * i)) & 0xff));
  }
  append_text(out, header);
  for (const auto& t : tensors) out.insert(out.end(), t.data.begin(), t.data.end());
  ts::testing::write_file(path, out);
}

Tensor make_tensor(std::string name, std::string dtype, std::vector<std::int64_t> shape,
                   std::size_t element_size, std::uint64_t seed) {
  std::uint64_t count = 1;
  for (const auto d : shape) count *= static_cast<std::uint64_t>(d);
  return {std::move(name), std::move(dtype), std::move(shape),
          ts::testing::random_bytes(count * element_size, seed)};
}

struct Checkpoint {
  std::filesystem::path dir;
  std::map<std::string, std::vector<std::byte>> bytes;  // tensor name -> its bytes
  std::uint64_t total = 0;
};

// A Llama-like checkpoint of `layers` layers sharded over 3 files with an index: each
// layer's tensors spread over the shards, shuffled inside each shard (so some blocks' tensors
// are contiguous in a file and others are not), odd sizes, unaligned offsets.
Checkpoint make_checkpoint(const TempDir& dir, int layers, std::uint64_t seed) {
  std::mt19937_64 rng(seed);
  std::vector<std::vector<Tensor>> shards(3);
  auto add = [&](std::size_t shard, Tensor t) { shards[shard].push_back(std::move(t)); };
  add(0, make_tensor("model.embed_tokens.weight", "F16", {37, 29}, 2, rng()));
  for (int i = 0; i < layers; ++i) {
    const auto p = "model.layers." + std::to_string(i);
    const auto n = static_cast<std::int64_t>(1000 + rng() % 40000);
    add(static_cast<std::size_t>(i) % 3, make_tensor(p + ".mlp.w", "U8", {n}, 1, rng()));
    add(static_cast<std::size_t>(i + 1) % 3,
        make_tensor(p + ".attn.q", "F32", {3, static_cast<std::int64_t>(1 + rng() % 3001)}, 4,
                    rng()));
    add(static_cast<std::size_t>(i) % 3,
        make_tensor(p + ".norm", "BF16", {static_cast<std::int64_t>(1 + rng() % 777)}, 2, rng()));
    add(static_cast<std::size_t>(i) % 3, make_tensor(p + ".empty", "F32", {0, 5}, 4, rng()));
  }
  add(2, make_tensor("model.norm.weight", "F32", {33}, 4, rng()));
  add(1, make_tensor("lm_head.weight", "F16", {37, 29}, 2, rng()));
  Checkpoint out;
  out.dir = dir / "ckpt";
  std::filesystem::create_directories(out.dir);
  std::string index = "{\"metadata\":{\"total_size\":0},\"weight_map\":{";
  bool first = true;
  for (std::size_t s = 0; s < shards.size(); ++s) {
    std::shuffle(shards[s].begin(), shards[s].end(), rng);
    const auto file = "model-0000" + std::to_string(s + 1) + "-of-00003.safetensors";
    write_safetensors(out.dir / file, shards[s]);
    for (const auto& t : shards[s]) {
      index += (first ? "\"" : ",\"") + t.name + "\":\"" + file + "\"";
      first = false;
      out.total += t.data.size();
      out.bytes[t.name] = t.data;
    }
  }
  index += "}}";
  std::vector<std::byte> index_bytes;
  append_text(index_bytes, index);
  ts::testing::write_file(out.dir / "model.safetensors.index.json", index_bytes);
  return out;
}

// The smallest budget for `slots` slots (from the engine's own refusal).
std::uint64_t minimum_budget(const std::filesystem::path& path, unsigned slots,
                             const eng::TensorGroups& groups = {}) {
  eng::EngineOptions options;
  options.device_budget = 1;
  options.slots = slots;
  try {
    (void)eng::Engine::from_safetensors(path, options, groups);
  } catch (const eng::BudgetTooSmall& e) {
    return e.minimum_budget();
  }
  ADD_FAILURE() << "a budget of 1 byte was accepted";
  return 0;
}

// Acquires `block`, compares every tensor's bytes at its placement, releases it.
void check_block(eng::Engine& engine, const Checkpoint& ckpt, std::uint32_t block) {
  const auto view = engine.acquire(block);
  ASSERT_NE(view.host, nullptr);
  for (const auto& t : engine.tensors(block)) {
    const auto& expected = ckpt.bytes.at(t.name);
    ASSERT_EQ(t.nbytes, expected.size()) << t.name;
    ASSERT_LE(t.offset + t.nbytes, view.size) << t.name;
    ASSERT_TRUE(expected.empty() ||
                std::memcmp(view.host + t.offset, expected.data(), expected.size()) == 0)
        << t.name << " in block " << engine.block_name(block);
  }
  engine.release(block);
}

}  // namespace

TEST(EngineSafetensors, ExactBytesForEveryStrategyAndTier) {
  TempDir dir;
  const auto ckpt = make_checkpoint(dir, 9, 1);
  const auto checkpoint = ts::SafetensorsCheckpoint::open(ckpt.dir);
  const auto minimum = minimum_budget(ckpt.dir, 3);
  for (const auto prefetch : {eng::PrefetchStrategy::kNone, eng::PrefetchStrategy::kNextLayer,
                              eng::PrefetchStrategy::kAdaptive}) {
    for (const std::uint64_t ram_cache : {std::uint64_t{0}, ckpt.total / 2}) {
      SCOPED_TRACE(std::string(eng::prefetch_strategy_name(prefetch)) +
                   " cache=" + std::to_string(ram_cache));
      eng::EngineOptions options;
      options.device_budget = minimum + 100 * KiB;
      options.slots = 3;
      options.prefetch = prefetch;
      options.ram_cache_bytes = ram_cache;
      options.verify_checksums = true;  // first-read checksums, checked on later passes
      auto engine = eng::Engine::from_safetensors(ckpt.dir, options);
      ASSERT_EQ(engine.block_count(), 9u + 3u);  // embed, 9 layers, norm, lm_head
      EXPECT_EQ(engine.block_name(0), "model.embed_tokens");
      EXPECT_EQ(engine.block_name(1), "model.layers.0");
      EXPECT_EQ(engine.block_name(11), "lm_head");
      EXPECT_GT(engine.plan().arena_bytes, 0u) << "the budget must force streaming";
      std::size_t tensors = 0;
      for (std::uint32_t b = 0; b < engine.block_count(); ++b) {
        for (const auto& t : engine.tensors(b)) {
          ++tensors;
          // Read in place, a tensor is aligned in memory as it is in its file; where the
          // bytes are copied into their buffer, at a 256-byte boundary.
          const auto* entry = checkpoint.find(t.name);
          ASSERT_NE(entry, nullptr);
          if (t.nbytes > 0 && engine.stats().in_place) {
            EXPECT_EQ(t.offset % 4096, entry->tensor->offset % 4096) << t.name;
          } else if (t.nbytes > 0) {
            EXPECT_EQ(t.offset % 256, 0u) << t.name;
          }
          EXPECT_EQ(t.dtype, entry->tensor->dtype);
          EXPECT_EQ(t.shape, entry->tensor->shape);
        }
      }
      EXPECT_EQ(tensors, ckpt.bytes.size());
      for (int pass = 0; pass < 3; ++pass) {
        for (std::uint32_t b = 0; b < engine.block_count(); ++b) check_block(engine, ckpt, b);
      }
      const auto stats = engine.stats();
      EXPECT_LE(stats.device_bytes_peak, options.device_budget);
      EXPECT_LE(stats.ram_tier.peak_bytes_in_use, ram_cache);
      EXPECT_EQ(stats.failures, 0u);
      EXPECT_EQ(stats.acquires, 3 * engine.block_count());
      if (prefetch != eng::PrefetchStrategy::kNone) {
        EXPECT_GT(stats.prefetches_used, 0u);
      }
      if (ram_cache > 0) {
        EXPECT_GT(stats.bytes_from_ram_tier, 0u);
      }
    }
  }
}

TEST(EngineSafetensors, ContiguousTensorsAreReadInOneRequest) {
  TempDir dir;
  std::vector<Tensor> tensors;
  std::map<std::string, std::vector<std::byte>> bytes;
  for (int i = 0; i < 4; ++i) {
    for (const char* part : {".a", ".b", ".c"}) {
      auto t = make_tensor("layers." + std::to_string(i) + part, "U8",
                           {static_cast<std::int64_t>(777 + 1000 * i)}, 1, 10 + bytes.size());
      bytes[t.name] = t.data;
      tensors.push_back(std::move(t));
    }
  }
  const auto path = dir / "model.safetensors";
  write_safetensors(path, tensors);
  eng::EngineOptions options;
  options.device_budget = 1 << 20;
  options.prefetch = eng::PrefetchStrategy::kNone;
  options.backend = ts::io::BackendType::kPread;  // counts the backend's reads
  auto engine = eng::Engine::from_safetensors(path, options);
  ASSERT_EQ(engine.block_count(), 4u);
  Checkpoint ckpt{path, bytes, 0};
  for (std::uint32_t b = 0; b < 4; ++b) check_block(engine, ckpt, b);
  EXPECT_EQ(engine.stats().io.submitted, 4u) << "one read per block";
}

TEST(EngineSafetensors, EveryBackendReadsExactBytesInPlace) {
  TempDir dir;
  const auto ckpt = make_checkpoint(dir, 5, 6);
  for (const auto backend :
       {ts::io::BackendType::kPread, ts::io::BackendType::kMmap, ts::io::BackendType::kIoUring}) {
    SCOPED_TRACE(std::string(ts::io::backend_name(backend)));
    eng::EngineOptions options;
    options.backend = backend;
    options.device_budget = minimum_budget(ckpt.dir, 2);
    std::optional<eng::Engine> engine;
    try {
      engine.emplace(eng::Engine::from_safetensors(ckpt.dir, options));
    } catch (const ts::Error& e) {
      ASSERT_EQ(backend, ts::io::BackendType::kIoUring) << e.what();
      continue;  // io_uring not usable here
    }
    for (int pass = 0; pass < 2; ++pass) {
      for (std::uint32_t b = 0; b < engine->block_count(); ++b) check_block(*engine, ckpt, b);
    }
    const auto io = engine->stats().io;
    const bool direct =
        std::all_of(io.files.begin(), io.files.end(), [](const auto& f) { return f.direct; });
    if (direct && backend != ts::io::BackendType::kMmap) {
      EXPECT_GT(io.reads_direct, 0u) << "unaligned tensors are read with O_DIRECT";
      EXPECT_EQ(io.reads_buffered, 0u);
    }
  }
}

TEST(EngineSafetensors, ThreadsAcquireAndReleaseAtRandom) {
  TempDir dir;
  const auto ckpt = make_checkpoint(dir, 12, 2);
  eng::EngineOptions options;
  options.slots = 4;
  options.device_budget = minimum_budget(ckpt.dir, 4) + 50 * KiB;
  options.ram_cache_bytes = ckpt.total / 3;
  options.verify_checksums = true;
  auto engine = eng::Engine::from_safetensors(ckpt.dir, options);
  const auto blocks = static_cast<std::uint32_t>(engine.block_count());
  std::atomic<int> errors{0};
  std::vector<std::thread> threads;
  for (unsigned t = 0; t < 4; ++t) {
    threads.emplace_back([&, t] {
      std::mt19937 rng(100 + t);
      for (int i = 0; i < 150; ++i) {
        const auto block = static_cast<std::uint32_t>(rng() % blocks);
        if (rng() % 4 == 0) engine.prefetch(static_cast<std::uint32_t>(rng() % blocks));
        const auto view = engine.acquire(block);
        for (const auto& tensor : engine.tensors(block)) {
          const auto& expected = ckpt.bytes.at(tensor.name);
          if (!expected.empty() &&
              std::memcmp(view.host + tensor.offset, expected.data(), expected.size()) != 0) {
            ++errors;
          }
        }
        engine.release(block);
      }
    });
  }
  for (auto& t : threads) t.join();
  EXPECT_EQ(errors.load(), 0);
  const auto stats = engine.stats();
  EXPECT_LE(stats.device_bytes_peak, options.device_budget);
  EXPECT_EQ(stats.failures, 0u);
  engine.close();
}

TEST(EngineSafetensors, EioReachesTheWaiterNamingTheFile) {
  TempDir dir;
  const auto ckpt = make_checkpoint(dir, 4, 3);
  const auto shard = ckpt.dir / "model-00002-of-00003.safetensors";
  std::atomic<bool> fail{true};
  eng::EngineOptions options;
  options.device_budget = minimum_budget(ckpt.dir, 2);
  options.prefetch = eng::PrefetchStrategy::kNone;
  options.backend = ts::io::BackendType::kPread;
  FaultInjectionEnv env([&](const FaultContext& ctx) {
    Fault fault;
    if (ctx.point == FaultPoint::kRead && fail && ctx.path->filename() == shard.filename()) {
      fault.error = EIO;
    }
    return fault;
  });
  options.env = &env;
  auto engine = eng::Engine::from_safetensors(ckpt.dir, options);
  // model.layers.0 has its attn.q in shard 2 (layer i's q goes to shard (i + 1) % 3).
  ASSERT_EQ(engine.block_name(1), "model.layers.0");
  try {
    (void)engine.acquire(1);
    FAIL() << "EIO was not reported";
  } catch (const ts::IoError& e) {
    const std::string what = e.what();
    EXPECT_EQ(e.code(), EIO);
    EXPECT_NE(what.find(shard.string()), std::string::npos) << what;
    EXPECT_NE(what.find("model.layers.0.attn.q"), std::string::npos) << what;
    EXPECT_NE(what.find("model.layers.0'"), std::string::npos) << what;
  }
  fail = false;
  check_block(engine, ckpt, 1);
  check_block(engine, ckpt, 2);
  EXPECT_EQ(engine.stats().failures, 1u);
}

TEST(EngineSafetensors, CallerGroupsAreRespected) {
  TempDir dir;
  const auto ckpt = make_checkpoint(dir, 3, 4);
  const eng::TensorGroups groups = {
      {"odd", {"model.layers.1.norm", "lm_head.weight", "model.layers.0.mlp.w"}},
      {"rest", {"model.layers.2.attn.q", "model.layers.2.mlp.w", "model.embed_tokens.weight"}},
  };
  eng::EngineOptions options;
  options.device_budget = minimum_budget(ckpt.dir, 2, groups);
  auto engine = eng::Engine::from_safetensors(ckpt.dir, options, groups);
  ASSERT_EQ(engine.block_count(), 2u);
  for (std::uint32_t b = 0; b < 2; ++b) {
    EXPECT_EQ(engine.block_name(b), groups[b].first);
    const auto tensors = engine.tensors(b);
    ASSERT_EQ(tensors.size(), groups[b].second.size());
    for (std::size_t i = 0; i < tensors.size(); ++i) {
      EXPECT_EQ(tensors[i].name, groups[b].second[i]);
    }
  }
  for (int pass = 0; pass < 2; ++pass) {
    check_block(engine, ckpt, 0);
    check_block(engine, ckpt, 1);
  }
}

TEST(EngineSafetensors, BadInputIsRefusedClearly) {
  TempDir dir;
  const auto ckpt = make_checkpoint(dir, 2, 5);
  eng::EngineOptions options;
  options.device_budget = 1 << 24;
  auto refused = [&](const eng::TensorGroups& groups, const std::string& needle) {
    try {
      (void)eng::Engine::from_safetensors(ckpt.dir, options, groups);
      ADD_FAILURE() << "accepted; expected an error with " << needle;
    } catch (const std::invalid_argument& e) {
      EXPECT_NE(std::string(e.what()).find(needle), std::string::npos) << e.what();
    }
  };
  refused({{"a", {"model.layers.0.mlp.w", "model.layers.9.nope"}}}, "model.layers.9.nope");
  refused({{"a", {"model.layers.0.mlp.w"}}, {"b", {"model.layers.0.mlp.w"}}},
          "model.layers.0.mlp.w");
  refused({{"a", {"model.layers.0.mlp.w"}}, {"a", {"model.norm.weight"}}}, "'a'");
  refused({{"a", {}}}, "'a'");

  const auto empty = dir / "empty";
  std::filesystem::create_directories(empty);
  try {
    (void)eng::Engine::from_safetensors(empty, options);
    FAIL() << "an empty directory was accepted";
  } catch (const ts::FormatError& e) {
    EXPECT_NE(std::string(e.what()).find(empty.string()), std::string::npos) << e.what();
  }
  EXPECT_THROW((void)eng::Engine::from_safetensors(dir / "missing", options), ts::Error);
}

TEST(EngineSafetensors, StorePlacementsMatchTheStore) {
  TempDir dir;
  const auto path = dir / "model.tstore";
  ts::StoreWriter writer(path, ts::WriterOptions{4096, 256, false});
  writer.begin_block("b0");
  for (int i = 0; i < 3; ++i) {
    const auto data = ts::testing::random_bytes(1000 + 7 * static_cast<std::size_t>(i), 9);
    writer.add_tensor("b0.t" + std::to_string(i), ts::DType::kUInt8,
                      std::vector<std::int64_t>{static_cast<std::int64_t>(data.size())}, data);
  }
  writer.end_block();
  writer.commit();
  const auto store = ts::Store::open(path);
  eng::EngineOptions options;
  options.device_budget = 1 << 20;
  eng::Engine engine(path, options);
  const auto tensors = engine.tensors(0);
  const auto expected = store.block_tensors(0);
  ASSERT_EQ(tensors.size(), expected.size());
  for (std::size_t i = 0; i < tensors.size(); ++i) {
    EXPECT_EQ(tensors[i].name, expected[i].name);
    EXPECT_EQ(tensors[i].offset, expected[i].offset_in_block);
    EXPECT_EQ(tensors[i].nbytes, expected[i].nbytes);
  }
  EXPECT_THROW((void)engine.tensors(1), std::out_of_range);
}
