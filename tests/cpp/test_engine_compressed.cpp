// The streaming engine over compressed stores (format 1.1), on real files: bitwise equal to
// the uncompressed store for every dtype the codec handles, with raw and compressed blocks and
// chunks mixed; units that cover part of a block decode only the chunks covering them; the
// RAM tier holds decoded units; rows of a compressed tensor; the paths that cannot decode
// (in place) falling back and saying so; damaged, truncated and short-read chunks refused
// with the file, block and chunk named; and concurrent acquires (run under TSan by
// `make test-tsan`).
#include <gtest/gtest.h>

#include <fcntl.h>

#include <algorithm>
#include <atomic>
#include <filesystem>
#include <map>
#include <random>
#include <thread>

#include "tensorstream/checksum.hpp"
#include "tensorstream/codec.hpp"
#include "tensorstream/detail/endian.hpp"
#include "tensorstream/detail/store_format.hpp"
#include "tensorstream/engine/engine.hpp"
#include "tensorstream/errors.hpp"
#include "tensorstream/store.hpp"
#include "test_helpers.hpp"

namespace ts = tensorstream;
namespace eng = tensorstream::engine;
namespace codec = tensorstream::codec;
namespace detail = tensorstream::detail;
using ts::testing::Fault;
using ts::testing::FaultContext;
using ts::testing::FaultInjectionEnv;
using ts::testing::FaultPoint;
using ts::testing::kAllDTypes;
using ts::testing::random_bytes;
using ts::testing::read_file;
using ts::testing::TempDir;
using ts::testing::weight_bytes;
using ts::testing::write_file;

namespace {

constexpr ts::OpenOptions kDecode{true};
constexpr std::uint32_t kChunk = 64u << 10;

struct Tensor {
  std::string name;
  ts::DType dtype;
  std::vector<std::int64_t> shape;
  std::vector<std::byte> data;
};
using Blocks = std::vector<std::pair<std::string, std::vector<Tensor>>>;

Tensor weights(std::string name, ts::DType dtype, std::int64_t rows, std::int64_t cols,
               std::uint64_t seed) {
  return Tensor{std::move(name),
                dtype,
                {rows, cols},
                weight_bytes(dtype, static_cast<std::size_t>(rows * cols), seed)};
}

Tensor noise(std::string name, std::int64_t n, std::uint64_t seed) {
  return Tensor{
      std::move(name), ts::DType::kUInt8, {n}, random_bytes(static_cast<std::size_t>(n), seed)};
}

ts::WriterOptions writer_options(bool compress) {
  ts::WriterOptions options;
  options.durable = false;
  options.compression.enabled = compress;
  options.compression.level = 1;
  options.compression.chunk_size = kChunk;
  options.compression.threads = 2;
  return options;
}

void write_store(const std::filesystem::path& path, const Blocks& blocks, bool compress) {
  ts::StoreWriter writer(path, writer_options(compress));
  for (const auto& [name, tensors] : blocks) {
    writer.begin_block(name);
    for (const auto& t : tensors) writer.add_tensor(t.name, t.dtype, t.shape, t.data);
    writer.end_block();
  }
  writer.commit();
}

std::map<std::string, const Tensor*> by_name(const Blocks& blocks) {
  std::map<std::string, const Tensor*> out;
  for (const auto& [name, tensors] : blocks) {
    for (const auto& t : tensors) out[t.name] = &t;
  }
  return out;
}

// Acquires `unit`, compares each of its tensors with what was written, releases it.
void expect_unit(eng::Engine& engine, std::uint32_t unit,
                 const std::map<std::string, const Tensor*>& expected) {
  const auto view = engine.acquire(unit);
  ASSERT_NE(view.host, nullptr);
  for (const auto& t : engine.tensors(unit)) {
    SCOPED_TRACE(t.name);
    const auto& want = expected.at(t.name)->data;
    ASSERT_EQ(t.nbytes, want.size());
    EXPECT_TRUE(std::equal(want.begin(), want.end(), view.host + t.offset)) << "bytes differ";
  }
  engine.release(unit);
}

// One block per dtype (weights of two chunks and a bit, a small tensor, an empty one), a
// block of random bytes (stored raw: no chunk shrinks) and a block mixing random bytes with
// bf16 weights (raw and compressed chunks in one block).
Blocks every_dtype_blocks() {
  Blocks blocks;
  std::uint64_t seed = 1;
  for (std::size_t i = 0; i < kAllDTypes.size(); ++i) {
    const auto dtype = kAllDTypes[i];
    const std::string block = "layers." + std::to_string(i);
    const auto cols = static_cast<std::int64_t>(256 / ts::dtype_size(dtype));
    const auto rows = static_cast<std::int64_t>((2 * kChunk + 4096) / 256);
    blocks.push_back(
        {block,
         {weights(block + ".w", dtype, rows, cols, seed++),
          weights(block + ".b", dtype, 1, 13, seed++), Tensor{block + ".empty", dtype, {0}, {}}}});
  }
  blocks.push_back({"noise", {noise("noise.a", 150000, 100), noise("noise.b", 999, 101)}});
  blocks.push_back(
      {"mixed",
       {weights("mixed.w", ts::DType::kBFloat16, 512, 128, 102), noise("mixed.noise", 200000, 103),
        weights("mixed.v", ts::DType::kFloat32, 300, 64, 104)}});
  return blocks;
}

std::uint64_t largest_block(const ts::Store& store) { return store.max_block_size(); }

class EngineCompressed : public ::testing::Test {
 protected:
  void SetUp() override {
    if (!codec::available()) GTEST_SKIP() << codec::describe();
    blocks_ = every_dtype_blocks();
    expected_ = by_name(blocks_);
    write_store(raw_path_, blocks_, false);
    write_store(path_, blocks_, true);
    const auto store = ts::Store::open(path_, kDecode);
    for (const auto& b : store.blocks()) compressed_blocks_ += b.codec == ts::Codec::kChunked;
    largest_ = largest_block(store);
  }

