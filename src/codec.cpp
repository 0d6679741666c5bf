#include "tensorstream/codec.hpp"

#include <algorithm>
#include <cstring>
#include <exception>
#include <mutex>

#include "tensorstream/checksum.hpp"
#include "tensorstream/errors.hpp"

#if defined(TS_HAVE_ZSTD)
#include <zstd.h>
#endif
#if defined(__SSE2__)
#include <emmintrin.h>
#endif

namespace tensorstream::codec {
namespace {

using detail::concat;

constexpr const char* kNoZstd =
    "this build of TensorStream was compiled without zstd (zstd.h was not found at configure "
    "time; install libzstd-dev and rebuild)";

// A chunk is kept compressed only if that saves at least 1/kMinSavingDivisor of its bytes and
// at least kMinSavingBytes (so that a random tensor's trailing zero padding alone never makes
// its last chunk "compressible").
constexpr std::size_t kMinSavingDivisor = 64;
constexpr std::size_t kMinSavingBytes = 1024;

std::string where_text(const ChunkLocation& where) {
  return concat("chunk ", where.chunk, " of block '", where.block_name, "' (blocks[", where.block,
                "]) in '", where.file, "'");
}

// Joins whole elements [e0, e1) of `m`-element planes into `out` (e1 - e0 elements).
void join_elements(const std::byte* planes, std::size_t m, unsigned width, std::size_t e0,
                   std::size_t e1, std::byte* out) {
  std::size_t e = e0;
  if (width == 2) {
    const std::byte* p0 = planes;
    const std::byte* p1 = planes + m;
#if defined(__SSE2__)
    for (; e + 16 <= e1; e += 16, out += 32) {
      const __m128i a = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p0 + e));
      const __m128i b = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p1 + e));
      _mm_storeu_si128(reinterpret_cast<__m128i*>(out), _mm_unpacklo_epi8(a, b));
      _mm_storeu_si128(reinterpret_cast<__m128i*>(out + 16), _mm_unpackhi_epi8(a, b));
    }
#endif
    for (; e < e1; ++e, out += 2) {
      out[0] = p0[e];
      out[1] = p1[e];
    }
    return;
  }
  if (width == 4) {
    const std::byte* p0 = planes;
    const std::byte* p1 = planes + m;
    const std::byte* p2 = planes + 2 * m;
    const std::byte* p3 = planes + 3 * m;
#if defined(__SSE2__)
    for (; e + 16 <= e1; e += 16, out += 64) {
      const __m128i a0 = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p0 + e));
      const __m128i a1 = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p1 + e));
      const __m128i a2 = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p2 + e));
      const __m128i a3 = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p3 + e));
      const __m128i t0 = _mm_unpacklo_epi8(a0, a1);
      const __m128i t1 = _mm_unpackhi_epi8(a0, a1);
      const __m128i t2 = _mm_unpacklo_epi8(a2, a3);
      const __m128i t3 = _mm_unpackhi_epi8(a2, a3);
      _mm_storeu_si128(reinterpret_cast<__m128i*>(out), _mm_unpacklo_epi16(t0, t2));
      _mm_storeu_si128(reinterpret_cast<__m128i*>(out + 16), _mm_unpackhi_epi16(t0, t2));
      _mm_storeu_si128(reinterpret_cast<__m128i*>(out + 32), _mm_unpacklo_epi16(t1, t3));
      _mm_storeu_si128(reinterpret_cast<__m128i*>(out + 48), _mm_unpackhi_epi16(t1, t3));
    }
#endif
    for (; e < e1; ++e, out += 4) {
      out[0] = p0[e];
      out[1] = p1[e];
      out[2] = p2[e];
      out[3] = p3[e];
    }
    return;
  }
  for (; e < e1; ++e, out += width) {
    for (unsigned k = 0; k < width; ++k) out[k] = planes[k * m + e];
  }
}

void check_width(unsigned width) {
  TS_EXPECT(width == 1 || width == 2 || width == 4 || width == 8, std::invalid_argument,
            "byte-plane width ", width, " is not 1, 2, 4 or 8");
}

}  // namespace

const char* name(Codec codec) noexcept {
  switch (codec) {
    case Codec::kNone:
      return "none";
    case Codec::kChunked:
      return "chunked";
  }
  return "unknown";
}

