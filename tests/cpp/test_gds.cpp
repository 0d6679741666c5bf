// GPUDirect Storage: cuFile loaded at run time, the engine's gds modes, and the fallbacks.
//
// Everywhere: the status queries never throw and say why GDS is unusable; gds=on on the CPU
// and with options that need host memory is a caller error; gds=off (and any CPU engine)
// never loads libcufile; a TENSORSTREAM_CUFILE_LIBRARY that is not a library is reported
// with its path and the loader's error; the real libcufile (from the nvidia-cufile wheel the
// header came from) loads, and without a CUDA driver its driver is not opened, with the
// reason. Tests that look at what the process has loaded run in a fresh process (gtest's
// "threadsafe" death tests re-execute the binary), so nothing earlier can have loaded it.
//
// On a GPU with a working cuFile driver: every block's bytes reach the device exactly (store
// and unaligned safetensors, compared after a copy back), gds=auto falls back per file on
// tmpfs, gds=on fails loudly where registration fails, and a file truncated under the engine
// fails the block with context. These skip, saying why, elsewhere. (Linux ≥ 6.6 takes O_DIRECT
// on tmpfs; there the engine's fault hook refuses it for the tmpfs file, as older kernels do.)
#include <fcntl.h>
#include <gtest/gtest.h>
#include <linux/magic.h>
#include <stdlib.h>
#include <sys/statfs.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <map>
#include <memory>
#include <random>
#include <sstream>
#include <string>
#include <vector>

#include "tensorstream/checksum.hpp"
#include "tensorstream/engine/engine.hpp"
#include "tensorstream/engine/residency.hpp"
#include "tensorstream/engine/trace.hpp"
#include "tensorstream/errors.hpp"
#include "tensorstream/shim/cuda.hpp"
#include "tensorstream/shim/cufile.hpp"
#include "tensorstream/store.hpp"
#include "test_helpers.hpp"

namespace ts = tensorstream;
namespace eng = tensorstream::engine;
using ts::testing::TempDir;

namespace {

constexpr std::uint64_t KiB = 1024;
constexpr std::uint64_t MiB = KiB * KiB;

// A directory under `base`, removed with its content (TempDir always uses the temp dir).
class ScratchDir {
 public:
  explicit ScratchDir(const std::filesystem::path& base) {
    std::string pattern = (base / "tsgds-XXXXXX").string();
    if (::mkdtemp(pattern.data()) == nullptr) throw std::runtime_error("mkdtemp failed");
    path_ = pattern;
  }
  ~ScratchDir() {
    std::error_code ec;
    std::filesystem::remove_all(path_, ec);
  }
  ScratchDir(const ScratchDir&) = delete;
  ScratchDir& operator=(const ScratchDir&) = delete;
  [[nodiscard]] const std::filesystem::path& path() const { return path_; }
  [[nodiscard]] std::filesystem::path operator/(const std::string& name) const {
    return path_ / name;
  }

