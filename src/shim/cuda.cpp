#include "tensorstream/shim/cuda.hpp"

#include <dlfcn.h>

#include <cstdio>
#include <mutex>
#include <utility>

#include "cuda_api.hpp"
#include "tensorstream/errors.hpp"

namespace tensorstream::cuda {
namespace {

#if defined(TS_HAVE_CUDA_HEADERS)

std::string dl_error() {
  const char* e = ::dlerror();
  return e ? e : "unknown dlopen error";
}

#define TS_STR(x) #x
#define TS_XSTR(x) TS_STR(x)  // expands cuMemAlloc to "cuMemAlloc_v2" first

struct Loaded {
  detail::DriverApi api;
  DriverStatus status;
};

std::string error_string(const detail::DriverApi& api, CUresult rc) {
  const char* s = nullptr;
  if (api.cuGetErrorString && api.cuGetErrorString(rc, &s) == CUDA_SUCCESS && s) return s;
  return tensorstream::detail::concat("CUDA error ", static_cast<int>(rc));
}

Loaded load_driver() {
  Loaded loaded;
  DriverStatus& status = loaded.status;
  // RTLD_LOCAL: the driver's symbols must not interpose on those of a CUDA runtime the host
  // process (e.g. torch) loads itself. The handle stays open for the life of the process.
  void* handle = ::dlopen("libcuda.so.1", RTLD_NOW | RTLD_LOCAL);
  if (handle == nullptr) {
    status.reason = "no CUDA driver: " + dl_error();
    return loaded;
  }
  auto& api = loaded.api;
#define TS_CUDA_RESOLVE(name)                                                      \
  api.name = reinterpret_cast<decltype(api.name)>(::dlsym(handle, TS_XSTR(name))); \
  if (api.name == nullptr) {                                                       \
    status.reason = "libcuda.so.1 lacks " TS_XSTR(name) " (driver too old?)";      \
    return loaded;                                                                 \
  }
  TS_CUDA_DRIVER_FUNCTIONS(TS_CUDA_RESOLVE)
#undef TS_CUDA_RESOLVE

  api.cuDriverGetVersion(&status.driver_version);
  if (const CUresult rc = api.cuInit(0); rc != CUDA_SUCCESS) {
    status.reason = "cuInit failed: " + error_string(api, rc);
    return loaded;
  }
  if (const CUresult rc = api.cuDeviceGetCount(&status.device_count); rc != CUDA_SUCCESS) {
    status.reason = "cuDeviceGetCount failed: " + error_string(api, rc);
    return loaded;
  }
  if (status.device_count == 0) {
    status.reason = "CUDA driver loaded but it reports no device";
    return loaded;
  }
  CUdevice dev = 0;
  char name[256] = {};
  if (api.cuDeviceGet(&dev, 0) == CUDA_SUCCESS &&
      api.cuDeviceGetName(name, sizeof name, dev) == CUDA_SUCCESS) {
    status.device0_name = name;
  }
  status.available = true;
  return loaded;
}

#else

struct Loaded {
  DriverStatus status;
};

Loaded load_driver() {
  Loaded loaded;
  loaded.status.reason = "this build has no CUDA support (cuda.h was not found at build time)";
  return loaded;
}

#endif

const Loaded& loaded() noexcept {
  static std::once_flag once;
  static Loaded instance;
  try {
    std::call_once(once, [] { instance = load_driver(); });
  } catch (...) {
    instance.status.available = false;
    instance.status.reason = "probing the CUDA driver failed unexpectedly";
  }
  return instance;
}

// Destructors report instead of throwing.
template <typename Fn>
void noexcept_call(const char* what, Fn&& fn) noexcept {
  try {
    fn();
  } catch (const std::exception& e) {
    std::fprintf(stderr, "tensorstream: %s: %s\n", what, e.what());
  }
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
  try {
    return loaded().status;
  } catch (...) {
    return DriverStatus{false, 0, 0, {}, "probing the CUDA driver failed unexpectedly"};
  }
}

bool available() noexcept { return loaded().status.available; }

#if defined(TS_HAVE_CUDA_HEADERS)

namespace detail {

const DriverApi& api() {
  const auto& l = loaded();
  if (!l.status.available) throw CudaError("CUDA is not available: " + l.status.reason);
  return l.api;
}

std::string describe_error(CUresult rc) noexcept {
  try {
    return tensorstream::detail::concat(error_string(loaded().api, rc), " (", static_cast<int>(rc),
                                        ")");
  } catch (...) {
    return "CUDA error";
  }
}

void throw_cuda_error(const char* call, CUresult rc) {
  throw CudaError(tensorstream::detail::concat(call, " failed: ", error_string(loaded().api, rc),
                                               " (", static_cast<int>(rc), ")"));
}

}  // namespace detail

namespace {
CUcontext ctx(const Device& d) { return static_cast<CUcontext>(d.context()); }
CUstream stream_of(StreamHandle s) { return static_cast<CUstream>(s); }
}  // namespace

Device::Device(int ordinal) : ordinal_(ordinal) {
  CUdevice dev = 0;
  TS_CUDA_TRY(cuDeviceGet, &dev, ordinal);
  CUcontext context = nullptr;
  TS_CUDA_TRY(cuDevicePrimaryCtxRetain, &context, dev);
  context_ = context;
}

Device::~Device() {
  if (context_ == nullptr) return;
  noexcept_call("releasing the primary context", [this] {
    CUdevice dev = 0;
    TS_CUDA_TRY(cuDeviceGet, &dev, ordinal_);
    TS_CUDA_TRY(cuDevicePrimaryCtxRelease, dev);
  });
}

Device::Device(Device&& other) noexcept
    : ordinal_(std::exchange(other.ordinal_, -1)),
      context_(std::exchange(other.context_, nullptr)) {}

MemInfo Device::mem_info() const {
  ContextScope scope(*this);
  std::size_t free = 0;
  std::size_t total = 0;
  TS_CUDA_TRY(cuMemGetInfo, &free, &total);
  return {free, total};
}

ContextScope::ContextScope(const Device& device) { TS_CUDA_TRY(cuCtxPushCurrent, ctx(device)); }

ContextScope::~ContextScope() {
  noexcept_call("popping a CUDA context", [] {
    CUcontext popped = nullptr;
    TS_CUDA_TRY(cuCtxPopCurrent, &popped);
  });
}

DeviceBuffer::DeviceBuffer(const Device& device, std::size_t bytes)
    : device_(&device), size_(bytes) {
  ContextScope scope(device);
  CUdeviceptr p = 0;
  TS_CUDA_TRY(cuMemAlloc, &p, bytes);
  ptr_ = p;
}

DeviceBuffer::~DeviceBuffer() {
  if (ptr_ == 0) return;
  noexcept_call("freeing device memory", [this] {
    ContextScope scope(*device_);
    TS_CUDA_TRY(cuMemFree, static_cast<CUdeviceptr>(ptr_));
  });
}

DeviceBuffer::DeviceBuffer(DeviceBuffer&& other) noexcept
    : device_(other.device_),
      ptr_(std::exchange(other.ptr_, 0)),
      size_(std::exchange(other.size_, 0)) {}

PinnedHostBuffer::PinnedHostBuffer(const Device& device, std::size_t bytes)
    : device_(&device), size_(bytes) {
  ContextScope scope(device);
  void* p = nullptr;
  TS_CUDA_TRY(cuMemHostAlloc, &p, bytes, CU_MEMHOSTALLOC_PORTABLE);
  data_ = static_cast<std::byte*>(p);
}

PinnedHostBuffer::~PinnedHostBuffer() {
  if (data_ == nullptr) return;
  noexcept_call("freeing pinned host memory", [this] {
    ContextScope scope(*device_);
    TS_CUDA_TRY(cuMemFreeHost, data_);
  });
}

PinnedHostBuffer::PinnedHostBuffer(PinnedHostBuffer&& other) noexcept
    : device_(other.device_),
      data_(std::exchange(other.data_, nullptr)),
      size_(std::exchange(other.size_, 0)) {}

HostRegistration::HostRegistration(const Device& device, void* data, std::size_t bytes)
    : device_(&device) {
  ContextScope scope(device);
  TS_CUDA_TRY(cuMemHostRegister, data, bytes, CU_MEMHOSTREGISTER_PORTABLE);
  data_ = data;
}

HostRegistration::~HostRegistration() {
  if (data_ == nullptr) return;
  noexcept_call("unregistering host memory", [this] {
    ContextScope scope(*device_);
    TS_CUDA_TRY(cuMemHostUnregister, data_);
  });
}

HostRegistration::HostRegistration(HostRegistration&& other) noexcept
    : device_(other.device_), data_(std::exchange(other.data_, nullptr)) {}

Stream::Stream(const Device& device) : device_(&device) {
  ContextScope scope(device);
  CUstream s = nullptr;
  TS_CUDA_TRY(cuStreamCreate, &s, CU_STREAM_NON_BLOCKING);
  stream_ = s;
}

Stream::~Stream() {
  if (stream_ == nullptr) return;
  noexcept_call("destroying a stream", [this] {
    ContextScope scope(*device_);
    TS_CUDA_TRY(cuStreamDestroy, stream_of(stream_));
  });
}

Stream::Stream(Stream&& other) noexcept
    : device_(other.device_), stream_(std::exchange(other.stream_, nullptr)) {}

void Stream::synchronize() const {
  ContextScope scope(*device_);
  TS_CUDA_TRY(cuStreamSynchronize, stream_of(stream_));
}

bool Stream::query() const {
  ContextScope scope(*device_);
  const CUresult rc = detail::api().cuStreamQuery(stream_of(stream_));
  if (rc == CUDA_ERROR_NOT_READY) return false;
  if (rc != CUDA_SUCCESS) detail::throw_cuda_error("cuStreamQuery", rc);
  return true;
}

Event::Event(const Device& device, bool timing) : device_(&device) {
  ContextScope scope(device);
  CUevent e = nullptr;
  TS_CUDA_TRY(cuEventCreate, &e, timing ? CU_EVENT_DEFAULT : CU_EVENT_DISABLE_TIMING);
  event_ = e;
}

Event::~Event() {
  if (event_ == nullptr) return;
  noexcept_call("destroying an event", [this] {
    ContextScope scope(*device_);
    TS_CUDA_TRY(cuEventDestroy, static_cast<CUevent>(event_));
  });
}

Event::Event(Event&& other) noexcept
    : device_(other.device_), event_(std::exchange(other.event_, nullptr)) {}

void Event::record(StreamHandle stream) const {
  ContextScope scope(*device_);
  TS_CUDA_TRY(cuEventRecord, static_cast<CUevent>(event_), stream_of(stream));
}

void Event::synchronize() const {
  ContextScope scope(*device_);
  TS_CUDA_TRY(cuEventSynchronize, static_cast<CUevent>(event_));
}

bool Event::query() const {
  ContextScope scope(*device_);
  const CUresult rc = detail::api().cuEventQuery(static_cast<CUevent>(event_));
  if (rc == CUDA_ERROR_NOT_READY) return false;
  if (rc != CUDA_SUCCESS) detail::throw_cuda_error("cuEventQuery", rc);
  return true;
}

void stream_wait_event(const Device& device, StreamHandle stream, const Event& event) {
  ContextScope scope(device);
  TS_CUDA_TRY(cuStreamWaitEvent, stream_of(stream), static_cast<CUevent>(event.handle()), 0);
}

void memcpy_htod_async(const Device& device, DevicePtr dst, const void* src, std::size_t bytes,
                       StreamHandle stream) {
  ContextScope scope(device);
  TS_CUDA_TRY(cuMemcpyHtoDAsync, static_cast<CUdeviceptr>(dst), src, bytes, stream_of(stream));
}

void memcpy_dtoh_async(const Device& device, void* dst, DevicePtr src, std::size_t bytes,
                       StreamHandle stream) {
  ContextScope scope(device);
  TS_CUDA_TRY(cuMemcpyDtoHAsync, dst, static_cast<CUdeviceptr>(src), bytes, stream_of(stream));
}

float elapsed_ms(const Event& start, const Event& end) {
  float ms = 0;
  TS_CUDA_TRY(cuEventElapsedTime, &ms, static_cast<CUevent>(start.handle()),
              static_cast<CUevent>(end.handle()));
  return ms;
}

#else  // no CUDA headers: every object refuses to exist, with the reason.

namespace {
[[noreturn]] void unsupported() { throw CudaError(loaded().status.reason); }
}  // namespace

Device::Device(int ordinal) : ordinal_(ordinal) { unsupported(); }
Device::~Device() = default;
Device::Device(Device&& other) noexcept : ordinal_(other.ordinal_), context_(nullptr) {}
MemInfo Device::mem_info() const { unsupported(); }
ContextScope::ContextScope(const Device&) { unsupported(); }
ContextScope::~ContextScope() = default;
DeviceBuffer::DeviceBuffer(const Device& d, std::size_t) : device_(&d) { unsupported(); }
DeviceBuffer::~DeviceBuffer() = default;
DeviceBuffer::DeviceBuffer(DeviceBuffer&& o) noexcept : device_(o.device_) {}
PinnedHostBuffer::PinnedHostBuffer(const Device& d, std::size_t) : device_(&d) { unsupported(); }
PinnedHostBuffer::~PinnedHostBuffer() = default;
PinnedHostBuffer::PinnedHostBuffer(PinnedHostBuffer&& o) noexcept : device_(o.device_) {}
HostRegistration::HostRegistration(const Device& d, void*, std::size_t) : device_(&d) {
  unsupported();
}
HostRegistration::~HostRegistration() = default;
HostRegistration::HostRegistration(HostRegistration&& o) noexcept : device_(o.device_) {}
Stream::Stream(const Device& d) : device_(&d) { unsupported(); }
Stream::~Stream() = default;
Stream::Stream(Stream&& o) noexcept : device_(o.device_) {}
void Stream::synchronize() const { unsupported(); }
bool Stream::query() const { unsupported(); }
Event::Event(const Device& d, bool) : device_(&d) { unsupported(); }
Event::~Event() = default;
Event::Event(Event&& o) noexcept : device_(o.device_) {}
void Event::record(StreamHandle) const { unsupported(); }
void Event::synchronize() const { unsupported(); }
bool Event::query() const { unsupported(); }
void stream_wait_event(const Device&, StreamHandle, const Event&) { unsupported(); }
void memcpy_htod_async(const Device&, DevicePtr, const void*, std::size_t, StreamHandle) {
  unsupported();
}
void memcpy_dtoh_async(const Device&, void*, DevicePtr, std::size_t, StreamHandle) {
  unsupported();
}
float elapsed_ms(const Event&, const Event&) { unsupported(); }

#endif

}  // namespace tensorstream::cuda
