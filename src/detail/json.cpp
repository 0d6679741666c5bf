#include "tensorstream/detail/json.hpp"

#include <algorithm>
#include <charconv>
#include <cstddef>
#include <limits>
#include <system_error>

#include "tensorstream/errors.hpp"

namespace tensorstream::detail::json {

const Value* Value::find(std::string_view key) const noexcept {
  const auto* object = std::get_if<Object>(&data);
  if (object == nullptr) return nullptr;
  for (const auto& [name, value] : *object) {
    if (name == key) return &value;
  }
  return nullptr;
}

namespace {

constexpr bool is_digit(char c) noexcept { return c >= '0' && c <= '9'; }

constexpr int hex_value(char c) noexcept {
  if (c >= '0' && c <= '9') return c - '0';
  if (c >= 'a' && c <= 'f') return c - 'a' + 10;
  if (c >= 'A' && c <= 'F') return c - 'A' + 10;
  return -1;
}

void append_utf8(std::string& out, std::uint32_t cp) {
  if (cp < 0x80) {
    out.push_back(static_cast<char>(cp));
  } else if (cp < 0x800) {
    out.push_back(static_cast<char>(0xC0 | (cp >> 6)));
    out.push_back(static_cast<char>(0x80 | (cp & 0x3F)));
  } else if (cp < 0x10000) {
    out.push_back(static_cast<char>(0xE0 | (cp >> 12)));
    out.push_back(static_cast<char>(0x80 | ((cp >> 6) & 0x3F)));
    out.push_back(static_cast<char>(0x80 | (cp & 0x3F)));
  } else {
    out.push_back(static_cast<char>(0xF0 | (cp >> 18)));
    out.push_back(static_cast<char>(0x80 | ((cp >> 12) & 0x3F)));
    out.push_back(static_cast<char>(0x80 | ((cp >> 6) & 0x3F)));
    out.push_back(static_cast<char>(0x80 | (cp & 0x3F)));
  }
}

// Messages quote input text; a hostile header must not turn one into a 100 MB string.
std::string excerpt(std::string_view text) {
  constexpr std::size_t kMax = 64;
  if (text.size() <= kMax) return std::string(text);
  return std::string(text.substr(0, kMax)) + "...";
}

template <typename T>
Value make_value(T&& content) {
  Value value;
  value.data = std::forward<T>(content);
  return value;
}

class Parser {
 public:
  Parser(std::string_view text, std::string_view source) : text_(text), source_(source) {}

  Value parse_document() {
    skip_whitespace();
    Value value = parse_value(0);
    skip_whitespace();
    if (!at_end()) fail("unexpected " + describe_current() + " after the JSON value");
    return value;
  }

 private:
  [[noreturn]] void fail_at(std::size_t pos, const std::string& cause) const {
    throw FormatError(concat(source_, ": invalid JSON at byte ", pos, ": ", cause));
  }
  [[noreturn]] void fail(const std::string& cause) const { fail_at(pos_, cause); }

  [[nodiscard]] bool at_end() const noexcept { return pos_ >= text_.size(); }
  // Only called when !at_end().
  [[nodiscard]] char current() const noexcept { return text_[pos_]; }

  [[nodiscard]] std::string describe_current() const {
    if (at_end()) return "end of input";
    const auto c = static_cast<unsigned char>(current());
    if (c >= 0x20 && c < 0x7F) return concat("character '", static_cast<char>(c), "'");
    static constexpr char kHex[] = "0123456789abcdef";
    return concat("byte 0x", kHex[c >> 4], kHex[c & 0xF]);
  }

  void skip_whitespace() noexcept {
    while (!at_end()) {
      const char c = current();
      if (c != ' ' && c != '\t' && c != '\n' && c != '\r') return;
      ++pos_;
    }
  }

  Value parse_value(int depth) {
    if (at_end()) fail("unexpected end of input, expected a value");
    switch (current()) {
      case '{':
        return parse_object(depth + 1);
      case '[':
        return parse_array(depth + 1);
      case '"':
        return make_value(parse_string());
      case 't':
        expect_literal("true");
        return make_value(true);
      case 'f':
        expect_literal("false");
        return make_value(false);
      case 'n':
        expect_literal("null");
        return make_value(nullptr);
      default:
        if (current() == '-' || is_digit(current())) return parse_number();
        fail("unexpected " + describe_current() + ", expected a value");
    }
  }

  void expect_literal(std::string_view literal) {
    if (text_.substr(pos_, literal.size()) != literal) {
      fail(concat("invalid literal, expected '", literal, "'"));
    }
    pos_ += literal.size();
  }

  void check_depth(int depth) const {
    if (depth > kMaxDepth) fail(concat("nesting deeper than ", kMaxDepth, " levels"));
  }