  eng::EngineOptions options(ts::io::BackendType backend = ts::io::BackendType::kPread) const {
    eng::EngineOptions o;
    o.device_budget = 3 * largest_;  // everything streams through the arena
    o.backend = backend;
    o.decode_threads = 2;
    o.compressed_reads = eng::CompressedReads::kDecode;  // the decoded copy has tests of its own
    return o;
  }

  TempDir dir_;
  std::filesystem::path raw_path_ = dir_ / "raw.tstore";
  std::filesystem::path path_ = dir_ / "packed.tstore";
  Blocks blocks_;
  std::map<std::string, const Tensor*> expected_;
  std::size_t compressed_blocks_ = 0;
  std::uint64_t largest_ = 0;
};

}  // namespace

TEST_F(EngineCompressed, TheStoreMixesRawAndCompressedBlocksAndChunks) {
  const auto store = ts::Store::open(path_, kDecode);
  EXPECT_GT(compressed_blocks_, kAllDTypes.size() / 2);
  const auto noise = *store.find_block("noise");
  EXPECT_EQ(store.blocks()[noise].codec, ts::Codec::kNone);
  const auto mixed = *store.find_block("mixed");
  std::map<ts::ChunkCodec, int> codecs;
  for (const auto& c : store.block_chunks(mixed)) ++codecs[c.codec];
  EXPECT_GT(codecs[ts::ChunkCodec::kRaw], 0);
  EXPECT_GT(codecs[ts::ChunkCodec::kBytePlanesZstd], 0);
}

