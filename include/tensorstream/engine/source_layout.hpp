// What the engine streams, independent of the source's format: the source layout.
//
// A source is a list of files and a list of blocks. A block is the set of tensors loaded and
// released together (typically one decoder layer); in memory it is one buffer of `size`
// bytes, and on disk a list of extents, each one read:
//
//     Extent {file, file_offset, length}  ──read──►  buffer [buffer_offset + skip, ... + length)
//
// Every extent's *read region* is its file range widened to kIoAlignment boundaries
// (io::plan_read): it starts at a kIoAlignment-aligned `buffer_offset`, just past the
// previous extent's region, so the concurrent O_DIRECT reads of one block never overlap and
// an over-read never clobbers a neighbour; the extent's bytes start `skip` (= file_offset mod
// kIoAlignment) into it. A tensor therefore sits in memory with the alignment it has in its
// file, and a block's size in memory is the sum of its extents' regions. Placements
// (TensorPlacement) say where each tensor lies in the buffer; they are the same whichever
// reader fills it (host, in place or GPUDirect Storage), and Engine::tensors() hands them out.
//
// Two sources exist today:
//   layout_of_store        a TensorStream store: one extent per block (the block's aligned
//                          extent, with the stored block checksum), its tensors at their
//                          offsets in the block
//
// Compressed store blocks (codec.hpp) are decoded on the way. An extent of such a block reads
// the stored bytes of the chunks that cover the raw bytes it wants (one contiguous range of
// the file, chunks_covering) and carries an ExtentDecode: the readers decode those chunks into
// the buffer, where the raw bytes land exactly where an uncompressed store's would (at
// buffer_offset + skip, skip = the raw offset mod kIoAlignment), so the buffer's layout and
// the placements do not depend on compression. Its `checksum` / `tensor_checksums` are over
// the decoded bytes (the block's raw_checksum, the tensors' checksums). Readers that write the
// read layout straight into memory (in place, GPUDirect Storage) cannot decode: a block with
// a decoded extent goes through the host reader (read_paths.hpp says so in the statistics).
// A block whose tensors are misaligned in the read layout can be repacked (pack_for_device):
// the reader then moves each tensor to a 256-aligned offset of the block's memory while
// copying it there (the GPU's host-to-device copy, or a move inside the CPU buffer), so what
// computes sees aligned tensors. Reading in place and GPUDirect Storage, which write the read
// layout straight into the block's memory, take only blocks that need no repacking.
//
//   layout_of_safetensors  a Hugging Face safetensors checkpoint read in place: blocks are
//                          caller-given tensor groups (or grouped by layer from the names),
//                          each laid out by layout_of_tensors
// layout_of_tensors is general: any tensors of any files, in any order, become one block
// whose runs of adjacent tensors are one extent each. A store block made of caller-given
// tensors would be laid out by it too.
//
// Thread-safety: values and pure functions (they read the files they are given).
#pragma once

#include <cstdint>
#include <filesystem>
#include <optional>
#include <span>
#include <string>
#include <utility>
#include <vector>

#include "tensorstream/dtype.hpp"
#include "tensorstream/store.hpp"