  Value parse_array(int depth) {
    check_depth(depth);
    ++pos_;  // '['
    Array elements;
    skip_whitespace();
    if (!at_end() && current() == ']') {
      ++pos_;
      return make_value(std::move(elements));
    }
    while (true) {
      skip_whitespace();
      elements.push_back(parse_value(depth));
      skip_whitespace();
      if (at_end()) fail("unexpected end of input in an array, expected ',' or ']'");
      if (current() == ',') {
        ++pos_;
        continue;
      }
      if (current() == ']') {
        ++pos_;
        return make_value(std::move(elements));
      }
      fail("unexpected " + describe_current() + " in an array, expected ',' or ']'");
    }
  }

  Value parse_object(int depth) {
    check_depth(depth);
    ++pos_;  // '{'
    Object members;
    std::vector<std::size_t> key_positions;
    skip_whitespace();
    if (!at_end() && current() == '}') {
      ++pos_;
      return make_value(std::move(members));
    }
    while (true) {
      skip_whitespace();
      if (at_end() || current() != '"') {
        fail("unexpected " + describe_current() + " in an object, expected a string key");
      }
      const std::size_t key_position = pos_;
      std::string key = parse_string();
      skip_whitespace();
      if (at_end() || current() != ':') {
        fail("unexpected " + describe_current() + " after an object key, expected ':'");
      }
      ++pos_;
      skip_whitespace();
      Value value = parse_value(depth);
      members.push_back(Member{std::move(key), std::move(value)});
      key_positions.push_back(key_position);
      skip_whitespace();
      if (at_end()) fail("unexpected end of input in an object, expected ',' or '}'");
      if (current() == ',') {
        ++pos_;
        continue;
      }
      if (current() == '}') {
        ++pos_;
        break;
      }
      fail("unexpected " + describe_current() + " in an object, expected ',' or '}'");
    }
    check_duplicate_keys(members, key_positions);
    return make_value(std::move(members));
  }

  // Sorting keeps this O(n log n): a header may hold hundreds of thousands of tensors.
  // Reports the first repeated key in file order.
  void check_duplicate_keys(const Object& members,
                            const std::vector<std::size_t>& key_positions) const {
    if (members.size() < 2) return;
    std::vector<std::size_t> order(members.size());
    for (std::size_t i = 0; i < order.size(); ++i) order[i] = i;
    std::sort(order.begin(), order.end(), [&](std::size_t a, std::size_t b) {
      const int c = members[a].first.compare(members[b].first);
      return c != 0 ? c < 0 : a < b;
    });
    std::size_t first_repeat = members.size();
    for (std::size_t i = 1; i < order.size(); ++i) {
      if (members[order[i]].first == members[order[i - 1]].first) {
        first_repeat = std::min(first_repeat, order[i]);
      }
    }
    if (first_repeat != members.size()) {
      fail_at(key_positions[first_repeat],
              concat("duplicate object key \"", excerpt(members[first_repeat].first), "\""));
    }
  }

  std::string parse_string() {
    const std::size_t start = pos_;
    ++pos_;  // opening quote
    std::string out;
    while (true) {
      // Copy runs of plain ASCII in one go.
      const std::size_t run_start = pos_;
      while (!at_end()) {
        const auto c = static_cast<unsigned char>(current());
        if (c == '"' || c == '\\' || c < 0x20 || c >= 0x80) break;
        ++pos_;
      }
      out.append(text_.substr(run_start, pos_ - run_start));
      if (at_end()) fail_at(start, "unterminated string");
      const auto c = static_cast<unsigned char>(current());
      if (c == '"') {
        ++pos_;
        return out;
      }
      if (c == '\\') {
        parse_escape(out);
      } else if (c < 0x20) {
        fail("control character " + describe_current() + " in a string (must be escaped)");
      } else {
        const std::size_t length = utf8_sequence_length();
        out.append(text_.substr(pos_, length));
        pos_ += length;
      }
    }
  }

  // Length of the well-formed UTF-8 sequence at pos_ (RFC 3629: no overlong forms, no
  // surrogates, nothing above U+10FFFF), or fail.
  std::size_t utf8_sequence_length() const {
    const auto byte = [&](std::size_t i) -> unsigned {
      return pos_ + i < text_.size() ? static_cast<unsigned char>(text_[pos_ + i]) : 0x100u;
    };
    const unsigned lead = byte(0);
    std::size_t length = 0;
    unsigned low = 0x80;
    unsigned high = 0xBF;
    if (lead >= 0xC2 && lead <= 0xDF) {
      length = 2;
    } else if (lead >= 0xE0 && lead <= 0xEF) {
      length = 3;
      if (lead == 0xE0) low = 0xA0;
      if (lead == 0xED) high = 0x9F;
    } else if (lead >= 0xF0 && lead <= 0xF4) {
      length = 4;
      if (lead == 0xF0) low = 0x90;
      if (lead == 0xF4) high = 0x8F;
    } else {
      fail("invalid UTF-8 lead " + describe_current() + " in a string");
    }
    const unsigned second = byte(1);
    if (second < low || second > high) fail_at(pos_ + 1, "invalid UTF-8 sequence in a string");
    for (std::size_t i = 2; i < length; ++i) {
      const unsigned next = byte(i);
      if (next < 0x80 || next > 0xBF) fail_at(pos_ + i, "invalid UTF-8 sequence in a string");
    }
    return length;
  }

