#include "tensorstream/shim/cuda.hpp"

#include <dlfcn.h>

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <mutex>
#include <string>
#include <type_traits>
#include <utility>

#include "cuda_api.hpp"
#include "tensorstream/errors.hpp"

namespace tensorstream::cuda {
namespace {

#if defined(TS_HAVE_CUDA_HEADERS)

// The table's types must be those <cuda.h> declares for the same calls.
#define TS_CUDA_CHECK_TYPE(name, pfn, version, symbol, feature) \
  static_assert(std::is_same_v<pfn, decltype(&::name)>, #name ": typedefs and cuda.h differ");
TS_CUDA_DRIVER_FUNCTIONS(TS_CUDA_CHECK_TYPE)
#undef TS_CUDA_CHECK_TYPE

using tensorstream::detail::concat;

std::string dl_error() {
  const char* e = ::dlerror();
  return e ? e : "unknown dlopen error";
}

// 3020 -> "3.2", 12080 -> "12.8".
std::string cuda_version_text(int v) { return concat(v / 1000, ".", (v % 1000) / 10); }

std::string error_string(const detail::DriverApi& api, CUresult rc) {
  const char* s = nullptr;
  if (api.cuGetErrorString && api.cuGetErrorString(rc, &s) == CUDA_SUCCESS && s) return s;
  return concat("CUDA error ", static_cast<int>(rc));
}

// Finds one entry point: through the driver's cuGetProcAddress when it has one (the
// variant of the requested ABI version), else by its exported symbol.
class EntryPointResolver {
 public:
  explicit EntryPointResolver(void* handle) : handle_(handle) {
    // The 5-argument form (CUDA 12.0) first: it says why a symbol is missing.
    v2_ = reinterpret_cast<PFN_cuGetProcAddress_v12000>(::dlsym(handle, "cuGetProcAddress_v2"));
    if (v2_ == nullptr) {
      v1_ = reinterpret_cast<PFN_cuGetProcAddress_v11030>(::dlsym(handle, "cuGetProcAddress"));
    }
  }

  [[nodiscard]] const char* method() const noexcept {
    return v2_ ? "cuGetProcAddress_v2" : v1_ ? "cuGetProcAddress" : "dlsym";
  }

  // nullptr with `why` set when the entry point is not there.
  void* resolve(const char* name, int version, const char* symbol, std::string& why) const {
    if (v2_ == nullptr && v1_ == nullptr) {
      void* fn = ::dlsym(handle_, symbol);
      if (fn == nullptr) why = concat("the driver exports no ", symbol);
      return fn;
    }
    void* fn = nullptr;
    CUdriverProcAddressQueryResult found = CU_GET_PROC_ADDRESS_SYMBOL_NOT_FOUND;
    const CUresult rc = v2_ ? v2_(name, &fn, version, CU_GET_PROC_ADDRESS_LEGACY_STREAM, &found)
                            : v1_(name, &fn, version, CU_GET_PROC_ADDRESS_LEGACY_STREAM);
    if (rc == CUDA_SUCCESS && fn != nullptr) return fn;
    if (rc != CUDA_SUCCESS) {
      // The query itself failed; the exported symbol of the same ABI is as good.
      fn = ::dlsym(handle_, symbol);
      if (fn == nullptr) {
        why = concat(method(), "(", name, ", ", version, ") failed with CUDA error ",
                     static_cast<int>(rc), " and the driver exports no ", symbol);
      }
      return fn;
    }
    why = concat(method(), " found no ", name, " for CUDA ", cuda_version_text(version),
                 found == CU_GET_PROC_ADDRESS_VERSION_NOT_SUFFICIENT
                     ? " (the driver has only newer variants)"
                     : " (symbol not found)");
    return nullptr;
  }

 private:
  void* handle_;
  PFN_cuGetProcAddress_v12000 v2_ = nullptr;
  PFN_cuGetProcAddress_v11030 v1_ = nullptr;
};

struct Loaded {
  detail::DriverApi api;
  DriverStatus status;
};

Loaded load_driver() {
  const char* env = std::getenv(kCudaLibraryEnv);
  auto probe = detail::probe_driver(env != nullptr && *env != '\0' ? env : "libcuda.so.1");
  return {probe.api, std::move(probe.status)};
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
    DriverStatus failed;
    failed.reason = "probing the CUDA driver failed unexpectedly";
    return failed;
  }
}

bool available() noexcept { return loaded().status.available; }

#if defined(TS_HAVE_CUDA_HEADERS)

namespace detail {

DriverProbe probe_driver(const std::string& library) noexcept {
  DriverProbe probe;
  DriverStatus& status = probe.status;
  try {
    status.library = library;
    // RTLD_LOCAL: the driver's symbols must not interpose on those of a CUDA runtime the host
    // process (e.g. torch) loads itself. The handle stays open for the life of the process.
    void* handle = ::dlopen(library.c_str(), RTLD_NOW | RTLD_LOCAL);
    if (handle == nullptr) {
      status.reason = "no CUDA driver: " + dl_error();
      return probe;
    }
    const EntryPointResolver resolver(handle);
    status.entry_points = resolver.method();
    auto& api = probe.api;
    std::string missing_required;
    // A missing entry of an optional feature switches that feature off (once, with the first
    // reason); a missing required one makes CUDA unusable.
#define TS_CUDA_RESOLVE(name, pfn, version, symbol, feature)                             \
  {                                                                                      \
    std::string why;                                                                     \
    api.name = reinterpret_cast<pfn>(resolver.resolve(#name, version, symbol, why));     \
    if (api.name == nullptr) {                                                           \
      const char* f = feature;                                                           \
      if (f == nullptr) {                                                                \
        if (missing_required.empty()) missing_required = why;                            \
      } else if (std::none_of(status.disabled.begin(), status.disabled.end(),            \
                              [&](const std::string& d) { return d.starts_with(f); })) { \
        status.disabled.push_back(concat(f, ": ", why));                                 \
      }                                                                                  \
    }                                                                                    \
  }
    TS_CUDA_DRIVER_FUNCTIONS(TS_CUDA_RESOLVE)
#undef TS_CUDA_RESOLVE
    if (!missing_required.empty()) {
      status.reason = concat(library, ": ", missing_required, " (driver too old?)");
      return probe;
    }
    if (api.cuDriverGetVersion(&status.driver_version) != CUDA_SUCCESS) {
      status.driver_version = 0;
    }
    if (const CUresult rc = api.cuInit(0); rc != CUDA_SUCCESS) {
      status.reason = "cuInit failed: " + error_string(api, rc);
      return probe;
    }
    if (const CUresult rc = api.cuDeviceGetCount(&status.device_count); rc != CUDA_SUCCESS) {
      status.device_count = 0;
      status.reason = "cuDeviceGetCount failed: " + error_string(api, rc);
      return probe;
    }
    if (status.device_count == 0) {
      status.reason = "CUDA driver loaded but it reports no device";
      return probe;
    }
    CUdevice dev = 0;
    char name[256] = {};
    if (api.cuDeviceGet(&dev, 0) == CUDA_SUCCESS &&
        api.cuDeviceGetName(name, sizeof name, dev) == CUDA_SUCCESS) {
      status.device0_name = name;
    }
    status.available = true;
  } catch (const std::exception& e) {
    status.available = false;
    status.reason = concat("probing the CUDA driver failed unexpectedly: ", e.what());
  }
  return probe;
}

void require_feature(bool present, const char* feature) {
  if (present) return;
  const auto& status = loaded().status;
  const std::string prefix = concat(feature, ": ");
  for (const auto& d : status.disabled) {
    if (d.starts_with(prefix)) {
      throw CudaError(concat(feature, " is not available: ", d.substr(prefix.size())));
    }
  }
  throw CudaError(concat(feature, " is not available"));
}

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

// CU_EVENT_DISABLE_TIMING without CU_EVENT_BLOCKING_SYNC is the cheapest for streams to wait
// on; a thread that waits on an event spins unless it has CU_EVENT_BLOCKING_SYNC
// (cuEventCreate in cuda.h).
unsigned event_flags(EventKind kind) {
  switch (kind) {
    case EventKind::kHostWait:
      return CU_EVENT_BLOCKING_SYNC | CU_EVENT_DISABLE_TIMING;
    case EventKind::kStreamOnly:
      return CU_EVENT_DISABLE_TIMING;
    case EventKind::kTiming:
      return CU_EVENT_BLOCKING_SYNC;
  }
  return CU_EVENT_BLOCKING_SYNC | CU_EVENT_DISABLE_TIMING;
}
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
  const auto& api = detail::api();
  detail::require_feature(api.cuMemHostRegister != nullptr && api.cuMemHostUnregister != nullptr,
                          detail::kFeatureHostRegistration);
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

Event::Event(const Device& device, EventKind kind) : device_(&device), kind_(kind) {
  ContextScope scope(device);
  CUevent e = nullptr;
  TS_CUDA_TRY(cuEventCreate, &e, event_flags(kind));
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
    : device_(other.device_), event_(std::exchange(other.event_, nullptr)), kind_(other.kind_) {}

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
  detail::require_feature(detail::api().cuEventElapsedTime != nullptr, detail::kFeatureTiming);
  TS_EXPECT(start.kind() == EventKind::kTiming && end.kind() == EventKind::kTiming, CudaError,
            "elapsed_ms needs two EventKind::kTiming events (the others record no timestamps)");
  TS_EXPECT(&start.device() == &end.device(), CudaError,
            "elapsed_ms of events of two different Device objects");
  // Like every other call: the events' context current for the call, whatever this thread
  // had current before.
  ContextScope scope(start.device());
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
Event::Event(const Device& d, EventKind) : device_(&d) { unsupported(); }
Event::~Event() = default;
Event::Event(Event&& o) noexcept : device_(o.device_), kind_(o.kind_) {}
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