namespace tensorstream::engine {

/// Where one tensor of a block lies in the block's buffer (BlockView::host / device), and
/// where it lies in its source.
struct TensorPlacement {
  std::string name;
  DType dtype{};
  std::vector<std::int64_t> shape;
  std::uint64_t offset = 0;  ///< byte offset in the block's buffer
  std::uint64_t nbytes = 0;
  std::uint32_t file = 0;  ///< index into Layout::files
  /// Where its bytes start in that file; for a tensor of a compressed block (`compressed`
  /// set), where the block's stored bytes start.
  std::uint64_t file_offset = 0;
  /// A tensor of a compressed store block: the block (an index into Layout::compressed) and
  /// the tensor's offset in the block's decoded bytes.
  std::optional<std::uint32_t> compressed;
  std::uint64_t raw_offset = 0;
};

/// A stored checksum of one tensor inside an extent (a store's tensors, grouped by the
/// caller): verify_checksums checks each tensor's bytes instead of the extent's.
struct TensorChecksum {
  std::string name;
  std::uint64_t offset = 0;  ///< from the extent's first byte
  std::uint64_t nbytes = 0;
  std::uint64_t checksum = 0;
};

/// One move of a repacked block (pack_for_device): `nbytes` from `from` in the read layout to
/// `to` in the block's memory.
struct CopyRange {
  std::uint64_t from = 0;
  std::uint64_t to = 0;
  std::uint64_t nbytes = 0;
};

/// Blocks given by the caller: block name -> names of its tensors, in the order blocks run.
using TensorGroups = std::vector<std::pair<std::string, std::vector<std::string>>>;

/// A compressed block of a store (codec.hpp), as the readers need it to decode parts of it.
struct CompressedBlock {
  std::string name;               ///< the store block's name (messages)
  std::uint32_t index = 0;        ///< its index among the store's blocks (messages)
  std::uint32_t file = 0;         ///< index into Layout::files
  std::uint64_t file_offset = 0;  ///< where its stored bytes start in that file
  std::uint64_t raw_size = 0;     ///< its decoded size
  std::vector<ChunkInfo> chunks;  ///< its chunk table (Store::block_chunks)
};

/// How an extent's stored bytes become the bytes of the buffer: the extent's
/// [file_offset, file_offset + length) are stored bytes [stored_offset, stored_offset + length)
/// of Layout::compressed[block] — whole chunks, those that cover raw bytes [raw_offset,
/// raw_offset + raw_length) — and those raw bytes land at buffer_offset + skip.
struct ExtentDecode {
  std::uint32_t block = 0;          ///< index into Layout::compressed
  std::uint64_t raw_offset = 0;     ///< the first raw byte wanted, in the block's decoded bytes
  std::uint64_t raw_length = 0;     ///< raw bytes wanted (≥ 1)
  std::uint64_t stored_offset = 0;  ///< file_offset − the block's file_offset
};

/// One read of a block: `length` bytes at `file_offset` of files[file], landing at
/// `buffer_offset` + `skip` of the block's buffer (`buffer_offset` is kIoAlignment-aligned);
/// with `decode`, decoded there instead (see the top of this file).
struct Extent {
  std::uint32_t file = 0;
  std::uint64_t file_offset = 0;
  std::uint64_t length = 0;
  std::uint64_t buffer_offset = 0;        ///< start of the aligned read region
  std::uint64_t skip = 0;                 ///< where the bytes start inside the region
  std::string label;                      ///< tensor(s) read, for messages; empty for a store block
  std::optional<std::uint64_t> checksum;  ///< stored XXH3-64 of the bytes (a store), else none
  std::vector<TensorChecksum> tensor_checksums;  ///< without `checksum`: per tensor, if stored
  std::optional<ExtentDecode> decode;            ///< a compressed block's chunks, decoded

  /// Bytes the extent puts into the buffer (from buffer_offset + skip): its length, or the
  /// raw bytes it decodes to.
  [[nodiscard]] std::uint64_t buffer_bytes() const noexcept {
    return decode ? decode->raw_length : length;
  }
};

struct BlockLayout {
  std::string name;
  /// Bytes the extents' read regions take (the read layout).
  std::uint64_t size = 0;
  std::vector<Extent> extents;
  /// Where each tensor is in the block's memory: the read layout, or after pack_for_device
  /// the packed one.
  std::vector<TensorPlacement> tensors;
  /// Empty: the block's memory is its read layout. Else (pack_for_device) the moves from the
  /// read layout to the packed one, and the packed size.
  std::vector<CopyRange> copies;
  std::uint64_t packed_size = 0;

