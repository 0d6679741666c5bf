#include "tensorstream/detail/json.hpp"

#include <gtest/gtest.h>

#include <cstdint>
#include <limits>
#include <string>

#include "tensorstream/errors.hpp"

namespace tensorstream::detail::json {
namespace {

const Object& object_of(const Value& value) { return std::get<Object>(value.data); }
const Array& array_of(const Value& value) { return std::get<Array>(value.data); }
const std::string& string_of(const Value& value) { return std::get<std::string>(value.data); }
Integer integer_of(const Value& value) { return std::get<Integer>(value.data); }

// Parses `text`, expecting a FormatError; returns its message.
std::string parse_error(std::string_view text) {
  try {
    (void)parse(text, "doc.json");
  } catch (const FormatError& e) {
    return e.what();
  }
  ADD_FAILURE() << "no FormatError for: " << text;
  return {};
}

void expect_rejected(std::string_view text, std::string_view cause, std::size_t byte) {
  const std::string message = parse_error(text);
  EXPECT_NE(message.find("doc.json: invalid JSON at byte " + std::to_string(byte) + ": "),
            std::string::npos)
      << message;
  EXPECT_NE(message.find(cause), std::string::npos) << message;
}

TEST(Json, Literals) {
  EXPECT_TRUE(std::holds_alternative<std::nullptr_t>(parse("null", "t").data));
  EXPECT_EQ(std::get<bool>(parse("true", "t").data), true);
  EXPECT_EQ(std::get<bool>(parse(" \t\r\nfalse \n", "t").data), false);
}

TEST(Json, NestedDocument) {
  const Value doc = parse(R"({"a": {"b": [1, [2, {"c": null}], "x"]}, "d": [], "e": {}})", "t");
  ASSERT_TRUE(doc.is_object());
  ASSERT_EQ(object_of(doc).size(), 3u);
  EXPECT_EQ(object_of(doc)[0].first, "a");
  EXPECT_EQ(object_of(doc)[1].first, "d");
  EXPECT_EQ(object_of(doc)[2].first, "e");
  const Value* b = doc.find("a")->find("b");
  ASSERT_NE(b, nullptr);
  ASSERT_TRUE(b->is_array());
  const Array& items = array_of(*b);
  ASSERT_EQ(items.size(), 3u);
  EXPECT_EQ(integer_of(items[0]).magnitude, 1u);
  EXPECT_TRUE(std::holds_alternative<std::nullptr_t>(array_of(items[1])[1].find("c")->data));
  EXPECT_EQ(string_of(items[2]), "x");
  EXPECT_TRUE(array_of(*doc.find("d")).empty());
  EXPECT_TRUE(object_of(*doc.find("e")).empty());
  EXPECT_EQ(doc.find("missing"), nullptr);
  EXPECT_EQ(items[0].find("a"), nullptr);  // not an object
}

TEST(Json, StringEscapes) {
  EXPECT_EQ(string_of(parse(R"("a\"b\\c\/d\be\ff\ng\rh\ti")", "t")), "a\"b\\c/d\be\ff\ng\rh\ti");
  EXPECT_EQ(string_of(parse(R"("\u0041\u00e9\u20AC")", "t")), "A\xC3\xA9\xE2\x82\xAC");
  EXPECT_EQ(string_of(parse(R"("\u0000")", "t")), std::string(1, '\0'));
  // U+1F600 as a surrogate pair, and U+10FFFF, the last code point.
  EXPECT_EQ(string_of(parse(R"("\uD83D\uDE00")", "t")), "\xF0\x9F\x98\x80");
  EXPECT_EQ(string_of(parse(R"("\udbff\udfff")", "t")), "\xF4\x8F\xBF\xBF");
  // Raw UTF-8 passes through unchanged.
  EXPECT_EQ(string_of(parse("\"caf\xC3\xA9 \xF0\x9F\x98\x80\"", "t")),
            "caf\xC3\xA9 \xF0\x9F\x98\x80");
  EXPECT_EQ(string_of(parse("\"\x7F\"", "t")), "\x7F");
}

TEST(Json, Integers) {
  EXPECT_EQ(integer_of(parse("0", "t")).magnitude, 0u);
  EXPECT_FALSE(integer_of(parse("0", "t")).negative);
  const Integer max = integer_of(parse("18446744073709551615", "t"));
  EXPECT_FALSE(max.negative);
  EXPECT_EQ(max.magnitude, std::numeric_limits<std::uint64_t>::max());
  const Integer min = integer_of(parse("-9223372036854775808", "t"));
  EXPECT_TRUE(min.negative);
  EXPECT_EQ(min.magnitude, std::uint64_t{1} << 63);
  const Integer minus = integer_of(parse("-42", "t"));
  EXPECT_TRUE(minus.negative);
  EXPECT_EQ(minus.magnitude, 42u);
}

TEST(Json, Doubles) {
  EXPECT_DOUBLE_EQ(std::get<double>(parse("1.5", "t").data), 1.5);
  EXPECT_DOUBLE_EQ(std::get<double>(parse("-0.25", "t").data), -0.25);
  EXPECT_DOUBLE_EQ(std::get<double>(parse("1e3", "t").data), 1000.0);
  EXPECT_DOUBLE_EQ(std::get<double>(parse("2.5E-2", "t").data), 0.025);
  EXPECT_DOUBLE_EQ(std::get<double>(parse("6.02e+23", "t").data), 6.02e23);
  // Too large for an integer is not silently a double.
  expect_rejected("18446744073709551616", "integer out of the 64-bit range", 0);
}

TEST(Json, MaxDepthAccepted) {
  const std::string text = std::string(kMaxDepth, '[') + std::string(kMaxDepth, ']');
  EXPECT_TRUE(parse(text, "t").is_array());
}

TEST(Json, RejectsTrailingGarbage) {
  expect_rejected("{} x", "unexpected character 'x' after the JSON value", 3);
  expect_rejected("1 2", "after the JSON value", 2);
  expect_rejected("truex", "after the JSON value", 4);
  expect_rejected(std::string_view("{}\0", 3), "byte 0x00", 2);
}

TEST(Json, RejectsEmptyAndTruncated) {
  expect_rejected("", "unexpected end of input", 0);
  expect_rejected("   ", "unexpected end of input", 3);
  expect_rejected("[1, 2", "unexpected end of input in an array", 5);
  expect_rejected("{\"a\": 1", "unexpected end of input in an object", 7);
  expect_rejected("{\"a\"", "expected ':'", 4);
  expect_rejected("[1,]", "expected a value", 3);
  expect_rejected("{,}", "expected a string key", 1);
  expect_rejected("{\"a\":1,}", "expected a string key", 7);
  expect_rejected("[1 2]", "expected ',' or ']'", 3);
}

TEST(Json, RejectsDuplicateKeys) {
  expect_rejected(R"({"a": 1, "b": 2, "a": 3})", "duplicate object key \"a\"", 17);
  // Decoded keys compare: "\u0061" is "a".
  expect_rejected(R"({"a": 1, "\u0061": 2})", "duplicate object key", 9);
  // Nested objects have their own key sets.
  EXPECT_NO_THROW((void)parse(R"({"a": {"a": 1}, "b": {"a": 2}})", "t"));
  // Many keys (the sorted path): the first repeat in file order is named.
  std::string text = "{";
  for (int i = 0; i < 100; ++i) text += "\"k" + std::to_string(i) + "\": 0, ";
  const std::size_t repeat_at = text.size();
  text += "\"k7\": 1, \"k3\": 1}";
  expect_rejected(text, "duplicate object key \"k7\"", repeat_at);
}

TEST(Json, RejectsExcessiveDepth) {
  const std::string arrays = std::string(kMaxDepth + 1, '[') + std::string(kMaxDepth + 1, ']');
  expect_rejected(arrays, "nesting deeper than 64 levels", kMaxDepth);
  std::string objects;
  for (int i = 0; i <= kMaxDepth; ++i) objects += "{\"a\":";
  objects += "1" + std::string(kMaxDepth + 1, '}');
  expect_rejected(objects, "nesting deeper than", 5 * kMaxDepth);
  // Far deeper input fails at the limit rather than exhausting the stack.
  expect_rejected(std::string(1'000'000, '['), "nesting deeper than", kMaxDepth);
}

TEST(Json, RejectsBadStrings) {
  expect_rejected("\"abc", "unterminated string", 0);
  expect_rejected("[\"abc\\", "unterminated escape sequence", 5);
  expect_rejected("\"a\nb\"", "control character byte 0x0a in a string", 2);
  expect_rejected(std::string_view("\"a\0\"", 4), "control character", 2);
  expect_rejected("\"\t\"", "control character", 1);
  expect_rejected(R"("\x")", "invalid escape sequence", 1);
  expect_rejected(R"("\u12")", "truncated \\u escape", 1);
  expect_rejected(R"("\u12G4")", "invalid hex digit", 5);
}

TEST(Json, RejectsLoneSurrogates) {
  expect_rejected(R"("\uDE00")", "lone low surrogate", 1);
  expect_rejected(R"("\uD83D")", "high surrogate not followed by a \\u low surrogate", 1);
  expect_rejected(R"("\uD83Dx")", "high surrogate not followed", 1);
  expect_rejected(R"("\uD83D\u0041")", "high surrogate not followed", 1);
  expect_rejected(R"("\uD83D\uD83D")", "high surrogate not followed", 1);
  expect_rejected(R"("\uD83D\n")", "high surrogate not followed", 1);
}

TEST(Json, RejectsInvalidUtf8) {
  expect_rejected("\"\x80\"", "invalid UTF-8 lead", 1);
  expect_rejected("\"\xC0\xAF\"", "invalid UTF-8 lead", 1);              // overlong '/'
  expect_rejected("\"\xE0\x80\xAF\"", "invalid UTF-8 sequence", 2);      // overlong
  expect_rejected("\"\xED\xA0\x80\"", "invalid UTF-8 sequence", 2);      // encoded surrogate
  expect_rejected("\"\xF4\x90\x80\x80\"", "invalid UTF-8 sequence", 2);  // > U+10FFFF
  expect_rejected("\"\xE2\x82\"", "invalid UTF-8 sequence", 3);
  expect_rejected("\"\xE2\x82", "invalid UTF-8 sequence", 3);  // input ends mid-sequence
  expect_rejected("\xC3\xA9", "byte 0xc3", 0);                 // non-ASCII outside a string
}

TEST(Json, RejectsBadNumbers) {
  expect_rejected("01", "leading zero", 1);
  expect_rejected("-01", "leading zero", 2);
  expect_rejected("[00]", "leading zero", 2);
  expect_rejected("-", "expected a digit", 1);
  expect_rejected("+1", "unexpected character '+'", 0);
  expect_rejected("1.", "expected a digit after '.'", 2);
  expect_rejected(".5", "unexpected character '.'", 0);
  expect_rejected("1e", "expected a digit in the exponent", 2);
  expect_rejected("1e+", "expected a digit in the exponent", 3);
  expect_rejected("0x10", "after the JSON value", 1);
  expect_rejected("18446744073709551616", "integer out of the 64-bit range", 0);
  expect_rejected("[99999999999999999999999]", "integer out of the 64-bit range", 1);
  expect_rejected("-9223372036854775809", "integer out of the 64-bit range", 0);
  expect_rejected("1e400", "number out of the double range", 0);
}

TEST(Json, RejectsBadLiterals) {
  expect_rejected("tru", "invalid literal, expected 'true'", 0);
  expect_rejected("nul", "expected 'null'", 0);
  expect_rejected("[fals]", "expected 'false'", 1);
  expect_rejected("True", "unexpected character 'T'", 0);
  expect_rejected("NaN", "unexpected character 'N'", 0);
  expect_rejected("'a'", "unexpected character", 0);
}

}  // namespace
}  // namespace tensorstream::detail::json
