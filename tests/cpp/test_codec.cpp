// The chunk codec on its own: byte planes, encoding choices, validation of everything a
// decoder reads (corrupt, truncated and forged chunks), partial and parallel decoding.
#include <gtest/gtest.h>

#include <algorithm>
#include <random>
#include <thread>

#include "tensorstream/checksum.hpp"
#include "tensorstream/codec.hpp"
#include "tensorstream/errors.hpp"
#include "test_helpers.hpp"

#if defined(TS_HAVE_ZSTD)
#include <zstd.h>
#endif

namespace ts = tensorstream;
namespace codec = tensorstream::codec;
using ts::testing::random_bytes;
using ts::testing::weight_bytes;

namespace {

// A one-chunk "block" for decode_chunk: the encoding of `raw` and its chunk record.
struct OneChunk {
  std::vector<std::byte> stored;
  ts::ChunkInfo info;
};

OneChunk encode_one(std::span<const std::byte> raw, unsigned width, int level = 1) {
  codec::ChunkEncoder encoder(level);
  const auto e = encoder.encode(raw, width);
  OneChunk c;
  c.stored.assign(e.bytes.begin(), e.bytes.end());
  c.info.raw_size = static_cast<std::uint32_t>(raw.size());
  c.info.stored_size = static_cast<std::uint32_t>(c.stored.size());
  c.info.codec = e.codec;
  c.info.plane_width = e.plane_width;
  c.info.level = e.level;
  c.info.checksum = ts::checksum64(c.stored);
  return c;
}

const codec::ChunkLocation kWhere{"/stores/m.tstore", "model.layers.3", 3, 7};

// Decoding must fail with `Exception` whose message names the file, block and chunk.
template <typename Exception>
void expect_refused(const ts::ChunkInfo& info, std::span<const std::byte> stored,
                    const std::string& cause, bool verify = false) {
  std::vector<std::byte> out(info.raw_size);
  try {
    codec::ChunkDecoder decoder;
    decoder.decode(info, stored, 0, out, verify, kWhere);
    FAIL() << "accepted a bad chunk (" << cause << ")";
  } catch (const Exception& e) {
    const std::string what = e.what();
    EXPECT_NE(what.find("/stores/m.tstore"), std::string::npos) << what;
    EXPECT_NE(what.find("block 'model.layers.3'"), std::string::npos) << what;
    EXPECT_NE(what.find("chunk 7"), std::string::npos) << what;
    EXPECT_NE(what.find(cause), std::string::npos) << what;
  }
}

}  // namespace

TEST(Codec, PlaneWidthFollowsTheRealComponent) {
  EXPECT_EQ(codec::plane_width(ts::DType::kBFloat16), 2u);
  EXPECT_EQ(codec::plane_width(ts::DType::kFloat16), 2u);
  EXPECT_EQ(codec::plane_width(ts::DType::kFloat32), 4u);
  EXPECT_EQ(codec::plane_width(ts::DType::kInt64), 8u);
  EXPECT_EQ(codec::plane_width(ts::DType::kComplex32), 2u);
  EXPECT_EQ(codec::plane_width(ts::DType::kComplex64), 4u);
  EXPECT_EQ(codec::plane_width(ts::DType::kComplex128), 8u);
  EXPECT_EQ(codec::plane_width(ts::DType::kFloat8E4M3FN), 1u);
  EXPECT_EQ(codec::plane_width(ts::DType::kInt8), 1u);
  EXPECT_EQ(codec::plane_width(ts::DType::kBool), 1u);
}

TEST(Codec, LevelMapping) {
  EXPECT_EQ(codec::zstd_level(1), 1);
  for (int level = 2; level <= 9; ++level) {
    EXPECT_GT(codec::zstd_level(level), codec::zstd_level(level - 1));
  }
  EXPECT_THROW((void)codec::zstd_level(0), std::invalid_argument);
  EXPECT_THROW((void)codec::zstd_level(10), std::invalid_argument);
  EXPECT_THROW(codec::ChunkEncoder(0), std::invalid_argument);
  EXPECT_THROW(codec::ChunkEncoder(10), std::invalid_argument);
}