  /// Bytes of the block's memory: `packed_size` when packed, else `size`.
  [[nodiscard]] std::uint64_t memory_size() const noexcept {
    return copies.empty() ? size : packed_size;
  }
  /// Some of its extents are decoded (a compressed store block's chunks).
  [[nodiscard]] bool decoded() const noexcept;
};

struct Layout {
  std::filesystem::path source;  ///< for messages
  std::string kind;              ///< "store" or "checkpoint", for messages
  std::vector<std::filesystem::path> files;
  std::vector<BlockLayout> blocks;
  /// The compressed store blocks that extents decode (ExtentDecode::block); empty for an
  /// uncompressed source.
  std::vector<CompressedBlock> compressed;

  /// Sum of the blocks' sizes in memory.
  [[nodiscard]] std::uint64_t bytes() const noexcept;
  /// Blocks with a decoded extent.
  [[nodiscard]] std::size_t decoded_blocks() const noexcept;
};

/// One tensor where a source holds it, the input of layout_of_tensors.
struct SourceTensor {
  std::string name;
  DType dtype{};
  std::vector<std::int64_t> shape;
  std::uint32_t file = 0;  ///< index into Layout::files
  std::uint64_t file_offset = 0;
  std::uint64_t nbytes = 0;
};

/// The block `name` made of `tensors`: read in (file, offset) order, each run of tensors
/// adjacent in one file one extent (labelled "first" or "first .. last"; a run of zero bytes
/// reads nothing), regions laid out as described at the top of this file. Tensors at most
/// `max_gap` bytes apart count as adjacent (the gap, alignment padding, is read with them).
/// Placements keep the order of `tensors`. Throws std::invalid_argument if offsets overflow.
[[nodiscard]] BlockLayout layout_of_tensors(std::string name, std::span<const SourceTensor> tensors,
                                            std::uint64_t max_gap = 0);

/// Opens the store at `path` (Store::open, decoding compressed blocks: FormatError / IoError
/// for a bad store, FormatError for a compressed one in a build without zstd). Blocks: the
/// store's own (one extent each, its stored checksum, or for a compressed block one decoded
/// extent over all its chunks, checked by its raw_checksum), or, when `groups` is not empty,
/// the groups (block name -> tensor names, any of the store's tensors; tensors listed in no
/// group are not streamed), each laid out by layout_of_tensors across the store's padding,
/// verified by the tensors' stored checksums; tensors of a compressed block decode only the
/// chunks that cover them. Throws std::invalid_argument for bad groups as
/// layout_of_safetensors does.
[[nodiscard]] Layout layout_of_store(const std::filesystem::path& path,
                                     const TensorGroups& groups = {});

/// Tensors of the device's memory start at multiples of this (what cuBLAS's fastest kernels
/// and the CPU's vector loads want).
inline constexpr std::uint64_t kTensorPlacementAlignment = 256;

/// When a tensor of `block` is not at a multiple of kTensorPlacementAlignment in the read
/// layout (safetensors tensors keep their file alignment, often only 8 bytes), repacks it:
/// tensors placed in order at aligned offsets, `copies` the moves, `packed_size` the end.
/// No change when every tensor is aligned already. Returns whether it repacked.
bool pack_for_device(BlockLayout& block);

/// Opens the safetensors checkpoint at `path` (SafetensorsCheckpoint::open). Blocks: `groups`
/// (block name -> tensor names; tensors listed in no group are not streamed), or, when empty,
/// group_into_blocks over every tensor's name. Throws FormatError for a checkpoint without
/// tensors, std::invalid_argument for bad groups (an unknown or repeated tensor, a repeated or
/// empty block).
[[nodiscard]] Layout layout_of_safetensors(const std::filesystem::path& path,
                                           const TensorGroups& groups);

/// What a failure names: "block 'B' (N bytes at offset O of 'F')", or with the tensor(s)
/// of the extent: "block 'B', tensor 'T' (...)"; a decoded extent: "block 'B' (R bytes
/// decoded from N stored bytes at offset O of 'F', store block 'S')".
[[nodiscard]] std::string describe_extent(const Layout& layout, std::uint32_t block,
                                          std::size_t extent);

}  // namespace tensorstream::engine