TEST_F(EngineCompressed, EveryUnitIsBitwiseTheUncompressedStoresForEveryDType) {
  for (const auto prefetch : {eng::PrefetchStrategy::kNone, eng::PrefetchStrategy::kAdaptive}) {
    SCOPED_TRACE(std::string(eng::prefetch_strategy_name(prefetch)));
    auto o = options();
    o.prefetch = prefetch;
    eng::Engine raw(raw_path_, o);
    eng::Engine engine(path_, o);
    ASSERT_EQ(engine.block_count(), raw.block_count());
    for (int pass = 0; pass < 2; ++pass) {
      for (std::uint32_t b = 0; b < engine.block_count(); ++b) {
        SCOPED_TRACE(engine.block_name(b));
        const auto a = raw.acquire(b);
        const auto c = engine.acquire(b);
        ASSERT_EQ(a.size, c.size);
        // Placements do not depend on compression, and neither do the bytes.
        const auto pa = raw.tensors(b);
        const auto pc = engine.tensors(b);
        ASSERT_EQ(pa.size(), pc.size());
        for (std::size_t i = 0; i < pa.size(); ++i) {
          EXPECT_EQ(pa[i].name, pc[i].name);
          EXPECT_EQ(pa[i].offset, pc[i].offset);
          EXPECT_TRUE(std::equal(a.host + pa[i].offset, a.host + pa[i].offset + pa[i].nbytes,
                                 c.host + pc[i].offset))
              << pa[i].name;
        }
        raw.release(b);
        engine.release(b);
      }
    }
    const auto s = engine.stats();
    EXPECT_EQ(s.compressed_units, compressed_blocks_);
    EXPECT_GT(s.bytes_read_compressed, 0u);
    EXPECT_GT(s.bytes_decoded, s.bytes_read_compressed);  // they shrank
    EXPECT_LE(s.bytes_read_compressed, s.bytes_from_storage);
    EXPECT_GT(s.decode_seconds, 0.0);
    EXPECT_EQ(s.decode_threads, 2u);
    EXPECT_NE(s.decode_note.find("hold compressed chunks"), std::string::npos) << s.decode_note;
    EXPECT_EQ(s.failures, 0u);
    // The uncompressed store reads more bytes for the same units.
    const auto r = raw.stats();
    EXPECT_EQ(r.compressed_units, 0u);
    EXPECT_EQ(r.bytes_decoded, 0u);
    EXPECT_TRUE(r.decode_note.empty());
    if (prefetch == eng::PrefetchStrategy::kNone) {  // the same fills, one per acquire
      EXPECT_LT(s.bytes_from_storage, r.bytes_from_storage);
      EXPECT_EQ(s.bytes_to_device, r.bytes_to_device);
      EXPECT_EQ(s.fills, r.fills);
    }
  }
}

TEST_F(EngineCompressed, WithChecksumsEveryDecodedBlockIsVerified) {
  auto o = options();
  o.verify_checksums = true;
  eng::Engine engine(path_, o);
  for (std::uint32_t b = 0; b < engine.block_count(); ++b) expect_unit(engine, b, expected_);
  EXPECT_EQ(engine.stats().failures, 0u);
}

TEST_F(EngineCompressed, InPlaceReadingFallsBackToDecodingOnFillsAndSaysWhy) {
  for (const auto backend : {ts::io::BackendType::kMmap, ts::io::BackendType::kAuto}) {
    SCOPED_TRACE(std::string(ts::io::backend_name(backend)));
    eng::Engine engine(path_, options(backend));
    for (std::uint32_t b = 0; b < engine.block_count(); ++b) expect_unit(engine, b, expected_);
    const auto s = engine.stats();
    EXPECT_FALSE(s.in_place);
    EXPECT_NE(s.backend_note.find("compressed chunks"), std::string::npos) << s.backend_note;
    EXPECT_NE(s.decode_note.find("compressed chunks"), std::string::npos) << s.decode_note;
    EXPECT_GT(s.bytes_decoded, 0u);
    // The raw store takes the in-place path under the same options (for mmap always).
    if (backend == ts::io::BackendType::kMmap) {
      eng::Engine raw(raw_path_, options(backend));
      EXPECT_TRUE(raw.stats().in_place);
    }
  }
}

