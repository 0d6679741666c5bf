// The TensorStream store: one file holding the weights of a model, laid out per block.
//
// A block is the set of tensors loaded and released together (typically one decoder layer).
// Each block is one contiguous extent aligned to `block_alignment` (4096) bytes, so it can be
// read with O_DIRECT or cuFile in one request; each tensor inside is aligned to
// `tensor_alignment` (256) bytes, so a device view of it is aligned for any kernel. The full
// format is documented field by field in docs/store-format.md.
//
// A block may be stored compressed (format 1.1): as independently decodable chunks, each
// raw, zstd, or zstd over byte planes, listed in a chunk table (ChunkInfo); codec.hpp
// decodes them, read_block()/read_range()/read_tensor() do it for callers that read through
// the Store. Checksums of tensors and the model fingerprint are over decoded bytes, so they
// do not change with compression.
//
// Store::open validates every header field before use, with checked arithmetic, and throws
// FormatError naming the file and the field; nothing is read from a position that was not
// checked to lie inside the file.
//
// StoreWriter is crash-safe: it writes to a hidden temporary file next to the destination,
// fsyncs it, renames it over the destination and fsyncs the directory. A writer that dies
// at any point leaves either no store or the previous one at the destination (plus a
// temporary that cleanup_orphaned_files() removes), never a store that opens with wrong data.
#pragma once

#include <cstdint>
#include <filesystem>
#include <functional>
#include <memory>
#include <optional>
#include <span>
#include <string>
#include <string_view>
#include <vector>

#include "tensorstream/alignment.hpp"
#include "tensorstream/checksum.hpp"
#include "tensorstream/detail/file.hpp"
#include "tensorstream/dtype.hpp"

