// The I/O backends (pread, mmap, io_uring) on a real-disk directory and on /dev/shm: exact
// bytes of store blocks, unaligned ranges and safetensors tensors; concurrency; statistics
// and O_DIRECT reporting; injected faults (EIO, short reads, slow reads); cancellation;
// teardown with reads in flight; reads past the end of a file. Plus the aligned buffer,
// the read plan, the options and the factory.
#include <fcntl.h>
#include <sys/statfs.h>
#include <unistd.h>

#include <gtest/gtest.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <future>
#include <mutex>
#include <random>
#include <set>
#include <string>
#include <thread>
#include <tuple>
#include <vector>

#include "tensorstream/errors.hpp"
#include "tensorstream/io/aligned_buffer.hpp"
#include "tensorstream/io/backend.hpp"
#include "tensorstream/io/mmap_backend.hpp"
#include "tensorstream/io/pread_backend.hpp"
#include "tensorstream/io/uring_backend.hpp"
#include "tensorstream/safetensors.hpp"
#include "tensorstream/store.hpp"
#include "test_helpers.hpp"

namespace {

namespace fs = std::filesystem;
namespace ts = tensorstream;
namespace tio = tensorstream::io;
using namespace std::chrono_literals;
using tio::AlignedBuffer;
using tio::BackendType;
using tio::FileId;
using tio::IoOptions;
using ts::testing::Fault;
using ts::testing::FaultContext;
using ts::testing::FaultInjectionEnv;
using ts::testing::FaultPoint;

// Sanitized builds are several times slower: scale the data down there.
#if defined(__SANITIZE_THREAD__) || defined(__SANITIZE_ADDRESS__)
constexpr bool kSanitized = true;
#else
constexpr bool kSanitized = false;
#endif
constexpr std::uint64_t kMiB = 1ull << 20;
constexpr std::uint64_t kRequest = 4 * kMiB;  // the smallest request size: most boundaries

// ---- helpers ------------------------------------------------------------------------------

// Random bytes, 8 at a time (the shared helper draws one per call: too slow for 100 MiB).
std::vector<std::byte> random_data(std::size_t n, std::uint64_t seed) {
  std::vector<std::byte> out(n);
  std::uint64_t x = seed * 0x9E3779B97F4A7C15ull + 1;
  std::size_t i = 0;
  for (; i + 8 <= n; i += 8) {
    x += 0x9E3779B97F4A7C15ull;
    std::uint64_t z = x;
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    z ^= z >> 31;
    std::memcpy(out.data() + i, &z, 8);
  }
  for (; i < n; ++i) out[i] = static_cast<std::byte>((x >> (i % 8 * 8)) & 0xff);
  return out;
}

std::vector<std::byte> write_random_file(const fs::path& path, std::size_t n, std::uint64_t seed) {
  auto data = random_data(n, seed);
  ts::testing::write_file(path, data);
  return data;
}

int count_open_fds() {
  int n = 0;
  for ([[maybe_unused]] const auto& entry : fs::directory_iterator("/proc/self/fd")) ++n;
  return n;
}

bool is_tmpfs(const fs::path& dir) {
  struct statfs st {};
  return ::statfs(dir.c_str(), &st) == 0 && st.f_type == 0x01021994;  // TMPFS_MAGIC
}

// A fresh directory under `base`, removed with its content on destruction.
class ScratchDir {
 public:
  explicit ScratchDir(const fs::path& base) {
    std::string pattern = (base / "tsio-XXXXXX").string();
    if (::mkdtemp(pattern.data()) != nullptr) path_ = pattern;
  }
  ~ScratchDir() {
    std::error_code ec;
    if (!path_.empty()) fs::remove_all(path_, ec);
  }
  ScratchDir(const ScratchDir&) = delete;
  ScratchDir& operator=(const ScratchDir&) = delete;
  [[nodiscard]] bool ok() const { return !path_.empty(); }
  [[nodiscard]] const fs::path& path() const { return path_; }

 private:
  fs::path path_;
};

// A directory on a real disk: TS_TEST_DISK_DIR, else beside the test binary (the build tree).
fs::path disk_base() {
  if (const char* env = std::getenv("TS_TEST_DISK_DIR"); env != nullptr && *env != '\0') {
    return env;
  }
  return fs::read_symlink("/proc/self/exe").parent_path();
}

// Reads [offset, offset + size) into a fresh aligned buffer and checks it against `content`.
void expect_range(tio::Backend& backend, FileId id, const std::vector<std::byte>& content,
                  std::uint64_t offset, std::uint64_t size) {
  SCOPED_TRACE(::testing::Message() << "range of " << size << " bytes at offset " << offset);
  const auto plan = tio::plan_read(offset, size);
  AlignedBuffer buffer(tio::required_capacity(offset, size));
  const auto bytes = backend.read(id, offset, size, buffer.span());
  ASSERT_EQ(bytes.size(), size);
  if (size == 0) return;
  EXPECT_EQ(bytes.data(), buffer.data() + plan.skip);
  EXPECT_EQ(std::memcmp(bytes.data(), content.data() + offset, size), 0);
}

template <typename Exception>
std::string expect_throws(const tio::ReadTicket& ticket) {
  try {
    ticket.wait();
  } catch (const Exception& e) {
    return e.what();
  } catch (const std::exception& e) {
    ADD_FAILURE() << "unexpected exception: " << e.what();
    return {};
  }
  ADD_FAILURE() << "the read did not fail";
  return {};
}

// ---- the parametrised suite: every backend × {disk, /dev/shm} --------------------------

struct Param {
  BackendType type;
  const char* where;  // "disk" or "shm"
};

std::string param_name(const ::testing::TestParamInfo<Param>& info) {
  return std::string(tio::backend_name(info.param.type)) + "_" + info.param.where;
}

class IoBackendTest : public ::testing::TestWithParam<Param> {
 protected:
  void SetUp() override {
    if (GetParam().type == BackendType::kIoUring) {
      if (auto why = tio::UringBackend::unavailable_reason()) GTEST_SKIP() << *why;
    }
    fs::path base = disk_base();
    if (std::string(GetParam().where) == "shm") {
      base = "/dev/shm";
      if (!fs::is_directory(base) || !is_tmpfs(base)) GTEST_SKIP() << "no tmpfs at /dev/shm";
    }
    dir_ = std::make_unique<ScratchDir>(base);
    if (!dir_->ok()) GTEST_SKIP() << "cannot create a directory in " << base;
  }

