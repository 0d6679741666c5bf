// The settings table: its rows, defaults read from the option structs, applying options by
// name, and the generated part of docs/runtime-settings.md.
#include <gtest/gtest.h>

#include <algorithm>
#include <cstring>
#include <filesystem>
#include <sstream>
#include <string>
#include <vector>

#include "cli.hpp"
#include "tensorstream/engine/stats.hpp"
#include "tensorstream/errors.hpp"
#include "tensorstream/settings.hpp"
#include "tensorstream/shim/cuda.hpp"
#include "tensorstream/shim/cufile.hpp"
#include "test_helpers.hpp"

namespace ts = tensorstream;
namespace eng = tensorstream::engine;
using ts::testing::TempDir;

namespace {

struct Result {
  int code;
  std::string out;
  std::string err;
};

Result run(std::vector<std::string> args) {
  std::ostringstream out;
  std::ostringstream err;
  const int code = ts::cli::run(args, out, err, /*interactive=*/false);
  return {code, out.str(), err.str()};
}

std::string message_of(eng::EngineOptions& o, std::string_view name, const ts::SettingValue& v) {
  try {
    ts::apply_setting(o, name, v);
  } catch (const std::invalid_argument& e) {
    return e.what();
  }
  return "";
}

std::string read_text(const std::filesystem::path& path) {
  const auto bytes = ts::testing::read_file(path);
  return {reinterpret_cast<const char*>(bytes.data()), bytes.size()};
}

void write_text(const std::filesystem::path& path, const std::string& text) {
  std::vector<std::byte> bytes(text.size());
  std::memcpy(bytes.data(), text.data(), text.size());
  ts::testing::write_file(path, bytes);
}

const std::filesystem::path kPage =
    std::filesystem::path(TS_SOURCE_DIR) / "docs/runtime-settings.md";

}  // namespace

// Changing the table is deliberate: a new row is added here too (settings.hpp, "Adding a
// setting").
TEST(Settings, TheRowsInDocumentationOrder) {
  std::vector<std::string> names;
  for (const auto& row : ts::settings()) names.emplace_back(row.name);
  const std::vector<std::string> expected{
      "device", "device_budget", "ram_cache_bytes", "cache_policy", "backend", "prefetch",
      "prefetch_depth", "slots", "verify_checksums", "decode_threads", "compressed_reads", "gds",
      "wait_timeout_ms", "trace_capacity", "check_invariants",
      // io
      "num_threads", "request_size", "queue_depth", "direct",
      // python
      "storage_path", "vram_budget_gb", "memory_pressure_mode", "min_layer_size", "dtype",
      "compression_enabled", "compression_level", "debug_mode",
      // environment
      "TENSORSTREAM_CUDA_LIBRARY", "TENSORSTREAM_CUFILE_LIBRARY", "CUFILE_LOGFILE_PATH",
      "CUFILE_ENV_PATH_JSON"};
  EXPECT_EQ(names, expected);
  for (const auto& row : ts::settings()) {
    EXPECT_EQ(ts::find_setting(row.name), &row) << row.name;
    EXPECT_FALSE(row.meaning.empty()) << row.name;
    EXPECT_FALSE(row.default_text.empty()) << row.name;
    const bool option =
        row.scope == ts::SettingScope::kEngine || row.scope == ts::SettingScope::kIo;
    EXPECT_EQ(row.is_option(), option) << row.name;
    if (row.kind == ts::SettingKind::kChoice) {
      EXPECT_FALSE(row.choices.empty()) << row.name;
    }
  }
  EXPECT_EQ(ts::find_setting("no_such_setting"), nullptr);
}

