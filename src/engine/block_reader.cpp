#include "tensorstream/engine/detail/block_reader.hpp"

#include <ios>

#include "tensorstream/checksum.hpp"
#include "tensorstream/errors.hpp"

namespace tensorstream::engine::detail {

ExtentVerifier::ExtentVerifier(const Layout& layout) : layout_(layout) {
  first_.resize(layout.blocks.size());
  for (std::size_t i = 0; i < layout.blocks.size(); ++i) {
    first_[i].resize(layout.blocks[i].extents.size());
  }
}

void ExtentVerifier::check(std::uint32_t block, std::size_t extent,
                           std::span<const std::byte> data) {
  const auto& e = layout_.blocks[block].extents[extent];
  if (!e.checksum && !e.tensor_checksums.empty()) {
    for (const auto& t : e.tensor_checksums) {
      const auto actual = checksum64(data.subspan(t.offset, t.nbytes));
      TS_EXPECT(actual == t.checksum, ChecksumError, "checksum mismatch in tensor '", t.name,
                "' of ", describe_extent(layout_, block, extent), ": stored ", std::hex, t.checksum,
                ", computed ", actual);
    }
    return;
  }
  const auto actual = checksum64(data);
  std::optional<std::uint64_t> expected = e.checksum;
  if (!expected) {
    std::lock_guard lock(mutex_);
    auto& first = first_[block][extent];
    if (!first) first = actual;
    expected = first;
  }
  TS_EXPECT(actual == *expected, ChecksumError, "checksum mismatch in ",
            describe_extent(layout_, block, extent), ": ", e.checksum ? "stored " : "first read ",
            std::hex, *expected, ", computed ", actual);
}

}  // namespace tensorstream::engine::detail
