// The CUDA shim against stand-ins for the driver: real shared libraries (fake_cuda_driver.cpp,
// one per variant) loaded with dlopen, as libcuda.so.1 would be. Two parts:
// - CudaLoader: the resolution of the entry-point table (detail::probe_driver) against
//   drivers with cuGetProcAddress_v2, with only the 4-argument cuGetProcAddress, with neither,
//   with a broken one, and with entry points missing.
// - CudaFakeDriver: the public API with TENSORSTREAM_CUDA_LIBRARY naming the CUDA 12.4
//   stand-in (set by main() before anything loads the driver): the flags events are created
//   with, the context every call makes current, copies, and doctor's report.
// On a GPU machine these run as well: they never touch the real driver.
#include <dlfcn.h>
#include <gtest/gtest.h>
#include <stdlib.h>
#include <sys/resource.h>

#include <algorithm>
#include <cstring>
#include <sstream>
#include <string>
#include <variant>
#include <vector>

#include "cli.hpp"
#include "cli_util.hpp"
#include "cuda_api.hpp"
#include "tensorstream/checksum.hpp"
#include "tensorstream/detail/json.hpp"
#include "tensorstream/engine/engine.hpp"
#include "tensorstream/errors.hpp"
#include "tensorstream/shim/cuda.hpp"
#include "tensorstream/store.hpp"
#include "test_helpers.hpp"

namespace ts = tensorstream;
namespace cuda = ts::cuda;
namespace json = ts::detail::json;

namespace {

std::string fake(const std::string& variant) {
  return std::string(TS_FAKE_CUDA_DIR) + "/libfake_cuda_" + variant + ".so";
}

// The stand-in's own test hooks, from the library the shim loaded (dlopen of a loaded file
// returns the same handle).
struct FakeHooks {
  explicit FakeHooks(const std::string& path) {
    handle = ::dlopen(path.c_str(), RTLD_NOW | RTLD_LOCAL);
    if (handle == nullptr) throw std::runtime_error(::dlerror());
    log_fn = reinterpret_cast<const char* (*)()>(::dlsym(handle, "fake_cuda_log"));
    clear_fn = reinterpret_cast<void (*)()>(::dlsym(handle, "fake_cuda_clear_log"));
    depth_fn = reinterpret_cast<int (*)()>(::dlsym(handle, "fake_cuda_context_depth"));
    if (!log_fn || !clear_fn || !depth_fn) throw std::runtime_error("not a fake driver");
  }
  [[nodiscard]] std::vector<std::string> log() const {
    std::vector<std::string> lines;
    std::istringstream in(log_fn());
    for (std::string line; std::getline(in, line);) lines.push_back(line);
    return lines;
  }
  [[nodiscard]] bool logged(const std::string& line) const {
    const auto lines = log();
    return std::find(lines.begin(), lines.end(), line) != lines.end();
  }
  void clear() const { clear_fn(); }
  [[nodiscard]] int context_depth() const { return depth_fn(); }
  void* handle = nullptr;
  const char* (*log_fn)() = nullptr;
  void (*clear_fn)() = nullptr;
  int (*depth_fn)() = nullptr;
};

bool contains(const std::string& text, const std::string& part) {
  return text.find(part) != std::string::npos;
}

}  // namespace

// ---- the table ---------------------------------------------------------------------------------

TEST(CudaLoader, AsksGetProcAddressForTheVersionEachCallWasWrittenAgainst) {
  // A CUDA 13 driver has cuEventElapsedTime_v2 (12.8); the shim is written against the CUDA
  // 2.0 call and must get that one, with the legacy default stream.
  const auto probe = cuda::detail::probe_driver(fake("13_0"));
  ASSERT_TRUE(probe.status.available) << probe.status.reason;
  EXPECT_EQ(probe.status.entry_points, "cuGetProcAddress_v2");
  EXPECT_EQ(probe.status.driver_version, 13000);
  EXPECT_EQ(probe.status.device0_name, "Fake GPU");
  EXPECT_TRUE(probe.status.disabled.empty());
  const FakeHooks hooks(fake("13_0"));
  for (const char* request : {"cuGetProcAddress_v2 cuEventElapsedTime 2000 flags=1",
                              "cuGetProcAddress_v2 cuMemAlloc 3020 flags=1",
                              "cuGetProcAddress_v2 cuMemcpyHtoDAsync 3020 flags=1",
                              "cuGetProcAddress_v2 cuDevicePrimaryCtxRelease 11000 flags=1",
                              "cuGetProcAddress_v2 cuCtxPushCurrent 4000 flags=1"}) {
    EXPECT_TRUE(hooks.logged(request)) << request;
  }
  // Called through the table, cuEventElapsedTime is the CUDA 2.0 function, not _v2.
  hooks.clear();
  float ms = 0;
  EXPECT_NE(probe.api.cuEventElapsedTime(&ms, nullptr, nullptr), CUDA_SUCCESS);  // no context
  EXPECT_TRUE(hooks.logged("cuEventElapsedTime"));
  EXPECT_FALSE(hooks.logged("cuEventElapsedTime_v2"));
  EXPECT_FALSE(hooks.logged("WRONG ABI"));
  EXPECT_EQ(reinterpret_cast<void*>(probe.api.cuMemAlloc), ::dlsym(hooks.handle, "cuMemAlloc_v2"));
}

