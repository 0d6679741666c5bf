// Compressed stores end to end on real files: the writer's chunking, bitwise round trips of
// every dtype at every level, mixed raw and compressed chunks and blocks, reading one tensor
// alone, the chunk table's validation, damaged chunks, old (1.0) stores, and the default open
// refusing compressed stores (the engine opens them to decode).
#include <gtest/gtest.h>

#include <map>
#include <random>
#include <thread>

#include "tensorstream/checksum.hpp"
#include "tensorstream/codec.hpp"
#include "tensorstream/convert.hpp"
#include "tensorstream/detail/endian.hpp"
#include "tensorstream/detail/store_format.hpp"
#include "tensorstream/engine/engine.hpp"
#include "tensorstream/errors.hpp"
#include "tensorstream/store.hpp"
#include "test_helpers.hpp"

namespace ts = tensorstream;
namespace codec = tensorstream::codec;
namespace detail = tensorstream::detail;
using ts::testing::kAllDTypes;
using ts::testing::random_bytes;
using ts::testing::read_file;
using ts::testing::TempDir;
using ts::testing::weight_bytes;
using ts::testing::write_file;

namespace {

constexpr ts::OpenOptions kDecode{true};
constexpr std::uint32_t kSmallChunk = 64u << 10;

ts::WriterOptions compressed(int level, std::uint32_t chunk_size = kSmallChunk,
                             unsigned threads = 2) {
  ts::WriterOptions options;
  options.durable = false;
  options.compression.enabled = true;
  options.compression.level = level;
  options.compression.chunk_size = chunk_size;
  options.compression.threads = threads;
  return options;
}

ts::WriterOptions uncompressed() {
  ts::WriterOptions options;
  options.durable = false;
  return options;
}

struct Tensor {
  std::string name;
  ts::DType dtype;
  std::vector<std::int64_t> shape;
  std::vector<std::byte> data;
};
using Blocks = std::vector<std::pair<std::string, std::vector<Tensor>>>;

ts::WriteSummary write_store(const std::filesystem::path& path, const Blocks& blocks,
                             const ts::WriterOptions& options) {
  ts::StoreWriter writer(path, options);
  for (const auto& [name, tensors] : blocks) {
    writer.begin_block(name);
    for (const auto& t : tensors) writer.add_tensor(t.name, t.dtype, t.shape, t.data);
    writer.end_block();
  }
  return writer.commit();
}

// A tensor of `numel` elements of weight-like values.
Tensor weights(std::string name, ts::DType dtype, std::int64_t numel, std::uint64_t seed) {
  return Tensor{
      std::move(name), dtype, {numel}, weight_bytes(dtype, static_cast<std::size_t>(numel), seed)};
}

Tensor noise(std::string name, std::int64_t n, std::uint64_t seed) {
  return Tensor{
      std::move(name), ts::DType::kUInt8, {n}, random_bytes(static_cast<std::size_t>(n), seed)};
}

// Every tensor's bytes, read through the whole block and alone, equal what was written;
// every chunk holds bytes of one tensor at most; every tensor starts a chunk.
void expect_holds(const ts::Store& store, const Blocks& blocks) {
  std::map<std::string, const Tensor*> expected;
  for (const auto& [name, tensors] : blocks) {
    for (const auto& t : tensors) expected[t.name] = &t;
  }
  ASSERT_EQ(store.tensors().size(), expected.size());
  for (std::size_t b = 0; b < store.blocks().size(); ++b) {
    const auto& block = store.blocks()[b];
    SCOPED_TRACE(block.name);
    std::vector<std::byte> buffer(block.raw_size);
    store.read_block(b, buffer, /*verify=*/true);
    EXPECT_EQ(ts::checksum64(buffer), block.raw_checksum);
    const auto chunks = store.block_chunks(b);
    for (const auto& t : store.block_tensors(b)) {
      SCOPED_TRACE(t.name);
      const auto& want = expected.at(t.name)->data;
      ASSERT_EQ(t.nbytes, want.size());
      EXPECT_TRUE(std::equal(want.begin(), want.end(),
                             buffer.begin() + static_cast<std::ptrdiff_t>(t.offset_in_block)));
      std::vector<std::byte> alone(t.nbytes);
      const auto index = *store.find_tensor(t.name);
      store.read_tensor(index, alone, /*verify=*/true);
      EXPECT_EQ(alone, want);
      if (t.nbytes == 0 || chunks.empty()) continue;
      const auto range = codec::chunks_covering(chunks, t.offset_in_block, t.nbytes);
      EXPECT_EQ(range.raw_begin, t.offset_in_block);  // the tensor starts a chunk
    }
    for (const auto& c : chunks) {
      int overlapping = 0;
      for (const auto& t : store.block_tensors(b)) {
        overlapping += t.nbytes > 0 && t.offset_in_block < c.raw_offset + c.raw_size &&
                       c.raw_offset < t.offset_in_block + t.nbytes;
      }
      EXPECT_LE(overlapping, 1) << "chunk at " << c.raw_offset;
    }
  }
  EXPECT_TRUE(store.verify().empty());
}

std::size_t compressed_chunks(const ts::Store& store) {
  std::size_t n = 0;
  for (const auto& c : store.chunks()) n += c.codec != ts::ChunkCodec::kRaw;
  return n;
}

}  // namespace

