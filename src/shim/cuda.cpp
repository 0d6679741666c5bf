#include "tensorstream/shim/cuda.hpp"

#include <dlfcn.h>

#include <mutex>

#if defined(TS_HAVE_CUDA_HEADERS)
#include <cuda.h>
#endif

#include "tensorstream/errors.hpp"

namespace tensorstream::cuda {
namespace {

std::string dl_error() {
  const char* e = ::dlerror();
  return e ? e : "unknown dlopen error";
}

#if defined(TS_HAVE_CUDA_HEADERS)

// The driver entry points TensorStream uses, typed from <cuda.h> so a signature change in a
// new toolkit is a compile error rather than a crash.
struct DriverApi {
  void* handle = nullptr;
  decltype(&::cuInit) init = nullptr;
  decltype(&::cuDriverGetVersion) driver_get_version = nullptr;
  decltype(&::cuDeviceGetCount) device_get_count = nullptr;
  decltype(&::cuDeviceGet) device_get = nullptr;
  decltype(&::cuDeviceGetName) device_get_name = nullptr;
  decltype(&::cuGetErrorString) get_error_string = nullptr;
};

template <typename Fn>
bool resolve(void* handle, const char* name, Fn& out, std::string& reason) {
  out = reinterpret_cast<Fn>(::dlsym(handle, name));
  if (out == nullptr) reason = detail::concat("libcuda.so.1 lacks ", name);
  return out != nullptr;
}

std::string error_string(const DriverApi& api, CUresult rc) {
  const char* s = nullptr;
  if (api.get_error_string && api.get_error_string(rc, &s) == CUDA_SUCCESS && s) return s;
  return detail::concat("CUDA error ", static_cast<int>(rc));
}

DriverStatus probe_driver() {
  DriverStatus status;
  DriverApi api;
  // RTLD_LOCAL: the driver's symbols must not interpose on those of a CUDA runtime the host
  // process (e.g. torch) may load itself.
  api.handle = ::dlopen("libcuda.so.1", RTLD_NOW | RTLD_LOCAL);
  if (api.handle == nullptr) {
    status.reason = "no CUDA driver: " + dl_error();
    return status;
  }
  if (!resolve(api.handle, "cuInit", api.init, status.reason) ||
      !resolve(api.handle, "cuDriverGetVersion", api.driver_get_version, status.reason) ||
      !resolve(api.handle, "cuDeviceGetCount", api.device_get_count, status.reason) ||
      !resolve(api.handle, "cuDeviceGet", api.device_get, status.reason) ||
      !resolve(api.handle, "cuDeviceGetName", api.device_get_name, status.reason) ||
      !resolve(api.handle, "cuGetErrorString", api.get_error_string, status.reason)) {
    return status;
  }
  api.driver_get_version(&status.driver_version);
  if (const CUresult rc = api.init(0); rc != CUDA_SUCCESS) {
    status.reason = "cuInit failed: " + error_string(api, rc);
    return status;
  }
  if (const CUresult rc = api.device_get_count(&status.device_count); rc != CUDA_SUCCESS) {
    status.reason = "cuDeviceGetCount failed: " + error_string(api, rc);
    return status;
  }
  if (status.device_count == 0) {
    status.reason = "CUDA driver loaded but it reports no device";
    return status;
  }
  CUdevice dev = 0;
  char name[256] = {};
  if (api.device_get(&dev, 0) == CUDA_SUCCESS &&
      api.device_get_name(name, sizeof name, dev) == CUDA_SUCCESS) {
    status.device0_name = name;
  }
  status.available = true;
  // The handle stays open for the life of the process: later issues keep using the table.
  return status;
}

#else

DriverStatus probe_driver() {
  DriverStatus status;
  status.reason = "this build has no CUDA support (cuda.h was not found at build time)";
  return status;
}

#endif

CuFileStatus probe_cufile() {
  CuFileStatus status;
#if defined(TS_HAVE_CUDA_HEADERS)
  void* handle = ::dlopen("libcufile.so.0", RTLD_NOW | RTLD_LOCAL);
  if (handle == nullptr) {
    status.reason = "no cuFile library: " + dl_error();
    return status;
  }
  for (const char* symbol : {"cuFileDriverOpen", "cuFileHandleRegister", "cuFileRead"}) {
    if (::dlsym(handle, symbol) == nullptr) {
      status.reason = detail::concat("libcufile.so.0 lacks ", symbol);
      return status;
    }
  }
  status.library_loaded = true;
#else
  status.reason = "this build has no CUDA support (cuda.h was not found at build time)";
#endif
  return status;
}

}  // namespace

bool compiled_with_cuda() noexcept {
#if defined(TS_HAVE_CUDA_HEADERS)
  return true;
#else
  return false;
#endif
}

DriverStatus driver_status() noexcept {
  static std::once_flag once;
  static DriverStatus status;
  try {
    std::call_once(once, [] { status = probe_driver(); });
  } catch (...) {
    DriverStatus failed;
    failed.reason = "probing the CUDA driver failed unexpectedly";
    return failed;
  }
  return status;
}

bool available() noexcept { return driver_status().available; }

CuFileStatus cufile_status() noexcept {
  static std::once_flag once;
  static CuFileStatus status;
  try {
    std::call_once(once, [] { status = probe_cufile(); });
  } catch (...) {
    CuFileStatus failed;
    failed.reason = "probing cuFile failed unexpectedly";
    return failed;
  }
  return status;
}

}  // namespace tensorstream::cuda