  void parse_escape(std::string& out) {
    const std::size_t escape_start = pos_;
    ++pos_;  // backslash
    if (at_end()) fail_at(escape_start, "unterminated escape sequence");
    const char c = current();
    ++pos_;
    switch (c) {
      case '"':
        out.push_back('"');
        return;
      case '\\':
        out.push_back('\\');
        return;
      case '/':
        out.push_back('/');
        return;
      case 'b':
        out.push_back('\b');
        return;
      case 'f':
        out.push_back('\f');
        return;
      case 'n':
        out.push_back('\n');
        return;
      case 'r':
        out.push_back('\r');
        return;
      case 't':
        out.push_back('\t');
        return;
      case 'u':
        break;
      default:
        fail_at(escape_start, "invalid escape sequence");
    }
    std::uint32_t cp = parse_hex4(escape_start);
    if (cp >= 0xDC00 && cp <= 0xDFFF) {
      fail_at(escape_start, "lone low surrogate in \\u escape");
    }
    if (cp >= 0xD800 && cp <= 0xDBFF) {
      if (text_.substr(pos_, 2) != "\\u") {
        fail_at(escape_start, "high surrogate not followed by a \\u low surrogate");
      }
      const std::size_t low_start = pos_;
      pos_ += 2;
      const std::uint32_t low = parse_hex4(low_start);
      if (low < 0xDC00 || low > 0xDFFF) {
        fail_at(escape_start, "high surrogate not followed by a \\u low surrogate");
      }
      cp = 0x10000 + ((cp - 0xD800) << 10) + (low - 0xDC00);
    }
    append_utf8(out, cp);
  }

  // Reads the 4 hex digits after "\u" (pos_ is on the first digit).
  std::uint32_t parse_hex4(std::size_t escape_start) {
    if (text_.size() - pos_ < 4) fail_at(escape_start, "truncated \\u escape");
    std::uint32_t cp = 0;
    for (int i = 0; i < 4; ++i) {
      const int digit = hex_value(current());
      if (digit < 0) fail("invalid hex digit in \\u escape");
      cp = (cp << 4) | static_cast<std::uint32_t>(digit);
      ++pos_;
    }
    return cp;
  }

  Value parse_number() {
    const std::size_t start = pos_;
    const bool negative = current() == '-';
    if (negative) ++pos_;
    if (at_end() || !is_digit(current())) fail("expected a digit in a number");
    const std::size_t digits_start = pos_;
    if (current() == '0') {
      ++pos_;
      if (!at_end() && is_digit(current())) fail("leading zero in a number");
    } else {
      while (!at_end() && is_digit(current())) ++pos_;
    }
    const std::size_t digits_end = pos_;
    bool integral = true;
    if (!at_end() && current() == '.') {
      integral = false;
      ++pos_;
      if (at_end() || !is_digit(current())) fail("expected a digit after '.' in a number");
      while (!at_end() && is_digit(current())) ++pos_;
    }
    if (!at_end() && (current() == 'e' || current() == 'E')) {
      integral = false;
      ++pos_;
      if (!at_end() && (current() == '+' || current() == '-')) ++pos_;
      if (at_end() || !is_digit(current())) fail("expected a digit in the exponent of a number");
      while (!at_end() && is_digit(current())) ++pos_;
    }

    if (integral) {
      Integer integer;
      integer.negative = negative;
      for (std::size_t i = digits_start; i < digits_end; ++i) {
        const auto digit = static_cast<std::uint64_t>(text_[i] - '0');
        if (__builtin_mul_overflow(integer.magnitude, std::uint64_t{10}, &integer.magnitude) ||
            __builtin_add_overflow(integer.magnitude, digit, &integer.magnitude)) {
          fail_at(start, "integer out of the 64-bit range");
        }
      }
      constexpr auto kMinInt64Magnitude =
          static_cast<std::uint64_t>(std::numeric_limits<std::int64_t>::max()) + 1;
      if (negative && integer.magnitude > kMinInt64Magnitude) {
        fail_at(start, "integer out of the 64-bit range");
      }
      return make_value(integer);
    }

    const std::string_view literal = text_.substr(start, pos_ - start);
    double number = 0;
    const auto [end, error] =
        std::from_chars(literal.data(), literal.data() + literal.size(), number);
    if (error == std::errc::result_out_of_range) fail_at(start, "number out of the double range");
    if (error != std::errc{} || end != literal.data() + literal.size()) {
      fail_at(start, "malformed number");
    }
    return make_value(number);
  }

  std::string_view text_;
  std::string_view source_;
  std::size_t pos_ = 0;
};

}  // namespace

Value parse(std::string_view text, std::string_view source) {
  return Parser(text, source).parse_document();
}

}  // namespace tensorstream::detail::json