TEST(StoreCompression, EveryDTypeAtEveryLevelRoundTripsBitwise) {
  TS_SKIP_WITHOUT_ZSTD();
  TempDir dir;
  Blocks blocks;
  std::uint64_t seed = 1;
  for (std::size_t i = 0; i < kAllDTypes.size(); ++i) {
    const auto dtype = kAllDTypes[i];
    const std::string block = "block" + std::to_string(i);
    // Two chunks and a bit: boundaries inside the tensor, a short last chunk, padding after.
    const auto numel = static_cast<std::int64_t>((kSmallChunk * 2 + 300) / ts::dtype_size(dtype));
    blocks.push_back(
        {block,
         {weights(block + ".w", dtype, numel, seed++), weights(block + ".b", dtype, 13, seed++),
          Tensor{block + ".empty", dtype, {0}, {}}}});
  }
  const auto plain = write_store(dir / "plain.tstore", blocks, uncompressed());
  for (int level = 1; level <= 9; ++level) {
    SCOPED_TRACE("level " + std::to_string(level));
    const auto path = dir / ("level" + std::to_string(level) + ".tstore");
    const auto summary = write_store(path, blocks, compressed(level));
    // Compression changes neither the tensors' checksums nor the model fingerprint.
    EXPECT_EQ(summary.fingerprint, plain.fingerprint);
    const auto store = ts::Store::open(path, kDecode);
    EXPECT_EQ(store.info().version_major, 1);
    EXPECT_EQ(store.info().version_minor, 1);
    EXPECT_GT(compressed_chunks(store), kAllDTypes.size());
    for (const auto& c : store.chunks()) {
      EXPECT_LE(c.raw_size, kSmallChunk);
      if (c.codec != ts::ChunkCodec::kRaw) {
        EXPECT_EQ(c.level, level);
      }
    }
    expect_holds(store, blocks);
  }
}

TEST(StoreCompression, IncompressibleChunksAndBlocksStayRaw) {
  TS_SKIP_WITHOUT_ZSTD();
  TempDir dir;
  const Blocks blocks = {
      {"mixed",
       {weights("mixed.w", ts::DType::kBFloat16, 100000, 1), noise("mixed.noise", 150000, 2),
        weights("mixed.v", ts::DType::kFloat32, 20000, 3)}},
      {"noise", {noise("noise.a", 70000, 4), noise("noise.b", 1000, 5)}},
      {"zeros", {Tensor{"zeros.z", ts::DType::kFloat16, {50000}, std::vector<std::byte>(100000)}}}};
  const auto path = dir / "m.tstore";
  write_store(path, blocks, compressed(3));
  const auto store = ts::Store::open(path, kDecode);
  const auto& mixed = store.blocks()[0];
  EXPECT_EQ(mixed.codec, ts::Codec::kChunked);
  std::map<ts::ChunkCodec, int> codecs;
  for (const auto& c : store.block_chunks(0)) ++codecs[c.codec];
  EXPECT_GT(codecs[ts::ChunkCodec::kRaw], 0);             // the random bytes
  EXPECT_GT(codecs[ts::ChunkCodec::kBytePlanesZstd], 0);  // the bf16 and fp32 weights
  EXPECT_LT(mixed.stored_size, mixed.raw_size);
  // A block none of whose chunks shrinks is a plain block: no chunk table, raw == stored.
  const auto& all_noise = store.blocks()[1];
  EXPECT_EQ(all_noise.codec, ts::Codec::kNone);
  EXPECT_EQ(all_noise.chunk_count, 0u);
  EXPECT_EQ(all_noise.stored_size, all_noise.raw_size);
  EXPECT_EQ(all_noise.checksum, all_noise.raw_checksum);
  EXPECT_EQ(store.blocks()[2].codec, ts::Codec::kChunked);
  EXPECT_LT(store.blocks()[2].stored_size, 1000u);
  expect_holds(store, blocks);
}

