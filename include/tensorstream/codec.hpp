// Lossless compression of store blocks: byte planes + zstd, chunk by chunk.
//
// A compressed (Codec::kChunked) block is a sequence of chunks, each covering a range of the
// block's raw bytes (at most WriterOptions::Compression::chunk_size of them, 1 MiB by default)
// and stored on its own: raw, as one zstd frame, or as one zstd frame of its bytes split into
// byte planes. Chunks never cross a tensor boundary. So:
//
//  - chunks decode independently, on as many threads as the caller has (decode_chunk() on
//    each, or decode_block() with a ParallelFor);
//  - one tensor (or any raw range) decodes alone: chunks_covering() says which chunks, and
//    which stored bytes, it needs; decode_block() writes only the requested raw range.
//
// Byte planes. The bytes of an element of width w are split into w planes (plane k holds
// byte k of every element), then the planes are compressed together. For bf16/fp16 the high
// byte (sign and exponent) carries about 2.6 bits of entropy and the low byte about 8:
// apart, zstd's entropy coder reaches the high byte's entropy and stores the low byte's
// blocks raw (a memcpy when decoding); interleaved, it cannot. Width 1 dtypes (int8, fp8)
// are compressed as they are. See docs/store-format.md for the measured ratios.
//
// Validation. Everything a decoder reads is checked before use: the chunk's codec and plane
// width, that its stored and raw ranges lie inside the buffers given, that the zstd frame is
// exactly one frame whose recorded content size is the chunk's raw size and that it decodes to
// exactly that many bytes. A chunk that fails is a FormatError (a ChecksumError when its
// stored checksum does not match) naming the file, the block and the chunk: never a crash, a
// short decode or bytes outside the destination written.
//
// Decoding one block (or one tensor) on a fill path:
//   1. chunks = store.block_chunks(b) (kept from Store::open; no I/O).
//   2. Read the block's stored extent, BlockInfo::offset + [0, stored_size), into any buffer
//      (any alignment; an O_DIRECT over-read is fine, point `stored` at the block's first
//      byte). For one tensor t only: r = chunks_covering(chunks, t.offset_in_block,
//      t.nbytes) and read stored bytes [r.stored_begin, r.stored_end) of the block.
//   3. BlockDecode{..., stored, stored_offset (0, or r.stored_begin), raw = the destination
//      (the slot, or exactly the tensor's bytes), raw_offset (0, or t.offset_in_block)}, then
//      decode_block(job, parallel) with the caller's pool, or decode_chunk(job, i, decoder)
//      for each chunk i of r from the caller's own tasks (one ChunkDecoder per thread).
//   4. Check BlockInfo::raw_checksum over the block (or the tensor's checksum) if verifying;
//      `verify` in the job checks each chunk's stored checksum before decoding it.
// A thread's decoder holds a zstd context (~150 KiB) and a scratch buffer as large as the
// largest chunk it decoded (1 MiB with the writer's default chunks).
//
// Builds without zstd (zstd.h absent at configure time) compile this API; available() is then
// false, encoders refuse to compress and decoders refuse zstd chunks with an error saying so.
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>
#include <span>
#include <string>
#include <string_view>
#include <vector>

#include "tensorstream/dtype.hpp"
#include "tensorstream/store.hpp"

