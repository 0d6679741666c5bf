// libFuzzer target: the store superblock and metadata decoders on arbitrary file images, and
// the decoding of every compressed block whose chunk table validates (its chunks read from
// the image, as Store::read_block reads them). Checksums are checked in a second pass only,
// so the fuzzer can reach the field rules behind them. Any exception other than
// tensorstream::Error is a bug.
#include <cstddef>
#include <cstdint>
#include <span>
#include <vector>

#include "tensorstream/codec.hpp"
#include "tensorstream/detail/store_format.hpp"
#include "tensorstream/errors.hpp"

namespace {

void decode(std::span<const std::byte> file, bool check_checksums) {
  namespace detail = tensorstream::detail;
  try {
    const auto sb = detail::decode_superblock(file, file.size(), "fuzz-input", check_checksums);
    // decode_superblock guarantees the metadata region lies inside the file.
    const auto tables = detail::decode_metadata(
        sb, file.subspan(sb.metadata_offset, sb.metadata_size), "fuzz-input", check_checksums);
    // decode_metadata guarantees each block's stored extent lies inside the data region.
    std::uint64_t decoded = 0;
    for (std::size_t i = 0; i < tables.blocks.size(); ++i) {
      const auto& b = tables.blocks[i];
      if (b.codec != tensorstream::Codec::kChunked || b.raw_size > (16u << 20)) continue;
      if ((decoded += b.raw_size) > (64u << 20)) break;
      std::vector<std::byte> raw(b.raw_size);
      namespace codec = tensorstream::codec;
      codec::BlockDecode job;
      job.file = "fuzz-input";
      job.block_name = b.name;
      job.block = i;
      job.chunks = std::span(tables.chunks).subspan(b.first_chunk, b.chunk_count);
      job.stored = file.subspan(b.offset, b.stored_size);
      job.raw = raw;
      job.verify = check_checksums;
      try {
        codec::decode_block(job);
      } catch (const tensorstream::Error&) {
      }
    }
  } catch (const tensorstream::Error&) {
  }
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  const std::span<const std::byte> file(reinterpret_cast<const std::byte*>(data), size);
  decode(file, /*check_checksums=*/false);
  decode(file, /*check_checksums=*/true);
  return 0;
}
