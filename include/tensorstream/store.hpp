// The TensorStream store: one file holding the weights of a model, laid out per block.
//
// A block is the set of tensors loaded and released together (typically one decoder layer).
// Each block is one contiguous extent aligned to `block_alignment` (4096) bytes, so it can be
// read with O_DIRECT or cuFile in one request; each tensor inside is aligned to
// `tensor_alignment` (256) bytes, so a device view of it is aligned for any kernel. The full
// format is documented field by field in docs/store-format.md.
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

/// Format version written by this library; readers accept this major version only.
inline constexpr std::uint16_t kStoreVersionMajor = 1;
inline constexpr std::uint16_t kStoreVersionMinor = 0;
// kBlockAlignment, the alignment of block extents in the file (and of the superblock region),
// is defined with the other alignments in alignment.hpp.
/// Minimum alignment of a tensor inside its block.
inline constexpr std::uint32_t kTensorAlignment = 256;
/// Largest metadata region accepted (block table, tensor table, dims, strings).
inline constexpr std::uint64_t kMaxMetadataSize = 1ull << 30;
/// Largest tensor rank accepted.
inline constexpr std::uint32_t kMaxTensorRank = 32;

/// How a block's bytes are encoded on disk. Only kNone exists in format 1.0; the field is
/// there so compression can be added without a format break (readers reject unknown codecs).
enum class Codec : std::uint16_t {
  kNone = 0,
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

/// An open, validated store. Immutable after open; every const member is thread-safe.
class Store {
 public:
  /// Opens and validates `path`. Throws IoError if it cannot be read and FormatError (naming
  /// the file and the header field) if any field is invalid or the metadata checksum fails.
  static Store open(const std::filesystem::path& path);

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

  /// Reads the decoded bytes of block `block` into `out` (size must be raw_size, else
  /// std::invalid_argument). With `verify`, checks the checksum and throws ChecksumError
  /// naming the file, block and offset on mismatch.
  void read_block(std::size_t block, std::span<std::byte> out, bool verify) const;

  /// Reads and checks every block (`progress(done_bytes, total_bytes)` after each, if set).
  /// Returns the damaged blocks; empty means the whole store is intact.
  [[nodiscard]] std::vector<BlockProblem> verify(
      const std::function<void(std::uint64_t, std::uint64_t)>& progress = {}) const;

 private:
  Store() = default;

  detail::FileDescriptor fd_;
  StoreInfo info_;
  std::vector<BlockInfo> blocks_;
  std::vector<TensorInfo> tensors_;
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
/// Not thread-safe.
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
  Checksum64 block_checksum_;
  std::optional<PendingTensor> open_tensor_;
  std::string user_metadata_;
  bool finished_ = false;
};

}  // namespace tensorstream
