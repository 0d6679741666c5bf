// Library version.
#pragma once

namespace tensorstream {
inline constexpr const char* kVersion = "0.1.0";
}  // namespace tensorstream
