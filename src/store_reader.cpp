#include <fcntl.h>

#include <algorithm>

#include "tensorstream/detail/store_format.hpp"
#include "tensorstream/errors.hpp"
#include "tensorstream/store.hpp"

namespace tensorstream {

Store Store::open(const std::filesystem::path& path) {
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
  return store;
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

void Store::read_block(std::size_t block, std::span<std::byte> out, bool verify) const {
  TS_EXPECT(block < blocks_.size(), std::out_of_range, "block index ", block, " out of range (",
            blocks_.size(), " blocks in '", path().string(), "')");
  const auto& b = blocks_[block];
  TS_EXPECT(out.size() == b.raw_size, std::invalid_argument, "buffer of ", out.size(),
            " bytes for block '", b.name, "' of ", b.raw_size, " bytes");
  fd_.pread_exact(out, b.offset);
  if (verify) {
    const auto actual = checksum64(out);
    TS_EXPECT(actual == b.checksum, ChecksumError, "checksum mismatch in '", path().string(),
              "', block '", b.name, "' (", b.stored_size, " bytes at offset ", b.offset,
              "): stored ", std::hex, b.checksum, ", computed ", actual);
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
