// Private: the table of CUDA driver entry points loaded with dlopen. Only compiled when the
// build found <cuda.h>; the public interface (shim/cuda.hpp) never exposes CUDA types.
#pragma once

#if defined(TS_HAVE_CUDA_HEADERS)
#include <cuda.h>

#include <string>

namespace tensorstream::cuda::detail {

// Each member has the type of the driver function of the same name in <cuda.h>. Where
// <cuda.h> maps a name to a versioned symbol (cuMemAlloc -> cuMemAlloc_v2), the loader
// resolves the versioned symbol, so the pointer always matches its declared type.
#define TS_CUDA_DRIVER_FUNCTIONS(X) \
  X(cuInit)                         \
  X(cuDriverGetVersion)             \
  X(cuDeviceGetCount)               \
  X(cuDeviceGet)                    \
  X(cuDeviceGetName)                \
  X(cuDeviceGetAttribute)           \
  X(cuDeviceTotalMem)               \
  X(cuGetErrorString)               \
  X(cuDevicePrimaryCtxRetain)       \
  X(cuDevicePrimaryCtxRelease)      \
  X(cuCtxPushCurrent)               \
  X(cuCtxPopCurrent)                \
  X(cuCtxGetCurrent)                \
  X(cuMemGetInfo)                   \
  X(cuMemAlloc)                     \
  X(cuMemFree)                      \
  X(cuMemHostAlloc)                 \
  X(cuMemFreeHost)                  \
  X(cuMemHostRegister)              \
  X(cuMemHostUnregister)            \
  X(cuMemcpyHtoDAsync)              \
  X(cuMemcpyDtoHAsync)              \
  X(cuMemsetD8Async)                \
  X(cuStreamCreate)                 \
  X(cuStreamDestroy)                \
  X(cuStreamSynchronize)            \
  X(cuStreamQuery)                  \
  X(cuStreamWaitEvent)              \
  X(cuEventCreate)                  \
  X(cuEventDestroy)                 \
  X(cuEventRecord)                  \
  X(cuEventSynchronize)             \
  X(cuEventQuery)                   \
  X(cuEventElapsedTime)

struct DriverApi {
#define TS_CUDA_MEMBER(name) decltype(&::name) name = nullptr;
  TS_CUDA_DRIVER_FUNCTIONS(TS_CUDA_MEMBER)
#undef TS_CUDA_MEMBER
};

/// The loaded table; throws CudaError (with the reason) if the driver is not usable.
const DriverApi& api();

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
