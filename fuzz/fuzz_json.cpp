// libFuzzer target: the strict JSON parser on arbitrary bytes. Anything but a parsed value
// or a tensorstream::Error is a bug.
#include <cstddef>
#include <cstdint>
#include <string_view>

#include "tensorstream/detail/json.hpp"
#include "tensorstream/errors.hpp"

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  try {
    const auto value = tensorstream::detail::json::parse(
        std::string_view(reinterpret_cast<const char*>(data), size), "fuzz-input");
    (void)value.find("key");
  } catch (const tensorstream::Error&) {
  }
  return 0;
}