TEST(Settings, EngineDefaultsAreThoseOfTheOptionStructs) {
  const eng::EngineOptions defaults;
  const auto value = [](std::string_view name) { return ts::find_setting(name)->default_value; };
  EXPECT_EQ(value("device"), ts::SettingValue{defaults.device});
  EXPECT_EQ(value("slots"), ts::SettingValue{std::uint64_t{defaults.slots}});
  EXPECT_EQ(value("trace_capacity"), ts::SettingValue{std::uint64_t{defaults.trace_capacity}});
  EXPECT_EQ(value("wait_timeout_ms"),
            ts::SettingValue{static_cast<std::uint64_t>(defaults.wait_timeout.count())});
  EXPECT_EQ(value("prefetch_depth"), ts::SettingValue{});
  EXPECT_EQ(value("prefetch"),
            ts::SettingValue{std::string(eng::prefetch_strategy_name(defaults.prefetch))});
  EXPECT_EQ(value("num_threads"), ts::SettingValue{std::uint64_t{defaults.io.num_threads}});
  EXPECT_EQ(value("request_size"), ts::SettingValue{std::uint64_t{defaults.io.request_size}});
  EXPECT_EQ(value("direct"), ts::SettingValue{defaults.io.direct});
  EXPECT_EQ(value("check_invariants"), ts::SettingValue{false});
  EXPECT_EQ(ts::find_setting("request_size")->default_text, "8 MiB");
  EXPECT_EQ(ts::find_setting("device_budget")->default_text, "required");
  // Every option row reads back what the defaults hold, and setting it to that changes nothing.
  for (const auto& row : ts::settings()) {
    if (!row.is_option()) continue;
    EXPECT_EQ(row.get(defaults), row.default_value) << row.name;
    eng::EngineOptions o;
    ts::apply_setting(o, row.name, row.default_value);
    EXPECT_EQ(row.get(o), row.default_value) << row.name;
  }
}

TEST(Settings, ApplyingByNameSetsTheField) {
  eng::EngineOptions o;
  ts::apply_setting(o, "device", std::string("cuda:1"));
  ts::apply_setting(o, "device_budget", std::uint64_t{123456});
  ts::apply_setting(o, "slots", std::uint64_t{5});
  ts::apply_setting(o, "prefetch_depth", std::uint64_t{3});
  ts::apply_setting(o, "prefetch", std::string("next_layer"));
  ts::apply_setting(o, "backend", std::string("io_uring"));
  ts::apply_setting(o, "gds", std::string("off"));
  ts::apply_setting(o, "cache_policy", std::string("lfu"));
  ts::apply_setting(o, "wait_timeout_ms", std::uint64_t{2500});
  ts::apply_setting(o, "num_threads", std::uint64_t{100});  // clamped later, not refused
  ts::apply_setting(o, "direct", false);
  ts::apply_setting(o, "check_invariants", true);
  EXPECT_EQ(o.device, "cuda:1");
  EXPECT_EQ(o.device_budget, 123456u);
  EXPECT_EQ(o.slots, 5u);
  EXPECT_EQ(o.prefetch_depth, 3u);
  EXPECT_EQ(o.prefetch, eng::PrefetchStrategy::kNextLayer);
  EXPECT_EQ(o.backend, ts::io::BackendType::kIoUring);
  EXPECT_EQ(o.gds, eng::GdsMode::kOff);
  EXPECT_EQ(o.cache_policy, ts::cache::Policy::kLfu);
  EXPECT_EQ(o.wait_timeout, std::chrono::milliseconds(2500));
  EXPECT_EQ(o.io.num_threads, 100u);
  EXPECT_EQ(o.io.normalized().num_threads, 64u);
  EXPECT_FALSE(o.io.direct);
  EXPECT_TRUE(o.check_invariants);
  ts::apply_setting(o, "prefetch_depth", ts::SettingValue{});
  EXPECT_FALSE(o.prefetch_depth.has_value());
}

TEST(Settings, BadOptionsNameTheKey) {
  eng::EngineOptions o;
  auto m = message_of(o, "device_budgett", std::uint64_t{1});
  EXPECT_NE(m.find("unknown engine option 'device_budgett'"), std::string::npos) << m;
  EXPECT_NE(m.find("known options: device, device_budget,"), std::string::npos) << m;
  // Python and environment rows are not engine options.
  m = message_of(o, "debug_mode", true);
  EXPECT_NE(m.find("unknown engine option 'debug_mode'"), std::string::npos) << m;
  m = message_of(o, "slots", std::string("4"));
  EXPECT_NE(m.find("engine option 'slots': expected a non-negative integer, got"),
            std::string::npos)
      << m;
  m = message_of(o, "slots", ts::SettingValue{});
  EXPECT_NE(m.find("engine option 'slots'"), std::string::npos) << m;
  m = message_of(o, "slots", std::uint64_t{0});
  EXPECT_NE(m.find("engine option 'slots': 0 is below the minimum of 1"), std::string::npos) << m;
  m = message_of(o, "prefetch_depth", std::uint64_t{65});
  EXPECT_NE(m.find("'prefetch_depth': 65 is above the maximum of 64"), std::string::npos) << m;
  m = message_of(o, "wait_timeout_ms", std::uint64_t{0});
  EXPECT_NE(m.find("'wait_timeout_ms': 0 is below the minimum of 1"), std::string::npos) << m;
  m = message_of(o, "queue_depth", std::uint64_t{1} << 40);
  EXPECT_NE(m.find("'queue_depth': 1099511627776 is too large"), std::string::npos) << m;
  m = message_of(o, "prefetch", std::string("sometimes"));
  EXPECT_NE(m.find("engine option 'prefetch': prefetch strategy 'sometimes' is not one of"),
            std::string::npos)
      << m;
  m = message_of(o, "backend", std::string("fast"));
  EXPECT_NE(m.find("engine option 'backend': backend 'fast' is not one of"), std::string::npos)
      << m;
  m = message_of(o, "direct", std::uint64_t{1});
  EXPECT_NE(m.find("engine option 'direct': expected true or false"), std::string::npos) << m;
  // Nothing was changed by the refused values.
  EXPECT_EQ(o.slots, eng::EngineOptions{}.slots);
  EXPECT_EQ(o.wait_timeout, eng::EngineOptions{}.wait_timeout);
}