TEST(StoreCompression, AStoreWhereNothingShrinksIsAVersion10StoreByteForByte) {
  TS_SKIP_WITHOUT_ZSTD();
  TempDir dir;
  const Blocks blocks = {{"a", {noise("a.x", 200000, 1), noise("a.y", 77, 2)}},
                         {"b", {noise("b.x", 5000, 3)}}};
  write_store(dir / "plain.tstore", blocks, uncompressed());
  write_store(dir / "tried.tstore", blocks, compressed(9));
  EXPECT_EQ(read_file(dir / "plain.tstore"), read_file(dir / "tried.tstore"));
  EXPECT_EQ(ts::Store::open(dir / "tried.tstore").info().version_minor, 0);
}

TEST(StoreCompression, WriterThreadsDoNotChangeTheBytes) {
  TS_SKIP_WITHOUT_ZSTD();
  TempDir dir;
  Blocks blocks;
  for (int b = 0; b < 3; ++b) {
    const auto name = "layers." + std::to_string(b);
    blocks.push_back(
        {name,
         {weights(name + ".w", ts::DType::kBFloat16, 400000, b), noise(name + ".n", 90000, b + 10),
          weights(name + ".f", ts::DType::kFloat32, 70000, b + 20)}});
  }
  write_store(dir / "one.tstore", blocks, compressed(3, kSmallChunk, 1));
  write_store(dir / "four.tstore", blocks, compressed(3, kSmallChunk, 4));
  EXPECT_EQ(read_file(dir / "one.tstore"), read_file(dir / "four.tstore"));
  expect_holds(ts::Store::open(dir / "four.tstore", kDecode), blocks);
}

TEST(StoreCompression, ReadingOneTensorReadsOnlyItsChunks) {
  TS_SKIP_WITHOUT_ZSTD();
  TempDir dir;
  const Blocks blocks = {{"layer",
                          {weights("layer.q", ts::DType::kBFloat16, 100000, 1),
                           weights("layer.k", ts::DType::kBFloat16, 70001, 2),
                           weights("layer.v", ts::DType::kFloat16, 90000, 3)}}};
  const auto path = dir / "m.tstore";
  write_store(path, blocks, compressed(1));
  std::vector<std::byte> full;
  ts::TensorInfo k;
  std::vector<ts::ChunkInfo> chunks;
  std::uint64_t block_offset = 0;
  {
    const auto store = ts::Store::open(path, kDecode);
    full.resize(store.blocks()[0].raw_size);
    store.read_block(0, full, true);
    k = store.tensors()[*store.find_tensor("layer.k")];
    const auto c = store.block_chunks(0);
    chunks.assign(c.begin(), c.end());
    block_offset = store.blocks()[0].offset;
    // Any range decodes to the same bytes as the whole block.
    std::mt19937_64 rng(4);
    for (int trial = 0; trial < 30; ++trial) {
      const auto offset = rng() % full.size();
      std::vector<std::byte> part(rng() % (full.size() - offset + 1));
      store.read_range(0, offset, part, true);
      EXPECT_TRUE(std::equal(part.begin(), part.end(), full.begin() + static_cast<long>(offset)));
    }
    std::vector<std::byte> past(10);
    EXPECT_THROW(store.read_range(0, full.size() - 5, past, false), std::out_of_range);
  }
  // Destroy the stored bytes of every chunk that does not hold layer.k: reading layer.k
  // alone still works (and verifies), the whole block does not.
  const auto range = codec::chunks_covering(chunks, k.offset_in_block, k.nbytes);
  auto bytes = read_file(path);
  for (std::size_t i = 0; i < chunks.size(); ++i) {
    if (i >= range.first && i < range.first + range.count) continue;
    for (std::uint32_t j = 0; j < chunks[i].stored_size; ++j) {
      bytes[block_offset + chunks[i].stored_offset + j] = std::byte{0xee};
    }
  }
  write_file(path, bytes);
  const auto store = ts::Store::open(path, kDecode);
  std::vector<std::byte> alone(k.nbytes);
  store.read_tensor(*store.find_tensor("layer.k"), alone, /*verify=*/true);
  EXPECT_TRUE(
      std::equal(alone.begin(), alone.end(), full.begin() + static_cast<long>(k.offset_in_block)));
  std::vector<std::byte> buffer(full.size());
  EXPECT_THROW(store.read_block(0, buffer, false), ts::FormatError);
  std::vector<std::byte> q(store.tensors()[0].nbytes);
  EXPECT_THROW(store.read_tensor(0, q, true), ts::Error);
}