TEST(CudaLoader, OlderDriverWithoutTheHeadersNewestSymbolsWorks) {
  // CUDA 12.4: no cuEventElapsedTime_v2, which is what <cuda.h> of CUDA 13 calls
  // cuEventElapsedTime. Loading by the header's names made such drivers unusable.
  ASSERT_EQ(::dlsym(FakeHooks(fake("12_4")).handle, "cuEventElapsedTime_v2"), nullptr);
  const auto probe = cuda::detail::probe_driver(fake("12_4"));
  ASSERT_TRUE(probe.status.available) << probe.status.reason;
  EXPECT_EQ(probe.status.driver_version, 12040);
  EXPECT_TRUE(probe.status.disabled.empty());
  EXPECT_NE(probe.api.cuEventElapsedTime, nullptr);
}

TEST(CudaLoader, FourArgumentGetProcAddress) {
  const auto probe = cuda::detail::probe_driver(fake("11_4_getproc_v1"));
  ASSERT_TRUE(probe.status.available) << probe.status.reason;
  EXPECT_EQ(probe.status.entry_points, "cuGetProcAddress");
  EXPECT_TRUE(FakeHooks(fake("11_4_getproc_v1")).logged("cuGetProcAddress cuMemFree 3020 flags=1"));
}

TEST(CudaLoader, DlsymOfTheExportedSymbolsWithoutGetProcAddress) {
  const auto probe = cuda::detail::probe_driver(fake("11_2_dlsym"));
  ASSERT_TRUE(probe.status.available) << probe.status.reason;
  EXPECT_EQ(probe.status.entry_points, "dlsym");
  const FakeHooks hooks(fake("11_2_dlsym"));
  // The exported symbols of the ABI each entry is typed with.
  EXPECT_EQ(reinterpret_cast<void*>(probe.api.cuMemAlloc), ::dlsym(hooks.handle, "cuMemAlloc_v2"));
  EXPECT_EQ(reinterpret_cast<void*>(probe.api.cuCtxPopCurrent),
            ::dlsym(hooks.handle, "cuCtxPopCurrent_v2"));
  EXPECT_EQ(reinterpret_cast<void*>(probe.api.cuEventElapsedTime),
            ::dlsym(hooks.handle, "cuEventElapsedTime"));
  for (const auto& line : hooks.log()) EXPECT_FALSE(line.starts_with("cuGetProcAddress")) << line;
}

TEST(CudaLoader, FailingGetProcAddressFallsBackToTheExportedSymbols) {
  const auto probe = cuda::detail::probe_driver(fake("getproc_fails"));
  ASSERT_TRUE(probe.status.available) << probe.status.reason;
  const FakeHooks hooks(fake("getproc_fails"));
  EXPECT_TRUE(hooks.logged("cuGetProcAddress_v2 cuInit 2000 flags=1"));
  EXPECT_EQ(reinterpret_cast<void*>(probe.api.cuStreamDestroy),
            ::dlsym(hooks.handle, "cuStreamDestroy_v2"));
}

TEST(CudaLoader, MissingOptionalEntryPointDisablesOnlyItsFeature) {
  const auto probe = cuda::detail::probe_driver(fake("no_timing"));
  ASSERT_TRUE(probe.status.available) << probe.status.reason;
  EXPECT_EQ(probe.api.cuEventElapsedTime, nullptr);
  ASSERT_EQ(probe.status.disabled.size(), 1u);
  const auto& why = probe.status.disabled[0];
  EXPECT_EQ(why.rfind("event timing (elapsed_ms): ", 0), 0u) << why;
  EXPECT_TRUE(contains(why, "cuEventElapsedTime")) << why;
  EXPECT_TRUE(contains(why, "symbol not found")) << why;
  EXPECT_NE(probe.api.cuMemAlloc, nullptr);
}