const char* name(ChunkCodec codec) noexcept {
  switch (codec) {
    case ChunkCodec::kRaw:
      return "raw";
    case ChunkCodec::kZstd:
      return "zstd";
    case ChunkCodec::kBytePlanesZstd:
      return "planes+zstd";
  }
  return "unknown";
}

bool available() noexcept {
#if defined(TS_HAVE_ZSTD)
  return true;
#else
  return false;
#endif
}

std::string describe() {
#if defined(TS_HAVE_ZSTD)
  return concat("zstd ", ZSTD_versionString());
#else
  return kNoZstd;
#endif
}

int zstd_level(int level) {
  TS_EXPECT(level >= kMinLevel && level <= kMaxLevel, std::invalid_argument, "compression level ",
            level, " is not in 1..9");
  // Level 1 tries zstd level 1 only; level N > 1 also tries this stronger level on every
  // chunk and keeps the smaller result (docs/store-format.md, "Compression levels").
  static constexpr int kZstdLevels[] = {1, 2, 3, 5, 7, 9, 12, 15, 19};
  return kZstdLevels[level - 1];
}

unsigned plane_width(DType dtype) noexcept {
  switch (dtype) {
    case DType::kComplex32:
      return 2;
    case DType::kComplex64:
      return 4;
    case DType::kComplex128:
      return 8;
    default:
      break;
  }
  const auto size = dtype_size(dtype);
  return size == 2 || size == 4 || size == 8 ? static_cast<unsigned>(size) : 1;
}

void split_planes(std::span<const std::byte> raw, unsigned width, std::span<std::byte> out) {
  check_width(width);
  TS_EXPECT(out.size() == raw.size(), std::invalid_argument, "split_planes: output of ", out.size(),
            " bytes for ", raw.size(), " input bytes");
  const std::size_t m = raw.size() / width;
  const std::byte* in = raw.data();
  std::byte* o = out.data();
  if (width == 2) {
    std::byte* p0 = o;
    std::byte* p1 = o + m;
    for (std::size_t e = 0; e < m; ++e) {
      p0[e] = in[2 * e];
      p1[e] = in[2 * e + 1];
    }
  } else {
    for (std::size_t e = 0; e < m; ++e) {
      for (unsigned k = 0; k < width; ++k) o[k * m + e] = in[e * width + k];
    }
  }
  std::copy(in + m * width, in + raw.size(), o + m * width);
}

void join_planes(std::span<const std::byte> planes, unsigned width, std::uint64_t skip,
                 std::span<std::byte> out) {
  check_width(width);
  const std::uint64_t n = planes.size();
  TS_EXPECT(skip <= n && out.size() <= n - skip, std::invalid_argument, "join_planes: bytes [",
            skip, ", +", out.size(), ") lie outside a chunk of ", n, " bytes");
  const std::size_t m = n / width;
  const std::uint64_t body = std::uint64_t{m} * width;
  const std::byte* src = planes.data();
  std::byte* o = out.data();
  std::uint64_t p = skip;
  const std::uint64_t end = skip + out.size();
  const std::uint64_t body_end = std::min(end, body);
  auto one = [&](std::uint64_t pos) { o[pos - skip] = src[(pos % width) * m + pos / width]; };
  while (p < body_end && p % width != 0) one(p++);
  if (p < body_end) {
    const std::size_t e0 = p / width;
    const std::size_t e1 = body_end / width;
    join_elements(src, m, width, e0, e1, o + (p - skip));
    p = std::uint64_t{e1} * width;
  }
  while (p < body_end) one(p++);
  // The tail bytes (past the last whole element) are stored where they are.
  if (p < end) std::memcpy(o + (p - skip), src + p, end - p);
}

// ---- encoder -------------------------------------------------------------------------------

struct ChunkEncoder::State {
  int level = kDefaultLevel;
  PlaneMode planes = PlaneMode::kAuto;
  std::vector<std::byte> planar;  // byte planes of the chunk being encoded
  std::vector<std::byte> best;    // the smallest encoding so far
  std::vector<std::byte> trial;   // a further attempt
#if defined(TS_HAVE_ZSTD)
  ZSTD_CCtx* cctx = nullptr;
  ~State() { ZSTD_freeCCtx(cctx); }

