// libFuzzer target: the compressed-chunk decoder on arbitrary stored bytes and chunk records.
// Input: byte 0 the chunk codec, byte 1 the plane width, bytes 2..5 the raw size (u32, inputs
// claiming more than 4 MiB are skipped to keep runs fast), bytes 6..9 where a clipped decode
// starts, then the stored bytes. Each input is decoded whole and clipped, into buffers fenced
// by guard bytes. Any exception other than tensorstream::Error, a write outside the
// destination or a "successful" decode that did not fill it are bugs.
#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <span>
#include <vector>

#include "tensorstream/checksum.hpp"
#include "tensorstream/codec.hpp"
#include "tensorstream/detail/endian.hpp"
#include "tensorstream/errors.hpp"

namespace {

constexpr std::size_t kGuard = 32;
constexpr std::uint32_t kMaxRaw = 4u << 20;

void decode(const tensorstream::ChunkInfo& chunk, std::span<const std::byte> stored,
            std::uint64_t skip, std::uint64_t n) {
  namespace codec = tensorstream::codec;
  std::vector<std::byte> out(n + 2 * kGuard, std::byte{0xa5});
  try {
    codec::ChunkDecoder::for_this_thread().decode(chunk, stored, skip,
                                                  std::span(out).subspan(kGuard, n),
                                                  /*verify=*/false, {"fuzz-input", "b", 0, 0});
  } catch (const tensorstream::Error&) {
  }
  for (std::size_t i = 0; i < kGuard; ++i) {
    if (out[i] != std::byte{0xa5} || out[out.size() - 1 - i] != std::byte{0xa5}) std::abort();
  }
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  namespace detail = tensorstream::detail;
  if (size < 10) return 0;
  const auto* bytes = reinterpret_cast<const std::byte*>(data);
  tensorstream::ChunkInfo chunk;
  chunk.codec = static_cast<tensorstream::ChunkCodec>(data[0]);
  chunk.plane_width = data[1];
  chunk.raw_size = detail::load_le<std::uint32_t>(bytes + 2);
  if (chunk.raw_size == 0 || chunk.raw_size > kMaxRaw) return 0;
  const auto skip = detail::load_le<std::uint32_t>(bytes + 6) % (chunk.raw_size + 1ull);
  const std::span<const std::byte> stored(bytes + 10, size - 10);
  chunk.stored_size = static_cast<std::uint32_t>(stored.size());
  chunk.checksum = tensorstream::checksum64(stored);
  decode(chunk, stored, 0, chunk.raw_size);
  decode(chunk, stored, skip, (chunk.raw_size - skip) / 2);
  return 0;
}