 private:
  std::filesystem::path path_;
};

std::filesystem::path make_store(const std::filesystem::path& dir, int blocks,
                                 std::uint64_t min_size, std::uint64_t max_size,
                                 std::uint64_t seed) {
  return ts::testing::make_random_store(dir, blocks, min_size, max_size, seed);
}

std::vector<std::uint64_t> block_sizes(const ts::Store& store) {
  std::vector<std::uint64_t> sizes;
  for (const auto& b : store.blocks()) sizes.push_back(b.raw_size);
  return sizes;
}

std::string process_maps() {
  std::ifstream in("/proc/self/maps");
  std::stringstream text;
  text << in.rdbuf();
  return text.str();
}

bool contains(const std::string& text, const std::string& part) {
  return text.find(part) != std::string::npos;
}

bool on_tmpfs(const std::filesystem::path& path) {
  struct statfs fs {};
  return ::statfs(path.c_str(), &fs) == 0 && fs.f_type == TMPFS_MAGIC;
}

// tmpfs refused O_DIRECT until Linux 6.6. Where it takes it, an environment makes the open
// fail for `path` exactly as such a kernel does (EINVAL), so the fallback is exercised. The
// returned environment (null where the file system refuses O_DIRECT itself) must outlive the
// engine made with `options`.
std::unique_ptr<ts::testing::FaultInjectionEnv> refuse_o_direct_like_old_tmpfs(
    eng::EngineOptions& options, const std::filesystem::path& path) {
  const int fd = ::open(path.c_str(), O_RDONLY | O_DIRECT | O_CLOEXEC);
  if (fd == -1) return nullptr;  // the file system refuses it itself
  ::close(fd);
  const auto target = std::filesystem::weakly_canonical(path);
  auto env = std::make_unique<ts::testing::FaultInjectionEnv>(
      [target](const ts::testing::FaultContext& c) {
        ts::testing::Fault fault;
        if (c.point == ts::testing::FaultPoint::kOpenDirect &&
            std::filesystem::weakly_canonical(*c.path) == target) {
          fault.error = EINVAL;
        }
        return fault;
      });
  options.env = env.get();
  return env;
}

// One safetensors file of `tensors` (name -> bytes, uint8, 1-D), header unpadded so every
// tensor starts at an unaligned file offset.
void write_safetensors(const std::filesystem::path& path,
                       const std::vector<std::pair<std::string, std::vector<std::byte>>>& tensors) {
  std::string header = "{";
  std::uint64_t offset = 0;
  for (std::size_t i = 0; i < tensors.size(); ++i) {
    const auto& [name, data] = tensors[i];
    header += (i ? ",\"" : "\"") + name + "\":{\"dtype\":\"U8\",\"shape\":[" +
              std::to_string(data.size()) + "],\"data_offsets\":[" + std::to_string(offset) + "," +
              std::to_string(offset + data.size()) + "]}";
    offset += data.size();
  }
  header += "}";
  std::vector<std::byte> out;
  for (int i = 0; i < 8; ++i)
    out.push_back(static_cast<std::byte>((header.size() >> (8 * i)) & 0xff));
  for (const char c : header) out.push_back(static_cast<std::byte>(c));
  for (const auto& [name, data] : tensors) out.insert(out.end(), data.begin(), data.end());
  ts::testing::write_file(path, out);
}

// Where GPU tests find cuFile when the environment does not say: the wheel's library.
void default_cufile_library() {
#ifdef TS_CUFILE_WHEEL_LIBRARY
  ::setenv("TENSORSTREAM_CUFILE_LIBRARY", TS_CUFILE_WHEEL_LIBRARY, /*overwrite=*/0);
#endif
}

}  // namespace

// Skips the test unless a GPU is here and cuFile's driver opens on device 0.
#define TS_REQUIRE_GDS()                                                                  \
  do {                                                                                    \
    if (!ts::cuda::available()) GTEST_SKIP() << ts::cuda::driver_status().reason;         \
    default_cufile_library();                                                             \
    const ts::cuda::Device probe_device(0);                                               \
    const auto probe = ts::cuda::cufile_open_driver(probe_device);                        \
    if (!probe.driver_opened) GTEST_SKIP() << "cuFile not usable here: " << probe.reason; \
  } while (0)

// ---- everywhere ------------------------------------------------------------------------------

TEST(Gds, ModeNamesRoundTrip) {
  for (const auto m : {eng::GdsMode::kAuto, eng::GdsMode::kOn, eng::GdsMode::kOff}) {
    EXPECT_EQ(eng::parse_gds_mode(eng::gds_mode_name(m)), m);
  }
  EXPECT_EQ(eng::EngineOptions{}.gds, eng::GdsMode::kAuto);
  try {
    (void)eng::parse_gds_mode("yes");
    FAIL() << "parsed 'yes'";
  } catch (const std::invalid_argument& e) {
    EXPECT_TRUE(contains(e.what(), "'yes'")) << e.what();
  }
  EXPECT_EQ(eng::span_kind_name(eng::SpanKind::kGdsRead), "gds read");
}

TEST(Gds, StatusNeverThrowsAndSaysWhy) {
  const auto status = ts::cuda::cufile_status();
  EXPECT_EQ(status.driver_opened, status.reason.empty()) << status.reason;
  if (!status.compiled) {
    EXPECT_FALSE(status.library_loaded);
    EXPECT_TRUE(contains(status.reason, "built without")) << status.reason;
  }
  if (!ts::cuda::available()) {
    EXPECT_FALSE(status.driver_opened);
    EXPECT_FALSE(status.reason.empty());
  }
}

