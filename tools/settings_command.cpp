// `tensorstream settings`: the settings table (settings.hpp) and the statistics
// (engine/stats.hpp) as text, Markdown or JSON; --check / --update keep the generated part of
// docs/runtime-settings.md equal to the Markdown.
#include <fcntl.h>

#include <algorithm>
#include <cerrno>
#include <fstream>
#include <iomanip>
#include <iterator>
#include <ostream>
#include <span>
#include <sstream>
#include <string>
#include <type_traits>
#include <vector>

#include "cli.hpp"
#include "commands.hpp"
#include "tensorstream/detail/file.hpp"
#include "tensorstream/detail/json_writer.hpp"
#include "tensorstream/engine/stats.hpp"
#include "tensorstream/errors.hpp"
#include "tensorstream/settings.hpp"

namespace tensorstream::cli {
namespace {

using tensorstream::detail::concat;

constexpr const char* kUsage =
    "usage: tensorstream settings [--markdown | --json | --check FILE | --update FILE]\n"
    "  (no option)     every setting: name, default, environment variable, Config field\n"
    "  --markdown      the tables of docs/runtime-settings.md (settings and statistics)\n"
    "  --json          the settings table as JSON\n"
    "  --check FILE    exit 1 if the generated part of FILE differs from --markdown\n"
    "  --update FILE   rewrite the generated part of FILE with --markdown\n";

// ---- statistics: (key, meaning) from for_each_field ---------------------------------------

template <class T>
struct is_vector : std::false_type {};
template <class T>
struct is_vector<std::vector<T>> : std::true_type {};

template <class V>
constexpr bool is_leaf =
    std::is_arithmetic_v<V> || std::is_same_v<V, std::string> ||
    std::is_same_v<V, std::string_view> || std::is_same_v<V, std::filesystem::path>;

struct DescribeStats {
  std::string prefix;
  std::vector<std::pair<std::string, std::string>>* rows;