TEST(StoreCompression, ParallelBlockReadsEqualSerialOnes) {
  TS_SKIP_WITHOUT_ZSTD();
  TempDir dir;
  const Blocks blocks = {
      {"l", {weights("l.w", ts::DType::kBFloat16, 600000, 1), noise("l.n", 100000, 2)}}};
  write_store(dir / "m.tstore", blocks, compressed(2));
  const auto store = ts::Store::open(dir / "m.tstore", kDecode);
  ASSERT_GT(store.block_chunks(0).size(), 10u);
  std::vector<std::byte> serial(store.blocks()[0].raw_size);
  std::vector<std::byte> parallel(serial.size());
  store.read_block(0, serial, true);
  // Two threads taking tasks from a shared counter, as a fill path's pool would.
  const ts::ParallelFor two_threads = [](std::size_t n,
                                         const std::function<void(std::size_t)>& task) {
    std::atomic<std::size_t> next{0};
    auto worker = [&] {
      for (std::size_t i; (i = next.fetch_add(1)) < n;) task(i);
    };
    std::thread other(worker);
    worker();
    other.join();
  };
  store.read_block(0, parallel, true, two_threads);
  EXPECT_EQ(serial, parallel);
}

TEST(StoreCompression, DamagedChunksAreRefusedNamingFileBlockAndChunk) {
  TS_SKIP_WITHOUT_ZSTD();
  TempDir dir;
  const Blocks blocks = {{"layers.0", {weights("layers.0.w", ts::DType::kBFloat16, 200000, 1)}},
                         {"layers.1", {weights("layers.1.w", ts::DType::kBFloat16, 200000, 2)}}};
  const auto path = dir / "m.tstore";
  write_store(path, blocks, compressed(3));
  const auto original = read_file(path);
  ts::ChunkInfo victim;
  std::uint64_t block_offset = 0;
  {
    const auto store = ts::Store::open(path, kDecode);
    victim = store.block_chunks(1)[2];
    block_offset = store.blocks()[1].offset;
    ASSERT_NE(victim.codec, ts::ChunkCodec::kRaw);
  }
  auto expect_names_chunk = [&](const std::string& what) {
    EXPECT_NE(what.find(path.string()), std::string::npos) << what;
    EXPECT_NE(what.find("block 'layers.1'"), std::string::npos) << what;
    EXPECT_NE(what.find("chunk 2"), std::string::npos) << what;
  };

  // A flipped byte inside the chunk: the checksums catch it and name the chunk.
  auto bytes = original;
  bytes[block_offset + victim.stored_offset + victim.stored_size / 2] ^= std::byte{0x10};
  write_file(path, bytes);
  {
    const auto store = ts::Store::open(path, kDecode);
    std::vector<std::byte> buffer(store.blocks()[1].raw_size);
    try {
      store.read_block(1, buffer, /*verify=*/true);
      FAIL() << "damage not detected";
    } catch (const ts::ChecksumError& e) {
      expect_names_chunk(e.what());
    }
    const auto problems = store.verify();
    ASSERT_EQ(problems.size(), 1u);
    EXPECT_EQ(problems[0].block, 1u);
    expect_names_chunk(problems[0].message);
    // Reading the tensor alone with verification checks the chunk it needs.
    std::vector<std::byte> tensor(store.tensors()[1].nbytes);
    try {
      store.read_tensor(1, tensor, true);
      FAIL() << "damage not detected";
    } catch (const ts::ChecksumError& e) {
      expect_names_chunk(e.what());
    }
  }

  // A destroyed frame header is refused even without verification.
  bytes = original;
  for (int i = 0; i < 4; ++i) bytes[block_offset + victim.stored_offset + i] = std::byte{0};
  write_file(path, bytes);
  {
    const auto store = ts::Store::open(path, kDecode);
    std::vector<std::byte> buffer(store.blocks()[1].raw_size);
    try {
      store.read_block(1, buffer, /*verify=*/false);
      FAIL() << "damage not detected";
    } catch (const ts::FormatError& e) {
      expect_names_chunk(e.what());
      EXPECT_NE(std::string(e.what()).find("zstd frame header"), std::string::npos) << e.what();
    }
  }
}