TEST(Gds, OnWithACpuDeviceIsACallerError) {
  TempDir dir;
  const auto path = make_store(dir.path(), 2, 10 * KiB, 20 * KiB, 1);
  eng::EngineOptions options;
  options.device = "cpu";
  options.device_budget = 1 * MiB;
  options.gds = eng::GdsMode::kOn;
  try {
    eng::Engine engine(path, options);
    FAIL() << "gds=on accepted on the CPU";
  } catch (const std::invalid_argument& e) {
    const std::string what = e.what();
    EXPECT_TRUE(contains(what, "gds=on")) << what;
    EXPECT_TRUE(contains(what, "CUDA device")) << what;
    EXPECT_TRUE(contains(what, "'cpu'")) << what;
  }
}

// Checked before any CUDA call, so these hold on machines without a GPU too.
TEST(Gds, OnRefusesOptionsThatNeedHostMemory) {
  TempDir dir;
  const auto path = make_store(dir.path(), 2, 10 * KiB, 20 * KiB, 2);
  const auto refused = [&](eng::EngineOptions options, const std::string& named) {
    options.device = "cuda:0";
    options.device_budget = 1 * MiB;
    options.gds = eng::GdsMode::kOn;
    try {
      eng::Engine engine(path, options);
      ADD_FAILURE() << "accepted gds=on with " << named;
    } catch (const std::invalid_argument& e) {
      EXPECT_TRUE(contains(e.what(), "gds=on")) << e.what();
      EXPECT_TRUE(contains(e.what(), named)) << e.what();
    }
  };
  eng::EngineOptions tier;
  tier.ram_cache_bytes = 4 * MiB;
  refused(tier, "ram_cache_bytes");
  eng::EngineOptions verify;
  verify.verify_checksums = true;
  refused(verify, "verify_checksums");
  eng::EngineOptions buffered;
  buffered.io.direct = false;
  refused(buffered, "io.direct");
}

TEST(Gds, CpuEngineSaysWhyNoFileUsesGds) {
  TempDir dir;
  const auto path = make_store(dir.path(), 3, 10 * KiB, 20 * KiB, 3);
  eng::EngineOptions options;
  options.device = "cpu";
  options.device_budget = 1 * MiB;
  eng::Engine engine(path, options);
  const auto view = engine.acquire(0);
  EXPECT_NE(view.host, nullptr);
  engine.release(0);
  const auto stats = engine.stats();
  EXPECT_EQ(stats.gds_mode, eng::GdsMode::kAuto);
  EXPECT_EQ(stats.gds_files, 0u);
  EXPECT_EQ(stats.gds_bytes, 0u);
  EXPECT_TRUE(contains(stats.gds_reason, "device 'cpu'")) << stats.gds_reason;
  ASSERT_EQ(stats.gds.size(), 1u);
  EXPECT_EQ(stats.gds[0].path, ts::Store::open(path).path());
  EXPECT_FALSE(stats.gds[0].used);
  EXPECT_EQ(stats.gds[0].reason, stats.gds_reason);
}

// gds=off, and every CPU engine, leave libcufile alone: checked in a fresh process.
TEST(Gds, OffAndCpuEnginesNeverLoadCufile) {
  GTEST_FLAG_SET(death_test_style, "threadsafe");
  EXPECT_EXIT(
      {
        TempDir dir;
        const auto path = make_store(dir.path(), 3, 10 * KiB, 50 * KiB, 4);
        for (const auto mode : {eng::GdsMode::kOff, eng::GdsMode::kAuto}) {
          eng::EngineOptions options;
          options.device = "cpu";
          options.device_budget = 1 * MiB;
          options.gds = mode;
          eng::Engine engine(path, options);
          for (std::uint32_t b = 0; b < engine.block_count(); ++b) {
            (void)engine.acquire(b);
            engine.release(b);
          }
          (void)engine.stats();
        }
        // On a CUDA device: it runs on a GPU, and fails to start (no driver) elsewhere.
        eng::EngineOptions cuda_off;
        cuda_off.device = "cuda:0";
        cuda_off.device_budget = 1 * MiB;
        cuda_off.gds = eng::GdsMode::kOff;
        try {
          eng::Engine engine(path, cuda_off);
          (void)engine.acquire(0);
          engine.release(0);
        } catch (const ts::CudaError&) {
        }
        const bool mapped = contains(process_maps(), "libcufile");
        std::fprintf(stderr, "mapped=%d loaded=%d\n", mapped ? 1 : 0,
                     ts::cuda::cufile_library_loaded() ? 1 : 0);
        std::exit(!mapped && !ts::cuda::cufile_library_loaded() ? 0 : 1);
      },
      ::testing::ExitedWithCode(0), "mapped=0 loaded=0");
}