TEST_F(EngineCompressed, TheRamTierHoldsDecodedUnits) {
  auto o = options();
  o.ram_cache_bytes = 64u << 20;  // the whole model
  o.cache_policy = ts::cache::Policy::kLru;
  eng::Engine engine(path_, o);
  for (std::uint32_t b = 0; b < engine.block_count(); ++b) expect_unit(engine, b, expected_);
  const auto first = engine.stats();
  // Second pass: every unit comes from the tier, already decoded.
  for (std::uint32_t b = 0; b < engine.block_count(); ++b) expect_unit(engine, b, expected_);
  const auto second = engine.stats();
  EXPECT_GT(second.bytes_from_ram_tier, first.bytes_from_ram_tier);
  EXPECT_EQ(second.bytes_decoded, first.bytes_decoded) << "a tier hit was decoded again";
  EXPECT_EQ(second.bytes_read_compressed, first.bytes_read_compressed);
  EXPECT_NE(second.decode_note.find("RAM tier"), std::string::npos) << second.decode_note;
}

TEST_F(EngineCompressed, PartialUnitsDecodeOnlyTheChunksCoveringTheirTensors) {
  // Each tensor of the first bf16 block its own unit, plus a unit of tensors of two blocks.
  const auto store = ts::Store::open(path_, kDecode);
  const auto bf16 = static_cast<std::size_t>(
      std::find(kAllDTypes.begin(), kAllDTypes.end(), ts::DType::kBFloat16) - kAllDTypes.begin());
  const std::string block = "layers." + std::to_string(bf16);
  const eng::TensorGroups groups = {
      {"w", {block + ".w"}},
      {"b", {block + ".b"}},
      {"across", {"mixed.v", "layers.0.w", "noise.b"}},
  };
  eng::Engine engine = eng::Engine::from_store(path_, options(), groups);
  const auto b_index = *store.find_block(block);
  const auto chunks = store.block_chunks(b_index);
  ASSERT_EQ(store.blocks()[b_index].codec, ts::Codec::kChunked);
  for (std::uint32_t u = 0; u < 3; ++u) {
    SCOPED_TRACE(engine.block_name(u));
    const auto before = engine.stats();
    expect_unit(engine, u, expected_);
    const auto after = engine.stats();
    if (u == 2) continue;
    // Exactly the stored bytes of the chunks that cover the tensor, nothing more.
    const auto& t = store.tensors()[*store.find_tensor(engine.tensors(u)[0].name)];
    const auto range = codec::chunks_covering(chunks, t.offset_in_block, t.nbytes);
    EXPECT_EQ(after.bytes_read_compressed - before.bytes_read_compressed,
              range.stored_end - range.stored_begin);
    EXPECT_EQ(after.bytes_decoded - before.bytes_decoded, t.nbytes);
    EXPECT_LT(range.stored_end - range.stored_begin, store.blocks()[b_index].stored_size);
  }
  // With checksums, each tensor of a partial unit is checked after decoding.
  auto o = options();
  o.verify_checksums = true;
  eng::Engine verified = eng::Engine::from_store(path_, o, groups);
  for (std::uint32_t u = 0; u < 3; ++u) expect_unit(verified, u, expected_);
}

TEST_F(EngineCompressed, RowsOfACompressedTensorAreDecoded) {
  const auto store = ts::Store::open(path_, kDecode);
  const auto bf16 = static_cast<std::size_t>(
      std::find(kAllDTypes.begin(), kAllDTypes.end(), ts::DType::kBFloat16) - kAllDTypes.begin());
  const auto unit = static_cast<std::uint32_t>(bf16);
  ASSERT_EQ(store.blocks()[unit].codec, ts::Codec::kChunked);
  eng::Engine engine(path_, options());
  const auto placement = engine.tensors(unit)[0];
  const auto& want = expected_.at(placement.name)->data;
  const auto row = placement.nbytes / static_cast<std::uint64_t>(placement.shape[0]);
  // Rows in several chunks, out of order, repeated, adjacent.
  const std::vector<std::int64_t> rows = {0, placement.shape[0] - 1, 7, 8, 9, 300, 7, 1};
  const auto view = engine.acquire_rows(unit, 0, rows);
  ASSERT_NE(view.host, nullptr);
  EXPECT_EQ(view.row_bytes, row);
  for (std::size_t i = 0; i < rows.size(); ++i) {
    const auto at = want.begin() + static_cast<std::ptrdiff_t>(rows[i] * row);
    EXPECT_TRUE(std::equal(at, at + static_cast<std::ptrdiff_t>(row), view.host + i * row))
        << "row " << rows[i];
  }
  engine.release_rows(view.handle);
  EXPECT_THROW((void)engine.acquire_rows(unit, 0, std::vector<std::int64_t>{placement.shape[0]}),
               std::invalid_argument);
}