  template <class V>
  void operator()(std::string_view name, const V& value, std::string_view meaning) const {
    const std::string key = prefix + std::string(name);
    rows->emplace_back(key, std::string(meaning));
    if constexpr (is_vector<V>::value) {
      if constexpr (!is_leaf<typename V::value_type>) {
        const typename V::value_type item{};
        for_each_field(item, DescribeStats{key + "[].", rows});
      }
    } else if constexpr (!is_leaf<V>) {
      for_each_field(value, DescribeStats{key + ".", rows});
    }
  }
};

// ---- Markdown -----------------------------------------------------------------------------

std::string cell(std::string_view text) {
  std::string out;
  for (const char c : text) {
    if (c == '|') out += '\\';
    out += c == '\n' ? ' ' : c;
  }
  return out;
}

std::string code(std::string_view text) { return concat("`", text, "`"); }

std::string default_cell(const Setting& s) {
  const auto* text = std::get_if<std::string>(&s.default_value);
  if (text != nullptr && *text == s.default_text) return code(*text);
  return cell(s.default_text);
}

std::string bound_text(const Setting& s, std::uint64_t n) {
  return setting_value_text(s, SettingValue{n});
}

std::string values_cell(const Setting& s) {
  std::string out;
  switch (s.kind) {
    case SettingKind::kBool:
      out = "`true`, `false`";
      break;
    case SettingKind::kInteger:
      if (s.unit == "GB") {
        out = "> 0: GB, or a size string";
      } else if (s.min && s.max) {
        out = concat(bound_text(s, *s.min), " – ", bound_text(s, *s.max));
      } else if (s.min) {
        out = concat("≥ ", bound_text(s, *s.min));
      } else if (s.max) {
        out = concat("≤ ", bound_text(s, *s.max));
      } else {
        out = "≥ 0";
      }
      if (s.unit == "bytes" && !s.min && !s.max) out += " bytes";
      if (s.clamped) out += " (clamped)";
      break;
    case SettingKind::kChoice:
      for (const auto choice : s.choices) out += concat(out.empty() ? "" : ", ", code(choice));
      break;
    case SettingKind::kText:
      out = "text";
      break;
    case SettingKind::kPath:
      out = "path";
      break;
  }
  if (s.optional) out += ", or unset";
  return out;
}

std::string config_cell(const Setting& s) {
  if (s.config_field.empty()) return "—";
  std::string out = code(s.config_field);
  if (!s.config_note.empty()) out += concat(": ", cell(s.config_note));
  return out;
}

void markdown_rows(std::ostream& out, SettingScope scope, bool with_config, bool with_env) {
  out << "| setting | default | values |" << (with_config ? " Config |" : "")
      << (with_env ? " environment |" : "") << " meaning and trade-off |\n"
      << "|---|---|---|" << (with_config ? "---|" : "") << (with_env ? "---|" : "") << "---|\n";
  for (const auto& s : settings()) {
    if (s.scope != scope) continue;
    out << "| " << code(s.name) << " | " << default_cell(s) << " | " << values_cell(s) << " |";
    if (with_config) out << " " << config_cell(s) << " |";
    if (with_env) out << " " << (s.env.empty() ? "—" : code(s.env)) << " |";
    out << " " << cell(s.meaning) << " |\n";
  }
}

std::string markdown() {
  std::ostringstream out;
  out << "## Engine (`EngineOptions`)\n\n"
         "Fields of `tensorstream::engine::EngineOptions` (`include/tensorstream/engine/"
         "options.hpp`) and keys of the options dict of `tensorstream._core.Engine`; the "
         "Config column names the `tensorstream.Config` field that gives each one "
         "(`Config.engine_options()`).\n\n";
  markdown_rows(out, SettingScope::kEngine, true, false);
  out << "\n## I/O (`IoOptions`)\n\n"
         "Fields of `tensorstream::io::IoOptions` (`include/tensorstream/io/backend.hpp`, "
         "`EngineOptions::io`); in the options dict they are keys of their own, beside the "
         "engine's.\n\n";
  markdown_rows(out, SettingScope::kIo, true, false);
  out << "\n## Python (`tensorstream.Config`)\n\n"
         "Fields of `tensorstream.Config` that act in Python (the fields that give an engine "
         "option are in the tables above). An explicit argument wins over the environment, "
         "which wins over the default.\n\n";
  markdown_rows(out, SettingScope::kPython, false, true);
  out << "\n## Environment\n\n"
         "Read by the engine's shims when the library is first needed (once per process), or "
         "by cuFile itself.\n\n"
         "| variable | default | meaning |\n|---|---|---|\n";
  for (const auto& s : settings()) {
    if (s.scope != SettingScope::kEnvironment) continue;
    out << "| " << code(s.name) << " | " << default_cell(s) << " | " << cell(s.meaning) << " |\n";
  }
  out << "\n## Options outside the table\n\n"
         "Options that are not scalars, so not rows of the table (`_core.structural_options()`"
         "):\n\n"
         "| option | given by | meaning |\n|---|---|---|\n";
  for (const auto& o : structural_options()) {
    out << "| " << code(o.name) << " | " << cell(o.given_by) << " | " << cell(o.meaning) << " |\n";
  }
  out << "\n## Statistics (`Engine::stats()`)\n\n"
         "`EngineStats` (`include/tensorstream/engine/stats.hpp`), as the keys of the dict of "
         "`_core.Engine.stats()` (nested: `ram_tier.hits`; lists of dicts: `gds[].path`). "
         "`OffloadedModel.statistics()` adds keys derived from these and from the model.\n\n"
         "| key | meaning |\n|---|---|\n";
  std::vector<std::pair<std::string, std::string>> rows;
  for_each_field(engine::EngineStats{}, DescribeStats{"", &rows});
  for (const auto& [key, meaning] : rows)
    out << "| " << code(key) << " | " << cell(meaning) << " |\n";
  return out.str();
}

// ---- JSON ---------------------------------------------------------------------------------

std::string json_value(const SettingValue& v) {
  if (const auto* b = std::get_if<bool>(&v)) return *b ? "true" : "false";
  if (const auto* n = std::get_if<std::uint64_t>(&v)) return concat(*n);
  if (const auto* s = std::get_if<std::string>(&v)) return detail::json::quote(*s);
  return "null";
}

std::string json_text(std::string_view text) {
  return text.empty() ? std::string("null") : detail::json::quote(text);
}

void print_json(std::ostream& out) {
  out << "[";
  bool first = true;
  for (const auto& s : settings()) {
    out << (first ? "" : ",") << "\n  {\"name\":" << detail::json::quote(s.name)
        << ",\"scope\":" << detail::json::quote(setting_scope_name(s.scope))
        << ",\"kind\":" << detail::json::quote(setting_kind_name(s.kind))
        << ",\"unit\":" << detail::json::quote(s.unit)
        << ",\"optional\":" << (s.optional ? "true" : "false")
        << ",\"default\":" << json_value(s.default_value)
        << ",\"default_text\":" << detail::json::quote(s.default_text)
        << ",\"min\":" << (s.min ? concat(*s.min) : "null")
        << ",\"max\":" << (s.max ? concat(*s.max) : "null")
        << ",\"clamped\":" << (s.clamped ? "true" : "false") << ",\"choices\":[";
    for (std::size_t i = 0; i < s.choices.size(); ++i) {
      out << (i ? "," : "") << detail::json::quote(s.choices[i]);
    }
    out << "],\"env\":" << json_text(s.env) << ",\"config_field\":" << json_text(s.config_field)
        << ",\"config_note\":" << json_text(s.config_note)
        << ",\"meaning\":" << detail::json::quote(s.meaning)
        << ",\"engine_option\":" << (s.is_option() ? "true" : "false") << "}";
    first = false;
  }
  out << "\n]\n";
}

void print_text(std::ostream& out) {
  std::size_t width = 0;
  for (const auto& s : settings()) width = std::max(width, s.name.size());
  for (const auto& s : settings()) {
    out << std::left << std::setw(12) << setting_scope_name(s.scope)
        << std::setw(static_cast<int>(width) + 2) << s.name << std::right << s.default_text;
    if (!s.env.empty() && s.env != s.name) out << "  [$" << s.env << "]";
    if (!s.config_field.empty() && s.config_field != s.name) {
      out << "  (Config." << s.config_field << ")";
    }
    out << "\n";
  }
}

// ---- the generated part of a page ---------------------------------------------------------

constexpr std::string_view kBegin =
    "<!-- BEGIN GENERATED by `tensorstream settings --markdown` from src/settings.cpp and "
    "include/tensorstream/engine/stats.hpp; edit those, then run `tensorstream settings "
    "--update docs/runtime-settings.md` -->\n";
constexpr std::string_view kEnd = "<!-- END GENERATED -->\n";

struct Page {
  std::string before, generated, after;
};

Page split_page(const std::filesystem::path& file) {
  std::ifstream in(file, std::ios::binary);
  if (!in) throw IoError(concat("cannot read '", file.string(), "'"), errno);
  const std::string text((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  const auto begin = text.find(kBegin);
  const auto end = begin == std::string::npos ? begin : text.find(kEnd, begin);
  TS_EXPECT(begin != std::string::npos && end != std::string::npos, FormatError, "'", file.string(),
            "' has no generated part: expected a line \"", kBegin.substr(0, 40),
            "...\" and, after it, \"", kEnd.substr(0, kEnd.size() - 1), "\"");
  const auto inside = begin + kBegin.size();
  return {text.substr(0, inside), text.substr(inside, end - inside), text.substr(end)};
}

// Replaces `file` with `text` crash-safely: a temporary file beside it, fsync, rename.
void replace_file(const std::filesystem::path& file, const std::string& text) {
  const auto temp = std::filesystem::path(file.string() + ".tmp");
  {
    detail::FileDescriptor fd(temp, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
    fd.pwrite_all(std::as_bytes(std::span(text.data(), text.size())), 0);
    fd.sync();
    fd.close();
  }
  std::filesystem::rename(temp, file);
  const auto dir = file.parent_path();
  detail::sync_directory(dir.empty() ? std::filesystem::path(".") : dir);
}

// The first line where `a` and `b` differ (1-based), for the --check message.
std::size_t first_difference(const std::string& a, const std::string& b) {
  std::size_t line = 1;
  for (std::size_t i = 0; i < a.size() && i < b.size(); ++i) {
    if (a[i] != b[i]) return line;
    if (a[i] == '\n') ++line;
  }
  return line;
}

}  // namespace

int cmd_settings(const std::vector<std::string>& args, std::ostream& out, std::ostream& err) {
  if (args.empty()) {
    print_text(out);
    return kExitOk;
  }
  const std::string& option = args[0];
  if (args.size() == 1 && option == "--markdown") {
    out << markdown();
    return kExitOk;
  }
  if (args.size() == 1 && option == "--json") {
    print_json(out);
    return kExitOk;
  }
  if (args.size() == 2 && (option == "--check" || option == "--update")) {
    const std::filesystem::path file = args[1];
    const Page page = split_page(file);
    const std::string generated = markdown();
    if (page.generated == generated) {
      out << file.string() << ": up to date\n";
      return kExitOk;
    }
    if (option == "--check") {
      err << file.string() << ": the generated part differs from `tensorstream settings "
          << "--markdown` (from its line " << first_difference(page.generated, generated)
          << " on); run `tensorstream settings --update " << file.string() << "`\n";
      return kExitFailure;
    }
    replace_file(file, page.before + generated + page.after);
    out << file.string() << ": updated\n";
    return kExitOk;
  }
  if (option == "-h" || option == "--help") {
    out << kUsage;
    return kExitOk;
  }
  err << kUsage;
  return kExitUsage;
}

}  // namespace tensorstream::cli
