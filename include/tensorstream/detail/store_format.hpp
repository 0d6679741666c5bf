// On-disk layout of the store (format 1.x): encoding and validating decoding of the
// superblock and the metadata region. Pure functions with no I/O, so they can be fuzzed.
// docs/store-format.md documents every field; keep the two in step.
#pragma once

#include <array>
#include <cstddef>
#include <cstdint>
#include <span>
#include <string>
#include <string_view>
#include <vector>

#include "tensorstream/store.hpp"

namespace tensorstream::detail {

/// "\x89TSTORE\n": the high byte catches 7-bit transfers, the newline catches text-mode
/// conversions.
inline constexpr std::array<std::byte, 8> kStoreMagic{
    std::byte{0x89}, std::byte{'T'}, std::byte{'S'}, std::byte{'T'},
    std::byte{'O'},  std::byte{'R'}, std::byte{'E'}, std::byte{'\n'}};

/// The superblock occupies the first 4096 bytes; its fields take the first kSuperblockUsed.
inline constexpr std::size_t kSuperblockSize = 4096;
inline constexpr std::size_t kSuperblockUsed = 128;
inline constexpr std::size_t kBlockRecordSize = 64;
inline constexpr std::size_t kTensorRecordSize = 48;
inline constexpr std::size_t kChunkRecordSize = 40;

/// The decoded superblock.
struct Superblock {
  std::uint16_t version_major = 0;
  std::uint16_t version_minor = 0;
  std::uint32_t flags = 0;
  std::uint32_t block_alignment = 0;
  std::uint32_t tensor_alignment = 0;
  std::uint32_t block_count = 0;
  std::uint32_t tensor_count = 0;
  std::uint64_t dims_count = 0;
  std::uint64_t strings_size = 0;
  std::uint64_t data_offset = 0;
  std::uint64_t data_size = 0;
  std::uint64_t metadata_offset = 0;
  std::uint64_t metadata_size = 0;
  std::uint64_t file_size = 0;
  std::uint64_t metadata_checksum = 0;
  Fingerprint fingerprint;
  std::uint64_t user_metadata_offset = 0;  ///< within the strings section
  std::uint64_t user_metadata_size = 0;
};

/// The decoded tables of the metadata region.
struct StoreTables {
  std::vector<BlockInfo> blocks;
  std::vector<TensorInfo> tensors;
  std::vector<ChunkInfo> chunks;  ///< the chunks of every compressed block, in block order
  std::string user_metadata;
};

/// Encodes `sb` into kSuperblockSize bytes (checksum included).
[[nodiscard]] std::vector<std::byte> encode_superblock(const Superblock& sb);

/// Encodes the metadata region for `blocks`, `tensors` and `chunks` (names, dims and user
/// metadata included) and fills the metadata-related fields of `sb` (counts, sizes,
/// checksum). Each block's chunk_count is written; its chunks are the next ones of `chunks`.
[[nodiscard]] std::vector<std::byte> encode_metadata(const std::vector<BlockInfo>& blocks,
                                                     const std::vector<TensorInfo>& tensors,
                                                     const std::vector<ChunkInfo>& chunks,
                                                     std::string_view user_metadata,
                                                     Superblock& sb);

/// Decodes and validates the superblock from the first bytes of a file of `file_size`
/// bytes. `source` names the file in errors. `check_checksums` = false is for fuzzing only.
[[nodiscard]] Superblock decode_superblock(std::span<const std::byte> bytes,
                                           std::uint64_t file_size, std::string_view source,
                                           bool check_checksums = true);

/// Decodes and validates the metadata region described by `sb`.
[[nodiscard]] StoreTables decode_metadata(const Superblock& sb, std::span<const std::byte> metadata,
                                          std::string_view source, bool check_checksums = true);

/// Rounds `value` up to a multiple of the power of two `alignment`; false on overflow.
[[nodiscard]] bool align_up(std::uint64_t value, std::uint64_t alignment,
                            std::uint64_t& out) noexcept;

/// a + b and a × b with overflow detection (false on overflow).
[[nodiscard]] bool checked_add(std::uint64_t a, std::uint64_t b, std::uint64_t& out) noexcept;
[[nodiscard]] bool checked_mul(std::uint64_t a, std::uint64_t b, std::uint64_t& out) noexcept;

/// Byte size of a tensor of `dtype` and `shape`: false on a negative dimension, an unknown
/// dtype or overflow.
[[nodiscard]] bool tensor_nbytes(DType dtype, std::span<const std::int64_t> shape,
                                 std::uint64_t& out) noexcept;

}  // namespace tensorstream::detail
