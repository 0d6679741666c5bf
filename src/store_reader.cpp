#include <fcntl.h>

#include <algorithm>

#include "tensorstream/codec.hpp"
#include "tensorstream/detail/store_format.hpp"
#include "tensorstream/errors.hpp"
#include "tensorstream/store.hpp"

namespace tensorstream {

Store Store::open(const std::filesystem::path& path, const OpenOptions& options) {
  Store store;
  store.fd_ = detail::FileDescriptor(path, O_RDONLY);
  const std::string source = path.string();
  const std::uint64_t file_size = store.fd_.size();

  std::vector<std::byte> superblock(std::min<std::uint64_t>(file_size, detail::kSuperblockSize));
  store.fd_.pread_exact(superblock, 0);
  const auto sb = detail::decode_superblock(superblock, file_size, source);

  std::vector<std::byte> metadata(sb.metadata_size);  // capped by decode_superblock
  store.fd_.pread_exact(metadata, sb.metadata_offset);
  auto tables = detail::decode_metadata(sb, metadata, source);

  store.info_ = StoreInfo{sb.version_major,
                          sb.version_minor,
                          sb.block_alignment,
                          sb.tensor_alignment,
                          sb.file_size,
                          sb.data_offset,
                          sb.data_size,
                          sb.metadata_offset,
                          sb.metadata_size,
                          sb.fingerprint,
                          std::move(tables.user_metadata)};
  store.blocks_ = std::move(tables.blocks);
  store.tensors_ = std::move(tables.tensors);
  store.chunks_ = std::move(tables.chunks);
  for (std::size_t i = 0; i < store.blocks_.size(); ++i) {
    const auto& b = store.blocks_[i];
    if (b.codec == Codec::kNone) continue;
    TS_EXPECT(options.decode_compressed, FormatError, "store '", source,
              "' has compressed blocks (the first is block '", b.name, "', blocks[", i, "], ",
              b.chunk_count, " chunks, ", b.stored_size, " bytes stored for ", b.raw_size,
              " raw); it was opened for reading block extents as raw bytes, which would "
              "misread them. Open it to decode (OpenOptions::decode_compressed; Python "
              "_core.Store(path, decode_compressed=True)) and read it with read_block / "
              "read_tensor or the streaming engine, which decode");
    if (codec::available()) break;
    for (std::uint32_t k = 0; k < b.chunk_count; ++k) {
      const auto& c = store.chunks_[b.first_chunk + k];
      TS_EXPECT(c.codec == ChunkCodec::kRaw, FormatError, "store '", source, "': chunk ", k,
                " of block '", b.name, "' (blocks[", i, "]) is compressed (", codec::name(c.codec),
                "), but ", codec::describe());
    }
  }
  return store;
}

std::span<const ChunkInfo> Store::block_chunks(std::size_t block) const {
  TS_EXPECT(block < blocks_.size(), std::out_of_range, "block index ", block, " out of range (",
            blocks_.size(), " blocks)");
  const auto& b = blocks_[block];
  return std::span<const ChunkInfo>(chunks_).subspan(b.first_chunk, b.chunk_count);
}

std::span<const TensorInfo> Store::block_tensors(std::size_t block) const {
  TS_EXPECT(block < blocks_.size(), std::out_of_range, "block index ", block, " out of range (",
            blocks_.size(), " blocks)");
  const auto& b = blocks_[block];
  return std::span<const TensorInfo>(tensors_).subspan(b.first_tensor, b.tensor_count);
}

std::optional<std::size_t> Store::find_block(std::string_view name) const noexcept {
  for (std::size_t i = 0; i < blocks_.size(); ++i) {
    if (blocks_[i].name == name) return i;
  }
  return std::nullopt;
}

std::optional<std::size_t> Store::find_tensor(std::string_view name) const noexcept {
  for (std::size_t i = 0; i < tensors_.size(); ++i) {
    if (tensors_[i].name == name) return i;
  }
  return std::nullopt;
}

std::uint64_t Store::max_block_size() const noexcept {
  std::uint64_t largest = 0;
  for (const auto& b : blocks_) largest = std::max(largest, b.raw_size);
  return largest;
}

void Store::read_block(std::size_t block, std::span<std::byte> out, bool verify,
                       const ParallelFor& parallel) const {
  TS_EXPECT(block < blocks_.size(), std::out_of_range, "block index ", block, " out of range (",
            blocks_.size(), " blocks in '", path().string(), "')");
  const auto& b = blocks_[block];
  TS_EXPECT(out.size() == b.raw_size, std::invalid_argument, "buffer of ", out.size(),
            " bytes for block '", b.name, "' of ", b.raw_size, " bytes");
  if (b.codec == Codec::kNone) {
    fd_.pread_exact(out, b.offset);
    if (verify) {
      const auto actual = checksum64(out);
      TS_EXPECT(actual == b.checksum, ChecksumError, "checksum mismatch in '", path().string(),
                "', block '", b.name, "' (", b.stored_size, " bytes at offset ", b.offset,
                "): stored ", std::hex, b.checksum, ", computed ", actual);
    }
    return;
  }
  const std::string file = path().string();
  const auto chunks = block_chunks(block);
  std::vector<std::byte> stored(b.stored_size);
  fd_.pread_exact(stored, b.offset);
  if (verify) {
    const auto actual = checksum64(stored);
    if (actual != b.checksum) {
      // Name the first damaged chunk where there is one.
      for (std::size_t k = 0; k < chunks.size(); ++k) {
        const auto& c = chunks[k];
        const auto chunk_actual =
            checksum64(std::span<const std::byte>(stored).subspan(c.stored_offset, c.stored_size));
        TS_EXPECT(chunk_actual == c.checksum, ChecksumError, "checksum mismatch in '", file,
                  "', block '", b.name, "', chunk ", k, " (", c.stored_size,
                  " stored bytes at offset ", b.offset + c.stored_offset, "): stored ", std::hex,
                  c.checksum, ", computed ", chunk_actual);
      }
      throw ChecksumError(detail::concat("checksum mismatch in '", file, "', block '", b.name,
                                         "' (", b.stored_size, " stored bytes at offset ", b.offset,
                                         "): stored ", std::hex, b.checksum, ", computed ",
                                         actual));
    }
  }
  codec::BlockDecode job;
  job.file = file;
  job.block_name = b.name;
  job.block = block;
  job.chunks = chunks;
  job.stored = stored;
  job.raw = out;
  codec::decode_block(job, parallel);
  if (verify) {
    const auto actual = checksum64(out);
    TS_EXPECT(actual == b.raw_checksum, ChecksumError, "checksum mismatch in '", file, "', block '",
              b.name, "' after decoding (", b.raw_size, " raw bytes): stored raw_checksum ",
              std::hex, b.raw_checksum, ", computed ", actual);
  }
}

void Store::read_range(std::size_t block, std::uint64_t raw_offset, std::span<std::byte> out,
                       bool verify, const ParallelFor& parallel) const {
  TS_EXPECT(block < blocks_.size(), std::out_of_range, "block index ", block, " out of range (",
            blocks_.size(), " blocks in '", path().string(), "')");
  const auto& b = blocks_[block];
  TS_EXPECT(raw_offset <= b.raw_size && out.size() <= b.raw_size - raw_offset, std::out_of_range,
            "bytes [", raw_offset, ", +", out.size(), ") lie outside block '", b.name, "' of ",
            b.raw_size, " bytes in '", path().string(), "'");
  if (out.empty()) return;
  if (b.codec == Codec::kNone) {
    fd_.pread_exact(out, b.offset + raw_offset);
    return;
  }
  const std::string file = path().string();
  const auto chunks = block_chunks(block);
  const auto range = codec::chunks_covering(chunks, raw_offset, out.size());
  std::vector<std::byte> stored(range.stored_end - range.stored_begin);
  fd_.pread_exact(stored, b.offset + range.stored_begin);
  codec::BlockDecode job;
  job.file = file;
  job.block_name = b.name;
  job.block = block;
  job.chunks = chunks;
  job.stored = stored;
  job.stored_offset = range.stored_begin;
  job.raw = out;
  job.raw_offset = raw_offset;
  job.verify = verify;
  codec::decode_block(job, parallel);
}

void Store::read_tensor(std::size_t tensor, std::span<std::byte> out, bool verify) const {
  TS_EXPECT(tensor < tensors_.size(), std::out_of_range, "tensor index ", tensor, " out of range (",
            tensors_.size(), " tensors in '", path().string(), "')");
  const auto& t = tensors_[tensor];
  TS_EXPECT(out.size() == t.nbytes, std::invalid_argument, "buffer of ", out.size(),
            " bytes for tensor '", t.name, "' of ", t.nbytes, " bytes");
  read_range(t.block, t.offset_in_block, out, verify);
  if (verify) {
    const auto actual = checksum64(out);
    TS_EXPECT(actual == t.checksum, ChecksumError, "checksum mismatch in '", path().string(),
              "', tensor '", t.name, "' of block '", blocks_[t.block].name, "': stored ", std::hex,
              t.checksum, ", computed ", actual);
  }
}

std::vector<BlockProblem> Store::verify(
    const std::function<void(std::uint64_t, std::uint64_t)>& progress) const {
  std::uint64_t total = 0;
  for (const auto& b : blocks_) total += b.stored_size;
  std::vector<BlockProblem> problems;
  std::vector<std::byte> buffer;
  std::uint64_t done = 0;
  for (std::size_t i = 0; i < blocks_.size(); ++i) {
    buffer.resize(blocks_[i].raw_size);
    try {
      read_block(i, buffer, /*verify=*/true);
      // Each tensor has its own checksum too; a mismatch there with a good block checksum
      // means the metadata was forged or written wrongly.
      for (const auto& t : block_tensors(i)) {
        const auto actual =
            checksum64(std::span<const std::byte>(buffer).subspan(t.offset_in_block, t.nbytes));
        TS_EXPECT(actual == t.checksum, ChecksumError, "checksum mismatch in '", path().string(),
                  "', tensor '", t.name, "' of block '", blocks_[i].name, "'");
      }
    } catch (const Error& e) {
      problems.push_back({static_cast<std::uint32_t>(i), e.what()});
    }
    done += blocks_[i].stored_size;
    if (progress) progress(done, total);
  }
  return problems;
}

}  // namespace tensorstream
