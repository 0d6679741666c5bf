// Every setting of TensorStream in one table.
//
// One row per setting: the engine's and the I/O backends' tunables (EngineOptions, IoOptions),
// the fields of the Python `tensorstream.Config` that act in Python, and the environment
// variables the engine reads. A row gives the setting's name, kind, default, range or accepted
// values, environment variable, the Config field that gives it, and what it does and trades.
// Everything that needs to know a setting reads this table instead of spelling it again:
//
//   bindings/module.cpp          `_core.Engine(path, options)`: each key of the options dict is
//                                applied by name (apply_setting); `_core.settings()` returns
//                                the table as a list of dicts
//   python/tensorstream/config.py  Config's defaults and the ranges and values it accepts
//   tools/settings_command.cpp   `tensorstream settings [--markdown | --json | --check FILE |
//                                --update FILE]`; the --markdown output is the generated part
//                                of docs/runtime-settings.md, and a test fails when the
//                                committed page differs from it
//
// (the shape of kvikio's `defaults` class and `kvikio.defaults`).
//
// Defaults. A row of the engine or I/O scope does not write its default: it reads it from a
// value-initialised EngineOptions. The in-class initialisers of EngineOptions (options.hpp)
// and IoOptions (io/backend.hpp) are therefore the one place each such default is written,
// and the table cannot disagree with them. Rows of the Python and environment scopes have no
// C++ struct behind them: their defaults are written in their row (src/settings.cpp), and
// Config reads them from there.
//
// ## Adding a setting
//
// A scalar engine option:
//   1. add the field, with its default, to EngineOptions (or IoOptions);
//   2. add one row to build_table() in src/settings.cpp, in its scope's group:
//        rows.push_back(option_row(kEngine, "memory_stream",
//                                  [](auto& o) -> auto& { return o.memory_stream; },
//                                  {.meaning = "what it does and what it trades"}));
//      (kIo and `o.io.x` for an IoOptions field). The kind follows from the field's type:
//      bool; an unsigned integer or std::optional of one; std::chrono::milliseconds;
//      std::string. An enum takes choice_row(...), given every member and its name and parse
//      functions. The Text argument also gives the unit, the range (.min, .max, .clamped)
//      and the Config field that gives the option (.config_field, .config_note), if any;
//   3. run `tensorstream settings --update docs/runtime-settings.md`, and add the name to
//      the expected list in tests/cpp/test_settings.cpp.
// The Python options dict accepts the new key at once; `_core.settings()` lists it.
//
// Structural options, which are not scalars, stay outside the table; structural_options()
// lists them with the reason: EngineOptions::device_memory (the allocate/release callables of
// `_core.Engine`), EngineOptions::env (C++ only), and the per-call arguments of the
// constructors (the tensor groups of Engine::from_safetensors).
//
// Thread-safety: the table is built on first use (thread-safe) and immutable afterwards;
// every function here may be called from any thread.
#pragma once

#include <cstdint>
#include <functional>
#include <optional>
#include <string>
#include <string_view>
#include <variant>
#include <vector>

#include "tensorstream/engine/options.hpp"

namespace tensorstream {

/// Where a setting acts.
enum class SettingScope {
  kEngine,       ///< a field of engine::EngineOptions: a key of the options dict
  kIo,           ///< a field of io::IoOptions (EngineOptions::io): a key of the options dict
  kPython,       ///< a field of tensorstream.Config that acts in Python
  kEnvironment,  ///< an environment variable read by the engine's shims, or by cuFile itself
};

/// "engine", "io", "python", "environment".
[[nodiscard]] std::string_view setting_scope_name(SettingScope scope) noexcept;

/// What a setting's value is.
enum class SettingKind {
  kBool,     ///< true or false
  kInteger,  ///< a non-negative integer, in `unit`
  kChoice,   ///< one of `choices`
  kText,     ///< free text whose form `meaning` gives (a device name)
  kPath,     ///< a file or directory path
};

/// "bool", "integer", "choice", "text", "path".
[[nodiscard]] std::string_view setting_kind_name(SettingKind kind) noexcept;

/// A setting's value: unset (std::monostate: Python None, std::nullopt), a bool, a
/// non-negative integer, or a string (choices, text, paths).
using SettingValue = std::variant<std::monostate, bool, std::uint64_t, std::string>;

/// One row of the table.
struct Setting {
  /// The options-dict key (engine, io), the Config field (python), or the variable itself
  /// (environment). Unique across the table.
  std::string_view name;
  SettingScope scope = SettingScope::kEngine;
  SettingKind kind = SettingKind::kBool;
  /// Integers: "bytes", "ms", "GB" (a Config size given in GB, held in bytes) or "" (a count).
  std::string_view unit;
  /// Unset is a value (Python None, std::nullopt); `meaning` says what it does.
  bool optional = false;
  /// The default; std::monostate when the setting is unset by default.
  SettingValue default_value;
  /// The default as the documentation shows it ("8 MiB", "required", "unset").
  std::string default_text;
  /// Integers: the accepted range, inclusive (either end may be open).
  std::optional<std::uint64_t> min;
  std::optional<std::uint64_t> max;
  /// Integers outside [min, max] are clamped into it by the engine rather than refused.
  bool clamped = false;
  /// kChoice: the accepted names.
  std::vector<std::string_view> choices;
  /// The environment variable that gives this setting (or that is this setting), or empty.
  std::string_view env;
  /// The tensorstream.Config field that gives this setting, or empty.
  std::string_view config_field;
  /// How `config_field` maps onto the setting, when not one to one; else empty.
  std::string_view config_note;
  /// What the setting does and what it trades (Markdown, one paragraph).
  std::string_view meaning;
  /// Engine and I/O scopes: store an already checked value into the options, and read the
  /// value back. Empty for the other scopes.
  std::function<void(engine::EngineOptions&, const SettingValue&)> set;
  std::function<SettingValue(const engine::EngineOptions&)> get;

  /// True for the rows apply_setting() accepts (engine and I/O scopes).
  [[nodiscard]] bool is_option() const noexcept { return static_cast<bool>(set); }
};

/// The table, in documentation order: engine, I/O, Python, environment.
[[nodiscard]] const std::vector<Setting>& settings();

/// The row named `name`, or nullptr.
[[nodiscard]] const Setting* find_setting(std::string_view name) noexcept;

/// The names apply_setting() accepts (the engine and I/O rows), comma-separated, for
/// messages.
[[nodiscard]] const std::string& option_names();

/// Sets the option `name` of `options` to `value`, checked against its row. Throws
/// std::invalid_argument naming the key: for a name that is not an engine or I/O row (the
/// message lists the known ones), a value of another kind (unset for a row that is not
/// optional, a string for an integer, ...), an integer outside a range that is not clamped,
/// or a name that is not one of the choices.
void apply_setting(engine::EngineOptions& options, std::string_view name,
                   const SettingValue& value);

/// `value` as the documentation writes it: "true", "unset", "8 MiB", "120000 ms", "auto".
[[nodiscard]] std::string setting_value_text(const Setting& setting, const SettingValue& value);

/// An option that is not a scalar, and therefore not a row, with where it is given instead.
struct StructuralOption {
  std::string_view name;
  std::string_view given_by;  ///< where a caller gives it
  std::string_view meaning;
};

/// EngineOptions::device_memory, EngineOptions::env and the per-call tensor groups.
[[nodiscard]] const std::vector<StructuralOption>& structural_options();

}  // namespace tensorstream