TEST(Codec, PlanesSplitAndJoinAnyClippedRange) {
  std::mt19937_64 rng(3);
  for (const unsigned width : {1u, 2u, 4u, 8u}) {
    for (const std::size_t size : {std::size_t{0}, std::size_t{1}, std::size_t{7}, std::size_t{33},
                                   std::size_t{64}, std::size_t{1000}, std::size_t{65539}}) {
      SCOPED_TRACE(std::to_string(width) + " x " + std::to_string(size));
      const auto raw = random_bytes(size, size * 31 + width);
      std::vector<std::byte> planes(size);
      codec::split_planes(raw, width, planes);
      if (width > 1 && size >= 2 * width) {
        // Plane 1 starts with byte 1 of element 0.
        EXPECT_EQ(planes[size / width], raw[1]);
      }
      std::vector<std::byte> back(size);
      codec::join_planes(planes, width, 0, back);
      EXPECT_EQ(back, raw);
      for (int trial = 0; trial < 40 && size > 0; ++trial) {
        const std::size_t skip = rng() % size;
        const std::size_t n = rng() % (size - skip + 1);
        std::vector<std::byte> part(n);
        codec::join_planes(planes, width, skip, part);
        EXPECT_TRUE(std::equal(part.begin(), part.end(), raw.begin() + static_cast<long>(skip)))
            << "skip " << skip << " n " << n;
      }
    }
  }
  std::vector<std::byte> out(4);
  EXPECT_THROW(codec::join_planes(std::vector<std::byte>(8), 2, 6, out), std::invalid_argument);
  std::vector<std::byte> eight(8);
  EXPECT_THROW(codec::split_planes(std::vector<std::byte>(8), 3, eight), std::invalid_argument);
}

TEST(Codec, RoundTripsEveryWidthAndLevelBitwise) {
  TS_SKIP_WITHOUT_ZSTD();
  const std::vector<ts::DType> dtypes = {ts::DType::kBFloat16, ts::DType::kFloat16,
                                         ts::DType::kFloat32,  ts::DType::kFloat64,
                                         ts::DType::kInt8,     ts::DType::kFloat8E4M3FN};
  for (const auto dtype : dtypes) {
    // An odd byte count: a tail after the last whole element of the planes.
    auto raw = weight_bytes(dtype, 40000, 11);
    raw.resize(raw.size() - 1);
    for (int level = 1; level <= 9; ++level) {
      SCOPED_TRACE(std::string(ts::dtype_name(dtype)) + " level " + std::to_string(level));
      const auto c = encode_one(raw, codec::plane_width(dtype), level);
      ASSERT_NE(c.info.codec, ts::ChunkCodec::kRaw);
      EXPECT_EQ(c.info.codec, codec::plane_width(dtype) > 1 ? ts::ChunkCodec::kBytePlanesZstd
                                                            : ts::ChunkCodec::kZstd);
      EXPECT_EQ(c.info.level, level);
      std::vector<std::byte> out(raw.size());
      codec::ChunkDecoder decoder;
      decoder.decode(c.info, c.stored, 0, out, /*verify=*/true, kWhere);
      EXPECT_EQ(out, raw);
    }
  }
}

TEST(Codec, BFloat16WeightsShrinkAndHigherLevelsNeverLose) {
  TS_SKIP_WITHOUT_ZSTD();
  const auto raw = weight_bytes(ts::DType::kBFloat16, 512 * 1024, 5);  // 1 MiB
  const auto level1 = encode_one(raw, 2, 1).stored.size();
  const auto level9 = encode_one(raw, 2, 9).stored.size();
  const double ratio = static_cast<double>(raw.size()) / static_cast<double>(level1);
  EXPECT_GT(ratio, 1.40);  // ~2.6 bits of entropy in the high byte, ~8 in the low one
  EXPECT_LE(level9, level1);
  // Interleaved, the same bytes shrink far less: planes are what makes this work.
  codec::ChunkEncoder plain(1, codec::PlaneMode::kNever);
  const auto e = plain.encode(raw, 2);
  EXPECT_EQ(e.codec, ts::ChunkCodec::kZstd);
  EXPECT_GT(e.bytes.size(), level1 + raw.size() / 20);
}

TEST(Codec, IncompressibleChunksStayRaw) {
  TS_SKIP_WITHOUT_ZSTD();
  const auto raw = random_bytes(100000, 8);
  for (const unsigned width : {1u, 2u, 4u}) {
    const auto c = encode_one(raw, width, 3);
    EXPECT_EQ(c.info.codec, ts::ChunkCodec::kRaw);
    EXPECT_EQ(c.info.level, 0);
    EXPECT_EQ(c.stored, raw);
  }
}

