// A small, strict JSON parser (RFC 8259) for the headers TensorStream reads: safetensors
// headers and Hugging Face index files. Not a general-purpose library: it keeps object
// members in file order, rejects duplicate keys, bounds nesting depth, and keeps integers
// exact (uint64/int64) so byte offsets never pass through a double.
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <string_view>
#include <utility>
#include <variant>
#include <vector>

namespace tensorstream::detail::json {

struct Value;
struct Member;
using Array = std::vector<Value>;
/// Members in file order. (Member, not std::pair: clang cannot instantiate a std::pair of the
/// still incomplete Value inside Value's own variant.)
using Object = std::vector<Member>;

/// An integer literal (no fraction or exponent) that fits in int64 or uint64.
struct Integer {
  bool negative = false;
  std::uint64_t magnitude = 0;
};

struct Value {
  std::variant<std::nullptr_t, bool, Integer, double, std::string, Array, Object> data;

  [[nodiscard]] bool is_object() const noexcept { return std::holds_alternative<Object>(data); }
  [[nodiscard]] bool is_array() const noexcept { return std::holds_alternative<Array>(data); }
  [[nodiscard]] bool is_string() const noexcept {
    return std::holds_alternative<std::string>(data);
  }
  [[nodiscard]] bool is_integer() const noexcept { return std::holds_alternative<Integer>(data); }
  /// The member `key` of an object, or nullptr (also when this is not an object).
  [[nodiscard]] const Value* find(std::string_view key) const noexcept;
};

/// One object member; named like std::pair's fields so it reads as one.
struct Member {
  std::string first;  ///< key
  Value second;       ///< value
};

/// Maximum nesting depth accepted by parse().
inline constexpr int kMaxDepth = 64;

/// Parses exactly one JSON value from `text` (surrounding whitespace allowed, nothing else).
/// Throws FormatError("<source>: invalid JSON at byte <n>: <cause>").
[[nodiscard]] Value parse(std::string_view text, std::string_view source);

}  // namespace tensorstream::detail::json