  // Compresses `src` at zstd level `zlevel` into `dst`; returns the size.
  std::size_t compress(std::span<const std::byte> src, int zlevel, std::vector<std::byte>& dst) {
    dst.resize(ZSTD_compressBound(src.size()));
    ZSTD_CCtx_reset(cctx, ZSTD_reset_session_and_parameters);
    ZSTD_CCtx_setParameter(cctx, ZSTD_c_compressionLevel, zlevel);
    // The decoder checks the recorded content size; checksums are kept in the chunk table.
    ZSTD_CCtx_setParameter(cctx, ZSTD_c_contentSizeFlag, 1);
    ZSTD_CCtx_setParameter(cctx, ZSTD_c_checksumFlag, 0);
    const std::size_t n = ZSTD_compress2(cctx, dst.data(), dst.size(), src.data(), src.size());
    TS_EXPECT(!ZSTD_isError(n), Error, "zstd compression failed: ", ZSTD_getErrorName(n));
    return n;
  }
#endif
};

ChunkEncoder::ChunkEncoder(int level, PlaneMode planes) : state_(std::make_unique<State>()) {
  (void)zstd_level(level);  // validates
  TS_EXPECT(available(), Error, "cannot write a compressed store: ", kNoZstd);
  state_->level = level;
  state_->planes = planes;
#if defined(TS_HAVE_ZSTD)
  state_->cctx = ZSTD_createCCtx();
  TS_EXPECT(state_->cctx != nullptr, Error, "cannot create a zstd compression context");
#endif
}

ChunkEncoder::~ChunkEncoder() = default;
ChunkEncoder::ChunkEncoder(ChunkEncoder&&) noexcept = default;
ChunkEncoder& ChunkEncoder::operator=(ChunkEncoder&&) noexcept = default;

int ChunkEncoder::level() const noexcept { return state_->level; }

EncodedChunk ChunkEncoder::encode(std::span<const std::byte> raw, unsigned width) {
  check_width(width);
  TS_EXPECT(!raw.empty() && raw.size() <= kMaxChunkRawSize, std::invalid_argument, "chunk of ",
            raw.size(), " bytes (must be 1..", kMaxChunkRawSize, ")");
  EncodedChunk out;
  out.bytes = raw;
#if defined(TS_HAVE_ZSTD)
  State& s = *state_;
  const bool planar = width > 1 && s.planes == PlaneMode::kAuto;
  std::span<const std::byte> input = raw;
  if (planar) {
    s.planar.resize(raw.size());
    split_planes(raw, width, s.planar);
    input = s.planar;
  }
  std::size_t best = s.compress(input, zstd_level(1), s.best);
  if (s.level > 1) {
    const std::size_t trial = s.compress(input, zstd_level(s.level), s.trial);
    if (trial < best) {
      std::swap(s.best, s.trial);
      best = trial;
    }
  }
  const std::size_t min_saving = std::max(raw.size() / kMinSavingDivisor, kMinSavingBytes);
  if (best < raw.size() && raw.size() - best >= min_saving) {
    out.codec = planar ? ChunkCodec::kBytePlanesZstd : ChunkCodec::kZstd;
    out.plane_width = static_cast<std::uint8_t>(planar ? width : 1);
    out.level = static_cast<std::uint8_t>(s.level);
    out.bytes = std::span<const std::byte>(s.best.data(), best);
  }
#endif
  return out;
}

// ---- decoder -------------------------------------------------------------------------------

struct ChunkDecoder::State {
  std::vector<std::byte> scratch;  // decompressed planes, or a clipped chunk
#if defined(TS_HAVE_ZSTD)
  ZSTD_DCtx* dctx = nullptr;
  ~State() { ZSTD_freeDCtx(dctx); }
#endif
};

ChunkDecoder::ChunkDecoder() : state_(std::make_unique<State>()) {}
ChunkDecoder::~ChunkDecoder() = default;
ChunkDecoder::ChunkDecoder(ChunkDecoder&&) noexcept = default;
ChunkDecoder& ChunkDecoder::operator=(ChunkDecoder&&) noexcept = default;