TEST(CudaLoader, MissingRequiredEntryPointNamesItAndTheLibrary) {
  const auto probe = cuda::detail::probe_driver(fake("no_memalloc"));
  EXPECT_FALSE(probe.status.available);
  EXPECT_TRUE(contains(probe.status.reason, "cuMemAlloc")) << probe.status.reason;
  EXPECT_TRUE(contains(probe.status.reason, fake("no_memalloc"))) << probe.status.reason;
  // Nothing was initialised with a half-filled table.
  EXPECT_FALSE(FakeHooks(fake("no_memalloc")).logged("cuInit flags=0"));
}

TEST(CudaLoader, InitFailureIsReportedWithTheDriversText) {
  const auto probe = cuda::detail::probe_driver(fake("init_fails"));
  EXPECT_FALSE(probe.status.available);
  EXPECT_EQ(probe.status.reason, "cuInit failed: fake: no CUDA-capable device is detected");
  EXPECT_EQ(probe.status.driver_version, 12040);
  EXPECT_EQ(probe.status.device_count, 0);
}

TEST(CudaLoader, MissingLibraryIsReportedNotThrown) {
  const auto probe = cuda::detail::probe_driver("/nonexistent/libcuda.so.1");
  EXPECT_FALSE(probe.status.available);
  EXPECT_EQ(probe.status.reason.rfind("no CUDA driver: ", 0), 0u) << probe.status.reason;
  EXPECT_TRUE(contains(probe.status.reason, "/nonexistent/libcuda.so.1")) << probe.status.reason;
  EXPECT_EQ(probe.status.entry_points, "");
}

// ---- the public API on the CUDA 12.4 stand-in -----------------------------------------------

class CudaFakeDriver : public ::testing::Test {
 protected:
  void SetUp() override {
    const auto status = cuda::driver_status();
    ASSERT_TRUE(status.available) << status.reason;
    hooks_.clear();
  }
  FakeHooks hooks_{fake("12_4")};
};

TEST_F(CudaFakeDriver, StatusComesFromTheNamedLibrary) {
  const auto status = cuda::driver_status();
  EXPECT_EQ(status.library, fake("12_4"));
  EXPECT_EQ(status.entry_points, "cuGetProcAddress_v2");
  EXPECT_EQ(status.device_count, 1);
  EXPECT_EQ(status.device0_name, "Fake GPU");
  EXPECT_TRUE(cuda::available());
}

TEST_F(CudaFakeDriver, EventsAreCreatedForHowTheyAreWaitedOn) {
  const cuda::Device device(0);
  {
    const cuda::Event host_wait(device);                  // the default: the engine's fill events
    EXPECT_TRUE(hooks_.logged("cuEventCreate flags=3"));  // BLOCKING_SYNC | DISABLE_TIMING
    host_wait.record(nullptr);
    host_wait.synchronize();
    EXPECT_TRUE(hooks_.logged("cuEventSynchronize blocking"));
  }
  hooks_.clear();
  {
    const cuda::Event stream_only(device, cuda::EventKind::kStreamOnly);
    EXPECT_TRUE(hooks_.logged("cuEventCreate flags=2"));  // DISABLE_TIMING
  }
  hooks_.clear();
  {
    const cuda::Event timing(device, cuda::EventKind::kTiming);
    EXPECT_TRUE(hooks_.logged("cuEventCreate flags=1"));  // BLOCKING_SYNC, timing on
    EXPECT_EQ(timing.kind(), cuda::EventKind::kTiming);
  }
}

TEST_F(CudaFakeDriver, ElapsedMsMakesTheContextCurrentItself) {
  const cuda::Device device(0);
  const cuda::Stream stream(device);
  const cuda::Event start(device, cuda::EventKind::kTiming);
  const cuda::Event end(device, cuda::EventKind::kTiming);
  start.record(stream.handle());
  end.record(stream.handle());
  end.synchronize();
  ASSERT_EQ(hooks_.context_depth(), 0);  // nothing current on this thread
  hooks_.clear();
  EXPECT_FLOAT_EQ(cuda::elapsed_ms(start, end), 1.5f);  // the stand-in's CUDA 2.0 call
  EXPECT_EQ(hooks_.log(), (std::vector<std::string>{"cuCtxPushCurrent_v2", "cuEventElapsedTime",
                                                    "cuCtxPopCurrent_v2"}));
  EXPECT_EQ(hooks_.context_depth(), 0);
}

