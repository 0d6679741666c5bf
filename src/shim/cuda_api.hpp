// Private: the table of CUDA driver entry points loaded at run time. Only compiled when the
// build found <cuda.h> and <cudaTypedefs.h>; the public interface (shim/cuda.hpp) never
// exposes CUDA types.
#pragma once

#if defined(TS_HAVE_CUDA_HEADERS)
#include <cuda.h>
#include <cudaTypedefs.h>

#include <string>

#include "tensorstream/shim/cuda.hpp"

namespace tensorstream::cuda::detail {

// Every entry point, typed by the cudaTypedefs.h pointer type of the ABI version the code was
// written against, and resolved for exactly that version:
//   X(name, PFN type, CUDA version of that ABI, exported symbol of that ABI, feature)
// - cuGetProcAddress(name, version) returns that variant: asking cuEventElapsedTime for 2000
//   gives the CUDA 2.0 function on every driver, where the header's own name for it
//   (cuEventElapsedTime_v2) exists only in 12.8+ drivers.
// - The exported symbol is the dlsym fallback for drivers without cuGetProcAddress.
// - feature: nullptr for an entry without which CUDA is unusable; otherwise the feature a
//   missing entry switches off (DriverStatus::disabled says which and why).
// All streams are asked for with legacy default-stream semantics (stream 0 is the legacy
// NULL stream, as StreamHandle documents).
#define TS_CUDA_DRIVER_FUNCTIONS(X)                                                            \
  X(cuInit, PFN_cuInit_v2000, 2000, "cuInit", nullptr)                                         \
  X(cuDriverGetVersion, PFN_cuDriverGetVersion_v2020, 2020, "cuDriverGetVersion", nullptr)     \
  X(cuDeviceGetCount, PFN_cuDeviceGetCount_v2000, 2000, "cuDeviceGetCount", nullptr)           \
  X(cuDeviceGet, PFN_cuDeviceGet_v2000, 2000, "cuDeviceGet", nullptr)                          \
  X(cuDeviceGetName, PFN_cuDeviceGetName_v2000, 2000, "cuDeviceGetName", nullptr)              \
  X(cuGetErrorString, PFN_cuGetErrorString_v6000, 6000, "cuGetErrorString", kFeatureErrorText) \
  X(cuDevicePrimaryCtxRetain, PFN_cuDevicePrimaryCtxRetain_v7000, 7000,                        \
    "cuDevicePrimaryCtxRetain", nullptr)                                                       \
  X(cuDevicePrimaryCtxRelease, PFN_cuDevicePrimaryCtxRelease_v11000, 11000,                    \
    "cuDevicePrimaryCtxRelease_v2", nullptr)                                                   \
  X(cuCtxPushCurrent, PFN_cuCtxPushCurrent_v4000, 4000, "cuCtxPushCurrent_v2", nullptr)        \
  X(cuCtxPopCurrent, PFN_cuCtxPopCurrent_v4000, 4000, "cuCtxPopCurrent_v2", nullptr)           \
  X(cuMemGetInfo, PFN_cuMemGetInfo_v3020, 3020, "cuMemGetInfo_v2", nullptr)                    \
  X(cuMemAlloc, PFN_cuMemAlloc_v3020, 3020, "cuMemAlloc_v2", nullptr)                          \
  X(cuMemFree, PFN_cuMemFree_v3020, 3020, "cuMemFree_v2", nullptr)                             \
  X(cuMemHostAlloc, PFN_cuMemHostAlloc_v2020, 2020, "cuMemHostAlloc", nullptr)                 \
  X(cuMemFreeHost, PFN_cuMemFreeHost_v2000, 2000, "cuMemFreeHost", nullptr)                    \
  X(cuMemHostRegister, PFN_cuMemHostRegister_v6050, 6050, "cuMemHostRegister_v2",              \
    kFeatureHostRegistration)                                                                  \
  X(cuMemHostUnregister, PFN_cuMemHostUnregister_v4000, 4000, "cuMemHostUnregister",           \
    kFeatureHostRegistration)                                                                  \
  X(cuMemcpyHtoDAsync, PFN_cuMemcpyHtoDAsync_v3020, 3020, "cuMemcpyHtoDAsync_v2", nullptr)     \
  X(cuMemcpyDtoHAsync, PFN_cuMemcpyDtoHAsync_v3020, 3020, "cuMemcpyDtoHAsync_v2", nullptr)     \
  X(cuStreamCreate, PFN_cuStreamCreate_v2000, 2000, "cuStreamCreate", nullptr)                 \
  X(cuStreamDestroy, PFN_cuStreamDestroy_v4000, 4000, "cuStreamDestroy_v2", nullptr)           \
  X(cuStreamSynchronize, PFN_cuStreamSynchronize_v2000, 2000, "cuStreamSynchronize", nullptr)  \
  X(cuStreamQuery, PFN_cuStreamQuery_v2000, 2000, "cuStreamQuery", nullptr)                    \
  X(cuStreamWaitEvent, PFN_cuStreamWaitEvent_v3020, 3020, "cuStreamWaitEvent", nullptr)        \
  X(cuEventCreate, PFN_cuEventCreate_v2000, 2000, "cuEventCreate", nullptr)                    \
  X(cuEventDestroy, PFN_cuEventDestroy_v4000, 4000, "cuEventDestroy_v2", nullptr)              \
  X(cuEventRecord, PFN_cuEventRecord_v2000, 2000, "cuEventRecord", nullptr)                    \
  X(cuEventSynchronize, PFN_cuEventSynchronize_v2000, 2000, "cuEventSynchronize", nullptr)     \
  X(cuEventQuery, PFN_cuEventQuery_v2000, 2000, "cuEventQuery", nullptr)                       \
  X(cuEventElapsedTime, PFN_cuEventElapsedTime_v2000, 2000, "cuEventElapsedTime", kFeatureTiming)

/// The optional features, as DriverStatus::disabled names them.
inline constexpr const char* kFeatureErrorText = "driver error strings (cuGetErrorString)";
inline constexpr const char* kFeatureHostRegistration =
    "page-locking existing host memory (HostRegistration)";
inline constexpr const char* kFeatureTiming = "event timing (elapsed_ms)";

struct DriverApi {
#define TS_CUDA_MEMBER(name, pfn, version, symbol, feature) pfn name = nullptr;
  TS_CUDA_DRIVER_FUNCTIONS(TS_CUDA_MEMBER)
#undef TS_CUDA_MEMBER
};

/// What loading one driver library found.
struct DriverProbe {
  DriverApi api;        ///< entries that were resolved (nullptr where absent)
  DriverStatus status;  ///< as driver_status() reports it
};

/// Loads `library` with dlopen (never unloaded), resolves every entry of the table (through
/// cuGetProcAddress_v2, else cuGetProcAddress, else dlsym of the exported symbols), then
/// initialises the driver and counts its devices. Never throws: every failure is in
/// status.reason, every missing optional entry in status.disabled. Each call probes anew;
/// driver_status() keeps the first probe of the process (of TENSORSTREAM_CUDA_LIBRARY, else
/// libcuda.so.1).
DriverProbe probe_driver(const std::string& library) noexcept;

/// The loaded table; throws CudaError (with the reason) if the driver is not usable.
const DriverApi& api();

/// Throws CudaError "<feature> is not available: <why>" unless `present`.
void require_feature(bool present, const char* feature);

/// "<driver's error string> (code)"; never throws.
std::string describe_error(CUresult rc) noexcept;

/// "<call> failed: <driver's error string> (code)".
[[noreturn]] void throw_cuda_error(const char* call, CUresult rc);

}  // namespace tensorstream::cuda::detail

/// Calls a driver function through the table and throws CudaError naming it on failure.
#define TS_CUDA_TRY(name, ...)                                                          \
  do {                                                                                  \
    const CUresult ts_cuda_rc_ = ::tensorstream::cuda::detail::api().name(__VA_ARGS__); \
    if (ts_cuda_rc_ != CUDA_SUCCESS) [[unlikely]] {                                     \
      ::tensorstream::cuda::detail::throw_cuda_error(#name, ts_cuda_rc_);               \
    }                                                                                   \
  } while (0)

#endif  // TS_HAVE_CUDA_HEADERS