ChunkDecoder& ChunkDecoder::for_this_thread() {
  thread_local ChunkDecoder decoder;
  return decoder;
}

void ChunkDecoder::decode(const ChunkInfo& chunk, std::span<const std::byte> stored,
                          std::uint64_t skip, std::span<std::byte> out, bool verify,
                          const ChunkLocation& where) {
  TS_EXPECT(stored.size() == chunk.stored_size, std::invalid_argument, where_text(where), ": ",
            stored.size(), " stored bytes given, the chunk has ", chunk.stored_size);
  TS_EXPECT(skip <= chunk.raw_size && out.size() <= chunk.raw_size - skip, std::invalid_argument,
            "bytes [", skip, ", +", out.size(), ") requested from ", where_text(where),
            ", which holds ", chunk.raw_size);
  if (verify) {
    const auto actual = checksum64(stored);
    TS_EXPECT(actual == chunk.checksum, ChecksumError, "checksum mismatch in ", where_text(where),
              " (", chunk.stored_size, " stored bytes at offset ", chunk.stored_offset,
              " of the block): stored ", std::hex, chunk.checksum, ", computed ", actual);
  }
  if (chunk.codec == ChunkCodec::kRaw) {
    TS_EXPECT(chunk.stored_size == chunk.raw_size, FormatError, "raw ", where_text(where), " has ",
              chunk.stored_size, " stored bytes for ", chunk.raw_size, " raw bytes");
    if (!out.empty()) std::memcpy(out.data(), stored.data() + skip, out.size());
    return;
  }
  const bool planar = chunk.codec == ChunkCodec::kBytePlanesZstd;
  TS_EXPECT(chunk.codec == ChunkCodec::kZstd || planar, FormatError, where_text(where),
            ": unknown chunk codec ", static_cast<int>(chunk.codec));
  TS_EXPECT(!planar || chunk.plane_width == 2 || chunk.plane_width == 4 || chunk.plane_width == 8,
            FormatError, where_text(where), ": byte-plane width ",
            static_cast<int>(chunk.plane_width), " is not 2, 4 or 8");
#if defined(TS_HAVE_ZSTD)
  State& s = *state_;
  if (s.dctx == nullptr) {
    s.dctx = ZSTD_createDCtx();
    TS_EXPECT(s.dctx != nullptr, Error, "cannot create a zstd decompression context");
  }
  const auto content = ZSTD_getFrameContentSize(stored.data(), stored.size());
  TS_EXPECT(content != ZSTD_CONTENTSIZE_ERROR, FormatError, "compressed ", where_text(where),
            " does not start with a zstd frame header");
  TS_EXPECT(content != ZSTD_CONTENTSIZE_UNKNOWN, FormatError, "compressed ", where_text(where),
            ": its zstd frame does not record its content size");
  TS_EXPECT(content == chunk.raw_size, FormatError, "compressed ", where_text(where),
            ": its zstd frame holds ", content, " bytes, the chunk table says ", chunk.raw_size);
  const auto frame = ZSTD_findFrameCompressedSize(stored.data(), stored.size());
  TS_EXPECT(
      !ZSTD_isError(frame) && frame == stored.size(), FormatError, "compressed ", where_text(where),
      ": ",
      ZSTD_isError(frame)
          ? std::string("truncated or corrupt zstd frame (") + ZSTD_getErrorName(frame) + ")"
          : concat("its zstd frame ends after ", frame, " of ", stored.size(), " stored bytes"));
  const bool direct = !planar && skip == 0 && out.size() == chunk.raw_size;
  std::byte* target = out.data();
  if (!direct) {
    if (s.scratch.size() < chunk.raw_size) s.scratch.resize(chunk.raw_size);
    target = s.scratch.data();
  }
  const std::size_t n =
      ZSTD_decompressDCtx(s.dctx, target, chunk.raw_size, stored.data(), stored.size());
  TS_EXPECT(!ZSTD_isError(n), FormatError, "compressed ", where_text(where),
            " does not decode: ", ZSTD_isError(n) ? ZSTD_getErrorName(n) : "");
  TS_EXPECT(n == chunk.raw_size, FormatError, "compressed ", where_text(where), " decoded to ", n,
            " bytes instead of ", chunk.raw_size);
  if (direct) return;
  const std::span<const std::byte> decoded(s.scratch.data(), chunk.raw_size);
  if (planar) {
    join_planes(decoded, chunk.plane_width, skip, out);
  } else if (!out.empty()) {
    std::memcpy(out.data(), decoded.data() + skip, out.size());
  }
#else
  throw FormatError(concat("compressed ", where_text(where), " cannot be decoded: ", kNoZstd));
#endif
}