TEST_F(CudaFakeDriver, ElapsedMsRefusesEventsWithoutTiming) {
  const cuda::Device device(0);
  const cuda::Event start(device, cuda::EventKind::kTiming);
  const cuda::Event end(device);
  start.record(nullptr);
  end.record(nullptr);
  try {
    (void)cuda::elapsed_ms(start, end);
    FAIL() << "elapsed_ms accepted an event without timing";
  } catch (const ts::CudaError& e) {
    EXPECT_TRUE(contains(e.what(), "kTiming")) << e.what();
  }
}

TEST_F(CudaFakeDriver, CopiesRoundTripAndEveryCallRestoresTheContext) {
  const cuda::Device device(0);
  EXPECT_EQ(device.mem_info().total, std::uint64_t{2} << 30);
  const auto data = ts::testing::random_bytes(1 << 16, 3);
  const cuda::PinnedHostBuffer src(device, data.size());
  const cuda::PinnedHostBuffer dst(device, data.size());
  std::memcpy(src.data(), data.data(), data.size());
  const cuda::DeviceBuffer on_device(device, data.size());
  const cuda::Stream stream(device);
  const cuda::Event copied(device);
  cuda::memcpy_htod_async(device, on_device.ptr(), src.data(), data.size(), stream.handle());
  copied.record(stream.handle());
  const cuda::Stream other(device);
  cuda::stream_wait_event(device, other.handle(), copied);
  cuda::memcpy_dtoh_async(device, dst.data(), on_device.ptr(), data.size(), other.handle());
  other.synchronize();
  EXPECT_TRUE(copied.query());
  EXPECT_EQ(std::memcmp(dst.data(), data.data(), data.size()), 0);
  std::vector<std::byte> host(4096, std::byte{7});
  { const cuda::HostRegistration registration(device, host.data(), host.size()); }
  EXPECT_TRUE(hooks_.logged("cuMemHostAlloc flags=1"));  // CU_MEMHOSTALLOC_PORTABLE
  EXPECT_TRUE(hooks_.logged("cuStreamCreate flags=1"));  // CU_STREAM_NON_BLOCKING
  EXPECT_EQ(hooks_.context_depth(), 0);
  const auto log = hooks_.log();
  const auto pushes = std::count(log.begin(), log.end(), "cuCtxPushCurrent_v2");
  EXPECT_EQ(pushes, std::count(log.begin(), log.end(), "cuCtxPopCurrent_v2"));
  EXPECT_GT(pushes, 10);
}

TEST_F(CudaFakeDriver, EngineFillsThroughTheShimAndItsWorkersSleepWhileWaiting) {
  // The engine's GPU path on the stand-in (its copies are synchronous memcpy, so this checks
  // what the engine asks of the driver, not the ordering on a real device): every byte
  // arrives, every event the engine creates is a host-wait one, and every host wait on an
  // event is a blocking (sleeping) one.
  const ts::testing::TempDir dir;
  const auto path = ts::testing::make_random_store(dir.path(), 6, 1 << 20, 3 << 20, 5);
  const auto store = ts::Store::open(path);
  ts::engine::EngineOptions options;
  options.device = "cuda:0";
  options.device_budget = 3 * (3 << 20) + (1 << 20);
  options.slots = 3;
  options.ram_cache_bytes = 8 << 20;  // a RAM tier too: fills wait on their source's copy
  options.gds = ts::engine::GdsMode::kOff;
  const cuda::Device device(0);
  const cuda::Stream stream(device);
  const cuda::PinnedHostBuffer back(device, 3 << 20);
  {
    ts::engine::Engine engine(path, options);
    for (int pass = 0; pass < 2; ++pass) {
      for (std::uint32_t b = 0; b < store.blocks().size(); ++b) {
        const auto view = engine.acquire(b, stream.handle());
        ASSERT_NE(view.device, 0u);
        cuda::memcpy_dtoh_async(device, back.data(), view.device, view.size, stream.handle());
        engine.release(b, stream.handle());
        stream.synchronize();
        EXPECT_EQ(ts::checksum64({back.data(), view.size}), store.blocks()[b].checksum) << b;
      }
    }
    EXPECT_EQ(engine.stats().failures, 0u);
  }
  const auto log = hooks_.log();
  std::size_t created = 0;
  std::size_t waits = 0;
  for (const auto& line : log) {
    if (line.starts_with("cuEventCreate")) {
      ++created;
      EXPECT_EQ(line, "cuEventCreate flags=3") << "an engine event is not BLOCKING_SYNC";
    }
    if (line.starts_with("cuEventSynchronize")) {
      ++waits;
      EXPECT_EQ(line, "cuEventSynchronize blocking");
    }
  }
  EXPECT_GE(created, 6u);  // ready + done per slot at least
  EXPECT_GE(waits, 1u);
  EXPECT_EQ(hooks_.context_depth(), 0);
}

