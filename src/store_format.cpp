#include "tensorstream/detail/store_format.hpp"

#include <algorithm>
#include <limits>
#include <unordered_set>

#include "tensorstream/detail/endian.hpp"
#include "tensorstream/errors.hpp"

namespace tensorstream::detail {
namespace {

// Superblock field offsets (docs/store-format.md, "Superblock").
constexpr std::size_t kOffMagic = 0;
constexpr std::size_t kOffVersionMajor = 8;
constexpr std::size_t kOffVersionMinor = 10;
constexpr std::size_t kOffFlags = 12;
constexpr std::size_t kOffBlockAlignment = 16;
constexpr std::size_t kOffTensorAlignment = 20;
constexpr std::size_t kOffBlockCount = 24;
constexpr std::size_t kOffTensorCount = 28;
constexpr std::size_t kOffDimsCount = 32;
constexpr std::size_t kOffStringsSize = 40;
constexpr std::size_t kOffDataOffset = 48;
constexpr std::size_t kOffDataSize = 56;
constexpr std::size_t kOffMetadataOffset = 64;
constexpr std::size_t kOffMetadataSize = 72;
constexpr std::size_t kOffFileSize = 80;
constexpr std::size_t kOffMetadataChecksum = 88;
constexpr std::size_t kOffFingerprintHigh = 96;
constexpr std::size_t kOffFingerprintLow = 104;
constexpr std::size_t kOffUserMetadataOffset = 112;
constexpr std::size_t kOffUserMetadataSize = 120;
constexpr std::size_t kOffSuperblockChecksum = 128;
static_assert(kOffSuperblockChecksum + 8 <= kSuperblockSize);

bool is_power_of_two(std::uint64_t v) noexcept { return v != 0 && (v & (v - 1)) == 0; }

// Builds "<file>: <field>: <cause>" FormatErrors.
class Checker {
 public:
  explicit Checker(std::string_view source) : source_(source) {}

  template <typename... Args>
  void expect(bool condition, std::string_view field, Args&&... cause) const {
    if (!condition) [[unlikely]] {
      throw FormatError(
          concat("invalid store '", source_, "': ", field, ": ", std::forward<Args>(cause)...));
    }
  }