TEST(Gds, ExplicitLibraryThatIsNotALibraryIsReported) {
  GTEST_FLAG_SET(death_test_style, "threadsafe");
  EXPECT_EXIT(
      {
        TempDir dir;
        const auto fake = dir / "libcufile-not-a-library.so";
        std::ofstream(fake) << "this is text, not an ELF file\n";
        ::setenv("TENSORSTREAM_CUFILE_LIBRARY", fake.c_str(), 1);
        const auto s = ts::cuda::cufile_status();
        std::fprintf(stderr, "compiled=%d loaded=%d reason=%s\n", s.compiled ? 1 : 0,
                     s.library_loaded ? 1 : 0, s.reason.c_str());
        const bool ok = s.compiled ? !s.library_loaded && !s.driver_opened &&
                                         contains(s.reason, fake.string()) &&
                                         contains(s.reason, "TENSORSTREAM_CUFILE_LIBRARY") &&
                                         !ts::cuda::cufile_library_loaded()
                                   : contains(s.reason, "built without");
        std::exit(ok ? 0 : 1);
      },
      ::testing::ExitedWithCode(0), "loaded=0 reason=");
}

// The dynamic loader's own message (dlerror) is part of the reason.
TEST(Gds, MissingExplicitLibraryNamesTheLoadersError) {
  GTEST_FLAG_SET(death_test_style, "threadsafe");
  EXPECT_EXIT(
      {
        ::setenv("TENSORSTREAM_CUFILE_LIBRARY", "/nonexistent/dir/libcufile.so.0", 1);
        const auto s = ts::cuda::cufile_status();
        std::fprintf(stderr, "reason=%s\n", s.reason.c_str());
        const bool ok = !s.library_loaded && !s.reason.empty() &&
                        (!s.compiled || (contains(s.reason, "/nonexistent/dir/libcufile.so.0") &&
                                         contains(s.reason, "No such file")));
        std::exit(ok ? 0 : 1);
      },
      ::testing::ExitedWithCode(0), "reason=");
}

TEST(Gds, RealLibraryLoadsButItsDriverNeedsCuda) {
#ifndef TS_CUFILE_WHEEL_LIBRARY
  GTEST_SKIP() << "no libcufile.so.0 beside the cufile.h this build used (pip install "
                  "nvidia-cufile)";
#else
  GTEST_FLAG_SET(death_test_style, "threadsafe");
  EXPECT_EXIT(
      {
        ::setenv("TENSORSTREAM_CUFILE_LIBRARY", TS_CUFILE_WHEEL_LIBRARY, 1);
        auto s = ts::cuda::cufile_status();
        std::fprintf(stderr, "loaded=%d version=%d reason=%s\n", s.library_loaded ? 1 : 0,
                     s.version, s.reason.c_str());
        bool ok = s.compiled && s.library_loaded && s.library == TS_CUFILE_WHEEL_LIBRARY &&
                  ts::cuda::cufile_library_loaded() && contains(process_maps(), "libcufile") &&
                  !s.driver_opened && !s.reason.empty();
        if (!ts::cuda::available()) {
          // Never opened without a CUDA driver (cuFileDriverOpen would spin forever).
          ok = ok && contains(s.reason, "CUDA driver");
        } else {
          const ts::cuda::Device device(0);
          s = ts::cuda::cufile_open_driver(device);
          std::fprintf(stderr, "opened=%d reason=%s\n", s.driver_opened ? 1 : 0, s.reason.c_str());
          ok = ok && (s.driver_opened == s.reason.empty());
        }
        std::exit(ok ? 0 : 1);
      },
      ::testing::ExitedWithCode(0), "loaded=1");
#endif
}

// ---- on a GPU with cuFile --------------------------------------------------------------------