TEST(Codec, DecodesAClippedRangeOfEveryCodec) {
  TS_SKIP_WITHOUT_ZSTD();
  auto raw = weight_bytes(ts::DType::kFloat32, 20000, 2);
  const auto random = random_bytes(raw.size(), 4);
  std::mt19937_64 rng(1);
  for (const auto& [data, width] :
       {std::pair{raw, 4u}, std::pair{raw, 1u}, std::pair{random, 4u}}) {
    const auto c = encode_one(data, width);
    codec::ChunkDecoder decoder;
    for (int trial = 0; trial < 50; ++trial) {
      const std::size_t skip = rng() % data.size();
      const std::size_t n = rng() % (data.size() - skip + 1);
      std::vector<std::byte> part(n);
      decoder.decode(c.info, c.stored, skip, part, false, kWhere);
      EXPECT_TRUE(std::equal(part.begin(), part.end(), data.begin() + static_cast<long>(skip)));
    }
    std::vector<std::byte> too_far(8);
    EXPECT_THROW(decoder.decode(c.info, c.stored, data.size() - 4, too_far, false, kWhere),
                 std::invalid_argument);
  }
}

TEST(Codec, CorruptTruncatedAndForgedChunksAreRefused) {
  TS_SKIP_WITHOUT_ZSTD();
  const auto raw = weight_bytes(ts::DType::kBFloat16, 30000, 9);
  const auto good = encode_one(raw, 2, 3);
  ASSERT_EQ(good.info.codec, ts::ChunkCodec::kBytePlanesZstd);

  // A damaged byte: the stored checksum names the chunk.
  auto damaged = good.stored;
  damaged[damaged.size() / 2] ^= std::byte{0x40};
  expect_refused<ts::ChecksumError>(good.info, damaged, "checksum mismatch", /*verify=*/true);
  // A damaged frame header is refused without the checksum too.
  damaged = good.stored;
  damaged[0] ^= std::byte{0xff};
  expect_refused<ts::FormatError>(good.info, damaged, "zstd frame header");

  // Truncated: the chunk table and the frame agree on fewer stored bytes than the frame has.
  auto info = good.info;
  info.stored_size -= 10;
  expect_refused<ts::FormatError>(info, std::span(good.stored).first(info.stored_size),
                                  "truncated or corrupt zstd frame");
  // Trailing bytes after the frame.
  auto longer = good.stored;
  longer.resize(longer.size() + 5);
  info = good.info;
  info.stored_size += 5;
  expect_refused<ts::FormatError>(info, longer, "its zstd frame ends after");
  // The frame holds another size than the table says.
  info = good.info;
  info.raw_size -= 2;
  expect_refused<ts::FormatError>(info, good.stored, "the chunk table says");
  // Unknown codec, bad plane width, raw chunk with a wrong size.
  info = good.info;
  info.codec = static_cast<ts::ChunkCodec>(9);
  expect_refused<ts::FormatError>(info, good.stored, "unknown chunk codec 9");
  info = good.info;
  info.plane_width = 3;
  expect_refused<ts::FormatError>(info, good.stored, "byte-plane width 3");
  info = good.info;
  info.codec = ts::ChunkCodec::kRaw;
  expect_refused<ts::FormatError>(info, good.stored, "raw chunk");

#if defined(TS_HAVE_ZSTD)
  // A frame that does not record its content size, and two frames back to back.
  std::vector<std::byte> frame(ZSTD_compressBound(raw.size()) * 2);
  ZSTD_CCtx* cctx = ZSTD_createCCtx();
  ZSTD_CCtx_setParameter(cctx, ZSTD_c_contentSizeFlag, 0);
  ZSTD_CCtx_setParameter(cctx, ZSTD_c_compressionLevel, 1);
  const std::size_t half = raw.size() / 2;
  // Streaming mode without a pledged size leaves the content size out of the header.
  ZSTD_inBuffer in{raw.data(), half, 0};
  ZSTD_outBuffer out{frame.data(), frame.size(), 0};
  while (ZSTD_compressStream2(cctx, &out, &in, ZSTD_e_end) != 0) {
  }
  info = ts::ChunkInfo{};
  info.codec = ts::ChunkCodec::kZstd;
  info.raw_size = static_cast<std::uint32_t>(half);
  info.stored_size = static_cast<std::uint32_t>(out.pos);
  expect_refused<ts::FormatError>(info, std::span(frame).first(out.pos),
                                  "does not record its content size");
  ZSTD_CCtx_reset(cctx, ZSTD_reset_session_and_parameters);
  const auto n1 = ZSTD_compressCCtx(cctx, frame.data(), frame.size(), raw.data(), half, 1);
  const auto n2 =
      ZSTD_compressCCtx(cctx, frame.data() + n1, frame.size() - n1, raw.data() + half, half, 1);
  ZSTD_freeCCtx(cctx);
  info.raw_size = static_cast<std::uint32_t>(half);  // the first frame's content size
  info.stored_size = static_cast<std::uint32_t>(n1 + n2);
  expect_refused<ts::FormatError>(info, std::span(frame).first(n1 + n2), "its zstd frame ends");
#endif
}