namespace tensorstream {

namespace detail {
class ChunkEncoderPool;
}

/// Format version: readers accept this major version only. kStoreVersionMinor is the newest
/// minor version this library writes: 1.1 adds compressed blocks and their chunk table. A
/// store without compressed blocks is still written as 1.0, byte for byte as before, so
/// 1.0 readers keep opening it.
inline constexpr std::uint16_t kStoreVersionMajor = 1;
inline constexpr std::uint16_t kStoreVersionMinor = 1;
/// The minor version of stores whose blocks are all uncompressed.
inline constexpr std::uint16_t kStoreVersionMinorUncompressed = 0;
// kBlockAlignment, the alignment of block extents in the file (and of the superblock region),
// is defined with the other alignments in alignment.hpp.
/// Minimum alignment of a tensor inside its block.
inline constexpr std::uint32_t kTensorAlignment = 256;
/// Largest metadata region accepted (block table, tensor table, dims, strings).
inline constexpr std::uint64_t kMaxMetadataSize = 1ull << 30;
/// Largest tensor rank accepted.
inline constexpr std::uint32_t kMaxTensorRank = 32;
/// Largest raw size of one chunk of a compressed block accepted by the reader (it bounds the
/// scratch memory a decoder needs).
inline constexpr std::uint32_t kMaxChunkRawSize = 64u << 20;

/// How a block's bytes are encoded on disk (the block record's `codec`).
enum class Codec : std::uint16_t {
  kNone = 0,     ///< stored bytes are the raw bytes (format 1.0 and later)
  kChunked = 1,  ///< a sequence of independently decodable chunks (format 1.1 and later)
};

/// How one chunk of a kChunked block is stored.
enum class ChunkCodec : std::uint8_t {
  kRaw = 0,             ///< the raw bytes (a chunk that did not shrink)
  kZstd = 1,            ///< one zstd frame of the raw bytes
  kBytePlanesZstd = 2,  ///< one zstd frame of the raw bytes split into byte planes
};

/// One chunk of a kChunked block: a range of the block's raw bytes, encoded on its own, so
/// that chunks can be decoded on several threads at once and any tensor can be decoded
/// without the rest of its block. A chunk never holds bytes of two tensors (it may hold a
/// tensor's trailing alignment padding).
struct ChunkInfo {
  std::uint64_t raw_offset = 0;     ///< offset of its raw bytes in the decoded block
  std::uint64_t stored_offset = 0;  ///< offset of its stored bytes from the block's `offset`
  std::uint32_t raw_size = 0;       ///< 1..kMaxChunkRawSize
  std::uint32_t stored_size = 0;    ///< == raw_size for kRaw, else 1..raw_size
  std::uint64_t checksum = 0;       ///< XXH3-64 of the stored bytes
  ChunkCodec codec = ChunkCodec::kRaw;
  /// Element width of the byte planes (2, 4 or 8) for kBytePlanesZstd, else 1.
  std::uint8_t plane_width = 1;
  /// The compression level (1..9) it was written with, 0 for kRaw. Decoding ignores it;
  /// tools that rewrite a store use it to keep the store's compression.
  std::uint8_t level = 0;
};

/// One block as recorded in the store.
struct BlockInfo {
  std::string name;
  std::uint64_t offset = 0;        ///< absolute file offset, multiple of block_alignment
  std::uint64_t stored_size = 0;   ///< bytes on disk
  std::uint64_t raw_size = 0;      ///< bytes once decoded (== stored_size for kNone)
  std::uint64_t checksum = 0;      ///< XXH3-64 of the stored bytes
  std::uint64_t raw_checksum = 0;  ///< XXH3-64 of the decoded bytes
  Codec codec = Codec::kNone;
  std::uint32_t first_tensor = 0;  ///< tensors [first_tensor, first_tensor + tensor_count)
  std::uint32_t tensor_count = 0;
  /// Chunks [first_chunk, first_chunk + chunk_count) of Store::chunks(); 0 chunks for kNone.
  std::uint32_t first_chunk = 0;
  std::uint32_t chunk_count = 0;
};

/// One tensor as recorded in the store.
struct TensorInfo {
  std::string name;
  DType dtype{};
  std::vector<std::int64_t> shape;
  std::uint32_t block = 0;            ///< index of the block holding it
  std::uint64_t offset_in_block = 0;  ///< multiple of tensor_alignment
  std::uint64_t nbytes = 0;           ///< prod(shape) × dtype_size(dtype)
  std::uint64_t checksum = 0;         ///< XXH3-64 of the tensor's bytes
};

/// Store-wide facts from the superblock.
struct StoreInfo {
  std::uint16_t version_major = 0;
  std::uint16_t version_minor = 0;
  std::uint32_t block_alignment = 0;
  std::uint32_t tensor_alignment = 0;
  std::uint64_t file_size = 0;
  std::uint64_t data_offset = 0;
  std::uint64_t data_size = 0;
  std::uint64_t metadata_offset = 0;
  std::uint64_t metadata_size = 0;
  Fingerprint fingerprint;
  std::string user_metadata;  ///< opaque text (JSON by convention) set by the writer
};

/// Outcome of Store::verify for one damaged block.
struct BlockProblem {
  std::uint32_t block = 0;
  std::string message;
};

/// Runs task(i) for every i in [0, n), possibly on several threads at once, and returns when
/// all have finished; an empty ParallelFor means one after the other on the caller's thread.
/// The tasks never throw (decoders catch their errors and rethrow the first one afterwards).
using ParallelFor =
    std::function<void(std::size_t n, const std::function<void(std::size_t)>& task)>;

/// How Store::open treats compressed blocks.
struct OpenOptions {
  /// Accept stores with compressed (kChunked) blocks, to be read through read_block(),
  /// read_range() or the decoders of codec.hpp (the streaming engine's layout_of_store opens
  /// stores so and decodes on its fill path). Off by default: a caller that reads block
  /// extents itself (from BlockInfo::offset and stored_size) would otherwise receive
  /// compressed bytes as if they were raw, so Store::open refuses such a store with a
  /// FormatError naming the file and its first compressed block.
  bool decode_compressed = false;
};

/// An open, validated store. Immutable after open; every const member is thread-safe.
class Store {
 public:
  /// Opens and validates `path`. Throws IoError if it cannot be read and FormatError (naming
  /// the file and the header field) if any field is invalid or the metadata checksum fails.
  /// A store with compressed blocks is refused unless `options.decode_compressed`, and
  /// always when this build lacks zstd (the message says so).
  static Store open(const std::filesystem::path& path, const OpenOptions& options = {});

