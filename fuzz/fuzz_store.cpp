// libFuzzer target: the store superblock and metadata decoders on arbitrary file images.
// Checksums are checked in a second pass only, so the fuzzer can reach the field rules
// behind them. Any exception other than tensorstream::Error is a bug.
#include <cstddef>
#include <cstdint>
#include <span>

#include "tensorstream/detail/store_format.hpp"
#include "tensorstream/errors.hpp"

namespace {

void decode(std::span<const std::byte> file, bool check_checksums) {
  namespace detail = tensorstream::detail;
  try {
    const auto sb = detail::decode_superblock(file, file.size(), "fuzz-input", check_checksums);
    // decode_superblock guarantees the metadata region lies inside the file.
    (void)detail::decode_metadata(sb, file.subspan(sb.metadata_offset, sb.metadata_size),
                                  "fuzz-input", check_checksums);
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