namespace tensorstream::codec {

inline constexpr int kMinLevel = 1;
inline constexpr int kMaxLevel = 9;
inline constexpr int kDefaultLevel = 3;
inline constexpr std::uint32_t kMinChunkSize = 64u << 10;
inline constexpr std::uint32_t kMaxChunkSize = 16u << 20;
inline constexpr std::uint32_t kDefaultChunkSize = 1u << 20;

/// "none", "chunked": the block codec's name in tools and messages.
[[nodiscard]] const char* name(Codec codec) noexcept;
/// "raw", "zstd", "planes+zstd": the chunk codec's name in tools and messages.
[[nodiscard]] const char* name(ChunkCodec codec) noexcept;

/// True if this build can compress and decompress (it was compiled with zstd.h).
[[nodiscard]] bool available() noexcept;

/// "zstd 1.5.4" (the library linked), or why compression is not available.
[[nodiscard]] std::string describe();

/// The zstd level used for compression level `level` (1..9; std::invalid_argument
/// otherwise). See docs/store-format.md for the mapping and why.
[[nodiscard]] int zstd_level(int level);

/// The byte-plane width for elements of `dtype`: the width of its real scalar component
/// (complex64 → 4), 1 for single-byte dtypes (no planes).
[[nodiscard]] unsigned plane_width(DType dtype) noexcept;

/// Byte planes of `raw` for elements of `width` bytes: `out` (raw.size() bytes) receives plane
/// 0 (byte 0 of every whole element), plane 1, ..., then the raw.size() % width tail bytes.
void split_planes(std::span<const std::byte> raw, unsigned width, std::span<std::byte> out);

/// The inverse of split_planes, clipped: writes bytes [skip, skip + out.size()) of the raw
/// chunk whose planes (of a chunk of `raw_size` bytes) are in `planes`.
void join_planes(std::span<const std::byte> planes, unsigned width, std::uint64_t skip,
                 std::span<std::byte> out);

/// A chunk as encoded: how, and its stored bytes (a view into the encoder's buffer, or into
/// the input for a raw chunk, valid until the next encode()).
struct EncodedChunk {
  ChunkCodec codec = ChunkCodec::kRaw;
  std::uint8_t plane_width = 1;
  std::uint8_t level = 0;
  std::span<const std::byte> bytes;
};

/// How an encoder chooses a chunk's encoding (benchmarks compare them; stores use kAuto).
enum class PlaneMode : std::uint8_t {
  kAuto,   ///< byte planes when the element width is > 1, else plain zstd
  kNever,  ///< plain zstd whatever the width (what general-purpose compressors do)
};

/// Compresses chunks at one level. Owns a zstd compression context and a scratch buffer.
/// Not thread-safe: use one per thread.
class ChunkEncoder {
 public:
  /// Throws std::invalid_argument for a level outside 1..9 and Error when the build lacks
  /// zstd.
  explicit ChunkEncoder(int level, PlaneMode planes = PlaneMode::kAuto);
  ~ChunkEncoder();
  ChunkEncoder(ChunkEncoder&&) noexcept;
  ChunkEncoder& operator=(ChunkEncoder&&) noexcept;
  ChunkEncoder(const ChunkEncoder&) = delete;
  ChunkEncoder& operator=(const ChunkEncoder&) = delete;

  /// Encodes `raw` (1..kMaxChunkRawSize bytes) whose elements are `plane_width` bytes wide
  /// (1, 2, 4 or 8). The result is raw when compression would not save at least 1/64 of the
  /// bytes and at least 1 KiB: decoding costs time, which a chunk that hardly shrinks does
  /// not repay (and a random tensor's trailing zero padding must not make its last chunk
  /// count as compressible).
  [[nodiscard]] EncodedChunk encode(std::span<const std::byte> raw, unsigned plane_width);

  [[nodiscard]] int level() const noexcept;

 private:
  struct State;
  std::unique_ptr<State> state_;
};

/// Names a chunk in error messages.
struct ChunkLocation {
  std::string_view file;
  std::string_view block_name;
  std::size_t block = 0;
  std::size_t chunk = 0;  ///< index within the block's chunks
};

/// Decompresses chunks. Owns a zstd decompression context and a scratch buffer that grows to
/// the largest chunk decoded (a planes chunk is decompressed there, then joined into the
/// destination). Not thread-safe: use one per thread (for_this_thread()).
class ChunkDecoder {
 public:
  ChunkDecoder();
  ~ChunkDecoder();
  ChunkDecoder(ChunkDecoder&&) noexcept;
  ChunkDecoder& operator=(ChunkDecoder&&) noexcept;
  ChunkDecoder(const ChunkDecoder&) = delete;
  ChunkDecoder& operator=(const ChunkDecoder&) = delete;