// ---- the chunk table's validation ---------------------------------------------------------

namespace {

// A compressed store whose chunk table can be edited and resealed, as StoreValidation does.
class ChunkTableValidation : public ::testing::Test {
 protected:
  void SetUp() override {
    if (!codec::available()) GTEST_SKIP() << codec::describe();
    path_ = dir_ / "model.tstore";
    const Blocks blocks = {{"layers.0",
                            {weights("layers.0.a", ts::DType::kBFloat16, 40000, 1),    // 2 chunks
                             weights("layers.0.b", ts::DType::kBFloat16, 20000, 2)}},  // 1 chunk
                           {"layers.1", {weights("layers.1.a", ts::DType::kFloat32, 10000, 3)}}};
    write_store(path_, blocks, compressed(1));
    bytes_ = read_file(path_);
    sb_ = detail::decode_superblock(bytes_, bytes_.size(), "x");
    const auto store = ts::Store::open(path_, kDecode);
    ASSERT_EQ(store.block_chunks(0).size(), 3u);
    ASSERT_EQ(store.block_chunks(1).size(), 1u);
  }

  std::byte* metadata() { return bytes_.data() + sb_.metadata_offset; }
  std::byte* block_record(std::size_t i) { return metadata() + i * detail::kBlockRecordSize; }
  std::byte* chunk_record(std::size_t i) {
    return metadata() + sb_.block_count * detail::kBlockRecordSize +
           sb_.tensor_count * detail::kTensorRecordSize + i * detail::kChunkRecordSize;
  }
  template <typename T>
  void add(std::byte* at, std::int64_t delta) {
    detail::store_le<T>(at, static_cast<T>(detail::load_le<T>(at) + delta));
  }

  void reseal_and_write() {
    sb_.metadata_checksum = ts::checksum64(
        std::span<const std::byte>(bytes_.data() + sb_.metadata_offset, sb_.metadata_size));
    const auto encoded = detail::encode_superblock(sb_);
    std::copy(encoded.begin(), encoded.end(), bytes_.begin());
    write_file(path_, bytes_);
  }

  void expect_rejected(const std::string& field, const std::string& cause) {
    reseal_and_write();
    try {
      (void)ts::Store::open(path_, kDecode);
      FAIL() << "store with a bad '" << field << "' was accepted";
    } catch (const ts::FormatError& e) {
      const std::string what = e.what();
      EXPECT_NE(what.find(path_.string()), std::string::npos) << what;
      EXPECT_NE(what.find(field), std::string::npos) << what;
      EXPECT_NE(what.find(cause), std::string::npos) << what;
    }
  }

  TempDir dir_;
  std::filesystem::path path_;
  std::vector<std::byte> bytes_;
  detail::Superblock sb_;
};

}  // namespace

TEST_F(ChunkTableValidation, ValidStoreOpens) {
  reseal_and_write();
  EXPECT_EQ(ts::Store::open(path_, kDecode).chunks().size(), 4u);
}

TEST_F(ChunkTableValidation, RawOffsetGap) {
  add<std::uint64_t>(chunk_record(1) + 0, 256);
  expect_rejected("chunks[1].raw_offset", "expected");
}

TEST_F(ChunkTableValidation, StoredOffsetGap) {
  add<std::uint64_t>(chunk_record(2) + 8, -1);
  expect_rejected("chunks[2].stored_offset", "expected");
}

TEST_F(ChunkTableValidation, EmptyChunk) {
  detail::store_le<std::uint32_t>(chunk_record(3) + 16, 0);
  expect_rejected("chunks[3].raw_size", "must be 1..");
}

TEST_F(ChunkTableValidation, ChunkLargerThanTheReaderAccepts) {
  detail::store_le<std::uint32_t>(chunk_record(3) + 16, ts::kMaxChunkRawSize + 1);
  expect_rejected("chunks[3].raw_size", "must be 1..");
}

TEST_F(ChunkTableValidation, ChunksDoNotCoverTheBlock) {
  add<std::uint32_t>(chunk_record(3) + 16, 4);
  expect_rejected("blocks[1].raw_size", "the chunks of block 'layers.1' hold");
}