// ---- the decoded copy ---------------------------------------------------------------------

namespace {

std::size_t files_in(const std::filesystem::path& dir) {
  return static_cast<std::size_t>(std::distance(std::filesystem::directory_iterator(dir),
                                                std::filesystem::directory_iterator{}));
}

// An environment whose temporary files (O_TMPFILE) cannot be created: a full disk.
class NoRoomEnv final : public ts::io::EnvWrapper {
 public:
  NoRoomEnv() : EnvWrapper(ts::io::Env::posix()) {}
  [[nodiscard]] ts::detail::FileDescriptor open(const std::filesystem::path& path,
                                                int flags) override {
    if ((flags & O_TMPFILE) == O_TMPFILE) {
      ts::detail::throw_errno("cannot create a file in '" + path.string() + "'", ENOSPC);
    }
    return EnvWrapper::open(path, flags);
  }
};

}  // namespace

TEST_F(EngineCompressed, OnTheCpuAutoDeclinesToDecodeAndReadsADecodedCopyInPlace) {
  for (const auto backend : {ts::io::BackendType::kAuto, ts::io::BackendType::kMmap}) {
    SCOPED_TRACE(std::string(ts::io::backend_name(backend)));
    auto o = options(backend);
    o.compressed_reads = eng::CompressedReads::kAuto;
    const auto before = files_in(dir_.path());
    {
      eng::Engine engine(path_, o);
      EXPECT_EQ(files_in(dir_.path()), before) << "the copy has no name";
      for (int pass = 0; pass < 2; ++pass) {
        for (std::uint32_t b = 0; b < engine.block_count(); ++b) expect_unit(engine, b, expected_);
      }
      const auto s = engine.stats();
      EXPECT_TRUE(s.in_place) << s.backend_note;
      EXPECT_EQ(s.compressed_units, compressed_blocks_);
      EXPECT_GT(s.decoded_copy_bytes, 0u);
      EXPECT_GT(s.decoded_copy_seconds, 0.0);
      EXPECT_EQ(s.bytes_decoded, 0u) << "nothing is decoded on the fills";
      EXPECT_EQ(s.bytes_read_compressed, 0u);
      EXPECT_NE(s.decode_note.find("in place from the page cache"), std::string::npos)
          << s.decode_note;
      EXPECT_NE(s.decode_note.find("decoded copy"), std::string::npos) << s.decode_note;
      // The raw units still come from the store, the decoded ones from the copy: both paths.
      EXPECT_EQ(s.gds_files, 0u);
    }
    EXPECT_EQ(files_in(dir_.path()), before);
  }
}