TEST(GdsGpu, StreamsEveryBlockExactly) {
  TS_REQUIRE_GDS();
  ScratchDir dir(TS_GDS_TMP);
  // Sizes that are not multiples of 4096 and span several requests.
  const auto path = make_store(dir.path(), 8, 5 * MiB + 123, 11 * MiB + 7, 21);
  const auto store = ts::Store::open(path);
  const auto file = ts::testing::read_file(path);
  eng::EngineOptions options;
  options.device = "cuda:0";
  options.slots = 3;
  options.device_budget = eng::minimum_budget(block_sizes(store), 3) + 24 * MiB;
  options.gds = eng::GdsMode::kOn;
  options.io.request_size = 4 * MiB;
  options.io.num_threads = 4;
  eng::Engine engine(path, options);
  auto stats = engine.stats();
  ASSERT_EQ(stats.gds_files, 1u) << stats.gds_reason;
  ASSERT_EQ(stats.gds.size(), 1u);
  EXPECT_TRUE(stats.gds[0].used);
  EXPECT_TRUE(stats.gds_reason.empty()) << stats.gds_reason;

  const ts::cuda::Device device(0);
  const ts::cuda::Stream stream(device);
  ts::cuda::PinnedHostBuffer back(device, 12 * MiB);
  for (int pass = 0; pass < 2; ++pass) {
    for (std::uint32_t b = 0; b < store.blocks().size(); ++b) {
      const auto& info = store.blocks()[b];
      const auto view = engine.acquire(b, stream.handle());
      ASSERT_NE(view.device, 0u);
      ASSERT_EQ(view.size, info.raw_size);
      ts::cuda::memcpy_dtoh_async(device, back.data(), view.device, view.size, stream.handle());
      engine.release(b, stream.handle());
      stream.synchronize();
      EXPECT_EQ(std::memcmp(back.data(), file.data() + info.offset, info.raw_size), 0)
          << info.name << ", pass " << pass;
    }
  }
  stats = engine.stats();
  EXPECT_EQ(stats.failures, 0u);
  EXPECT_GT(stats.gds_bytes, 0u);
  EXPECT_EQ(stats.gds_bytes, stats.bytes_from_storage);  // nothing went through host memory
  EXPECT_EQ(stats.io.bytes_read, 0u);
  EXPECT_LE(stats.device_bytes_peak, options.device_budget);
  EXPECT_TRUE(contains(engine.trace_json(), "gds read"));
}

TEST(GdsGpu, SafetensorsLandWhereTheHostPathPutsThem) {
  TS_REQUIRE_GDS();
  ScratchDir dir(TS_GDS_TMP);
  std::vector<std::pair<std::string, std::vector<std::byte>>> tensors;
  std::uint64_t seed = 5;
  for (int layer = 0; layer < 4; ++layer) {
    for (const auto& [part, size] :
         std::vector<std::pair<std::string, std::size_t>>{{"a", 3 * MiB + 17}, {"b", 1001}}) {
      tensors.emplace_back("layers." + std::to_string(layer) + "." + part,
                           ts::testing::random_bytes(size, ++seed));
    }
  }
  const auto path = dir / "model.safetensors";
  write_safetensors(path, tensors);
  std::map<std::string, std::vector<std::byte>> expected(tensors.begin(), tensors.end());

  const ts::cuda::Device device(0);
  const ts::cuda::Stream stream(device);
  ts::cuda::PinnedHostBuffer back(device, 8 * MiB);
  std::vector<std::vector<eng::TensorPlacement>> placements;
  for (const auto mode : {eng::GdsMode::kOn, eng::GdsMode::kOff}) {
    eng::EngineOptions options;
    options.device = "cuda:0";
    options.device_budget = 64 * MiB;
    options.gds = mode;
    auto engine = eng::Engine::from_safetensors(path, options);
    EXPECT_EQ(engine.stats().gds_files, mode == eng::GdsMode::kOn ? 1u : 0u);
    for (std::uint32_t b = 0; b < engine.block_count(); ++b) {
      const auto view = engine.acquire(b, stream.handle());
      ts::cuda::memcpy_dtoh_async(device, back.data(), view.device, view.size, stream.handle());
      engine.release(b, stream.handle());
      stream.synchronize();
      const auto placed = engine.tensors(b);
      placements.push_back(placed);
      for (const auto& t : placed) {
        const auto& want = expected.at(t.name);
        ASSERT_EQ(t.nbytes, want.size());
        EXPECT_EQ(std::memcmp(back.data() + t.offset, want.data(), want.size()), 0)
            << t.name << " with gds=" << eng::gds_mode_name(mode);
      }
    }
    const auto stats = engine.stats();
    EXPECT_EQ(stats.failures, 0u);
    EXPECT_EQ(stats.gds_bytes > 0, mode == eng::GdsMode::kOn);
  }
  // Both paths put every tensor at the same offset.
  ASSERT_EQ(placements.size() % 2, 0u);
  const auto half = placements.size() / 2;
  for (std::size_t i = 0; i < half; ++i) {
    ASSERT_EQ(placements[i].size(), placements[i + half].size());
    for (std::size_t t = 0; t < placements[i].size(); ++t) {
      EXPECT_EQ(placements[i][t].offset, placements[i + half][t].offset);
    }
  }
}

