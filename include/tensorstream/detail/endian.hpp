// Little-endian encoding of fixed-width integers, independent of the host's byte order.
// The store format is little-endian throughout (docs/store-format.md).
#pragma once

#include <cstddef>
#include <cstdint>
#include <cstring>
#include <string>
#include <type_traits>

namespace tensorstream::detail {

/// Reads a little-endian T from `p` (no alignment required).
template <typename T>
[[nodiscard]] T load_le(const std::byte* p) noexcept {
  static_assert(std::is_integral_v<T>);
  using U = std::make_unsigned_t<T>;
  U value = 0;
  for (std::size_t i = 0; i < sizeof(T); ++i) {
    value |= static_cast<U>(static_cast<U>(std::to_integer<unsigned>(p[i])) << (8 * i));
  }
  return static_cast<T>(value);
}

/// Writes `value` little-endian to `p`.
template <typename T>
void store_le(std::byte* p, T value) noexcept {
  static_assert(std::is_integral_v<T>);
  using U = std::make_unsigned_t<T>;
  const auto u = static_cast<U>(value);
  for (std::size_t i = 0; i < sizeof(T); ++i) p[i] = static_cast<std::byte>((u >> (8 * i)) & 0xff);
}

/// Appends `value` little-endian to a byte string.
template <typename T>
void append_le(std::string& out, T value) {
  std::byte buf[sizeof(T)];
  store_le(buf, value);
  out.append(reinterpret_cast<const char*>(buf), sizeof(T));
}

}  // namespace tensorstream::detail