TEST_F(EngineCompressed, ADecodedCopyServesEveryPathBitwise) {
  const auto store = ts::Store::open(path_, kDecode);
  const auto bf16 = static_cast<std::uint32_t>(
      std::find(kAllDTypes.begin(), kAllDTypes.end(), ts::DType::kBFloat16) - kAllDTypes.begin());
  const std::string block = store.blocks()[bf16].name;
  const eng::TensorGroups groups = {
      {"w", {block + ".w"}},
      {"b", {block + ".b"}},
      {"across", {"mixed.v", "layers.0.w", "noise.b"}},
  };
  for (const auto backend : {ts::io::BackendType::kPread, ts::io::BackendType::kAuto}) {
    for (const bool verify : {false, true}) {
      SCOPED_TRACE(std::string(ts::io::backend_name(backend)) + (verify ? " verify" : ""));
      auto o = options(backend);
      o.compressed_reads = eng::CompressedReads::kDecodedCopy;
      o.verify_checksums = verify;
      eng::Engine engine(path_, o);
      for (std::uint32_t b = 0; b < engine.block_count(); ++b) expect_unit(engine, b, expected_);
      const auto s = engine.stats();
      EXPECT_GT(s.decoded_copy_bytes, 0u);
      EXPECT_EQ(s.bytes_decoded, 0u);
      EXPECT_NE(s.decode_note.find("compressed_reads = decoded_copy"), std::string::npos)
          << s.decode_note;
      // Rows of a tensor that was compressed now come from the copy, raw.
      const auto w = engine.tensors(bf16)[0];
      const auto row = w.nbytes / static_cast<std::uint64_t>(w.shape[0]);
      const std::vector<std::int64_t> rows = {3, 400, 3};
      const auto view = engine.acquire_rows(bf16, 0, rows);
      const auto& want = expected_.at(w.name)->data;
      for (std::size_t i = 0; i < rows.size(); ++i) {
        const auto at = want.begin() + static_cast<std::ptrdiff_t>(rows[i] * row);
        EXPECT_TRUE(std::equal(at, at + static_cast<std::ptrdiff_t>(row), view.host + i * row));
      }
      engine.release_rows(view.handle);
      // Units that cover parts of blocks: the copy holds just their chunks' bytes.
      eng::Engine parts = eng::Engine::from_store(path_, o, groups);
      for (std::uint32_t u = 0; u < 3; ++u) expect_unit(parts, u, expected_);
      EXPECT_GT(parts.stats().decoded_copy_bytes, 0u);
      EXPECT_LT(parts.stats().decoded_copy_bytes, s.decoded_copy_bytes);
    }
  }
}

TEST_F(EngineCompressed, WithoutRoomForACopyTheUnitsAreDecodedOnTheFills) {
  NoRoomEnv env;
  auto o = options(ts::io::BackendType::kAuto);
  o.compressed_reads = eng::CompressedReads::kAuto;
  o.env = &env;
  eng::Engine engine(path_, o);
  for (std::uint32_t b = 0; b < engine.block_count(); ++b) expect_unit(engine, b, expected_);
  const auto s = engine.stats();
  EXPECT_EQ(s.decoded_copy_bytes, 0u);
  EXPECT_GT(s.bytes_decoded, 0u);
  EXPECT_FALSE(s.in_place);
  EXPECT_NE(s.decode_note.find("could not be made"), std::string::npos) << s.decode_note;
  EXPECT_NE(s.decode_note.find(dir_.path().string()), std::string::npos) << s.decode_note;
}

// ---- damage -----------------------------------------------------------------------------

namespace {

// The first compressed chunk of the bf16 block: where it is and what names it.
struct Victim {
  std::uint32_t block = 0;
  std::size_t chunk = 0;
  ts::ChunkInfo info;
  std::uint64_t file_offset = 0;  // of its stored bytes
  std::string block_name;
};

Victim compressed_chunk(const std::filesystem::path& path) {
  const auto store = ts::Store::open(path, kDecode);
  const auto bf16 = static_cast<std::size_t>(
      std::find(kAllDTypes.begin(), kAllDTypes.end(), ts::DType::kBFloat16) - kAllDTypes.begin());
  Victim v;
  v.block = static_cast<std::uint32_t>(bf16);
  v.block_name = store.blocks()[v.block].name;
  const auto chunks = store.block_chunks(v.block);
  v.chunk = 1;  // not the first: the message must give the right index
  v.info = chunks[v.chunk];
  EXPECT_EQ(v.info.codec, ts::ChunkCodec::kBytePlanesZstd);
  v.file_offset = store.blocks()[v.block].offset + v.info.stored_offset;
  return v;
}

void expect_names(const std::string& what, const std::filesystem::path& path, const Victim& v,
                  bool chunk = true) {
  EXPECT_NE(what.find(path.string()), std::string::npos) << what;
  EXPECT_NE(what.find("'" + v.block_name + "'"), std::string::npos) << what;
  if (chunk) {
    EXPECT_NE(what.find("chunk " + std::to_string(v.chunk)), std::string::npos) << what;
  }
}

}  // namespace