  [[nodiscard]] const std::filesystem::path& path() const noexcept { return fd_.path(); }
  [[nodiscard]] int fd() const noexcept { return fd_.get(); }
  [[nodiscard]] const StoreInfo& info() const noexcept { return info_; }
  [[nodiscard]] const std::vector<BlockInfo>& blocks() const noexcept { return blocks_; }
  [[nodiscard]] const std::vector<TensorInfo>& tensors() const noexcept { return tensors_; }
  /// The tensors of block `block`.
  [[nodiscard]] std::span<const TensorInfo> block_tensors(std::size_t block) const;
  /// Index of the block called `name`, if any.
  [[nodiscard]] std::optional<std::size_t> find_block(std::string_view name) const noexcept;
  /// Index of the tensor called `name`, if any.
  [[nodiscard]] std::optional<std::size_t> find_tensor(std::string_view name) const noexcept;
  /// Largest raw_size of any block (what a streaming slot must hold).
  [[nodiscard]] std::uint64_t max_block_size() const noexcept;
  /// Every chunk of every compressed block, grouped by block in block order.
  [[nodiscard]] const std::vector<ChunkInfo>& chunks() const noexcept { return chunks_; }
  /// The chunks of block `block` (empty for an uncompressed block).
  [[nodiscard]] std::span<const ChunkInfo> block_chunks(std::size_t block) const;
  /// True if any block is compressed.
  [[nodiscard]] bool compressed() const noexcept { return !chunks_.empty(); }

  /// Reads the decoded bytes of block `block` into `out` (size must be raw_size, else
  /// std::invalid_argument); a compressed block is read whole and its chunks decoded through
  /// `parallel`. With `verify`, checks the stored bytes' checksum (and, for a compressed
  /// block, each chunk's and the decoded bytes' checksum) and throws ChecksumError naming the
  /// file, block (and chunk) and offset on mismatch. A chunk that does not decode is a
  /// FormatError naming the file, block and chunk.
  void read_block(std::size_t block, std::span<std::byte> out, bool verify,
                  const ParallelFor& parallel = {}) const;

  /// Reads decoded bytes [raw_offset, raw_offset + out.size()) of block `block` into `out`,
  /// reading from the file only the stored bytes of the chunks that cover the range (of a
  /// compressed block) or the range itself (of an uncompressed one). With `verify`, checks
  /// the stored checksum of every chunk read (an uncompressed block's range has no checksum
  /// of its own: check the tensor's checksum, as read_tensor does). Throws
  /// std::out_of_range for a range outside the block.
  void read_range(std::size_t block, std::uint64_t raw_offset, std::span<std::byte> out,
                  bool verify, const ParallelFor& parallel = {}) const;

  /// Reads the bytes of tensor `tensor` (out.size() must be its nbytes) through
  /// read_range(); with `verify`, also checks the tensor's checksum.
  void read_tensor(std::size_t tensor, std::span<std::byte> out, bool verify) const;

  /// Reads and checks every block: the stored bytes' checksum, the decoded bytes' checksum
  /// and every tensor's checksum (`progress(done_bytes, total_bytes)` after each block, in
  /// stored bytes, if set). Returns the damaged blocks; empty means the store is intact.
  [[nodiscard]] std::vector<BlockProblem> verify(
      const std::function<void(std::uint64_t, std::uint64_t)>& progress = {}) const;

 private:
  Store() = default;

  detail::FileDescriptor fd_;
  StoreInfo info_;
  std::vector<BlockInfo> blocks_;
  std::vector<TensorInfo> tensors_;
  std::vector<ChunkInfo> chunks_;
};

/// Layout options of a StoreWriter.
struct WriterOptions {
  /// Block extent alignment: a power of two ≥ 4096 (the largest logical block size of
  /// common drives, so O_DIRECT reads of a block need no over-read).
  std::uint32_t block_alignment = kBlockAlignment;
  /// Tensor alignment inside a block: a power of two ≥ 256 and ≤ block_alignment.
  std::uint32_t tensor_alignment = kTensorAlignment;
  /// fsync the file and the directory on commit (turn off only for throwaway stores).
  bool durable = true;
  /// Lossless compression of the blocks (see codec.hpp and docs/store-format.md).
  struct Compression {
    /// Off by default: a compressed store costs CPU time on every read, which pays only
    /// where the storage path is slower than decoding (about 1.7 GB/s per core for bf16).
    bool enabled = false;
    /// 1 (fastest to write) .. 9 (smallest); codec::zstd_level() maps it to zstd. Reading
    /// speed hardly depends on it.
    int level = 3;
    /// Raw bytes per chunk, a multiple of 4096 in [64 KiB, 16 MiB]. Smaller chunks decode
    /// on more threads at once and let a single tensor be read with less over-read; larger
    /// ones cost less metadata (40 bytes per chunk).
    std::uint32_t chunk_size = 1u << 20;
    /// Threads that encode chunks while the caller appends (0: one per CPU, at most 8;
    /// 1: encode on the caller's thread).
    unsigned threads = 0;
  } compression{};
};

/// Summary returned by StoreWriter::commit.
struct WriteSummary {
  std::uint64_t file_size = 0;
  std::uint32_t block_count = 0;
  std::uint32_t tensor_count = 0;
  Fingerprint fingerprint;
};

/// Writes a store block by block. Usage: for each block, begin_block(), then add_tensor()
/// (or begin_tensor()/append()/end_tensor() to stream large tensors in pieces), then
/// end_block(); finally commit(). Destroying an uncommitted writer deletes its temporary.
///
/// With compression, each tensor's bytes are cut into chunks of at most
/// `compression.chunk_size` raw bytes (a tensor's last chunk also takes its trailing
/// alignment padding), encoded by `compression.threads` worker threads while the caller goes
/// on appending, and laid out in order; a chunk that does not shrink is stored raw, and a block
/// none of whose chunks shrank is written as an uncompressed block. Memory held is about
/// 2 × threads + 2 chunks plus the write buffer, whatever the model size.
///
/// Not thread-safe: one thread calls its members (the encoding workers are internal).
class StoreWriter {
 public:
  /// Creates the temporary file beside `destination` (whose directory must exist).
  explicit StoreWriter(std::filesystem::path destination, WriterOptions options = {});
  ~StoreWriter();
  StoreWriter(const StoreWriter&) = delete;
  StoreWriter& operator=(const StoreWriter&) = delete;