TEST_F(CudaFakeDriver, BenchIoMeasuresTheGpuRowsThroughTheShim) {
  // bench-io's GPU rows run end to end (the figures are the stand-in's, meaningless): the
  // pinned H2D row times with elapsed_ms on a thread that has no context current.
  const ts::testing::TempDir dir;
  const auto path = ts::testing::make_random_store(dir.path(), 4, 1 << 20, 2 << 20, 9);
  const auto store = ts::Store::open(path);
  std::uint64_t bytes = 0;
  for (const auto& b : store.blocks()) bytes += b.raw_size;
  std::ostringstream out;
  std::ostringstream err;
  const int code = ts::cli::run({"bench-io", path.string(), "--device", "cuda:0", "--repeat", "1",
                                 "--no-fio", "--backends", "pread", "--json"},
                                out, err, /*interactive=*/false);
  ASSERT_EQ(code, 0) << err.str();
  const auto doc = json::parse(out.str(), "bench-io output");
  const auto* h2d = doc.find("reference")->find("pinned_h2d");
  ASSERT_TRUE(h2d != nullptr && h2d->is_object()) << out.str();
  EXPECT_EQ(std::get<json::Integer>(h2d->find("bytes")->data).magnitude, 8u * (256u << 20));
  EXPECT_GT(std::get<double>(h2d->find("gbps")->data), 0.0);
  const auto* engine = doc.find("device")->find("engine");
  ASSERT_TRUE(engine != nullptr && engine->is_object()) << out.str();
  EXPECT_EQ(std::get<json::Integer>(engine->find("bytes")->data).magnitude, bytes);
  EXPECT_EQ(hooks_.context_depth(), 0);
}

TEST_F(CudaFakeDriver, DoctorReportsTheDriverAndNoMemlockWarningForCudaPinnedMemory) {
  // A small locked-memory limit with a GPU: CUDA's pinned memory is not charged to it (see
  // doctor.cpp), so doctor must not warn about it.
  rlimit saved{};
  ASSERT_EQ(::getrlimit(RLIMIT_MEMLOCK, &saved), 0);
  rlimit small = saved;
  small.rlim_cur = std::min<rlim_t>(saved.rlim_max, 64 << 10);
  ASSERT_EQ(::setrlimit(RLIMIT_MEMLOCK, &small), 0);
  const ts::testing::TempDir dir;
  std::ostringstream out;
  std::ostringstream err;
  const int code = ts::cli::run(
      {"doctor", "--json", "--probe-size", "0", "--storage-path", dir.path().string()}, out, err,
      /*interactive=*/false);
  ASSERT_EQ(::setrlimit(RLIMIT_MEMLOCK, &saved), 0);
  ASSERT_EQ(code, 0) << err.str();
  const auto doc = json::parse(out.str(), "doctor output");
  const auto& cuda_doc = *doc.find("cuda");
  EXPECT_TRUE(std::get<bool>(cuda_doc.find("driver")->data));
  EXPECT_EQ(std::get<std::string>(cuda_doc.find("library")->data), fake("12_4"));
  EXPECT_EQ(std::get<std::string>(cuda_doc.find("entry_points")->data), "cuGetProcAddress_v2");
  EXPECT_TRUE(std::get<json::Array>(cuda_doc.find("disabled")->data).empty());
  const auto& memlock = *doc.find("memlock");
  EXPECT_EQ(std::get<json::Integer>(memlock.find("soft")->data).magnitude,
            static_cast<std::uint64_t>(small.rlim_cur));
  if (!ts::cli::util::io_uring_rings_charged_to_memlock(
          std::get<std::string>(doc.find("machine")->find("kernel")->data))) {
    EXPECT_TRUE(std::holds_alternative<std::nullptr_t>(memlock.find("warning")->data)) << out.str();
  }
}

int main(int argc, char** argv) {
  // Before anything loads the driver: every public call in this process uses the stand-in,
  // and cuFile is kept out (it would load the real libcuda.so.1 itself).
  ::setenv("TENSORSTREAM_CUDA_LIBRARY", fake("12_4").c_str(), 1);
  ::setenv("TENSORSTREAM_CUFILE_LIBRARY", "/nonexistent/libcufile.so.0", 1);
  ::testing::InitGoogleTest(&argc, argv);
  return RUN_ALL_TESTS();
}
