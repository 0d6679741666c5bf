// The benchmark and diagnosis tools: `bench-io`, `doctor`, and the C++ example, run end to
// end on small stores kept on the build directory's (real) file system.
#include <gtest/gtest.h>
#include <stdlib.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cstdio>
#include <filesystem>
#include <set>
#include <sstream>
#include <string>
#include <variant>

#include "cli.hpp"
#include "cli_util.hpp"
#include "tensorstream/detail/json.hpp"
#include "tensorstream/store.hpp"
#include "test_helpers.hpp"

namespace ts = tensorstream;
namespace json = ts::detail::json;

namespace {

struct Result {
  int code;
  std::string out;
  std::string err;
};

Result run(const std::vector<std::string>& args) {
  std::ostringstream out;
  std::ostringstream err;
  const int code = ts::cli::run(args, out, err, /*interactive=*/false);
  return {code, out.str(), err.str()};
}

// A directory on the build tree's file system (not tmpfs), removed afterwards.
class BuildTempDir {
 public:
  BuildTempDir() {
#ifdef TS_BENCH_TMP
    const std::filesystem::path base = TS_BENCH_TMP;
#else
    const std::filesystem::path base = std::filesystem::temp_directory_path();
#endif
    std::string pattern = (base / "tsbench-XXXXXX").string();
    if (::mkdtemp(pattern.data()) == nullptr) throw std::runtime_error("mkdtemp failed");
    path_ = pattern;
  }
  ~BuildTempDir() {
    std::error_code ec;
    std::filesystem::remove_all(path_, ec);
  }
  BuildTempDir(const BuildTempDir&) = delete;
  BuildTempDir& operator=(const BuildTempDir&) = delete;
  [[nodiscard]] const std::filesystem::path& path() const { return path_; }

