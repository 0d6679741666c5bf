// The CUDA driver is found at run time on a GPU machine, and its absence is reported (not
// thrown) elsewhere. The same binary runs in both places.
#include <gtest/gtest.h>

#include <algorithm>
#include <filesystem>
#include <string>
#include <vector>

#include "tensorstream/errors.hpp"
#include "tensorstream/shim/cuda.hpp"
#include "tensorstream/shim/cufile.hpp"

namespace ts = tensorstream;

namespace {
bool machine_has_nvidia_gpu() { return std::filesystem::exists("/dev/nvidia0"); }
}  // namespace

TEST(CudaShim, StatusNeverThrowsAndExplainsAbsence) {
  const auto status = ts::cuda::driver_status();
  if (!status.available) {
    EXPECT_FALSE(status.reason.empty());
    EXPECT_EQ(status.device_count == 0 || !status.reason.empty(), true);
  }
  EXPECT_EQ(ts::cuda::available(), status.available);
  const auto cufile = ts::cuda::cufile_status();
  EXPECT_EQ(cufile.driver_opened, cufile.reason.empty());
  EXPECT_TRUE(cufile.library_loaded || !cufile.driver_opened);
}

TEST(CudaShim, FindsDriverOnGpuMachine) {
  if (!machine_has_nvidia_gpu()) GTEST_SKIP() << "no NVIDIA GPU on this machine";
  ASSERT_TRUE(ts::cuda::compiled_with_cuda()) << "GPU machine but built without CUDA headers";
  const auto status = ts::cuda::driver_status();
  ASSERT_TRUE(status.available) << status.reason;
  EXPECT_GE(status.device_count, 1);
  EXPECT_GE(status.driver_version, 12000);
  EXPECT_FALSE(status.device0_name.empty());
}

TEST(CudaShim, ReportsNoDriverWithoutGpu) {
  if (machine_has_nvidia_gpu()) GTEST_SKIP() << "this machine has a GPU";
  const auto status = ts::cuda::driver_status();
  EXPECT_FALSE(status.available);
  EXPECT_FALSE(status.reason.empty());
}

TEST(CudaShim, ObjectsRefuseToExistWithoutDriver) {
  if (ts::cuda::available()) GTEST_SKIP() << "a CUDA driver is available";
  try {
    ts::cuda::Device device(0);
    FAIL() << "Device constructed without a driver";
  } catch (const ts::CudaError& e) {
    EXPECT_NE(std::string(e.what()).find(ts::cuda::driver_status().reason), std::string::npos)
        << e.what();
  }
}

TEST(CudaShim, GpuCopiesRoundTripThroughPinnedMemory) {
  if (!ts::cuda::available()) GTEST_SKIP() << ts::cuda::driver_status().reason;
  ts::cuda::Device device(0);
  const auto info = device.mem_info();
  EXPECT_GT(info.total, 0u);
  EXPECT_LE(info.free, info.total);
  constexpr std::size_t kBytes = 64u << 20;
  ts::cuda::PinnedHostBuffer src(device, kBytes);
  ts::cuda::PinnedHostBuffer dst(device, kBytes);
  for (std::size_t i = 0; i < kBytes; ++i) src.data()[i] = static_cast<std::byte>(i * 131 % 251);
  ts::cuda::DeviceBuffer on_device(device, kBytes);
  ts::cuda::Stream stream(device);
  ts::cuda::Event start(device, ts::cuda::EventKind::kTiming);
  ts::cuda::Event copied(device, ts::cuda::EventKind::kTiming);
  start.record(stream.handle());
  ts::cuda::memcpy_htod_async(device, on_device.ptr(), src.data(), kBytes, stream.handle());
  copied.record(stream.handle());
  // A second stream waits on the event on the device, then copies back.
  ts::cuda::Stream other(device);
  ts::cuda::stream_wait_event(device, other.handle(), copied);
  ts::cuda::memcpy_dtoh_async(device, dst.data(), on_device.ptr(), kBytes, other.handle());
  other.synchronize();
  EXPECT_TRUE(copied.query());
  EXPECT_TRUE(std::equal(src.data(), src.data() + kBytes, dst.data()));
  const float ms = ts::cuda::elapsed_ms(start, copied);
  EXPECT_GT(ms, 0.0f);
  RecordProperty("h2d_gbps", std::to_string(kBytes / (ms * 1e-3) / 1e9));
}

TEST(CudaShim, RegisteredHostMemoryCopies) {
  if (!ts::cuda::available()) GTEST_SKIP() << ts::cuda::driver_status().reason;
  ts::cuda::Device device(0);
  std::vector<std::byte> host(1 << 20, std::byte{0x5a});
  ts::cuda::HostRegistration registration(device, host.data(), host.size());
  ts::cuda::DeviceBuffer on_device(device, host.size());
  ts::cuda::Stream stream(device);
  ts::cuda::memcpy_htod_async(device, on_device.ptr(), host.data(), host.size(), stream.handle());
  std::vector<std::byte> back(host.size());
  ts::cuda::memcpy_dtoh_async(device, back.data(), on_device.ptr(), back.size(), stream.handle());
  stream.synchronize();
  EXPECT_EQ(back, host);
}