TEST_F(EngineCompressed, ADamagedChunkIsAChecksumErrorNamingFileBlockAndChunk) {
  const auto victim = compressed_chunk(path_);
  auto bytes = read_file(path_);
  // Inside the raw zstd blocks (the mantissa plane, second half): decoding alone would not
  // notice, the chunk's checksum does, with and without verify_checksums.
  bytes[victim.file_offset + victim.info.stored_size * 3 / 4] ^= std::byte{0x20};
  write_file(path_, bytes);
  for (const bool verify : {false, true}) {
    SCOPED_TRACE(verify ? "verify_checksums" : "no verify_checksums");
    auto o = options();
    o.verify_checksums = verify;
    eng::Engine engine(path_, o);
    try {
      (void)engine.acquire(victim.block);
      FAIL() << "damage not detected";
    } catch (const ts::ChecksumError& e) {
      expect_names(e.what(), path_, victim);
    }
    // The engine goes on: other units stream, the damaged one fails again, close is clean.
    expect_unit(engine, 0, expected_);
    EXPECT_THROW((void)engine.acquire(victim.block), ts::ChecksumError);
    EXPECT_EQ(engine.stats().failures, 2u);
    // Rows of the damaged chunk are refused the same way.
    const auto w = engine.tensors(victim.block)[0];
    const auto row_bytes = w.nbytes / static_cast<std::uint64_t>(w.shape[0]);
    const std::vector<std::int64_t> row = {
        static_cast<std::int64_t>((victim.info.raw_offset - w.raw_offset) / row_bytes + 1)};
    try {
      (void)engine.acquire_rows(victim.block, 0, row);
      FAIL() << "damage not detected in rows";
    } catch (const ts::ChecksumError& e) {
      expect_names(e.what(), path_, victim);
    }
    engine.close();
  }
}

TEST_F(EngineCompressed, ADamagedChunkStopsTheDecodedCopyAndReachesTheWaiter) {
  const auto victim = compressed_chunk(path_);
  auto bytes = read_file(path_);
  bytes[victim.file_offset + victim.info.stored_size * 3 / 4] ^= std::byte{0x20};
  write_file(path_, bytes);
  auto o = options(ts::io::BackendType::kAuto);
  o.compressed_reads = eng::CompressedReads::kDecodedCopy;
  eng::Engine engine(path_, o);  // starts: the copy is not made, the note says why
  const auto s = engine.stats();
  EXPECT_EQ(s.decoded_copy_bytes, 0u);
  EXPECT_NE(s.decode_note.find("could not be made"), std::string::npos) << s.decode_note;
  expect_names(s.decode_note, path_, victim);
  expect_unit(engine, 0, expected_);
  try {
    (void)engine.acquire(victim.block);
    FAIL() << "damage not detected";
  } catch (const ts::ChecksumError& e) {
    expect_names(e.what(), path_, victim);
  }
}

