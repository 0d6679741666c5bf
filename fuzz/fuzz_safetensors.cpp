// libFuzzer target: the input is a whole safetensors file image. Anything but a clean
// accept or a tensorstream::Error (a crash, a sanitizer report, another exception type) is
// a bug.
#include <cstddef>
#include <cstdint>
#include <span>

#include "tensorstream/errors.hpp"
#include "tensorstream/safetensors.hpp"

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  if (size < 8) return 0;
  std::uint64_t header_size = 0;
  for (std::size_t i = 0; i < 8; ++i) header_size |= std::uint64_t{data[i]} << (8 * i);
  if (header_size > size - 8) return 0;
  const auto json = std::as_bytes(std::span(data + 8, static_cast<std::size_t>(header_size)));
  try {
    const tensorstream::SafetensorsHeader header =
        tensorstream::parse_safetensors_header(json, size, "fuzz-input");
    // An accepted header must describe bytes that lie inside the image.
    for (const auto& tensor : header.tensors) {
      if (tensor.offset < header.data_offset || tensor.offset > size ||
          tensor.nbytes > size - tensor.offset) {
        __builtin_trap();
      }
    }
  } catch (const tensorstream::Error&) {
  }
  return 0;
}