TEST(Codec, RandomDamageNeverCrashesOrDecodesShort) {
  TS_SKIP_WITHOUT_ZSTD();
  const auto raw = weight_bytes(ts::DType::kFloat16, 20000, 1);
  const auto good = encode_one(raw, 2, 1);
  std::mt19937_64 rng(77);
  codec::ChunkDecoder decoder;
  int refused = 0;
  for (int trial = 0; trial < 3000; ++trial) {
    auto bad = good.stored;
    const int flips = 1 + static_cast<int>(rng() % 4);
    for (int f = 0; f < flips; ++f)
      bad[rng() % bad.size()] ^= static_cast<std::byte>(1 + rng() % 255);
    // The output is fenced: a decoder writing past it would change the guard bytes.
    std::vector<std::byte> out(raw.size() + 64, std::byte{0x5a});
    try {
      decoder.decode(good.info, bad, 0, std::span(out).first(raw.size()), false, kWhere);
    } catch (const ts::FormatError& e) {
      ++refused;
      EXPECT_NE(std::string(e.what()).find("chunk 7"), std::string::npos);
    }
    EXPECT_TRUE(
        std::all_of(out.end() - 64, out.end(), [](std::byte b) { return b == std::byte{0x5a}; }));
  }
  EXPECT_GT(refused, 0);
}

TEST(Codec, ChunksCoveringFindsTheChunksOfARange) {
  std::vector<ts::ChunkInfo> chunks;
  std::uint64_t raw = 0;
  std::uint64_t stored = 0;
  for (std::uint32_t size : {100u, 50u, 200u, 10u}) {
    ts::ChunkInfo c;
    c.raw_offset = raw;
    c.raw_size = size;
    c.stored_offset = stored;
    c.stored_size = size / 2;
    raw += size;
    stored += size / 2;
    chunks.push_back(c);
  }
  auto r = codec::chunks_covering(chunks, 0, 360);
  EXPECT_EQ(r.first, 0u);
  EXPECT_EQ(r.count, 4u);
  EXPECT_EQ(r.stored_end, stored);
  r = codec::chunks_covering(chunks, 100, 50);  // exactly chunk 1
  EXPECT_EQ(r.first, 1u);
  EXPECT_EQ(r.count, 1u);
  EXPECT_EQ(r.raw_begin, 100u);
  EXPECT_EQ(r.raw_end, 150u);
  EXPECT_EQ(r.stored_begin, 50u);
  EXPECT_EQ(r.stored_end, 75u);
  r = codec::chunks_covering(chunks, 149, 2);  // the last byte of 1, the first of 2
  EXPECT_EQ(r.first, 1u);
  EXPECT_EQ(r.count, 2u);
  r = codec::chunks_covering(chunks, 359, 1);
  EXPECT_EQ(r.first, 3u);
  EXPECT_EQ(r.count, 1u);
  EXPECT_EQ(codec::chunks_covering(chunks, 20, 0).count, 0u);
  EXPECT_THROW((void)codec::chunks_covering(chunks, 300, 61), std::out_of_range);
  EXPECT_THROW((void)codec::chunks_covering(chunks, 361, 0), std::out_of_range);
}