  void begin_block(std::string_view name);
  void add_tensor(std::string_view name, DType dtype, std::span<const std::int64_t> shape,
                  std::span<const std::byte> data);
  void begin_tensor(std::string_view name, DType dtype, std::span<const std::int64_t> shape);
  void append(std::span<const std::byte> data);
  void end_tensor();
  void end_block();
  /// Opaque text stored with the store (JSON by convention).
  void set_user_metadata(std::string text);

  /// Writes the metadata and superblock, makes the file durable and renames it over the
  /// destination. Throws (leaving any previous store in place) if a step fails.
  WriteSummary commit();
  /// Deletes the temporary; the writer is unusable afterwards. Idempotent.
  void abort() noexcept;

  [[nodiscard]] const std::filesystem::path& destination() const noexcept { return destination_; }
  [[nodiscard]] const std::filesystem::path& temp_path() const noexcept { return temp_path_; }

  /// Test-only: called with the name of each commit stage ("block_written",
  /// "metadata_written", "superblock_written", "synced", "renamed") so crash tests can stop
  /// the process at a chosen point.
  std::function<void(std::string_view stage)> stage_hook;

 private:
  struct PendingTensor {
    TensorInfo info;
    std::uint64_t written;  // no initializer here: clang rejects emplace() of such nested types
    Checksum64 checksum;
  };

  void write_bytes(std::span<const std::byte> data);
  void write_zeros(std::uint64_t n);
  // Raw bytes of the open block: written as they are, or fed to the chunker.
  void add_raw(std::span<const std::byte> data);
  void add_raw_zeros(std::uint64_t n);
  // Ends the chunk being filled (at a tensor start and at the end of a block).
  void cut_chunk();
  // Writes encoded chunks out in order: all of them, or only while more than `keep` wait.
  void write_chunks(std::size_t keep);
  void flush();
  void require(bool condition, std::string_view what) const;
  void stage(std::string_view name) const;

  std::filesystem::path destination_;
  std::filesystem::path temp_path_;
  WriterOptions options_;
  detail::FileDescriptor fd_;
  std::vector<std::byte> buffer_;  // pending writes at offset buffer_offset_
  std::uint64_t buffer_offset_ = 0;
  std::uint64_t position_ = 0;  // logical end of file
  std::vector<BlockInfo> blocks_;
  std::vector<TensorInfo> tensors_;
  std::optional<BlockInfo> open_block_;
  Checksum64 block_checksum_;    // of the open block's stored bytes
  Checksum64 raw_checksum_;      // of its raw bytes (compressed stores only)
  std::uint64_t block_raw_ = 0;  // raw bytes of the open block so far
  // Compression (null when off). The chunk being filled, the plane width of its tensor, the
  // chunks of finished blocks, and raw buffers of written chunks kept for reuse.
  std::unique_ptr<detail::ChunkEncoderPool> encoder_;
  std::vector<std::byte> chunk_;
  unsigned chunk_width_ = 1;
  std::uint64_t chunk_raw_offset_ = 0;
  std::vector<ChunkInfo> chunks_;
  std::vector<std::vector<std::byte>> spare_;
  std::size_t max_pending_ = 0;
  std::optional<PendingTensor> open_tensor_;
  std::string user_metadata_;
  bool finished_ = false;
};

}  // namespace tensorstream