  /// The calling thread's decoder (created on first use, freed when the thread exits).
  static ChunkDecoder& for_this_thread();

  /// Decodes raw bytes [skip, skip + out.size()) of `chunk`, whose stored bytes are
  /// `stored` (exactly chunk.stored_size of them). With `verify`, first checks the stored
  /// checksum. Throws FormatError / ChecksumError naming `where`; std::invalid_argument when
  /// the range lies outside the chunk or `stored` has the wrong size.
  void decode(const ChunkInfo& chunk, std::span<const std::byte> stored, std::uint64_t skip,
              std::span<std::byte> out, bool verify, const ChunkLocation& where);

 private:
  struct State;
  std::unique_ptr<State> state_;
};

/// Chunks [first, first + count) of a block and the raw and stored byte ranges they span.
struct ChunkRange {
  std::size_t first = 0;
  std::size_t count = 0;
  std::uint64_t raw_begin = 0;     ///< raw offset of the first chunk
  std::uint64_t raw_end = 0;       ///< raw end of the last chunk
  std::uint64_t stored_begin = 0;  ///< stored offset (from the block's offset) of the first
  std::uint64_t stored_end = 0;    ///< stored end of the last chunk
};

/// The chunks of a block (`chunks`, as Store::block_chunks gives them: contiguous in raw and
/// stored order) that hold raw bytes [raw_offset, raw_offset + size); count 0 for size 0.
/// Reading stored bytes [stored_begin, stored_end) of the block is enough to decode them.
/// std::out_of_range if the range passes the last chunk. O(log chunks).
[[nodiscard]] ChunkRange chunks_covering(std::span<const ChunkInfo> chunks,
                                         std::uint64_t raw_offset, std::uint64_t size);

/// One decoding job on one compressed block: where its stored bytes are, where the decoded
/// bytes go, and what to call it in messages.
struct BlockDecode {
  std::string_view file;              ///< for messages
  std::string_view block_name;        ///< for messages
  std::size_t block = 0;              ///< for messages
  std::span<const ChunkInfo> chunks;  ///< the block's chunk table (Store::block_chunks)
  /// Stored bytes [stored_offset, stored_offset + stored.size()) of the block (offsets from
  /// the block's `offset` in the file): the whole extent, or the part chunks_covering()
  /// names. Must stay valid and unchanged during the call.
  std::span<const std::byte> stored;
  std::uint64_t stored_offset = 0;
  /// Destination of raw bytes [raw_offset, raw_offset + raw.size()) of the block. Only these
  /// bytes are written; chunks that overlap the range partly are decoded and clipped. Any
  /// alignment; must not overlap `stored` (decoding is never in place).
  std::span<std::byte> raw;
  std::uint64_t raw_offset = 0;
  /// Check each chunk's stored checksum before decoding it.
  bool verify = false;
};

/// Decodes chunk `index` of `job.chunks` into the part of `job.raw` it overlaps, with
/// `decoder`. For callers that fan chunks out themselves: chunks write disjoint bytes of
/// `job.raw`, so any number of them may run at once (one decoder per thread). Throws as
/// ChunkDecoder::decode does, and FormatError naming the chunk when its stored bytes are not
/// all inside `job.stored`.
void decode_chunk(const BlockDecode& job, std::size_t index, ChunkDecoder& decoder);

/// Decodes every chunk overlapping `job.raw` through `parallel` (each task uses its thread's
/// ChunkDecoder::for_this_thread()), then rethrows the error of the lowest-numbered chunk
/// that failed, if any. Thread-safe for distinct jobs; `job.raw` must not be read until it
/// returns.
void decode_block(const BlockDecode& job, const ParallelFor& parallel = {});

}  // namespace tensorstream::codec