// ---- blocks --------------------------------------------------------------------------------

ChunkRange chunks_covering(std::span<const ChunkInfo> chunks, std::uint64_t raw_offset,
                           std::uint64_t size) {
  const std::uint64_t raw_total =
      chunks.empty() ? 0 : chunks.back().raw_offset + chunks.back().raw_size;
  TS_EXPECT(raw_offset <= raw_total && size <= raw_total - raw_offset, std::out_of_range,
            "raw bytes [", raw_offset, ", +", size, ") lie outside a block of ", raw_total,
            " bytes");
  ChunkRange range;
  if (size == 0) return range;
  // The first chunk whose end passes raw_offset, then the first that starts at or past the end.
  const auto first = std::partition_point(chunks.begin(), chunks.end(), [&](const ChunkInfo& c) {
    return c.raw_offset + c.raw_size <= raw_offset;
  });
  const auto last = std::partition_point(
      first, chunks.end(), [&](const ChunkInfo& c) { return c.raw_offset < raw_offset + size; });
  range.first = static_cast<std::size_t>(first - chunks.begin());
  range.count = static_cast<std::size_t>(last - first);
  range.raw_begin = first->raw_offset;
  range.raw_end = (last - 1)->raw_offset + (last - 1)->raw_size;
  range.stored_begin = first->stored_offset;
  range.stored_end = (last - 1)->stored_offset + (last - 1)->stored_size;
  return range;
}

void decode_chunk(const BlockDecode& job, std::size_t index, ChunkDecoder& decoder) {
  TS_EXPECT(index < job.chunks.size(), std::out_of_range, "chunk ", index, " of block '",
            job.block_name, "' in '", job.file, "' does not exist (", job.chunks.size(),
            " chunks)");
  const ChunkInfo& c = job.chunks[index];
  const ChunkLocation where{job.file, job.block_name, job.block, index};
  // The part of the chunk's raw bytes that the destination asks for.
  const std::uint64_t want_begin = std::max(c.raw_offset, job.raw_offset);
  const std::uint64_t want_end =
      std::min(c.raw_offset + c.raw_size, job.raw_offset + job.raw.size());
  if (want_begin >= want_end) return;
  TS_EXPECT(c.stored_offset >= job.stored_offset &&
                c.stored_offset - job.stored_offset <= job.stored.size() &&
                c.stored_size <= job.stored.size() - (c.stored_offset - job.stored_offset),
            FormatError, "stored bytes [", c.stored_offset, ", +", c.stored_size, ") of ",
            where_text(where), " lie outside the stored bytes read [", job.stored_offset, ", +",
            job.stored.size(), ")");
  decoder.decode(c, job.stored.subspan(c.stored_offset - job.stored_offset, c.stored_size),
                 want_begin - c.raw_offset,
                 job.raw.subspan(want_begin - job.raw_offset, want_end - want_begin), job.verify,
                 where);
}

void decode_block(const BlockDecode& job, const ParallelFor& parallel) {
  if (job.raw.empty()) return;
  const auto range = chunks_covering(job.chunks, job.raw_offset, job.raw.size());
  if (!parallel || range.count <= 1) {
    auto& decoder = ChunkDecoder::for_this_thread();
    for (std::size_t i = 0; i < range.count; ++i) decode_chunk(job, range.first + i, decoder);
    return;
  }
  std::mutex mutex;  // guards failed_at and error
  std::size_t failed_at = range.count;
  std::exception_ptr error;
  parallel(range.count, [&](std::size_t i) {
    try {
      decode_chunk(job, range.first + i, ChunkDecoder::for_this_thread());
    } catch (...) {
      std::lock_guard lock(mutex);
      if (i < failed_at) {
        failed_at = i;
        error = std::current_exception();
      }
    }
  });
  if (error) std::rethrow_exception(error);
}

}  // namespace tensorstream::codec