TEST(Codec, DecodeBlockOnSeveralThreadsEqualsOneThread) {
  TS_SKIP_WITHOUT_ZSTD();
  // A block of 40 chunks: weights, random bytes (raw chunks) and zeros, alternating.
  std::vector<std::byte> raw;
  std::vector<ts::ChunkInfo> chunks;
  std::vector<std::byte> stored;
  codec::ChunkEncoder encoder(2);
  for (int i = 0; i < 40; ++i) {
    std::vector<std::byte> part = i % 3 == 0   ? weight_bytes(ts::DType::kBFloat16, 16384, i)
                                  : i % 3 == 1 ? random_bytes(32768, i)
                                               : std::vector<std::byte>(32768);
    const auto e = encoder.encode(part, 2);
    ts::ChunkInfo c;
    c.raw_offset = raw.size();
    c.raw_size = static_cast<std::uint32_t>(part.size());
    c.stored_offset = stored.size();
    c.stored_size = static_cast<std::uint32_t>(e.bytes.size());
    c.codec = e.codec;
    c.plane_width = e.plane_width;
    c.level = e.level;
    c.checksum = ts::checksum64(e.bytes);
    chunks.push_back(c);
    stored.insert(stored.end(), e.bytes.begin(), e.bytes.end());
    raw.insert(raw.end(), part.begin(), part.end());
  }
  EXPECT_EQ(chunks[1].codec, ts::ChunkCodec::kRaw);
  EXPECT_EQ(chunks[2].codec, ts::ChunkCodec::kBytePlanesZstd);

  // A real fan-out: every task on its own thread.
  const ts::ParallelFor threads = [](std::size_t n, const std::function<void(std::size_t)>& task) {
    std::vector<std::thread> pool;
    for (std::size_t i = 0; i < n; ++i) pool.emplace_back(task, i);
    for (auto& t : pool) t.join();
  };
  codec::BlockDecode job;
  job.file = "f";
  job.block_name = "b";
  job.chunks = chunks;
  job.stored = stored;
  job.verify = true;
  std::vector<std::byte> out(raw.size());
  job.raw = out;
  codec::decode_block(job, threads);
  EXPECT_EQ(out, raw);

  // A window that starts and ends inside chunks.
  std::vector<std::byte> window(100000);
  job.raw = window;
  job.raw_offset = 12345;
  codec::decode_block(job, threads);
  EXPECT_TRUE(std::equal(window.begin(), window.end(), raw.begin() + 12345));

  // Only the covering stored bytes: enough for the window, and a chunk outside is refused.
  const auto range = codec::chunks_covering(chunks, 12345, window.size());
  job.stored = std::span<const std::byte>(stored).subspan(range.stored_begin,
                                                          range.stored_end - range.stored_begin);
  job.stored_offset = range.stored_begin;
  std::fill(window.begin(), window.end(), std::byte{0});
  codec::decode_block(job, threads);
  EXPECT_TRUE(std::equal(window.begin(), window.end(), raw.begin() + 12345));
  job.raw = out;
  job.raw_offset = 0;
  EXPECT_THROW(codec::decode_block(job, threads), ts::FormatError);

  // Two damaged chunks: the error of the lower one is the one reported.
  auto damaged = stored;
  damaged[chunks[20].stored_offset + 3] ^= std::byte{1};
  damaged[chunks[5].stored_offset + 3] ^= std::byte{1};
  job.stored = damaged;
  job.stored_offset = 0;
  try {
    codec::decode_block(job, threads);
    FAIL() << "damage not detected";
  } catch (const ts::ChecksumError& e) {
    EXPECT_NE(std::string(e.what()).find("chunk 5 "), std::string::npos) << e.what();
  }
}

TEST(Codec, WithoutZstdEncodersAndDecodersRefuse) {
  if (codec::available()) GTEST_SKIP() << "this build has zstd";
  EXPECT_THROW(codec::ChunkEncoder(3), ts::Error);
  ts::ChunkInfo info;
  info.codec = ts::ChunkCodec::kZstd;
  info.raw_size = 10;
  info.stored_size = 4;
  expect_refused<ts::FormatError>(info, std::vector<std::byte>(4), "compiled without zstd");
  // Raw chunks still decode.
  info.codec = ts::ChunkCodec::kRaw;
  info.stored_size = 10;
  std::vector<std::byte> out(10);
  codec::ChunkDecoder decoder;
  decoder.decode(info, std::vector<std::byte>(10, std::byte{7}), 0, out, false, kWhere);
  EXPECT_EQ(out[9], std::byte{7});
}