TEST_F(ChunkTableValidation, StoredSizesDoNotAddUp) {
  add<std::uint32_t>(chunk_record(3) + 20, -1);
  expect_rejected("blocks[1].stored_size", "stored bytes");
}

TEST_F(ChunkTableValidation, CompressedChunkLargerThanItsRawBytes) {
  const auto raw = detail::load_le<std::uint32_t>(chunk_record(0) + 16);
  const auto stored = detail::load_le<std::uint32_t>(chunk_record(0) + 20);
  detail::store_le<std::uint32_t>(chunk_record(0) + 20, raw + 1);
  add<std::uint64_t>(chunk_record(1) + 8, static_cast<std::int64_t>(raw + 1 - stored));
  add<std::uint64_t>(chunk_record(2) + 8, static_cast<std::int64_t>(raw + 1 - stored));
  add<std::uint64_t>(block_record(0) + 8, static_cast<std::int64_t>(raw + 1 - stored));
  expect_rejected("chunks[0].stored_size", "compressed chunk 0 of block 'layers.0'");
}

TEST_F(ChunkTableValidation, UnknownChunkCodec) {
  detail::store_le<std::uint8_t>(chunk_record(0) + 32, 9);
  expect_rejected("chunks[0].codec", "unknown codec 9");
}

TEST_F(ChunkTableValidation, BadPlaneWidth) {
  detail::store_le<std::uint8_t>(chunk_record(0) + 33, 3);
  expect_rejected("chunks[0].plane_width", "byte-plane width 3");
}

TEST_F(ChunkTableValidation, BadLevel) {
  detail::store_le<std::uint8_t>(chunk_record(0) + 34, 0);
  expect_rejected("chunks[0].level", "must be 1..9");
}

TEST_F(ChunkTableValidation, RawChunkWhoseSizesDiffer) {
  detail::store_le<std::uint8_t>(chunk_record(0) + 32, 0);
  expect_rejected("chunks[0].stored_size", "raw chunk 0");
}

TEST_F(ChunkTableValidation, ReservedBytes) {
  detail::store_le<std::uint32_t>(chunk_record(2) + 36, 1);
  expect_rejected("chunks[2].reserved", "reserved bytes");
}

TEST_F(ChunkTableValidation, ChunkCrossingATensorStart) {
  // Chunk 1 (the end of layers.0.a) takes the first 512 bytes of layers.0.b's chunk.
  add<std::uint32_t>(chunk_record(1) + 16, 512);
  add<std::uint64_t>(chunk_record(2) + 0, 512);
  add<std::uint32_t>(chunk_record(2) + 16, -512);
  expect_rejected("chunks[1].raw_offset", "crosses the start of tensor 'layers.0.b'");
}

TEST_F(ChunkTableValidation, ChunkCountDisagreesWithTheMetadataSize) {
  add<std::uint32_t>(block_record(1) + 60, 1);
  expect_rejected("metadata_size", "chunk records");
}

TEST_F(ChunkTableValidation, ChunksCountedInTheWrongBlock) {
  // layers.1's one chunk counted in layers.0: the counts still sum up.
  add<std::uint32_t>(block_record(0) + 60, 1);
  add<std::uint32_t>(block_record(1) + 60, -1);
  expect_rejected("chunks[3].raw_offset", "chunk 3 of block 'layers.0' starts at raw byte 0");
}

TEST_F(ChunkTableValidation, UncompressedBlockWithChunks) {
  detail::store_le<std::uint16_t>(block_record(1) + 56, 0);
  expect_rejected("blocks[1].chunk_count", "is not compressed but has chunks");
}

TEST_F(ChunkTableValidation, CompressedBlocksInAVersion10Store) {
  sb_.version_minor = 0;
  expect_rejected("blocks[0].codec", "compressed blocks need 1.1");
}

TEST_F(ChunkTableValidation, UnknownBlockCodec) {
  detail::store_le<std::uint16_t>(block_record(0) + 56, 2);
  expect_rejected("blocks[0].codec", "codec 2");
}