TEST(Settings, ChoicesComeFromTheEnumsNames) {
  const auto& backend = *ts::find_setting("backend");
  for (const auto choice : backend.choices) {
    EXPECT_TRUE(ts::io::parse_backend_type(choice).has_value()) << choice;
  }
  const auto& policy = *ts::find_setting("cache_policy");
  EXPECT_EQ(policy.choices.size(), 4u);
  for (const auto choice : policy.choices) EXPECT_NO_THROW((void)ts::cache::parse_policy(choice));
}

TEST(Settings, EnvironmentRowsAreTheVariablesTheShimsRead) {
  EXPECT_NE(ts::find_setting(ts::cuda::kCudaLibraryEnv), nullptr);
  EXPECT_NE(ts::find_setting(ts::cuda::kCufileLibraryEnv), nullptr);
  EXPECT_EQ(ts::find_setting("storage_path")->env, "TENSORSTREAM_STORAGE_PATH");
  EXPECT_EQ(ts::find_setting("vram_budget_gb")->env, "TENSORSTREAM_VRAM_BUDGET");
}

TEST(Settings, StructuralOptionsAreListedOutsideTheTable) {
  std::vector<std::string> names;
  for (const auto& o : ts::structural_options()) {
    names.emplace_back(o.name);
    EXPECT_EQ(ts::find_setting(o.name), nullptr) << o.name;
  }
  EXPECT_EQ(names, (std::vector<std::string>{"device_memory", "env", "groups", "unit_needs",
                                             "unit_partial", "unit_use_rate", "memory_stream"}));
}

// Every statistic the Python dict had before the statistics were described once.
TEST(Settings, StatisticsVisitorNamesEveryKey) {
  std::vector<std::string> top;
  std::vector<std::string> ram;
  std::vector<std::string> io;
  eng::EngineStats stats;
  for_each_field(stats, [&](std::string_view name, const auto&, std::string_view meaning) {
    top.emplace_back(name);
    EXPECT_FALSE(meaning.empty()) << name;
  });
  for_each_field(stats.ram_tier, [&](std::string_view name, const auto&, std::string_view) {
    ram.emplace_back(name);
  });
  for_each_field(stats.io, [&](std::string_view name, const auto&, std::string_view) {
    io.emplace_back(name);
  });
  const auto has = [](const std::vector<std::string>& keys, const char* key) {
    return std::find(keys.begin(), keys.end(), key) != keys.end();
  };
  for (const char* key : {"acquires",
                          "device_hits",
                          "device_misses",
                          "bytes_from_storage",
                          "bytes_from_ram_tier",
                          "bytes_to_device",
                          "fills",
                          "prefetches_issued",
                          "prefetches_used",
                          "prefetches_wasted",
                          "prefetches_cancelled",
                          "failures",
                          "stall_seconds",
                          "io_seconds",
                          "fill_seconds",
                          "storage_gbps",
                          "device_bytes_in_use",
                          "device_bytes_peak",
                          "device_budget",
                          "prefetch_depth",
                          "order_learned",
                          "block_load_seconds",
                          "backend",
                          "in_place",
                          "backend_note",
                          "gds_mode",
                          "gds_files",
                          "gds_bytes",
                          "gds_reason",
                          "gds",
                          "bytes_from_page_cache",
                          "ram_tier",
                          "io",
                          "invariant_checks"}) {
    EXPECT_TRUE(has(top, key)) << key;
  }
  for (const char* key : {"capacity", "bytes_in_use", "peak_bytes_in_use", "entries", "hits",
                          "misses", "evictions", "rejections", "hit_rate"}) {
    EXPECT_TRUE(has(ram, key)) << key;
  }
  for (const char* key :
       {"bytes_read", "requests", "reads_direct", "reads_buffered", "busy_seconds"}) {
    EXPECT_TRUE(has(io, key)) << key;
  }
}