 private:
  std::filesystem::path path_;
};

// A store of a few MB with blocks of uneven sizes (not multiples of 4096).
std::uint64_t write_store(const std::filesystem::path& path) {
  ts::WriterOptions options;
  options.durable = false;
  ts::StoreWriter writer(path, options);
  const std::vector<std::size_t> sizes = {300'000, 1'048'700, 2'000'000, 65'536, 777'777};
  for (std::size_t b = 0; b < sizes.size(); ++b) {
    const std::string name = "layers." + std::to_string(b);
    writer.begin_block(name);
    const auto data = ts::testing::random_bytes(sizes[b], b + 1);
    const std::int64_t shape[] = {static_cast<std::int64_t>(sizes[b])};
    writer.add_tensor(name + ".weight", ts::DType::kUInt8, shape, data);
    const std::int64_t small_shape[] = {100};
    writer.add_tensor(name + ".bias", ts::DType::kUInt8, small_shape,
                      std::span(data).subspan(0, 100));
    writer.end_block();
  }
  writer.commit();
  std::uint64_t total = 0;
  const auto store = ts::Store::open(path);
  for (const auto& b : store.blocks()) total += b.stored_size;
  return total;
}

const json::Value& member(const json::Value& v, const std::string& key) {
  const auto* m = v.find(key);
  if (m == nullptr) throw std::runtime_error("missing JSON member '" + key + "'");
  return *m;
}

double number(const json::Value& v) {
  if (const auto* i = std::get_if<json::Integer>(&v.data)) {
    return i->negative ? -static_cast<double>(i->magnitude) : static_cast<double>(i->magnitude);
  }
  if (const auto* d = std::get_if<double>(&v.data)) return *d;
  throw std::runtime_error("not a number");
}

bool is_null(const json::Value& v) { return std::holds_alternative<std::nullptr_t>(v.data); }

bool on_path(const std::string& program) {
  const char* path = std::getenv("PATH");
  if (path == nullptr) return false;
  std::stringstream dirs(path);
  std::string dir;
  while (std::getline(dirs, dir, ':')) {
    if (!dir.empty() && ::access((std::filesystem::path(dir) / program).c_str(), X_OK) == 0) {
      return true;
    }
  }
  return false;
}

class BenchTools : public ::testing::Test {
 protected:
  void SetUp() override {
    store_ = dir_.path() / "small.tstore";
    block_bytes_ = write_store(store_);
  }

  BuildTempDir dir_;
  std::filesystem::path store_;
  std::uint64_t block_bytes_ = 0;
};

}  // namespace

TEST_F(BenchTools, BenchIoJsonReportsEveryBackendAndTheReference) {
  const auto r = run({"bench-io", store_.string(), "--json", "--no-fio", "--repeat", "1"});
  ASSERT_EQ(r.code, 0) << r.err;
  const auto doc = json::parse(r.out, "bench-io output");  // exactly one JSON value
  EXPECT_EQ(number(member(doc, "bytes")), static_cast<double>(block_bytes_));
  EXPECT_TRUE(std::get<bool>(member(doc, "cold").data));
  EXPECT_FALSE(std::get<std::string>(member(member(doc, "machine"), "filesystem").data).empty());
  EXPECT_GE(number(member(member(doc, "machine"), "cpus")), 1);

  std::set<std::string> seen;
  for (const auto& [name, b] : std::get<json::Object>(member(doc, "backends").data)) {
    seen.insert(name);
    EXPECT_EQ(number(member(b, "bytes")), static_cast<double>(block_bytes_)) << name;
    EXPECT_GT(number(member(b, "gbps")), 0) << name;
    EXPECT_GT(number(member(b, "seconds")), 0) << name;
    EXPECT_TRUE(std::holds_alternative<bool>(member(b, "direct").data)) << name;
    EXPECT_GT(number(member(b, "vs_odirect")), 0) << name;
  }
  for (const auto& [name, why] : std::get<json::Object>(member(doc, "skipped").data)) {
    seen.insert(name);
    EXPECT_FALSE(std::get<std::string>(why.data).empty()) << name;
  }
  EXPECT_EQ(seen, (std::set<std::string>{"pread", "io_uring", "mmap"}));
  EXPECT_TRUE(doc.find("backends")->find("pread") != nullptr) << "pread always works";

  const auto& reference = member(doc, "reference");
  const auto& odirect = member(reference, "odirect_read");
  ASSERT_FALSE(is_null(odirect));
  EXPECT_GE(number(member(odirect, "bytes")), static_cast<double>(block_bytes_));
  EXPECT_GT(number(member(odirect, "gbps")), 0);
  EXPECT_TRUE(is_null(member(reference, "fio")));
  EXPECT_NE(std::get<std::string>(member(reference, "fio_note").data).find("--no-fio"),
            std::string::npos);
  EXPECT_TRUE(is_null(member(reference, "pinned_h2d")));

  const auto& device = member(doc, "device");
  ASSERT_FALSE(is_null(device));
  const auto& engine = member(device, "engine");
  EXPECT_EQ(number(member(engine, "bytes")), static_cast<double>(block_bytes_));
  EXPECT_GT(number(member(engine, "gbps")), 0);
  EXPECT_EQ(number(member(engine, "acquires")), 5);
  // On the CPU, the engine reading in place through the page cache is measured beside it.
  const auto& mapped = member(device, "in_place");
  ASSERT_FALSE(is_null(mapped));
  EXPECT_EQ(number(member(mapped, "bytes")), static_cast<double>(block_bytes_));
  EXPECT_GT(number(member(mapped, "gbps")), 0);
  EXPECT_EQ(number(member(mapped, "acquires")), 5);
}

TEST_F(BenchTools, BenchIoTableAndOptions) {
  const auto r = run({"bench-io", store_.string(), "--no-fio", "--repeat", "2", "--backends",
                      "pread", "--threads", "2", "--request-size", "4", "--queue-depth", "4",
                      "--in-flight", "2", "--device", "none"});
  ASSERT_EQ(r.code, 0) << r.err;
  EXPECT_NE(r.out.find("pread"), std::string::npos) << r.out;
  EXPECT_NE(r.out.find("O_DIRECT read"), std::string::npos) << r.out;
  EXPECT_NE(r.out.find("threads 2, request 4.0 MiB, queue depth 4, 2 block(s) in flight"),
            std::string::npos)
      << r.out;
  EXPECT_EQ(r.out.find("mmap "), std::string::npos) << r.out;
  EXPECT_EQ(r.out.find("engine ->"), std::string::npos) << r.out;

  const auto out_file = dir_.path() / "result.json";
  const auto w = run({"bench-io", store_.string(), "--no-fio", "--repeat", "1", "--backends",
                      "mmap", "--warm", "--json-out", out_file.string()});
  ASSERT_EQ(w.code, 0) << w.err;
  EXPECT_NE(w.out.find("warm page cache"), std::string::npos) << w.out;
  const auto bytes = ts::testing::read_file(out_file);
  const auto doc = json::parse(
      std::string_view(reinterpret_cast<const char*>(bytes.data()), bytes.size()), "json-out");
  EXPECT_FALSE(std::get<bool>(member(doc, "cold").data));
  EXPECT_EQ(number(member(member(member(doc, "backends"), "mmap"), "bytes")),
            static_cast<double>(block_bytes_));
}

TEST_F(BenchTools, BenchIoWithFio) {
  if (!on_path("fio")) GTEST_SKIP() << "fio is not installed";
  const auto r = run({"bench-io", store_.string(), "--json", "--repeat", "1", "--backends", "pread",
                      "--device", "none"});
  ASSERT_EQ(r.code, 0) << r.err;
  const auto doc = json::parse(r.out, "bench-io output");
  const auto& fio = member(member(doc, "reference"), "fio");
  ASSERT_FALSE(is_null(fio)) << r.out;
  EXPECT_GT(number(member(fio, "gbps")), 0);
  EXPECT_GT(number(member(fio, "bytes")), 0);
  EXPECT_GT(number(member(member(member(doc, "backends"), "pread"), "vs_fio")), 0);
}

TEST_F(BenchTools, BenchIoErrors) {
  auto r = run({"bench-io", store_.string(), "--frobnicate"});
  EXPECT_EQ(r.code, 2);
  EXPECT_NE(r.err.find("--frobnicate"), std::string::npos) << r.err;
  EXPECT_EQ(run({"bench-io", store_.string(), "--repeat"}).code, 2);
  EXPECT_EQ(run({"bench-io", store_.string(), "--repeat", "0"}).code, 2);
  EXPECT_EQ(run({"bench-io", store_.string(), "--backends", "pread,floppy"}).code, 2);
  EXPECT_EQ(run({"bench-io", store_.string(), "--device", "tpu:0"}).code, 2);
  EXPECT_EQ(run({"bench-io"}).code, 2);
  EXPECT_EQ(run({"bench-io", store_.string(), store_.string()}).code, 2);

  const auto missing = dir_.path() / "no-such.tstore";
  r = run({"bench-io", missing.string(), "--no-fio"});
  EXPECT_EQ(r.code, 1);
  EXPECT_NE(r.err.find(missing.string()), std::string::npos) << r.err;
}

TEST_F(BenchTools, MakeStore) {
  const auto path = dir_.path() / "made.tstore";
  const auto r =
      run({"bench-io", "--make-store", path.string(), "--size-gb", "0.003", "--block-mb", "1"});
  ASSERT_EQ(r.code, 0) << r.err;
  const auto store = ts::Store::open(path);
  EXPECT_EQ(store.blocks().size(), 3u);
  EXPECT_TRUE(store.verify().empty());
  EXPECT_EQ(run({"bench-io", "--make-store", path.string()}).code, 2);  // no --size-gb
}

TEST_F(BenchTools, DoctorJson) {
  const auto r =
      run({"doctor", "--json", "--storage-path", dir_.path().string(), "--probe-size", "8"});
  ASSERT_EQ(r.code, 0) << r.err;
  const auto doc = json::parse(r.out, "doctor output");
  std::set<std::string> names;
  for (const auto& [name, b] : std::get<json::Object>(member(doc, "backends").data)) {
    names.insert(name);
    const bool works = std::get<bool>(member(b, "works").data);
    const auto& reason = std::get<std::string>(member(b, "reason").data);
    if (!works) {
      EXPECT_FALSE(reason.empty()) << name;
    }
  }
  EXPECT_EQ(names, (std::set<std::string>{"pread", "mmap", "io_uring", "gpudirect"}));
  EXPECT_TRUE(std::get<bool>(member(member(member(doc, "backends"), "pread"), "works").data));

  const auto& storage = member(doc, "storage");
  EXPECT_EQ(std::get<std::string>(member(storage, "path").data), dir_.path().string());
  const auto& bandwidth = member(storage, "bandwidth");
  ASSERT_FALSE(is_null(bandwidth)) << r.out;
  EXPECT_GT(number(member(bandwidth, "read_gbps")), 0);
  EXPECT_EQ(number(member(bandwidth, "bytes")), 8.0 * (1 << 20));
  EXPECT_TRUE(doc.find("cuda")->find("driver") != nullptr);
  EXPECT_TRUE(doc.find("cufile")->find("loaded") != nullptr);
  // GPUDirect Storage: whether it works on the storage path, and if not, why.
  const auto& gds = member(doc, "gds");
  if (!std::get<bool>(member(gds, "works").data)) {
    EXPECT_FALSE(std::get<std::string>(member(gds, "reason").data).empty()) << r.out;
  }
  const auto& memlock = member(member(doc, "memlock"), "soft");
  EXPECT_TRUE(memlock.is_integer() || std::get<std::string>(memlock.data) == "unlimited");
  EXPECT_TRUE(doc.find("io_uring")->find("works") != nullptr);

  // The probe file is gone, and nothing else was left behind.
  std::size_t entries = 0;
  for (const auto& e : std::filesystem::directory_iterator(dir_.path())) {
    (void)e;
    ++entries;
  }
  EXPECT_EQ(entries, 1u);  // small.tstore only
}

// doctor warns about RLIMIT_MEMLOCK only for io_uring rings, which kernels before 5.12 charge
// to it (CUDA's pinned memory is never charged; see doctor.cpp).
TEST(DoctorMemlock, IoUringRingsAreChargedBeforeLinux512) {
  using ts::cli::util::io_uring_rings_charged_to_memlock;
  EXPECT_TRUE(io_uring_rings_charged_to_memlock("5.10.0-27-amd64"));
  EXPECT_TRUE(io_uring_rings_charged_to_memlock("5.11.22"));
  EXPECT_TRUE(io_uring_rings_charged_to_memlock("4.19.0"));
  EXPECT_FALSE(io_uring_rings_charged_to_memlock("5.12.0"));
  EXPECT_FALSE(io_uring_rings_charged_to_memlock("6.18.44-fc-v669"));
  EXPECT_FALSE(io_uring_rings_charged_to_memlock("10.1"));
  EXPECT_FALSE(io_uring_rings_charged_to_memlock(""));
  EXPECT_FALSE(io_uring_rings_charged_to_memlock("linux"));
  EXPECT_FALSE(io_uring_rings_charged_to_memlock("5"));
}

TEST_F(BenchTools, DoctorText) {
  const auto r = run({"doctor", "--storage-path", dir_.path().string(), "--probe-size", "4"});
  ASSERT_EQ(r.code, 0) << r.err;
  for (const char* line :
       {"CUDA support compiled in:", "CUDA driver:", "cuFile (GPUDirect Storage):",
        "GPUDirect Storage on the storage path:", "O_DIRECT on the storage path:", "io_uring:",
        "RLIMIT_MEMLOCK", "backends on", "gpudirect", "storage read bandwidth:"}) {
    EXPECT_NE(r.out.find(line), std::string::npos) << line << "\n" << r.out;
  }
  EXPECT_EQ(run({"doctor", "--storage-path"}).code, 2);
  EXPECT_EQ(run({"doctor", "--what"}).code, 2);
  const auto missing = run({"doctor", "--storage-path", (dir_.path() / "nope").string()});
  EXPECT_EQ(missing.code, 1);
  EXPECT_NE(missing.err.find("nope"), std::string::npos) << missing.err;
}

#ifdef TS_EXAMPLE_BIN
TEST_F(BenchTools, ExampleStreamStoreRuns) {
  const std::string command =
      std::string("'") + TS_EXAMPLE_BIN + "' '" + store_.string() + "' --passes 2 2>&1";
  FILE* pipe = ::popen(command.c_str(), "r");
  ASSERT_NE(pipe, nullptr);
  std::string output;
  char buf[4096];
  while (const std::size_t n = std::fread(buf, 1, sizeof buf, pipe)) output.append(buf, n);
  const int status = ::pclose(pipe);
  ASSERT_TRUE(WIFEXITED(status)) << output;
  EXPECT_EQ(WEXITSTATUS(status), 0) << output;
  EXPECT_NE(output.find("streamed 5 blocks x 2 passes to cpu"), std::string::npos) << output;
  EXPECT_NE(output.find("GB/s"), std::string::npos) << output;
  EXPECT_NE(output.find("hits"), std::string::npos) << output;
  EXPECT_NE(output.find("stall"), std::string::npos) << output;
}
#endif