TEST_F(ChunkTableValidation, TruncatedChunkIsRefusedWhenDecoded) {
  // A consistent table whose chunk 1 lost its last 8 bytes (the rest moves down).
  const auto stored_offset = detail::load_le<std::uint64_t>(chunk_record(1) + 8);
  const auto stored_size = detail::load_le<std::uint32_t>(chunk_record(1) + 20);
  const auto block_offset = detail::load_le<std::uint64_t>(block_record(0));
  const auto block_stored = detail::load_le<std::uint64_t>(block_record(0) + 8);
  const auto cut = block_offset + stored_offset + stored_size - 8;
  std::copy(bytes_.begin() + static_cast<long>(cut + 8),
            bytes_.begin() + static_cast<long>(block_offset + block_stored),
            bytes_.begin() + static_cast<long>(cut));
  add<std::uint32_t>(chunk_record(1) + 20, -8);
  add<std::uint64_t>(chunk_record(2) + 8, -8);
  add<std::uint64_t>(block_record(0) + 8, -8);
  reseal_and_write();
  const auto store = ts::Store::open(path_, kDecode);
  std::vector<std::byte> buffer(store.blocks()[0].raw_size);
  try {
    store.read_block(0, buffer, /*verify=*/false);
    FAIL() << "truncated chunk decoded";
  } catch (const ts::FormatError& e) {
    const std::string what = e.what();
    EXPECT_NE(what.find("chunk 1 of block 'layers.0'"), std::string::npos) << what;
    EXPECT_NE(what.find(path_.string()), std::string::npos) << what;
  }
  // Its neighbour still decodes alone.
  std::vector<std::byte> b(store.tensors()[1].nbytes);
  store.read_tensor(1, b, /*verify=*/true);
}

// ---- old stores, the default open, the engine -------------------------------------------

TEST(StoreCompression, Version10StoresStillOpenAndRewriteByteForByte) {
  // Written by the 1.0 writer before compression existed.
  const std::filesystem::path old_path = TS_STORE_V10;
  const auto store = ts::Store::open(old_path);  // the default options: no decoding needed
  EXPECT_EQ(store.info().version_minor, 0);
  EXPECT_FALSE(store.compressed());
  EXPECT_TRUE(store.verify().empty());
  // The writer of today, without compression, writes the very same file.
  TempDir dir;
  ts::StoreWriter writer(dir / "again.tstore", uncompressed());
  writer.set_user_metadata(store.info().user_metadata);
  for (std::size_t b = 0; b < store.blocks().size(); ++b) {
    writer.begin_block(store.blocks()[b].name);
    for (const auto& t : store.block_tensors(b)) {
      std::vector<std::byte> data(t.nbytes);
      store.read_tensor(*store.find_tensor(t.name), data, true);
      writer.add_tensor(t.name, t.dtype, t.shape, data);
    }
    writer.end_block();
  }
  writer.commit();
  EXPECT_EQ(read_file(dir / "again.tstore"), read_file(old_path));
}

TEST(StoreCompression, CompressedFixtureDecodesOrSaysTheBuildLacksZstd) {
  // A small 1.1 store committed to the repository (fuzz/seeds/store/compressed.tstore): the
  // format may not drift under it.
  const std::filesystem::path path = TS_STORE_V11;
  if (!codec::available()) {
    try {
      (void)ts::Store::open(path, kDecode);
      FAIL() << "a build without zstd opened a compressed store";
    } catch (const ts::FormatError& e) {
      EXPECT_NE(std::string(e.what()).find("compiled without zstd"), std::string::npos) << e.what();
      EXPECT_NE(std::string(e.what()).find(path.string()), std::string::npos) << e.what();
    }
    return;
  }
  const auto store = ts::Store::open(path, kDecode);
  EXPECT_EQ(store.info().version_minor, 1);
  EXPECT_GT(compressed_chunks(store), 0u);
  EXPECT_EQ(store.blocks()[0].codec, ts::Codec::kNone);  // mixed blocks
  EXPECT_EQ(store.blocks()[1].codec, ts::Codec::kChunked);
  EXPECT_TRUE(store.verify().empty());  // stored, decoded and tensor checksums
  EXPECT_EQ(store.info().fingerprint.hex(), "3457b23066137a6b5e821cee99ff946b");
}