TEST(GdsGpu, AutoFallsBackPerFileOnTmpfs) {
  TS_REQUIRE_GDS();
  const std::filesystem::path shm = "/dev/shm";
  if (!on_tmpfs(shm)) GTEST_SKIP() << "/dev/shm is not a tmpfs here";
  ScratchDir disk(TS_GDS_TMP);
  ScratchDir memory(shm);
  // Shard 1 on the build tree's disk, shard 2 on tmpfs (reached through a symbolic link, as
  // in a Hugging Face cache snapshot). O_DIRECT is refused on tmpfs.
  std::vector<std::pair<std::string, std::vector<std::byte>>> one{
      {"layers.0.w", ts::testing::random_bytes(2 * MiB + 5, 1)},
      {"layers.1.w", ts::testing::random_bytes(MiB + 3, 2)}};
  std::vector<std::pair<std::string, std::vector<std::byte>>> two{
      {"layers.2.w", ts::testing::random_bytes(3 * MiB + 9, 3)},
      {"layers.3.w", ts::testing::random_bytes(777, 4)}};
  write_safetensors(disk / "model-00001-of-00002.safetensors", one);
  write_safetensors(memory / "model-00002-of-00002.safetensors", two);
  std::filesystem::create_symlink(memory / "model-00002-of-00002.safetensors",
                                  disk / "model-00002-of-00002.safetensors");
  std::string index = "{\"metadata\":{},\"weight_map\":{";
  for (const auto& [name, data] : one)
    index += "\"" + name + "\":\"model-00001-of-00002.safetensors\",";
  for (const auto& [name, data] : two)
    index += "\"" + name + "\":\"model-00002-of-00002.safetensors\",";
  index.back() = '}';
  index += "}";
  std::ofstream(disk / "model.safetensors.index.json") << index;
  std::map<std::string, std::vector<std::byte>> expected(one.begin(), one.end());
  expected.insert(two.begin(), two.end());

  eng::EngineOptions options;
  options.device = "cuda:0";
  options.device_budget = 64 * MiB;
  options.gds = eng::GdsMode::kAuto;
  const auto env =
      refuse_o_direct_like_old_tmpfs(options, memory / "model-00002-of-00002.safetensors");
  auto engine = eng::Engine::from_safetensors(disk.path(), options);
  const ts::cuda::Device device(0);
  const ts::cuda::Stream stream(device);
  ts::cuda::PinnedHostBuffer back(device, 8 * MiB);
  for (std::uint32_t b = 0; b < engine.block_count(); ++b) {
    const auto view = engine.acquire(b, stream.handle());
    ts::cuda::memcpy_dtoh_async(device, back.data(), view.device, view.size, stream.handle());
    engine.release(b, stream.handle());
    stream.synchronize();
    for (const auto& t : engine.tensors(b)) {
      const auto& want = expected.at(t.name);
      EXPECT_EQ(std::memcmp(back.data() + t.offset, want.data(), want.size()), 0) << t.name;
    }
  }
  const auto stats = engine.stats();
  EXPECT_EQ(stats.failures, 0u);
  ASSERT_EQ(stats.gds.size(), 2u);
  const auto& on_disk = stats.gds[0].path.filename() == "model-00001-of-00002.safetensors"
                            ? stats.gds[0]
                            : stats.gds[1];
  const auto& in_memory = &on_disk == &stats.gds[0] ? stats.gds[1] : stats.gds[0];
  EXPECT_FALSE(in_memory.used);
  EXPECT_FALSE(in_memory.reason.empty());
  if (ts::cuda::cufile_status().nvidia_fs) {
    EXPECT_TRUE(on_disk.used) << on_disk.reason;
    EXPECT_TRUE(contains(in_memory.reason, "O_DIRECT")) << in_memory.reason;
    EXPECT_EQ(stats.gds_files, 1u);
    EXPECT_GT(stats.gds_bytes, 0u);
    EXPECT_GT(stats.io.bytes_read, 0u);  // the tmpfs shard went through the host path
    EXPECT_TRUE(contains(stats.gds_reason, "O_DIRECT")) << stats.gds_reason;
  } else {
    // gds=auto does not use cuFile's compatibility mode: every file on the host path.
    EXPECT_FALSE(on_disk.used);
    EXPECT_TRUE(contains(stats.gds_reason, "nvidia-fs")) << stats.gds_reason;
    EXPECT_EQ(stats.gds_bytes, 0u);
  }
}