// ---- the command and the documentation page ------------------------------------------------

TEST(SettingsCommand, ListsEverySetting) {
  const auto r = run({"settings"});
  EXPECT_EQ(r.code, ts::cli::kExitOk) << r.err;
  for (const auto& row : ts::settings()) {
    EXPECT_NE(r.out.find(std::string(row.name)), std::string::npos) << row.name;
  }
  const auto json = run({"settings", "--json"});
  EXPECT_EQ(json.code, ts::cli::kExitOk);
  EXPECT_NE(json.out.find("{\"name\":\"request_size\",\"scope\":\"io\",\"kind\":\"integer\","
                          "\"unit\":\"bytes\",\"optional\":false,\"default\":8388608"),
            std::string::npos)
      << json.out;
  EXPECT_EQ(run({"settings", "--bogus"}).code, ts::cli::kExitUsage);
}

TEST(SettingsCommand, MarkdownHasEveryRowAndStatistic) {
  const auto r = run({"settings", "--markdown"});
  ASSERT_EQ(r.code, ts::cli::kExitOk) << r.err;
  for (const auto& row : ts::settings()) {
    EXPECT_NE(r.out.find(ts::detail::concat("| `", row.name, "` |")), std::string::npos)
        << row.name;
  }
  EXPECT_NE(r.out.find("| `ram_tier.hit_rate` |"), std::string::npos);
  EXPECT_NE(r.out.find("| `gds[].reason` |"), std::string::npos);
  EXPECT_NE(r.out.find("| `num_threads` | 4 | 1 – 64 (clamped) | `num_io_threads` |"),
            std::string::npos);
}

// The committed page is the command's output: it cannot drift from the table.
TEST(SettingsCommand, TheCommittedPageIsUpToDate) {
  const auto r = run({"settings", "--check", kPage.string()});
  EXPECT_EQ(r.code, ts::cli::kExitOk)
      << r.err << "\nrun: tensorstream settings --update docs/runtime-settings.md";
  const std::string page = read_text(kPage);
  EXPECT_NE(page.find(run({"settings", "--markdown"}).out), std::string::npos);
}

TEST(SettingsCommand, CheckFindsADriftedPageAndUpdateRepairsIt) {
  TempDir dir;
  const auto copy = dir / "runtime-settings.md";
  std::string page = read_text(kPage);
  const std::string hand_written_tail = page.substr(page.find("<!-- END GENERATED -->"));
  const auto at = page.find("| `slots` | 2 |");
  ASSERT_NE(at, std::string::npos);
  page.replace(at, 15, "| `slots` | 3 |");
  write_text(copy, page);
  auto r = run({"settings", "--check", copy.string()});
  EXPECT_EQ(r.code, ts::cli::kExitFailure);
  EXPECT_NE(r.err.find("the generated part differs"), std::string::npos) << r.err;
  EXPECT_NE(r.err.find("tensorstream settings --update"), std::string::npos) << r.err;
  r = run({"settings", "--update", copy.string()});
  EXPECT_EQ(r.code, ts::cli::kExitOk) << r.err;
  EXPECT_EQ(read_text(copy), read_text(kPage));
  EXPECT_NE(read_text(copy).find(hand_written_tail), std::string::npos);
  EXPECT_EQ(run({"settings", "--check", copy.string()}).code, ts::cli::kExitOk);
  EXPECT_FALSE(std::filesystem::exists(dir / "runtime-settings.md.tmp"));
}

TEST(SettingsCommand, APageWithoutMarkersIsAnError) {
  TempDir dir;
  const auto plain = dir / "plain.md";
  write_text(plain, "# no markers here\n");
  const auto r = run({"settings", "--check", plain.string()});
  EXPECT_EQ(r.code, ts::cli::kExitFailure);
  EXPECT_NE(r.err.find("has no generated part"), std::string::npos) << r.err;
  EXPECT_NE(r.err.find(plain.string()), std::string::npos) << r.err;
  const auto missing = run({"settings", "--check", (dir / "missing.md").string()});
  EXPECT_EQ(missing.code, ts::cli::kExitFailure);
  EXPECT_NE(missing.err.find("cannot read"), std::string::npos) << missing.err;
}