  [[nodiscard]] std::unique_ptr<tio::Backend> make(IoOptions options = {},
                                                   tio::Env& env = tio::Env::posix()) const {
    if (options.request_size == IoOptions{}.request_size) options.request_size = kRequest;
    return tio::make_backend(GetParam().type, options, env);
  }
  [[nodiscard]] fs::path file(const std::string& name) const { return dir_->path() / name; }
  [[nodiscard]] bool is_mmap() const { return GetParam().type == BackendType::kMmap; }

  std::unique_ptr<ScratchDir> dir_;
};

INSTANTIATE_TEST_SUITE_P(
    All, IoBackendTest,
    ::testing::Values(Param{BackendType::kPread, "disk"}, Param{BackendType::kPread, "shm"},
                      Param{BackendType::kMmap, "disk"}, Param{BackendType::kMmap, "shm"},
                      Param{BackendType::kIoUring, "disk"}, Param{BackendType::kIoUring, "shm"}),
    param_name);

TEST_P(IoBackendTest, StoreBlocksExact) {
  const fs::path path = file("model.tstore");
  std::mt19937_64 rng(1234);
  const int blocks = kSanitized ? 3 : 6;
  const std::uint64_t max_block = 20 * kMiB;
  std::vector<std::vector<std::vector<std::byte>>> expected(blocks);
  {
    ts::StoreWriter writer(path, ts::WriterOptions{.durable = false});
    std::uint64_t seed = 1;
    for (int b = 0; b < blocks; ++b) {
      writer.begin_block("block" + std::to_string(b));
      // Block 0 is empty, block 1 tiny; the others random up to 20 MiB.
      // Tensor sizes: the budget cut at random points (each tensor at least 1 byte).
      const int tensors = b == 0 ? 0 : 1 + static_cast<int>(rng() % 6);
      const std::uint64_t budget = b == 1 ? 1000 : rng() % (max_block + 1);
      std::vector<std::uint64_t> cuts = {0, budget};
      for (int t = 1; t < tensors; ++t) cuts.push_back(rng() % (budget + 1));
      std::sort(cuts.begin(), cuts.end());
      for (int t = 0; t < tensors; ++t) {
        const std::uint64_t n = std::max<std::uint64_t>(1, cuts[t + 1] - cuts[t]);
        expected[b].push_back(random_data(n, seed++));
        const std::int64_t shape[] = {static_cast<std::int64_t>(n)};
        writer.add_tensor("b" + std::to_string(b) + ".t" + std::to_string(t), ts::DType::kUInt8,
                          shape, expected[b].back());
      }
      writer.end_block();
    }
    writer.commit();
  }
  const auto store = ts::Store::open(path);
  auto backend = make();
  const FileId id = backend->open(path);
  std::uint64_t total = 0;
  for (std::size_t b = 0; b < store.blocks().size(); ++b) {
    const auto& block = store.blocks()[b];
    SCOPED_TRACE(block.name);
    ASSERT_EQ(block.offset % 4096, 0u);
    AlignedBuffer buffer(tio::required_capacity(block.offset, block.stored_size));
    const auto bytes = backend->read(id, block.offset, block.stored_size, buffer.span());
    ASSERT_EQ(bytes.size(), block.stored_size);
    EXPECT_EQ(bytes.data(), buffer.data());  // aligned block: no skip
    std::vector<std::byte> reference(block.raw_size);
    store.read_block(b, reference, /*verify=*/true);
    EXPECT_TRUE(std::equal(reference.begin(), reference.end(), bytes.begin()));
    const auto tensors = store.block_tensors(b);
    ASSERT_EQ(tensors.size(), expected[b].size());
    for (std::size_t t = 0; t < tensors.size(); ++t) {
      const auto& want = expected[b][t];
      ASSERT_EQ(tensors[t].nbytes, want.size());
      EXPECT_EQ(std::memcmp(bytes.data() + tensors[t].offset_in_block, want.data(), want.size()), 0)
          << tensors[t].name;
    }
    total += block.stored_size;
  }
  const auto stats = backend->stats();
  EXPECT_GE(stats.bytes_read, total);
  EXPECT_EQ(stats.failed, 0u);
}

TEST_P(IoBackendTest, UnalignedRangesExact) {
  const std::uint64_t size = 3 * kRequest + 12345;
  const auto content = write_random_file(file("data.bin"), size, 7);
  auto backend = make();
  const FileId id = backend->open(file("data.bin"));
  EXPECT_EQ(backend->file_size(id), size);
  // Edges: single bytes, the tail, request and page boundaries, the whole file.
  const std::vector<std::pair<std::uint64_t, std::uint64_t>> edges = {
      {0, 1},
      {size - 1, 1},
      {4095, 1},
      {4095, 2},
      {4096, 4096},
      {kRequest - 1, 2},
      {kRequest - 5000, kRequest + 10000},
      {0, size},
      {1, size - 1},
      {size - 12345, 12345},
      {size - 4097, 4097},
      {123, 0},
      {kRequest * 2, kRequest}};
  for (const auto& [offset, length] : edges) expect_range(*backend, id, content, offset, length);
  std::mt19937_64 rng(99);
  for (int i = 0; i < (kSanitized ? 15 : 40); ++i) {
    const std::uint64_t offset = rng() % size;
    const std::uint64_t max_len = std::min<std::uint64_t>(size - offset, 9 * kMiB);
    const std::uint64_t length = i % 4 == 0 ? 1 + rng() % 64 : 1 + rng() % max_len;
    expect_range(*backend, id, content, offset, std::min(length, size - offset));
  }
}

// Hugging Face layout: 8-byte length, JSON header, tensors packed back to back.
TEST_P(IoBackendTest, SafetensorsTensorsExact) {
  struct Spec {
    std::string name;
    std::string dtype;
    std::uint64_t count;
    std::uint64_t element;
  };
  const std::vector<Spec> specs = {
      {"a", "U8", 1, 1}, {"b", "U8", 4093, 1},     {"c", "BF16", 5 * kMiB + 3, 2},
      {"d", "U8", 7, 1}, {"e", "F32", 1000003, 4}, {"f", "U8", 4096, 1},
      {"g", "I64", 1, 8}};
  std::string header = "{";
  std::vector<std::byte> data;
  std::vector<std::vector<std::byte>> tensors;
  for (std::size_t i = 0; i < specs.size(); ++i) {
    const auto& s = specs[i];
    tensors.push_back(random_data(s.count * s.element, 100 + i));
    header += (i ? "," : "") + std::string("\"") + s.name + "\":{\"dtype\":\"" + s.dtype +
              "\",\"shape\":[" + std::to_string(s.count) + "],\"data_offsets\":[" +
              std::to_string(data.size()) + "," +
              std::to_string(data.size() + tensors.back().size()) + "]}";
    data.insert(data.end(), tensors.back().begin(), tensors.back().end());
  }
  header += ",\"__metadata__\":{\"format\":\"pt\"}}";
  header.append((8 - header.size() % 8) % 8 + 3, ' ');  // +3: make the data section unaligned
  std::vector<std::byte> image(8);
  const std::uint64_t n = header.size();
  for (int i = 0; i < 8; ++i) image[i] = static_cast<std::byte>((n >> (8 * i)) & 0xff);
  for (char c : header) image.push_back(static_cast<std::byte>(c));
  image.insert(image.end(), data.begin(), data.end());
  ts::testing::write_file(file("model.safetensors"), image);

  const auto st = ts::SafetensorsFile::open(file("model.safetensors"));
  ASSERT_EQ(st.tensors().size(), specs.size());
  auto backend = make();
  const FileId id = backend->open(file("model.safetensors"));
  int unaligned = 0;
  for (const auto& t : st.tensors()) {
    SCOPED_TRACE(t.name);
    const auto index = static_cast<std::size_t>(t.name[0] - 'a');
    const auto plan = tio::plan_read(t.offset, t.nbytes);
    EXPECT_EQ(plan.skip, t.offset % 4096);
    unaligned += plan.skip != 0;
    AlignedBuffer buffer(tio::required_capacity(t.offset, t.nbytes));
    auto ticket = backend->submit(id, t.offset, t.nbytes, buffer.span());
    EXPECT_EQ(ticket.plan(), plan);
    const auto bytes = ticket.wait();
    ASSERT_EQ(bytes.size(), tensors[index].size());
    EXPECT_EQ(bytes.data(), buffer.data() + plan.skip);
    EXPECT_EQ(std::memcmp(bytes.data(), tensors[index].data(), bytes.size()), 0);
  }
  EXPECT_GE(unaligned, 5);
}

TEST_P(IoBackendTest, ConcurrentSubmitsFromFourThreads) {
  const std::uint64_t size = 2 * kRequest + 777;
  const auto content = write_random_file(file("data.bin"), size, 11);
  IoOptions options;
  options.num_threads = 4;
  options.queue_depth = 8;
  auto backend = make(options);
  const FileId id = backend->open(file("data.bin"));
  const int per_thread = kSanitized ? 8 : 24;
  std::atomic<std::uint64_t> requested{0};
  std::atomic<int> mismatches{0};
  std::vector<std::thread> threads;
  for (int t = 0; t < 4; ++t) {
    threads.emplace_back([&, t] {
      std::mt19937_64 rng(500 + t);
      std::vector<AlignedBuffer> buffers;
      std::vector<tio::ReadTicket> tickets;
      std::vector<std::pair<std::uint64_t, std::uint64_t>> ranges;
      for (int i = 0; i < per_thread; ++i) {
        const std::uint64_t offset = rng() % size;
        const std::uint64_t length = 1 + rng() % std::min<std::uint64_t>(size - offset, 3 * kMiB);
        buffers.emplace_back(tio::required_capacity(offset, length));
        tio::SubmitOptions submit_options;
        submit_options.priority = i % 5 == 0 ? tio::Priority::kHigh : tio::Priority::kNormal;
        tickets.push_back(
            backend->submit(id, offset, length, buffers.back().span(), submit_options));
        ranges.emplace_back(offset, length);
        requested += length;
      }
      for (std::size_t i = 0; i < tickets.size(); ++i) {
        const auto bytes = tickets[i].wait();
        if (std::memcmp(bytes.data(), content.data() + ranges[i].first, ranges[i].second) != 0) {
          ++mismatches;
        }
      }
    });
  }
  for (auto& t : threads) t.join();
  EXPECT_EQ(mismatches.load(), 0);
  const auto stats = backend->stats();
  EXPECT_EQ(stats.submitted, 4u * per_thread);
  EXPECT_EQ(stats.completed, 4u * per_thread);
  EXPECT_EQ(stats.failed + stats.cancelled, 0u);
  EXPECT_GE(stats.bytes_read, requested.load());
  EXPECT_GE(stats.requests, 4u * per_thread);
  EXPECT_GT(stats.busy_seconds, 0.0);
}

TEST_P(IoBackendTest, StatsReportDirectIo) {
  const std::uint64_t size = kRequest + 4096 * 3 + 100;  // a tail that is not a whole page
  const auto content = write_random_file(file("data.bin"), size, 3);
  auto backend = make();
  const FileId id = backend->open(file("data.bin"));
  expect_range(*backend, id, content, 0, size);
  const auto stats = backend->stats();
  ASSERT_EQ(stats.files.size(), 1u);
  const auto& info = stats.files[0];
  EXPECT_EQ(info.id, id);
  EXPECT_EQ(info.path, file("data.bin"));
  EXPECT_EQ(info.size, size);
  EXPECT_GE(stats.bytes_read, size);
  if (is_mmap()) {
    EXPECT_FALSE(info.direct);
    EXPECT_EQ(stats.reads_direct, 0u);
    EXPECT_FALSE(info.direct_note.empty());
    return;
  }
  const auto direct_problem = tio::probe_direct_io(dir_->path());
  std::printf("[ info ] %s on %s: O_DIRECT %s%s\n", backend->name().data(), GetParam().where,
              info.direct ? "in use" : "not in use: ", info.direct ? "" : info.direct_note.c_str());
  if (!direct_problem) {
    EXPECT_TRUE(info.direct) << info.direct_note;
    EXPECT_TRUE(info.direct_note.empty()) << info.direct_note;
    EXPECT_GT(stats.reads_direct, 0u);
  } else {
    EXPECT_FALSE(info.direct);
    EXPECT_FALSE(info.direct_note.empty());
    EXPECT_EQ(stats.reads_direct, 0u);
  }
  if (std::string(GetParam().where) == "disk" && !direct_problem) {
    // The unaligned tail of a direct read still arrives exact (short transfer at EOF).
    expect_range(*backend, id, content, size - 5000, 5000);
  }
  // Turning O_DIRECT off is reported as such.
  IoOptions no_direct;
  no_direct.direct = false;
  auto buffered = make(no_direct);
  const FileId id2 = buffered->open(file("data.bin"));
  expect_range(*buffered, id2, content, 10, size - 10);
  const auto stats2 = buffered->stats();
  EXPECT_FALSE(stats2.files[0].direct);
  EXPECT_NE(stats2.files[0].direct_note.find("disabled"), std::string::npos);
  EXPECT_EQ(stats2.reads_direct, 0u);
}

TEST_P(IoBackendTest, DirectOpenRefusedFallsBackToBuffered) {
  if (is_mmap()) GTEST_SKIP() << "mmap does not use O_DIRECT";
  const std::uint64_t size = kRequest + 5000;
  const auto content = write_random_file(file("data.bin"), size, 4);
  IoOptions options;
  FaultInjectionEnv env([](const FaultContext& c) {
    Fault f;
    if (c.point == FaultPoint::kOpenDirect) f.error = EINVAL;  // like an old tmpfs
    return f;
  });
  auto backend = make(options, env);
  const FileId id = backend->open(file("data.bin"));
  expect_range(*backend, id, content, 0, size);
  const auto stats = backend->stats();
  EXPECT_FALSE(stats.files[0].direct);
  EXPECT_EQ(stats.files[0].direct_note,
            "O_DIRECT refused by the file system (EINVAL): falling back to buffered reads");
  EXPECT_EQ(stats.reads_direct, 0u);
  EXPECT_GT(stats.reads_buffered, 0u);
}

TEST_P(IoBackendTest, DirectReadRefusedFallsBackToBuffered) {
  if (is_mmap()) GTEST_SKIP() << "mmap does not use O_DIRECT";
  if (tio::probe_direct_io(dir_->path())) GTEST_SKIP() << "no O_DIRECT here";
  const std::uint64_t size = 2 * kRequest + 5000;
  const auto content = write_random_file(file("data.bin"), size, 5);
  IoOptions options;
  FaultInjectionEnv env([](const FaultContext& c) {
    Fault f;
    if (c.point == FaultPoint::kRead && c.direct) f.error = EINVAL;
    return f;
  });
  auto backend = make(options, env);
  const FileId id = backend->open(file("data.bin"));
  EXPECT_TRUE(backend->stats().files[0].direct);
  expect_range(*backend, id, content, 0, size);
  expect_range(*backend, id, content, 333, 100000);
  const auto stats = backend->stats();
  EXPECT_FALSE(stats.files[0].direct);
  EXPECT_NE(stats.files[0].direct_note.find("EINVAL"), std::string::npos)
      << stats.files[0].direct_note;
  EXPECT_NE(stats.files[0].direct_note.find("falling back to buffered reads"), std::string::npos);
  EXPECT_EQ(stats.failed, 0u);
}

TEST_P(IoBackendTest, InjectedEioNamesFileAndOffset) {
  const std::uint64_t size = 3 * kRequest;
  write_random_file(file("data.bin"), size, 6);
  IoOptions options;
  FaultInjectionEnv env([](const FaultContext& c) {
    Fault f;
    if (c.point == FaultPoint::kRead && c.offset == kRequest) f.error = EIO;
    return f;
  });
  auto backend = make(options, env);
  const FileId id = backend->open(file("data.bin"));
  AlignedBuffer buffer(tio::required_capacity(100, 2 * kRequest));
  auto ticket = backend->submit(id, 100, 2 * kRequest, buffer.span());
  try {
    ticket.wait();
    FAIL() << "no error";
  } catch (const ts::IoError& e) {
    const std::string what = e.what();
    EXPECT_EQ(e.code(), EIO);
    EXPECT_NE(what.find(file("data.bin").string()), std::string::npos) << what;
    EXPECT_NE(what.find("read of " + std::to_string(2 * kRequest) + " bytes at offset 100 "),
              std::string::npos)
        << what;
    EXPECT_NE(what.find("offset " + std::to_string(kRequest)), std::string::npos) << what;
    EXPECT_NE(what.find(std::strerror(EIO)), std::string::npos) << what;
  }
  // The error is sticky and the backend stays usable.
  EXPECT_THROW(ticket.wait(), ts::IoError);
  const auto content = ts::testing::read_file(file("data.bin"));
  expect_range(*backend, id, content, 0, 1000);
  EXPECT_EQ(backend->stats().failed, 1u);
}

TEST_P(IoBackendTest, TransientErrorsAreRetried) {
  if (is_mmap()) GTEST_SKIP() << "a copy has no transient errors";
  const auto content = write_random_file(file("data.bin"), kRequest + 3000, 23);
  std::atomic<int> calls{0};
  IoOptions options;
  FaultInjectionEnv env([&calls](const FaultContext& c) {
    Fault f;
    if (c.point == FaultPoint::kRead) f.error = calls++ % 2 ? EAGAIN : EINTR;
    return f;
  });
  auto backend = make(options, env);
  const FileId id = backend->open(file("data.bin"));
  expect_range(*backend, id, content, 0, kRequest + 3000);
  EXPECT_EQ(calls.load(), 2);
  EXPECT_EQ(backend->stats().failed, 0u);
}

TEST_P(IoBackendTest, InjectedShortReadIsAnError) {
  write_random_file(file("data.bin"), kRequest, 8);
  IoOptions options;
  FaultInjectionEnv env([](const FaultContext& c) {
    Fault f;
    if (c.point == FaultPoint::kRead) f.eof_after = 1000;
    return f;
  });
  auto backend = make(options, env);
  const FileId id = backend->open(file("data.bin"));
  AlignedBuffer buffer(kRequest);
  auto ticket = backend->submit(id, 0, 5000, buffer.span());
  const std::string what = expect_throws<ts::FormatError>(ticket);
  EXPECT_NE(what.find("unexpected end of file"), std::string::npos) << what;
  EXPECT_NE(what.find(file("data.bin").string()), std::string::npos) << what;
  // Needing only the first bytes, a request that ends early still succeeds.
  EXPECT_NO_THROW(backend->read(id, 10, 900, buffer.span()));
}

TEST_P(IoBackendTest, PartialTransfersAreResumed) {
  const std::uint64_t size = 2 * kRequest + 999;
  const auto content = write_random_file(file("data.bin"), size, 9);
  for (std::uint64_t partial : {std::uint64_t{1}, std::uint64_t{4096}, std::uint64_t{4097}}) {
    SCOPED_TRACE(partial);
    IoOptions options;
    FaultInjectionEnv env([partial](const FaultContext& c) {
      Fault f;
      if (c.point == FaultPoint::kRead) f.partial = partial;
      return f;
    });
    auto backend = make(options, env);
    const FileId id = backend->open(file("data.bin"));
    expect_range(*backend, id, content, 0, size);
    expect_range(*backend, id, content, 4097, kRequest);
    EXPECT_EQ(backend->stats().failed, 0u);
  }
}

TEST_P(IoBackendTest, SlowReadWaitForIsBounded) {
  const auto content = write_random_file(file("data.bin"), 100000, 10);
  IoOptions options;
  FaultInjectionEnv env([](const FaultContext& c) {
    Fault f;
    if (c.point == FaultPoint::kRead) f.delay = 400ms;
    return f;
  });
  auto backend = make(options, env);
  const FileId id = backend->open(file("data.bin"));
  AlignedBuffer buffer(tio::required_capacity(5, 99990));
  const auto start = std::chrono::steady_clock::now();
  auto ticket = backend->submit(id, 5, 99990, buffer.span());
  EXPECT_FALSE(ticket.ready());
  EXPECT_FALSE(ticket.wait_for(50ms));
  EXPECT_LT(std::chrono::steady_clock::now() - start, 300ms);
  const auto bytes = ticket.wait();
  EXPECT_GE(std::chrono::steady_clock::now() - start, 400ms);
  EXPECT_TRUE(ticket.ready());
  EXPECT_TRUE(ticket.wait_for(0ns));
  EXPECT_EQ(std::memcmp(bytes.data(), content.data() + 5, 99990), 0);
  EXPECT_FALSE(ticket.cancel());  // already complete: nothing to cancel
}

// One request at a time: a slow read holds the backend while others queue behind it.
TEST_P(IoBackendTest, CancelQueuedReadsAndPriorities) {
  const auto content = write_random_file(file("data.bin"), 64 * 4096, 12);
  std::mutex mutex;
  std::vector<std::uint64_t> started;  // offsets, in the order the requests started
  std::atomic<bool> slow_started{false};
  IoOptions options;
  options.num_threads = 1;
  options.queue_depth = 1;
  FaultInjectionEnv env([&](const FaultContext& c) {
    Fault f;
    if (c.point != FaultPoint::kRead) return f;
    std::lock_guard lock(mutex);
    started.push_back(c.offset);
    if (c.offset == 0) {
      f.delay = 300ms;
      slow_started = true;
    }
    return f;
  });
  auto backend = make(options, env);
  const FileId id = backend->open(file("data.bin"));
  std::vector<AlignedBuffer> buffers;
  for (int i = 0; i < 6; ++i) buffers.emplace_back(4096);
  auto slow = backend->submit(id, 0, 4096, buffers[0].span());
  for (int i = 0; i < 500 && !slow_started; ++i) std::this_thread::sleep_for(2ms);
  ASSERT_TRUE(slow_started);
  auto b = backend->submit(id, 1 * 4096, 4096, buffers[1].span());
  auto c = backend->submit(id, 2 * 4096, 4096, buffers[2].span());
  auto d = backend->submit(id, 3 * 4096, 4096, buffers[3].span());
  tio::SubmitOptions high;
  high.priority = tio::Priority::kHigh;
  auto h = backend->submit(id, 4 * 4096, 4096, buffers[4].span(), high);
  EXPECT_TRUE(c.cancel());
  EXPECT_TRUE(d.cancel());
  EXPECT_TRUE(c.ready());  // nothing of it had started: complete at once
  const std::string what = expect_throws<tio::Cancelled>(c);
  EXPECT_NE(what.find("cancelled"), std::string::npos) << what;
  EXPECT_NE(what.find(file("data.bin").string()), std::string::npos) << what;
  expect_throws<tio::Cancelled>(d);
  EXPECT_EQ(std::memcmp(slow.wait().data(), content.data(), 4096), 0);
  EXPECT_EQ(std::memcmp(h.wait().data(), content.data() + 4 * 4096, 4096), 0);
  EXPECT_EQ(std::memcmp(b.wait().data(), content.data() + 4096, 4096), 0);
  {
    std::lock_guard lock(mutex);
    EXPECT_EQ(started, (std::vector<std::uint64_t>{0, 4 * 4096, 1 * 4096}));
  }
  const auto stats = backend->stats();
  EXPECT_EQ(stats.cancelled, 2u);
  EXPECT_EQ(stats.completed, 3u);
}

TEST_P(IoBackendTest, CancelOfRunningReadWaitsForItsRequests) {
  write_random_file(file("data.bin"), 3 * kRequest, 13);
  std::atomic<int> calls{0};
  IoOptions options;
  options.num_threads = 1;
  options.queue_depth = 1;
  FaultInjectionEnv env([&](const FaultContext& c) {
    Fault f;
    if (c.point == FaultPoint::kRead) {
      ++calls;
      f.delay = 150ms;
    }
    return f;
  });
  auto backend = make(options, env);
  const FileId id = backend->open(file("data.bin"));
  AlignedBuffer buffer(3 * kRequest);
  auto ticket = backend->submit(id, 0, 3 * kRequest, buffer.span());
  for (int i = 0; i < 500 && calls == 0; ++i) std::this_thread::sleep_for(2ms);
  const auto start = std::chrono::steady_clock::now();
  EXPECT_TRUE(ticket.cancel());
  expect_throws<tio::Cancelled>(ticket);
  EXPECT_LT(std::chrono::steady_clock::now() - start, 1s);
  EXPECT_EQ(calls.load(), 1);  // the two queued requests never started
}

TEST_P(IoBackendTest, DroppingATicketCancelsIt) {
  write_random_file(file("data.bin"), 100000, 14);
  IoOptions options;
  FaultInjectionEnv env([](const FaultContext& c) {
    Fault f;
    if (c.point == FaultPoint::kRead) f.delay = 2s;
    return f;
  });
  auto backend = make(options, env);
  const FileId id = backend->open(file("data.bin"));
  const auto start = std::chrono::steady_clock::now();
  {
    AlignedBuffer buffer(tio::required_capacity(0, 100000));
    auto ticket = backend->submit(id, 0, 100000, buffer.span());
    std::this_thread::sleep_for(20ms);
  }  // the ticket goes first, then its buffer: nothing may write there afterwards
  EXPECT_LT(std::chrono::steady_clock::now() - start, 1s);
  EXPECT_EQ(backend->stats().cancelled, 1u);
}

TEST_P(IoBackendTest, DestroyWithReadsInFlight) {
  write_random_file(file("a.bin"), 2 * kRequest, 15);
  write_random_file(file("b.bin"), 2 * kRequest, 16);
  const int fds_before = count_open_fds();
  std::vector<AlignedBuffer> buffers;
  std::vector<tio::ReadTicket> tickets;
  std::chrono::steady_clock::duration destroy_time{};
  {
    IoOptions options;
    options.num_threads = 2;
    options.queue_depth = 2;
    FaultInjectionEnv env([](const FaultContext& c) {
      Fault f;
      if (c.point == FaultPoint::kRead) f.delay = 200ms;
      return f;
    });
    auto backend = make(options, env);
    const FileId a = backend->open(file("a.bin"));
    const FileId b = backend->open(file("b.bin"));
    for (int i = 0; i < 16; ++i) {
      buffers.emplace_back(2 * kRequest);
      tickets.push_back(backend->submit(i % 2 ? a : b, 0, 2 * kRequest, buffers.back().span()));
    }
    std::this_thread::sleep_for(30ms);
    EXPECT_GT(count_open_fds(), fds_before);
    const auto start = std::chrono::steady_clock::now();
    backend.reset();
    destroy_time = std::chrono::steady_clock::now() - start;
  }
  EXPECT_LT(destroy_time, 1s);
  EXPECT_EQ(count_open_fds(), fds_before);  // tickets alive, descriptors gone
  for (auto& t : tickets) {
    EXPECT_TRUE(t.ready());
    expect_throws<tio::Cancelled>(t);
  }
  tickets.clear();
  EXPECT_EQ(count_open_fds(), fds_before);
}

TEST_P(IoBackendTest, CloseWithReadInFlight) {
  const auto content = write_random_file(file("data.bin"), 50000, 17);
  const int fds_before = count_open_fds();
  IoOptions options;
  FaultInjectionEnv env([](const FaultContext& c) {
    Fault f;
    if (c.point == FaultPoint::kRead) f.delay = 100ms;
    return f;
  });
  auto backend = make(options, env);
  const int fds_backend = count_open_fds();
  const FileId id = backend->open(file("data.bin"));
  AlignedBuffer buffer(tio::required_capacity(1, 49999));
  auto ticket = backend->submit(id, 1, 49999, buffer.span());
  backend->close(id);
  EXPECT_THROW(backend->close(id), std::invalid_argument);
  EXPECT_TRUE(backend->stats().files.empty());
  EXPECT_EQ(std::memcmp(ticket.wait().data(), content.data() + 1, 49999), 0);
  EXPECT_EQ(count_open_fds(), fds_backend);
  backend.reset();
  EXPECT_EQ(count_open_fds(), fds_before);
}

TEST_P(IoBackendTest, ReadPastEndOfFile) {
  const auto content = write_random_file(file("data.bin"), 10000, 18);
  auto backend = make();
  const FileId id = backend->open(file("data.bin"));
  AlignedBuffer buffer(4 * 4096);
  for (const auto& [offset, size] : std::vector<std::pair<std::uint64_t, std::uint64_t>>{
           {9990, 20}, {10000, 1}, {20000, 5}, {0, 10001}}) {
    SCOPED_TRACE(offset);
    auto ticket = backend->submit(id, offset, size, buffer.span());
    EXPECT_TRUE(ticket.ready());  // refused at submit, without I/O
    const std::string what = expect_throws<ts::FormatError>(ticket);
    EXPECT_NE(what.find("past the end of the file (10000 bytes)"), std::string::npos) << what;
    EXPECT_NE(what.find(file("data.bin").string()), std::string::npos) << what;
  }
  EXPECT_EQ(backend->read(id, 10000, 0, {}).size(), 0u);
  expect_range(*backend, id, content, 0, 10000);
  expect_range(*backend, id, content, 9999, 1);
}

// A file cut short after open: no SIGBUS (mmap), no hang, an end-of-file error.
TEST_P(IoBackendTest, TruncatedAfterOpen) {
  const auto content = write_random_file(file("data.bin"), 5 * 4096 + 10, 19);
  auto backend = make();
  const FileId id = backend->open(file("data.bin"));
  fs::resize_file(file("data.bin"), 4096);
  AlignedBuffer buffer(6 * 4096);
  auto ticket = backend->submit(id, 100, 3 * 4096, buffer.span());
  const std::string what = expect_throws<ts::FormatError>(ticket);
  EXPECT_NE(what.find("end of file"), std::string::npos) << what;
  expect_range(*backend, id, content, 0, 4096);
}

TEST_P(IoBackendTest, CallerMistakesThrowInvalidArgument) {
  write_random_file(file("data.bin"), 10000, 20);
  auto backend = make();
  const FileId id = backend->open(file("data.bin"));
  AlignedBuffer buffer(3 * 4096);
  // Misaligned destination, too small a destination, unknown file.
  EXPECT_THROW((void)backend->submit(id, 0, 100, buffer.span().subspan(1)), std::invalid_argument);
  EXPECT_THROW((void)backend->submit(id, 4000, 200, buffer.span().first(4096)),
               std::invalid_argument);
  EXPECT_THROW((void)backend->submit(FileId{999}, 0, 10, buffer.span()), std::invalid_argument);
  EXPECT_THROW((void)backend->submit(id, ~0ull - 5, 10, buffer.span()), std::invalid_argument);
  EXPECT_THROW(backend->open(file("missing.bin")), ts::IoError);
  EXPECT_THROW(backend->open(dir_->path()), ts::IoError);
  tio::ReadTicket empty;
  EXPECT_FALSE(empty.valid());
  EXPECT_FALSE(empty.ready());
  EXPECT_FALSE(empty.cancel());
  EXPECT_THROW(empty.wait(), std::logic_error);
}

TEST_P(IoBackendTest, CompletionCallback) {
  const auto content = write_random_file(file("data.bin"), 10000, 21);
  auto backend = make();
  const FileId id = backend->open(file("data.bin"));
  AlignedBuffer buffer(4 * 4096);
  std::promise<std::exception_ptr> ok;
  tio::SubmitOptions options;
  options.on_complete = [&ok](std::exception_ptr e) { ok.set_value(e); };
  auto ticket = backend->submit(id, 3, 9000, buffer.span(), std::move(options));
  EXPECT_EQ(ok.get_future().get(), nullptr);
  EXPECT_EQ(std::memcmp(ticket.wait().data(), content.data() + 3, 9000), 0);
  std::promise<std::exception_ptr> bad;
  tio::SubmitOptions failing;
  failing.on_complete = [&bad](std::exception_ptr e) { bad.set_value(e); };
  auto past_end = backend->submit(id, 9000, 2000, buffer.span(), std::move(failing));
  EXPECT_NE(bad.get_future().get(), nullptr);
}

TEST_P(IoBackendTest, Mapping) {
  if (!is_mmap()) GTEST_SKIP() << "mmap only";
  const auto content = write_random_file(file("data.bin"), 3 * 4096 + 5, 22);
  ts::testing::write_file(file("empty.bin"), {});
  tio::MmapBackend backend;
  const FileId id = backend.open(file("data.bin"));
  const auto map = backend.mapping(id);
  ASSERT_EQ(map.size(), content.size());
  EXPECT_EQ(std::memcmp(map.data(), content.data(), content.size()), 0);
  EXPECT_NO_THROW(backend.prefetch(id, 100, 5000));
  EXPECT_NO_THROW(backend.prefetch(id, 0, ~0ull));
  EXPECT_NO_THROW(backend.prefetch(id, 1 << 20, 10));
  const FileId empty = backend.open(file("empty.bin"));
  EXPECT_TRUE(backend.mapping(empty).empty());
  EXPECT_EQ(backend.read(empty, 0, 0, {}).size(), 0u);
  EXPECT_THROW((void)backend.mapping(FileId{12345}), std::invalid_argument);
}

// ---- not parametrised -------------------------------------------------------------------

TEST(IoBackendPlan, PlanRead) {
  EXPECT_EQ(tio::plan_read(0, 4096), (tio::ReadPlan{0, 4096, 0}));
  EXPECT_EQ(tio::plan_read(0, 1), (tio::ReadPlan{0, 4096, 0}));
  EXPECT_EQ(tio::plan_read(4095, 2), (tio::ReadPlan{0, 8192, 4095}));
  EXPECT_EQ(tio::plan_read(4096, 4096), (tio::ReadPlan{4096, 4096, 0}));
  EXPECT_EQ(tio::plan_read(5000, 0), (tio::ReadPlan{4096, 0, 904}));
  EXPECT_EQ(tio::plan_read(10, 20, 512), (tio::ReadPlan{0, 512, 10}));
  EXPECT_EQ(tio::plan_read(8191, 8194), (tio::ReadPlan{4096, 16384, 4095}));
  EXPECT_EQ(tio::required_capacity(4097, 4096), 8192u);
  EXPECT_THROW((void)tio::plan_read(0, 1, 3000), std::invalid_argument);
  EXPECT_THROW((void)tio::plan_read(~0ull - 10, 5), std::invalid_argument);
  std::mt19937_64 rng(1);
  for (int i = 0; i < 10000; ++i) {
    const std::uint64_t offset = rng() >> 20;
    const std::uint64_t size = 1 + (rng() >> 40);
    const auto p = tio::plan_read(offset, size);
    ASSERT_EQ(p.aligned_offset % 4096, 0u);
    ASSERT_EQ(p.aligned_size % 4096, 0u);
    ASSERT_EQ(p.aligned_offset + p.skip, offset);
    ASSERT_LT(p.skip, 4096u);
    ASSERT_GE(p.aligned_offset + p.aligned_size, offset + size);
    ASSERT_LT(p.aligned_offset + p.aligned_size - (offset + size), 4096u);
  }
}

TEST(IoBackendOptions, Normalized) {
  IoOptions o;
  o.num_threads = 0;
  o.queue_depth = 0;
  o.request_size = 1;
  auto n = o.normalized();
  EXPECT_EQ(n.num_threads, 1u);
  EXPECT_EQ(n.queue_depth, 1u);
  EXPECT_EQ(n.request_size, 4 * kMiB);
  o.num_threads = 1000;
  o.queue_depth = 100000;
  o.request_size = 1ull << 40;
  n = o.normalized();
  EXPECT_EQ(n.num_threads, 64u);
  EXPECT_EQ(n.queue_depth, 1024u);
  EXPECT_EQ(n.request_size, 16 * kMiB);
  o.request_size = 5 * kMiB + 123;
  EXPECT_EQ(o.normalized().request_size, 5 * kMiB);
  EXPECT_EQ(IoOptions{}.normalized().request_size, 8 * kMiB);
  tio::PreadBackend backend(o);
  EXPECT_EQ(backend.options().request_size, 5 * kMiB);
}

TEST(IoBackendNames, RoundTrip) {
  for (auto type :
       {BackendType::kAuto, BackendType::kPread, BackendType::kMmap, BackendType::kIoUring}) {
    EXPECT_EQ(tio::parse_backend_type(tio::backend_name(type)), type);
  }
  EXPECT_EQ(tio::backend_name(BackendType::kIoUring), "io_uring");
  EXPECT_EQ(tio::parse_backend_type("uring"), std::nullopt);
  EXPECT_EQ(tio::parse_backend_type("PREAD"), std::nullopt);
  EXPECT_EQ(tio::make_backend(BackendType::kPread)->name(), "pread");
  EXPECT_EQ(tio::make_backend(BackendType::kMmap)->name(), "mmap");
}

TEST(IoBackendFactory, AutoPrefersUring) {
  const auto why = tio::UringBackend::unavailable_reason();
  auto backend = tio::make_backend(BackendType::kAuto);
  std::printf("[ info ] auto -> %s: %s\n", backend->name().data(),
              backend->selection_note().c_str());
  if (!why) {
    EXPECT_EQ(backend->type(), BackendType::kIoUring);
    EXPECT_NO_THROW((void)tio::make_backend(BackendType::kIoUring));
  } else {
    EXPECT_EQ(backend->type(), BackendType::kPread);
    EXPECT_NE(backend->selection_note().find(*why), std::string::npos);
    EXPECT_THROW((void)tio::make_backend(BackendType::kIoUring), ts::Error);
  }
  EXPECT_NE(backend->selection_note().find("io_uring"), std::string::npos);
  EXPECT_TRUE(tio::make_backend(BackendType::kPread)->selection_note().empty());
}

TEST(IoBackendFactory, ProbeBackends) {
  ScratchDir dir(disk_base());
  ASSERT_TRUE(dir.ok());
  const auto direct = tio::probe_direct_io(dir.path());
  std::printf("[ info ] O_DIRECT on %s: %s\n", dir.path().c_str(),
              direct ? direct->c_str() : "works");
  const auto probes = tio::probe_backends(dir.path());
  ASSERT_EQ(probes.size(), 3u);
  for (const auto& p : probes) {
    std::printf("[ info ] %-8s usable=%d direct=%d %s\n", tio::backend_name(p.type).data(),
                p.usable, p.direct, p.detail.c_str());
  }
  EXPECT_EQ(probes[0].type, BackendType::kPread);
  EXPECT_TRUE(probes[0].usable) << probes[0].detail;
  EXPECT_EQ(probes[0].direct, !direct.has_value()) << probes[0].detail;
  EXPECT_EQ(probes[1].type, BackendType::kMmap);
  EXPECT_TRUE(probes[1].usable) << probes[1].detail;
  EXPECT_FALSE(probes[1].direct);
  EXPECT_EQ(probes[2].type, BackendType::kIoUring);
  EXPECT_EQ(probes[2].usable, !tio::UringBackend::unavailable_reason().has_value())
      << probes[2].detail;
  EXPECT_TRUE(fs::is_empty(dir.path()));  // the probe files are gone
  const auto missing = tio::probe_backends(dir.path() / "missing");
  for (const auto& p : missing) EXPECT_FALSE(p.usable);
  EXPECT_TRUE(tio::probe_direct_io(dir.path() / "missing").has_value());
}

TEST(AlignedBuffer, AllocatesAlignedZeroedMemory) {
  for (std::size_t size :
       {std::size_t{1}, std::size_t{4096}, std::size_t{4097}, std::size_t{3 << 20}}) {
    AlignedBuffer buffer(size);
    ASSERT_NE(buffer.data(), nullptr);
    EXPECT_EQ(reinterpret_cast<std::uintptr_t>(buffer.data()) % ts::kIoAlignment, 0u);
    EXPECT_EQ(buffer.size(), size);
    EXPECT_EQ(buffer.span().size(), size);
    EXPECT_FALSE(buffer.adopted());
    EXPECT_EQ(buffer.data()[size - 1], std::byte{0});
    std::memset(buffer.data(), 0xab, size);  // writable end to end
  }
  AlignedBuffer empty(0);
  EXPECT_TRUE(empty.empty());
  EXPECT_EQ(empty.data(), nullptr);
  EXPECT_THROW(AlignedBuffer(~std::size_t{0} - 100), ts::Error);
}

TEST(AlignedBuffer, MovesOwnership) {
  AlignedBuffer a(8192);
  std::byte* p = a.data();
  AlignedBuffer b(std::move(a));
  EXPECT_EQ(b.data(), p);
  EXPECT_EQ(a.data(), nullptr);  // NOLINT(bugprone-use-after-move): moved-from is empty
  EXPECT_EQ(a.size(), 0u);
  AlignedBuffer c(4096);
  c = std::move(b);
  EXPECT_EQ(c.data(), p);
  EXPECT_EQ(c.size(), 8192u);
  c.reset();
  EXPECT_TRUE(c.empty());
}

TEST(AlignedBuffer, AdoptsExternalMemoryWithItsDeleter) {
  int calls = 0;
  void* raw = nullptr;
  ASSERT_EQ(::posix_memalign(&raw, 4096, 3 * 4096), 0);
  auto* data = static_cast<std::byte*>(raw);
  {
    auto buffer = AlignedBuffer::adopt(data, 3 * 4096, [&calls, data](std::byte* p, std::size_t n) {
      EXPECT_EQ(p, data);
      EXPECT_EQ(n, 3u * 4096);
      ++calls;
      std::free(p);
    });
    EXPECT_TRUE(buffer.adopted());
    EXPECT_EQ(buffer.data(), data);
    AlignedBuffer moved = std::move(buffer);
    EXPECT_EQ(calls, 0);
  }
  EXPECT_EQ(calls, 1);
  // Misaligned memory is refused and stays the caller's.
  alignas(4096) static std::byte storage[2 * 4096];
  EXPECT_THROW(
      (void)AlignedBuffer::adopt(storage + 1, 100, [&calls](std::byte*, std::size_t) { ++calls; }),
      std::invalid_argument);
  EXPECT_THROW((void)AlignedBuffer::adopt(nullptr, 100, {}), std::invalid_argument);
  EXPECT_EQ(calls, 1);
  // Adopted memory is a valid read destination.
  auto adopted = AlignedBuffer::adopt(storage, sizeof storage, {});
  ScratchDir dir(disk_base());
  ASSERT_TRUE(dir.ok());
  const auto content = write_random_file(dir.path() / "x.bin", 5000, 1);
  tio::PreadBackend backend;
  const FileId id = backend.open(dir.path() / "x.bin");
  const auto bytes = backend.read(id, 7, 4993, adopted.span());
  EXPECT_EQ(std::memcmp(bytes.data(), content.data() + 7, 4993), 0);
}

}  // namespace
