// Writing JSON text: string quoting with the escapes RFC 8259 requires.
#pragma once

#include <string>
#include <string_view>

namespace tensorstream::detail::json {

/// `text` as a quoted JSON string literal.
[[nodiscard]] std::string quote(std::string_view text);

}  // namespace tensorstream::detail::json