TEST_F(EngineCompressed, AFrameThatDoesNotDecodeIsAFormatErrorEvenWithAMatchingChecksum) {
  // A destroyed zstd frame header whose chunk checksum was recomputed (a writer bug rather
  // than bit rot): the frame validation catches it.
  const auto victim = compressed_chunk(path_);
  auto bytes = read_file(path_);
  for (int i = 0; i < 4; ++i) bytes[victim.file_offset + i] = std::byte{0};
  auto sb = detail::decode_superblock(bytes, bytes.size(), "x");
  const auto stored =
      std::span<const std::byte>(bytes).subspan(victim.file_offset, victim.info.stored_size);
  const auto store = ts::Store::open(path_, kDecode);
  std::size_t chunk_index = 0;  // in the store's chunk table
  for (std::uint32_t b = 0; b < victim.block; ++b) chunk_index += store.block_chunks(b).size();
  chunk_index += victim.chunk;
  std::byte* record =
      bytes.data() + sb.metadata_offset + sb.block_count * detail::kBlockRecordSize +
      sb.tensor_count * detail::kTensorRecordSize + chunk_index * detail::kChunkRecordSize;
  ASSERT_EQ(detail::load_le<std::uint64_t>(record + 24), victim.info.checksum);
  detail::store_le<std::uint64_t>(record + 24, ts::checksum64(stored));
  sb.metadata_checksum = ts::checksum64(
      std::span<const std::byte>(bytes.data() + sb.metadata_offset, sb.metadata_size));
  const auto encoded = detail::encode_superblock(sb);
  std::copy(encoded.begin(), encoded.end(), bytes.begin());
  write_file(path_, bytes);
  eng::Engine engine(path_, options());
  try {
    (void)engine.acquire(victim.block);
    FAIL() << "damage not detected";
  } catch (const ts::ChecksumError& e) {
    FAIL() << "the checksum matches, yet: " << e.what();
  } catch (const ts::FormatError& e) {
    expect_names(e.what(), path_, victim);
    EXPECT_NE(std::string(e.what()).find("zstd frame"), std::string::npos) << e.what();
  }
}

TEST_F(EngineCompressed, AStoreTruncatedUnderTheEngineIsAFormatErrorNamingTheBlock) {
  const auto victim = compressed_chunk(path_);
  eng::Engine engine(path_, options());
  expect_unit(engine, 0, expected_);
  // Cut the file in the middle of the victim's chunk (the metadata at the end goes too, but
  // the engine validated it at open).
  std::filesystem::resize_file(path_, victim.file_offset + victim.info.stored_size / 2);
  try {
    (void)engine.acquire(victim.block);
    FAIL() << "truncation not detected";
  } catch (const ts::FormatError& e) {
    expect_names(e.what(), path_, victim, /*chunk=*/false);
    EXPECT_NE(std::string(e.what()).find("decoded from"), std::string::npos) << e.what();
  }
  expect_unit(engine, 0, expected_);  // still served from the part that is left
}

TEST_F(EngineCompressed, AShortReadOfChunksIsReportedNotDecoded) {
  const auto victim = compressed_chunk(path_);
  const auto store = ts::Store::open(path_, kDecode);
  const auto block_offset = store.blocks()[victim.block].offset;
  FaultInjectionEnv env([&](const FaultContext& ctx) {
    Fault fault;
    if (ctx.point == FaultPoint::kRead && ctx.offset == block_offset) fault.eof_after = 1000;
    return fault;
  });
  auto o = options();
  o.env = &env;
  eng::Engine engine(path_, o);
  try {
    (void)engine.acquire(victim.block);
    FAIL() << "a short read was not reported";
  } catch (const ts::Error& e) {
    expect_names(e.what(), path_, victim, /*chunk=*/false);
  }
  expect_unit(engine, 0, expected_);
}

// ---- threads ------------------------------------------------------------------------------

TEST_F(EngineCompressed, ConcurrentAcquiresOfDecodedUnitsGetExactBytes) {
  auto o = options();
  o.device_budget = 5 * largest_;
  o.decode_threads = 3;
  eng::Engine engine(path_, o);
  const auto units = static_cast<std::uint32_t>(engine.block_count());
  std::atomic<int> mismatches{0};
  std::vector<std::thread> threads;
  for (int t = 0; t < 4; ++t) {
    threads.emplace_back([&, t] {
      std::mt19937 rng(static_cast<unsigned>(t));
      for (int i = 0; i < 40; ++i) {
        const auto u = static_cast<std::uint32_t>(rng() % units);
        const auto view = engine.acquire(u);
        for (const auto& p : engine.tensors(u)) {
          const auto& want = expected_.at(p.name)->data;
          if (!std::equal(want.begin(), want.end(), view.host + p.offset)) ++mismatches;
        }
        if (i % 5 == 0) engine.prefetch((u + 1) % units);
        engine.release(u);
      }
    });
  }
  for (auto& th : threads) th.join();
  EXPECT_EQ(mismatches.load(), 0);
  EXPECT_EQ(engine.stats().failures, 0u);
}