TEST(GdsGpu, OnFailsLoudlyWhereRegistrationFails) {
  TS_REQUIRE_GDS();
  const std::filesystem::path shm = "/dev/shm";
  if (!on_tmpfs(shm)) GTEST_SKIP() << "/dev/shm is not a tmpfs here";
  ScratchDir memory(shm);
  const auto path = make_store(memory.path(), 2, 64 * KiB, 128 * KiB, 8);
  eng::EngineOptions options;
  options.device = "cuda:0";
  options.device_budget = 8 * MiB;
  options.gds = eng::GdsMode::kOn;
  const auto env = refuse_o_direct_like_old_tmpfs(options, path);
  try {
    eng::Engine engine(path, options);
    FAIL() << "gds=on accepted a store on tmpfs";
  } catch (const ts::Error& e) {
    const std::string what = e.what();
    EXPECT_TRUE(contains(what, "gds=on")) << what;
    EXPECT_TRUE(contains(what, path.filename().string())) << what;
    EXPECT_TRUE(contains(what, "O_DIRECT")) << what;
  }
  // gds=auto reads the same store through the host path.
  options.gds = eng::GdsMode::kAuto;
  eng::Engine engine(path, options);
  EXPECT_EQ(engine.stats().gds_files, 0u);
  EXPECT_FALSE(engine.stats().gds_reason.empty());
  (void)engine.acquire(0);
  engine.release(0);
}

TEST(GdsGpu, TruncatedFileFailsTheBlockWithContext) {
  TS_REQUIRE_GDS();
  ScratchDir dir(TS_GDS_TMP);
  const auto path = make_store(dir.path(), 4, 2 * MiB, 3 * MiB, 9);
  const auto store = ts::Store::open(path);
  eng::EngineOptions options;
  options.device = "cuda:0";
  options.device_budget = eng::minimum_budget(block_sizes(store), 2);
  options.prefetch = eng::PrefetchStrategy::kNone;
  options.gds = eng::GdsMode::kOn;
  eng::Engine engine(path, options);
  const auto& last = store.blocks().back();
  std::filesystem::resize_file(path, last.offset);  // the last block is gone
  try {
    (void)engine.acquire(static_cast<std::uint32_t>(store.blocks().size() - 1));
    FAIL() << "read a block past the end of the file";
  } catch (const ts::Error& e) {
    const std::string what = e.what();
    EXPECT_TRUE(contains(what, last.name)) << what;
    EXPECT_TRUE(contains(what, path.filename().string())) << what;
    EXPECT_TRUE(contains(what, "GPUDirect Storage")) << what;
  }
  EXPECT_EQ(engine.stats().failures, 1u);
  (void)engine.acquire(0);  // the blocks still in the file read fine
  engine.release(0);
  engine.close();
}

TEST(GdsGpu, OffNeverLoadsCufileOnAGpu) {
  if (!ts::cuda::available()) GTEST_SKIP() << ts::cuda::driver_status().reason;
  GTEST_FLAG_SET(death_test_style, "threadsafe");
  EXPECT_EXIT(
      {
        default_cufile_library();
        ScratchDir dir(TS_GDS_TMP);
        const auto path = make_store(dir.path(), 3, MiB, 2 * MiB, 10);
        eng::EngineOptions options;
        options.device = "cuda:0";
        options.device_budget = 16 * MiB;
        options.gds = eng::GdsMode::kOff;
        eng::Engine engine(path, options);
        for (std::uint32_t b = 0; b < engine.block_count(); ++b) {
          (void)engine.acquire(b);
          engine.release(b);
        }
        const bool ok = engine.stats().gds_reason == "gds is off" &&
                        !contains(process_maps(), "libcufile") &&
                        !ts::cuda::cufile_library_loaded();
        std::exit(ok ? 0 : 1);
      },
      ::testing::ExitedWithCode(0), "");
}