TEST(StoreCompression, DefaultOpenRefusesCompressedStoresTheEngineDecodesThem) {
  TS_SKIP_WITHOUT_ZSTD();
  TempDir dir;
  const auto path = dir / "m.tstore";
  write_store(path,
              {{"embed", {noise("embed.w", 50000, 1)}},  // stays raw
               {"layers.0", {weights("layers.0.w", ts::DType::kBFloat16, 50000, 2)}},
               {"layers.1", {weights("layers.1.w", ts::DType::kBFloat16, 50000, 3)}}},
              compressed(3));
  auto expect_refusal = [&](const std::string& what) {
    EXPECT_NE(what.find(path.string()), std::string::npos) << what;
    EXPECT_NE(what.find("block 'layers.0'"), std::string::npos) << what;  // the first compressed
    EXPECT_NE(what.find("compressed"), std::string::npos) << what;
  };
  try {
    (void)ts::Store::open(path);
    FAIL() << "opened for raw reading";
  } catch (const ts::FormatError& e) {
    expect_refusal(e.what());
  }
  EXPECT_NO_THROW((void)ts::Store::open(path, kDecode));
  // The engine opens it to decode: every block's decoded bytes, as the store holds them
  // (tests/cpp/test_engine_compressed.cpp covers the engine's decoding in depth).
  const auto store = ts::Store::open(path, kDecode);
  ts::engine::EngineOptions options;
  options.device_budget = 64u << 20;
  ts::engine::Engine engine(path, options);
  for (std::uint32_t b = 0; b < engine.block_count(); ++b) {
    const auto view = engine.acquire(b);
    EXPECT_EQ(ts::checksum64({view.host, store.blocks()[b].raw_size}),
              store.blocks()[b].raw_checksum)
        << store.blocks()[b].name;
    engine.release(b);
  }
  EXPECT_EQ(engine.stats().compressed_units, 2u);
}

TEST(StoreCompression, ConvertCompressesAndKeepsTheFingerprint) {
  TS_SKIP_WITHOUT_ZSTD();
  TempDir dir;
  // A safetensors file written by a StoreWriter-independent path: header + data by hand.
  const std::vector<std::pair<std::string, std::size_t>> tensors = {
      {"model.layers.0.w", 300000}, {"model.layers.1.w", 300000}, {"lm_head.weight", 1000}};
  std::string header = "{";
  std::vector<std::byte> data;
  for (const auto& [name, numel] : tensors) {
    const auto bytes = weight_bytes(ts::DType::kBFloat16, numel, numel + name.size());
    header += (header.size() > 1 ? "," : "") + std::string("\"") + name +
              "\":{\"dtype\":\"BF16\",\"shape\":[" + std::to_string(numel) +
              "],\"data_offsets\":[" + std::to_string(data.size()) + "," +
              std::to_string(data.size() + bytes.size()) + "]}";
    data.insert(data.end(), bytes.begin(), bytes.end());
  }
  header += "}";
  std::vector<std::byte> file(8);
  detail::store_le<std::uint64_t>(file.data(), header.size());
  for (char c : header) file.push_back(static_cast<std::byte>(c));
  file.insert(file.end(), data.begin(), data.end());
  write_file(dir / "m.safetensors", file);

  ts::ConvertOptions plain;
  plain.writer = uncompressed();
  ts::ConvertOptions options;
  options.writer = compressed(3, codec::kDefaultChunkSize);
  const auto a = ts::convert_safetensors(dir / "m.safetensors", dir / "a.tstore", plain);
  const auto b = ts::convert_safetensors(dir / "m.safetensors", dir / "b.tstore", options);
  EXPECT_EQ(a.fingerprint, b.fingerprint);
  EXPECT_LT(static_cast<double>(b.file_size), static_cast<double>(a.file_size) / 1.3);
  const auto store = ts::Store::open(dir / "b.tstore", kDecode);
  EXPECT_EQ(store.blocks()[0].codec, ts::Codec::kChunked);
  EXPECT_TRUE(store.verify().empty());
}

TEST(StoreCompression, WriterOptionsAreValidated) {
  TempDir dir;
  if (!codec::available()) {
    EXPECT_THROW(ts::StoreWriter(dir / "x.tstore", compressed(3)), ts::Error);
    return;
  }
  EXPECT_THROW(ts::StoreWriter(dir / "x.tstore", compressed(0)), std::invalid_argument);
  EXPECT_THROW(ts::StoreWriter(dir / "x.tstore", compressed(10)), std::invalid_argument);
  EXPECT_THROW(ts::StoreWriter(dir / "x.tstore", compressed(3, 4096)), std::invalid_argument);
  EXPECT_THROW(ts::StoreWriter(dir / "x.tstore", compressed(3, (64u << 10) + 1)),
               std::invalid_argument);
  EXPECT_THROW(ts::StoreWriter(dir / "x.tstore", compressed(3, 32u << 20)), std::invalid_argument);
  EXPECT_FALSE(std::filesystem::exists(dir / "x.tstore"));
}
