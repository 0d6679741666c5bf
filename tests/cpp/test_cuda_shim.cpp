// The CUDA driver is found at run time on a GPU machine, and its absence is reported (not
// thrown) elsewhere. The same binary runs in both places.
#include <gtest/gtest.h>

#include <filesystem>

#include "tensorstream/shim/cuda.hpp"

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
  EXPECT_EQ(cufile.library_loaded, cufile.reason.empty());
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