 private:
  std::string_view source_;
};

std::string field_name(std::string_view table, std::size_t index, std::string_view field) {
  return concat(table, "[", index, "].", field);
}

// Bytes of the block, tensor, dims and string sections; false on overflow.
bool fixed_sections_size(const Superblock& sb, std::uint64_t& out) noexcept {
  std::uint64_t expected = 0;
  std::uint64_t part = 0;
  bool ok = checked_mul(sb.block_count, kBlockRecordSize, part) && checked_add(0, part, expected);
  ok = ok && checked_mul(sb.tensor_count, kTensorRecordSize, part) &&
       checked_add(expected, part, expected);
  ok = ok && checked_mul(sb.dims_count, 8, part) && checked_add(expected, part, expected);
  ok = ok && checked_add(expected, sb.strings_size, expected);
  out = expected;
  return ok;
}

}  // namespace

bool checked_add(std::uint64_t a, std::uint64_t b, std::uint64_t& out) noexcept {
  return !__builtin_add_overflow(a, b, &out);
}

bool checked_mul(std::uint64_t a, std::uint64_t b, std::uint64_t& out) noexcept {
  return !__builtin_mul_overflow(a, b, &out);
}

bool align_up(std::uint64_t value, std::uint64_t alignment, std::uint64_t& out) noexcept {
  std::uint64_t sum = 0;
  if (!checked_add(value, alignment - 1, sum)) return false;
  out = sum & ~(alignment - 1);
  return true;
}

bool tensor_nbytes(DType dtype, std::span<const std::int64_t> shape, std::uint64_t& out) noexcept {
  std::uint64_t n = dtype_size(dtype);
  if (n == 0) return false;
  for (const auto dim : shape) {
    if (dim < 0 || !checked_mul(n, static_cast<std::uint64_t>(dim), n)) return false;
  }
  out = n;
  return true;
}

std::vector<std::byte> encode_superblock(const Superblock& sb) {
  std::vector<std::byte> out(kSuperblockSize, std::byte{0});
  std::byte* p = out.data();
  std::copy(kStoreMagic.begin(), kStoreMagic.end(), p + kOffMagic);
  store_le(p + kOffVersionMajor, sb.version_major);
  store_le(p + kOffVersionMinor, sb.version_minor);
  store_le(p + kOffFlags, sb.flags);
  store_le(p + kOffBlockAlignment, sb.block_alignment);
  store_le(p + kOffTensorAlignment, sb.tensor_alignment);
  store_le(p + kOffBlockCount, sb.block_count);
  store_le(p + kOffTensorCount, sb.tensor_count);
  store_le(p + kOffDimsCount, sb.dims_count);
  store_le(p + kOffStringsSize, sb.strings_size);
  store_le(p + kOffDataOffset, sb.data_offset);
  store_le(p + kOffDataSize, sb.data_size);
  store_le(p + kOffMetadataOffset, sb.metadata_offset);
  store_le(p + kOffMetadataSize, sb.metadata_size);
  store_le(p + kOffFileSize, sb.file_size);
  store_le(p + kOffMetadataChecksum, sb.metadata_checksum);
  store_le(p + kOffFingerprintHigh, sb.fingerprint.high);
  store_le(p + kOffFingerprintLow, sb.fingerprint.low);
  store_le(p + kOffUserMetadataOffset, sb.user_metadata_offset);
  store_le(p + kOffUserMetadataSize, sb.user_metadata_size);
  store_le(p + kOffSuperblockChecksum,
           checksum64(std::span<const std::byte>(p, kOffSuperblockChecksum)));
  return out;
}

std::vector<std::byte> encode_metadata(const std::vector<BlockInfo>& blocks,
                                       const std::vector<TensorInfo>& tensors,
                                       const std::vector<ChunkInfo>& chunks,
                                       std::string_view user_metadata, Superblock& sb) {
  std::string strings;
  std::vector<std::uint64_t> dims;
  std::vector<std::byte> table(blocks.size() * kBlockRecordSize +
                               tensors.size() * kTensorRecordSize +
                               chunks.size() * kChunkRecordSize);
  auto add_string = [&strings](std::string_view s) {
    const auto offset = strings.size();
    strings.append(s);
    return offset;
  };

  std::byte* p = table.data();
  for (const auto& b : blocks) {
    const auto name_offset = add_string(b.name);
    store_le(p + 0, b.offset);
    store_le(p + 8, b.stored_size);
    store_le(p + 16, b.raw_size);
    store_le(p + 24, b.checksum);
    store_le(p + 32, b.raw_checksum);
    store_le(p + 40, b.first_tensor);
    store_le(p + 44, b.tensor_count);
    store_le(p + 48, static_cast<std::uint32_t>(name_offset));
    store_le(p + 52, static_cast<std::uint32_t>(b.name.size()));
    store_le(p + 56, static_cast<std::uint16_t>(b.codec));
    store_le(p + 60, b.chunk_count);
    p += kBlockRecordSize;
  }
  for (const auto& t : tensors) {
    const auto name_offset = add_string(t.name);
    store_le(p + 0, t.offset_in_block);
    store_le(p + 8, t.nbytes);
    store_le(p + 16, t.checksum);
    store_le(p + 24, static_cast<std::uint64_t>(dims.size()));
    store_le(p + 32, static_cast<std::uint32_t>(name_offset));
    store_le(p + 36, static_cast<std::uint32_t>(t.name.size()));
    store_le(p + 40, t.block);
    store_le(p + 44, static_cast<std::uint16_t>(t.dtype));
    store_le(p + 46, static_cast<std::uint16_t>(t.shape.size()));
    for (const auto d : t.shape) dims.push_back(static_cast<std::uint64_t>(d));
    p += kTensorRecordSize;
  }
  for (const auto& c : chunks) {
    store_le(p + 0, c.raw_offset);
    store_le(p + 8, c.stored_offset);
    store_le(p + 16, c.raw_size);
    store_le(p + 20, c.stored_size);
    store_le(p + 24, c.checksum);
    store_le(p + 32, static_cast<std::uint8_t>(c.codec));
    store_le(p + 33, c.plane_width);
    store_le(p + 34, c.level);
    p += kChunkRecordSize;
  }
  sb.user_metadata_offset = add_string(user_metadata);
  sb.user_metadata_size = user_metadata.size();
  TS_EXPECT(strings.size() <= std::numeric_limits<std::uint32_t>::max(), std::invalid_argument,
            "store names take ", strings.size(), " bytes, more than the format's 4 GiB limit");

  std::vector<std::byte> out = std::move(table);
  const auto dims_at = out.size();
  out.resize(dims_at + dims.size() * 8 + strings.size());
  for (std::size_t i = 0; i < dims.size(); ++i) store_le(out.data() + dims_at + 8 * i, dims[i]);
  std::copy(reinterpret_cast<const std::byte*>(strings.data()),
            reinterpret_cast<const std::byte*>(strings.data()) + strings.size(),
            out.data() + dims_at + dims.size() * 8);

  sb.block_count = static_cast<std::uint32_t>(blocks.size());
  sb.tensor_count = static_cast<std::uint32_t>(tensors.size());
  sb.dims_count = dims.size();
  sb.strings_size = strings.size();
  sb.metadata_size = out.size();
  sb.metadata_checksum = checksum64(out);
  return out;
}

Superblock decode_superblock(std::span<const std::byte> bytes, std::uint64_t file_size,
                             std::string_view source, bool check_checksums) {
  const Checker check(source);
  check.expect(file_size >= kSuperblockSize && bytes.size() >= kSuperblockSize, "superblock",
               "file is ", file_size, " bytes, smaller than the ", kSuperblockSize,
               "-byte superblock (truncated or not a store)");
  const std::byte* p = bytes.data();
  check.expect(std::equal(kStoreMagic.begin(), kStoreMagic.end(), p + kOffMagic), "magic",
               "not a TensorStream store (bad magic)");
  if (check_checksums) {
    const auto expected = load_le<std::uint64_t>(p + kOffSuperblockChecksum);
    const auto actual = checksum64(std::span<const std::byte>(p, kOffSuperblockChecksum));
    check.expect(expected == actual, "superblock_checksum",
                 "superblock is corrupt (checksum mismatch)");
  }

  Superblock sb;
  sb.version_major = load_le<std::uint16_t>(p + kOffVersionMajor);
  sb.version_minor = load_le<std::uint16_t>(p + kOffVersionMinor);
  sb.flags = load_le<std::uint32_t>(p + kOffFlags);
  sb.block_alignment = load_le<std::uint32_t>(p + kOffBlockAlignment);
  sb.tensor_alignment = load_le<std::uint32_t>(p + kOffTensorAlignment);
  sb.block_count = load_le<std::uint32_t>(p + kOffBlockCount);
  sb.tensor_count = load_le<std::uint32_t>(p + kOffTensorCount);
  sb.dims_count = load_le<std::uint64_t>(p + kOffDimsCount);
  sb.strings_size = load_le<std::uint64_t>(p + kOffStringsSize);
  sb.data_offset = load_le<std::uint64_t>(p + kOffDataOffset);
  sb.data_size = load_le<std::uint64_t>(p + kOffDataSize);
  sb.metadata_offset = load_le<std::uint64_t>(p + kOffMetadataOffset);
  sb.metadata_size = load_le<std::uint64_t>(p + kOffMetadataSize);
  sb.file_size = load_le<std::uint64_t>(p + kOffFileSize);
  sb.metadata_checksum = load_le<std::uint64_t>(p + kOffMetadataChecksum);
  sb.fingerprint.high = load_le<std::uint64_t>(p + kOffFingerprintHigh);
  sb.fingerprint.low = load_le<std::uint64_t>(p + kOffFingerprintLow);
  sb.user_metadata_offset = load_le<std::uint64_t>(p + kOffUserMetadataOffset);
  sb.user_metadata_size = load_le<std::uint64_t>(p + kOffUserMetadataSize);

  check.expect(sb.version_major == kStoreVersionMajor, "version", "format version ",
               sb.version_major, ".", sb.version_minor, " is not supported (this build reads ",
               kStoreVersionMajor, ".x)");
  check.expect(sb.flags == 0, "flags", "unknown flags 0x", std::hex, sb.flags);
  check.expect(is_power_of_two(sb.block_alignment) && sb.block_alignment >= kBlockAlignment &&
                   sb.block_alignment <= (1u << 30),
               "block_alignment", sb.block_alignment,
               " is not a power of two between 4096 and 2^30");
  check.expect(is_power_of_two(sb.tensor_alignment) && sb.tensor_alignment >= kTensorAlignment &&
                   sb.tensor_alignment <= sb.block_alignment,
               "tensor_alignment", sb.tensor_alignment,
               " is not a power of two between 256 and block_alignment");
  check.expect(sb.file_size == file_size, "file_size", "header records ", sb.file_size,
               " bytes but the file has ", file_size, " (truncated or extended)");
  check.expect(sb.data_offset >= kSuperblockSize && sb.data_offset % sb.block_alignment == 0,
               "data_offset", sb.data_offset,
               " is not a multiple of block_alignment past the superblock");
  std::uint64_t data_end = 0;
  check.expect(
      checked_add(sb.data_offset, sb.data_size, data_end) && data_end == sb.metadata_offset,
      "data_size", "data region [", sb.data_offset, ", +", sb.data_size,
      ") does not end where the metadata starts (", sb.metadata_offset, ")");
  std::uint64_t metadata_end = 0;
  check.expect(
      checked_add(sb.metadata_offset, sb.metadata_size, metadata_end) && metadata_end == file_size,
      "metadata_size", "metadata region [", sb.metadata_offset, ", +", sb.metadata_size,
      ") does not end at the end of the file (", file_size, ")");
  check.expect(sb.metadata_size <= kMaxMetadataSize, "metadata_size", sb.metadata_size,
               " bytes exceeds the limit of ", kMaxMetadataSize);

  // Every count must be consistent with the metadata size: this bounds all allocations
  // made while decoding by the (capped) metadata size. The chunk table (format 1.1) takes
  // the rest; its size follows from the block table and is checked by decode_metadata.
  std::uint64_t expected = 0;
  check.expect(fixed_sections_size(sb, expected) && expected <= sb.metadata_size &&
                   (sb.metadata_size - expected) % kChunkRecordSize == 0,
               "metadata_size",
               "does not match block_count, tensor_count, dims_count and strings_size");
  std::uint64_t user_end = 0;
  check.expect(checked_add(sb.user_metadata_offset, sb.user_metadata_size, user_end) &&
                   user_end <= sb.strings_size,
               "user_metadata", "range lies outside the string table");
  return sb;
}

StoreTables decode_metadata(const Superblock& sb, std::span<const std::byte> metadata,
                            std::string_view source, bool check_checksums) {
  const Checker check(source);
  check.expect(metadata.size() == sb.metadata_size, "metadata", "expected ", sb.metadata_size,
               " bytes, got ", metadata.size());
  if (check_checksums) {
    check.expect(checksum64(metadata) == sb.metadata_checksum, "metadata_checksum",
                 "metadata region is corrupt (checksum mismatch)");
  }
  // The chunk table's length follows from the block table: sum the blocks' chunk counts
  // first (each is checked against its codec below).
  const std::byte* blocks_at = metadata.data();
  std::uint64_t fixed_size = 0;
  check.expect(fixed_sections_size(sb, fixed_size) && fixed_size <= metadata.size(),
               "metadata_size",
               "does not match block_count, tensor_count, dims_count and strings_size");
  std::uint64_t chunk_total = 0;
  for (std::uint32_t i = 0; i < sb.block_count; ++i) {
    chunk_total += load_le<std::uint32_t>(blocks_at + std::size_t{i} * kBlockRecordSize + 60);
  }
  std::uint64_t chunk_bytes = 0;
  check.expect(checked_mul(chunk_total, kChunkRecordSize, chunk_bytes) &&
                   chunk_bytes == metadata.size() - fixed_size,
               "metadata_size", "the blocks record ", chunk_total,
               " chunks, but the metadata has room for ",
               (metadata.size() - fixed_size) / kChunkRecordSize, " chunk records (",
               metadata.size() - fixed_size, " bytes)");
  const std::byte* tensors_at = blocks_at + std::size_t{sb.block_count} * kBlockRecordSize;
  const std::byte* chunks_at = tensors_at + std::size_t{sb.tensor_count} * kTensorRecordSize;
  const std::byte* dims_at = chunks_at + chunk_bytes;
  const std::byte* strings_at = dims_at + sb.dims_count * 8;
  const std::string_view strings(reinterpret_cast<const char*>(strings_at), sb.strings_size);

  auto name_at = [&](std::string_view field, std::uint32_t offset, std::uint32_t size) {
    std::uint64_t end = 0;
    check.expect(checked_add(offset, size, end) && end <= strings.size(), field, "name range [",
                 offset, ", +", size, ") lies outside the string table");
    check.expect(size > 0, field, "empty name");
    return strings.substr(offset, size);
  };

  StoreTables out;
  out.user_metadata = std::string(strings.substr(sb.user_metadata_offset, sb.user_metadata_size));
  out.blocks.resize(sb.block_count);
  out.tensors.resize(sb.tensor_count);
  out.chunks.resize(chunk_total);

  std::unordered_set<std::string_view> block_names;
  std::unordered_set<std::string_view> tensor_names;
  std::uint64_t next_tensor = 0;
  std::uint32_t next_chunk = 0;
  const std::uint64_t data_end = sb.data_offset + sb.data_size;  // checked by decode_superblock
  for (std::uint32_t i = 0; i < sb.block_count; ++i) {
    const std::byte* r = blocks_at + std::size_t{i} * kBlockRecordSize;
    BlockInfo& b = out.blocks[i];
    const auto field = [&](std::string_view f) { return field_name("blocks", i, f); };
    b.offset = load_le<std::uint64_t>(r + 0);
    b.stored_size = load_le<std::uint64_t>(r + 8);
    b.raw_size = load_le<std::uint64_t>(r + 16);
    b.checksum = load_le<std::uint64_t>(r + 24);
    b.raw_checksum = load_le<std::uint64_t>(r + 32);
    b.first_tensor = load_le<std::uint32_t>(r + 40);
    b.tensor_count = load_le<std::uint32_t>(r + 44);
    const auto name =
        name_at(field("name"), load_le<std::uint32_t>(r + 48), load_le<std::uint32_t>(r + 52));
    b.name = std::string(name);
    check.expect(block_names.insert(name).second, field("name"), "duplicate block name '", name,
                 "'");
    const auto codec = load_le<std::uint16_t>(r + 56);
    const bool chunked = codec == static_cast<std::uint16_t>(Codec::kChunked);
    check.expect(codec == static_cast<std::uint16_t>(Codec::kNone) || chunked, field("codec"),
                 "codec ", codec, " of block '", name, "' is not supported by this version");
    check.expect(!chunked || sb.version_minor >= 1, field("codec"), "block '", name,
                 "' is compressed, which format version ", sb.version_major, ".", sb.version_minor,
                 " does not allow (compressed blocks need 1.1)");
    b.codec = static_cast<Codec>(codec);
    check.expect(load_le<std::uint16_t>(r + 58) == 0, field("flags"),
                 "reserved bits set in block '", name, "'");
    b.chunk_count = load_le<std::uint32_t>(r + 60);
    check.expect(chunked ? b.chunk_count > 0 : b.chunk_count == 0, field("chunk_count"), "block '",
                 name, "' ",
                 chunked ? "is compressed but has no chunks" : "is not compressed but has chunks");
    b.first_chunk = next_chunk;
    next_chunk += b.chunk_count;  // the sum was checked against the metadata size above
    check.expect(b.offset % sb.block_alignment == 0 && b.offset >= sb.data_offset, field("offset"),
                 "block '", name, "' at ", b.offset,
                 " is not block-aligned inside the data region");
    std::uint64_t end = 0;
    check.expect(checked_add(b.offset, b.stored_size, end) && end <= data_end, field("stored_size"),
                 "block '", name, "' [", b.offset, ", +", b.stored_size,
                 ") extends past the data region (ends at ", data_end, ")");
    if (!chunked) {
      check.expect(b.raw_size == b.stored_size && b.raw_checksum == b.checksum, field("raw_size"),
                   "block '", name, "' is not encoded, so raw and stored size/checksum must match");
    }
    check.expect(b.first_tensor == next_tensor, field("first_tensor"), "block '", name,
                 "' starts at tensor ", b.first_tensor, ", expected ", next_tensor);
    check.expect(
        checked_add(next_tensor, b.tensor_count, next_tensor) && next_tensor <= sb.tensor_count,
        field("tensor_count"), "block '", name, "' claims tensors beyond the table");

    // Chunks tile the block's raw bytes and its stored bytes, in order, without gaps.
    std::uint64_t raw_at = 0;
    std::uint64_t stored_at = 0;
    for (std::uint32_t k = 0; k < b.chunk_count; ++k) {
      const std::uint32_t ci = b.first_chunk + k;
      const std::byte* cr = chunks_at + std::size_t{ci} * kChunkRecordSize;
      ChunkInfo& c = out.chunks[ci];
      const auto cfield = [&](std::string_view f) { return field_name("chunks", ci, f); };
      c.raw_offset = load_le<std::uint64_t>(cr + 0);
      c.stored_offset = load_le<std::uint64_t>(cr + 8);
      c.raw_size = load_le<std::uint32_t>(cr + 16);
      c.stored_size = load_le<std::uint32_t>(cr + 20);
      c.checksum = load_le<std::uint64_t>(cr + 24);
      const auto chunk_codec = load_le<std::uint8_t>(cr + 32);
      c.plane_width = load_le<std::uint8_t>(cr + 33);
      c.level = load_le<std::uint8_t>(cr + 34);
      check.expect(c.raw_offset == raw_at, cfield("raw_offset"), "chunk ", k, " of block '", name,
                   "' starts at raw byte ", c.raw_offset, ", expected ", raw_at);
      check.expect(c.stored_offset == stored_at, cfield("stored_offset"), "chunk ", k,
                   " of block '", name, "' starts at stored byte ", c.stored_offset, ", expected ",
                   stored_at);
      check.expect(c.raw_size > 0 && c.raw_size <= kMaxChunkRawSize, cfield("raw_size"), "chunk ",
                   k, " of block '", name, "' has ", c.raw_size, " raw bytes (must be 1..",
                   kMaxChunkRawSize, ")");
      check.expect(load_le<std::uint8_t>(cr + 35) == 0 && load_le<std::uint32_t>(cr + 36) == 0,
                   cfield("reserved"), "reserved bytes set in chunk ", k, " of block '", name, "'");
      switch (chunk_codec) {
        case static_cast<std::uint8_t>(ChunkCodec::kRaw):
          check.expect(c.stored_size == c.raw_size, cfield("stored_size"), "raw chunk ", k,
                       " of block '", name, "' has ", c.stored_size, " stored bytes for ",
                       c.raw_size, " raw bytes");
          check.expect(c.plane_width == 1 && c.level == 0, cfield("codec"), "raw chunk ", k,
                       " of block '", name, "' records a plane width or a level");
          break;
        case static_cast<std::uint8_t>(ChunkCodec::kZstd):
        case static_cast<std::uint8_t>(ChunkCodec::kBytePlanesZstd): {
          const bool planar = chunk_codec == static_cast<std::uint8_t>(ChunkCodec::kBytePlanesZstd);
          check.expect(c.stored_size > 0 && c.stored_size <= c.raw_size, cfield("stored_size"),
                       "compressed chunk ", k, " of block '", name, "' has ", c.stored_size,
                       " stored bytes for ", c.raw_size, " raw bytes");
          check.expect(planar ? (c.plane_width == 2 || c.plane_width == 4 || c.plane_width == 8)
                              : c.plane_width == 1,
                       cfield("plane_width"), "chunk ", k, " of block '", name,
                       "' has byte-plane width ", static_cast<int>(c.plane_width));
          check.expect(c.level >= 1 && c.level <= 9, cfield("level"), "compressed chunk ", k,
                       " of block '", name, "' records level ", static_cast<int>(c.level),
                       " (must be 1..9)");
          break;
        }
        default:
          check.expect(false, cfield("codec"), "chunk ", k, " of block '", name,
                       "' has unknown codec ", static_cast<int>(chunk_codec));
      }
      c.codec = static_cast<ChunkCodec>(chunk_codec);
      raw_at += c.raw_size;
      stored_at += c.stored_size;
    }
    if (chunked) {
      check.expect(raw_at == b.raw_size, field("raw_size"), "the chunks of block '", name,
                   "' hold ", raw_at, " raw bytes, the block records ", b.raw_size);
      check.expect(stored_at == b.stored_size, field("stored_size"), "the chunks of block '", name,
                   "' hold ", stored_at, " stored bytes, the block records ", b.stored_size);
    }
  }
  check.expect(next_tensor == sb.tensor_count, "tensor_count", "blocks hold ", next_tensor,
               " tensors but the table has ", sb.tensor_count);

  // Extents must not overlap: sort by offset and compare neighbours.
  std::vector<std::uint32_t> by_offset(sb.block_count);
  for (std::uint32_t i = 0; i < sb.block_count; ++i) by_offset[i] = i;
  std::sort(by_offset.begin(), by_offset.end(),
            [&](auto a, auto b) { return out.blocks[a].offset < out.blocks[b].offset; });
  for (std::size_t k = 1; k < by_offset.size(); ++k) {
    const auto& prev = out.blocks[by_offset[k - 1]];
    const auto& cur = out.blocks[by_offset[k]];
    check.expect(prev.offset + prev.stored_size <= cur.offset,
                 field_name("blocks", by_offset[k], "offset"), "block '", cur.name,
                 "' overlaps block '", prev.name, "'");
  }

  for (std::uint32_t bi = 0; bi < sb.block_count; ++bi) {
    const BlockInfo& b = out.blocks[bi];
    std::uint64_t prev_end = 0;
    for (std::uint32_t ti = b.first_tensor; ti < b.first_tensor + b.tensor_count; ++ti) {
      const std::byte* r = tensors_at + std::size_t{ti} * kTensorRecordSize;
      TensorInfo& t = out.tensors[ti];
      const auto field = [&](std::string_view f) { return field_name("tensors", ti, f); };
      t.offset_in_block = load_le<std::uint64_t>(r + 0);
      t.nbytes = load_le<std::uint64_t>(r + 8);
      t.checksum = load_le<std::uint64_t>(r + 16);
      const auto dims_index = load_le<std::uint64_t>(r + 24);
      const auto name =
          name_at(field("name"), load_le<std::uint32_t>(r + 32), load_le<std::uint32_t>(r + 36));
      t.name = std::string(name);
      check.expect(tensor_names.insert(name).second, field("name"), "duplicate tensor name '", name,
                   "'");
      t.block = load_le<std::uint32_t>(r + 40);
      check.expect(t.block == bi, field("block"), "tensor '", name, "' records block ", t.block,
                   " but lies in block ", bi);
      const auto dtype = load_le<std::uint16_t>(r + 44);
      check.expect(dtype_is_valid(dtype), field("dtype"), "tensor '", name, "' has unknown dtype ",
                   dtype);
      t.dtype = static_cast<DType>(dtype);
      const auto ndim = load_le<std::uint16_t>(r + 46);
      check.expect(ndim <= kMaxTensorRank, field("ndim"), "tensor '", name, "' has rank ", ndim,
                   " (limit ", kMaxTensorRank, ")");
      std::uint64_t dims_end = 0;
      check.expect(checked_add(dims_index, ndim, dims_end) && dims_end <= sb.dims_count,
                   field("dims"), "tensor '", name, "' shape lies outside the dims table");
      t.shape.resize(ndim);
      for (std::uint16_t d = 0; d < ndim; ++d) {
        const auto dim = load_le<std::uint64_t>(dims_at + (dims_index + d) * 8);
        check.expect(dim <= static_cast<std::uint64_t>(std::numeric_limits<std::int64_t>::max()),
                     field("dims"), "tensor '", name, "' has a negative dimension");
        t.shape[d] = static_cast<std::int64_t>(dim);
      }
      std::uint64_t expected = 0;
      check.expect(tensor_nbytes(t.dtype, t.shape, expected) && expected == t.nbytes,
                   field("nbytes"), "tensor '", name, "' records ", t.nbytes, " bytes but ",
                   dtype_name(t.dtype), " × its shape needs ",
                   tensor_nbytes(t.dtype, t.shape, expected) ? std::to_string(expected)
                                                             : std::string("an overflowing size"));
      check.expect(t.offset_in_block % sb.tensor_alignment == 0, field("offset_in_block"),
                   "tensor '", name, "' at ", t.offset_in_block, " is not aligned to ",
                   sb.tensor_alignment);
      check.expect(t.offset_in_block >= prev_end, field("offset_in_block"), "tensor '", name,
                   "' overlaps the tensor before it in block '", b.name, "'");
      std::uint64_t end = 0;
      check.expect(checked_add(t.offset_in_block, t.nbytes, end) && end <= b.raw_size,
                   field("nbytes"), "tensor '", name, "' extends past the end of block '", b.name,
                   "'");
      prev_end = end;
    }
    // No tensor may start inside a chunk: a chunk then holds bytes of one tensor at most
    // (and padding), so one tensor can be decoded without its neighbours.
    std::uint32_t k = 0;
    for (std::uint32_t ti = b.first_tensor; ti < b.first_tensor + b.tensor_count && b.chunk_count;
         ++ti) {
      const TensorInfo& t = out.tensors[ti];
      if (t.nbytes == 0) continue;
      const ChunkInfo* c = &out.chunks[b.first_chunk + k];
      while (c->raw_offset + c->raw_size <= t.offset_in_block) c = &out.chunks[b.first_chunk + ++k];
      check.expect(c->raw_offset == t.offset_in_block,
                   field_name("chunks", b.first_chunk + k, "raw_offset"), "chunk ", k,
                   " of block '", b.name, "' crosses the start of tensor '", t.name,
                   "' (a chunk may hold bytes of one tensor only)");
    }
  }
  return out;
}

}  // namespace tensorstream::detail
