// A writer killed at any point (fork + SIGKILL) leaves either no store or the previous one
// at the destination, never a store that opens with wrong data; its leftover temporary is
// removed by cleanup_orphaned_files.
#include <gtest/gtest.h>
#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <optional>
#include <random>
#include <thread>

#include "tensorstream/store.hpp"
#include "tensorstream/store_maintenance.hpp"
#include "test_helpers.hpp"

namespace ts = tensorstream;
using ts::testing::TempDir;

namespace {

constexpr int kBlocks = 6;

// Writes a store whose content depends on `seed`; returns its fingerprint. `kill_at` names
// the stage (and occurrence) at which the process kills itself.
ts::Fingerprint write_store(const std::filesystem::path& path, std::uint64_t seed,
                            std::size_t tensor_bytes, std::optional<std::string> kill_at = {},
                            int occurrence = 1) {
  ts::StoreWriter writer(path);
  int seen = 0;
  if (kill_at) {
    writer.stage_hook = [&](std::string_view stage) {
      if (stage == *kill_at && ++seen == occurrence) ::raise(SIGKILL);
    };
  }
  for (int b = 0; b < kBlocks; ++b) {
    writer.begin_block("layers." + std::to_string(b));
    const auto data =
        ts::testing::random_bytes(tensor_bytes, seed * 100 + static_cast<unsigned>(b));
    writer.add_tensor("layers." + std::to_string(b) + ".w", ts::DType::kUInt8,
                      std::vector<std::int64_t>{static_cast<std::int64_t>(tensor_bytes)}, data);
    writer.end_block();
  }
  return writer.commit().fingerprint;
}

// Runs `body` in a child process and returns its wait status.
template <typename Body>
int run_child(Body body, std::optional<std::chrono::microseconds> kill_after = {}) {
  const pid_t pid = ::fork();
  if (pid == 0) {
    body();
    ::_exit(0);
  }
  if (kill_after) {
    std::this_thread::sleep_for(*kill_after);
    ::kill(pid, SIGKILL);
  }
  int status = 0;
  ::waitpid(pid, &status, 0);
  return status;
}

// The invariant: at the destination there is either nothing or a complete, intact store
// with one of the `allowed` fingerprints; after clean-up, no temporary remains.
void expect_consistent(const std::filesystem::path& dir, const std::filesystem::path& path,
                       const std::vector<ts::Fingerprint>& allowed, bool may_be_absent) {
  if (!std::filesystem::exists(path)) {
    EXPECT_TRUE(may_be_absent) << "the previous store disappeared";
  } else {
    const auto store = ts::Store::open(path);
    EXPECT_TRUE(store.verify().empty());
    EXPECT_NE(std::find(allowed.begin(), allowed.end(), store.info().fingerprint), allowed.end())
        << "store holds data of neither the old nor the new version";
  }
  (void)ts::cleanup_orphaned_files(dir);
  for (const auto& entry : std::filesystem::directory_iterator(dir)) {
    EXPECT_EQ(entry.path(), path) << "leftover " << entry.path();
  }
}

const std::vector<std::pair<std::string, int>> kStages = {
    {"block_written", 1},    {"block_written", kBlocks / 2}, {"block_written", kBlocks},
    {"metadata_written", 1}, {"superblock_written", 1},      {"synced", 1},
    {"renamed", 1}};

}  // namespace

TEST(CrashSafety, KilledAtEachStageWithoutPreviousStore) {
  for (const auto& [stage, occurrence] : kStages) {
    SCOPED_TRACE(stage + " #" + std::to_string(occurrence));
    TempDir dir;
    const auto path = dir / "model.tstore";
    const int status = run_child([&] { write_store(path, 2, 100000, stage, occurrence); });
    ASSERT_TRUE(WIFSIGNALED(status) && WTERMSIG(status) == SIGKILL);
    TempDir reference_dir;
    const auto expected = write_store(reference_dir / "ref.tstore", 2, 100000);
    expect_consistent(dir.path(), path, {expected}, /*may_be_absent=*/stage != "renamed");
  }
}

TEST(CrashSafety, KilledAtEachStageKeepsPreviousStore) {
  for (const auto& [stage, occurrence] : kStages) {
    SCOPED_TRACE(stage + " #" + std::to_string(occurrence));
    TempDir dir;
    const auto path = dir / "model.tstore";
    const auto old_fp = write_store(path, 1, 100000);
    const int status = run_child([&] { write_store(path, 2, 100000, stage, occurrence); });
    ASSERT_TRUE(WIFSIGNALED(status) && WTERMSIG(status) == SIGKILL);
    TempDir reference_dir;
    const auto new_fp = write_store(reference_dir / "ref.tstore", 2, 100000);
    std::vector<ts::Fingerprint> allowed{old_fp};
    if (stage == "renamed") allowed = {new_fp};
    expect_consistent(dir.path(), path, allowed, /*may_be_absent=*/false);
    EXPECT_EQ(ts::Store::open(path).info().fingerprint, allowed[0]);
  }
}

TEST(CrashSafety, KilledAtRandomMomentsKeepsPreviousStore) {
  std::mt19937 rng(1234);
  TempDir reference_dir;
  const auto new_fp = write_store(reference_dir / "ref.tstore", 2, 4 << 20);
  int finished = 0;
  int killed = 0;
  for (int round = 0; round < 12; ++round) {
    TempDir dir;
    const auto path = dir / "model.tstore";
    const auto old_fp = write_store(path, 1, 4 << 20);
    const auto delay = std::chrono::microseconds(rng() % 150000);
    const int status = run_child([&] { write_store(path, 2, 4 << 20); }, delay);
    (WIFSIGNALED(status) ? killed : finished) += 1;
    expect_consistent(dir.path(), path, {old_fp, new_fp}, /*may_be_absent=*/false);
  }
  RecordProperty("killed", killed);
  RecordProperty("finished", finished);
  EXPECT_GT(killed, 0) << "no child was killed mid-write: the test exercised nothing";
}

TEST(CrashSafety, CleanupKeepsTemporariesOfLiveWriters) {
  TempDir dir;
  ts::StoreWriter writer(dir / "live.tstore");
  writer.begin_block("b");
  writer.end_block();
  EXPECT_TRUE(ts::cleanup_orphaned_files(dir.path()).empty());
  EXPECT_TRUE(std::filesystem::exists(writer.temp_path()));
  // A temporary of a process that no longer exists is removed.
  const pid_t pid = ::fork();
  if (pid == 0) ::_exit(0);
  ::waitpid(pid, nullptr, 0);
  const auto orphan = dir / (".other.tstore." + std::to_string(pid) + ".0.tstmp");
  ts::testing::write_file(orphan, ts::testing::random_bytes(10, 1));
  const auto removed = ts::cleanup_orphaned_files(dir.path());
  ASSERT_EQ(removed.size(), 1u);
  EXPECT_EQ(removed[0], orphan);
  long parsed = 0;
  EXPECT_TRUE(ts::detail::parse_temp_name(writer.temp_path().filename().string(), parsed));
  EXPECT_EQ(parsed, ::getpid());
  EXPECT_FALSE(ts::detail::parse_temp_name("model.tstore", parsed));
  EXPECT_FALSE(ts::detail::parse_temp_name(".x.abc.0.tstmp", parsed));
}
