// A stand-in for libcuda.so.1, built by the tests in several variants (compile definitions
// below), so that the CUDA shim's loader and wrappers run against a real shared library
// loaded with dlopen on machines without a GPU. It follows the driver API's documented
// behaviour where the shim depends on it: cuGetProcAddress returns the variant of a call for
// the CUDA version asked (CUDA_ERROR_INVALID_VALUE above the driver's version), calls that
// need a context fail with CUDA_ERROR_INVALID_CONTEXT when none is current on the calling
// thread, cuEventElapsedTime refuses events created with CU_EVENT_DISABLE_TIMING, and
// "device memory" is host memory, so copies move real bytes. Every call is logged, in
// order, for the tests to read (fake_cuda_log).
//
//   FAKE_DRIVER_VERSION   what cuDriverGetVersion reports (default 12040)
//   FAKE_GETPROC          2: exports cuGetProcAddress_v2 and cuGetProcAddress; 1: only the
//                         4-argument cuGetProcAddress; 0: neither (dlsym only)
//   FAKE_GETPROC_FAILS    cuGetProcAddress* return CUDA_ERROR_NOT_INITIALIZED for every query
//   FAKE_NO_TIMING        no cuEventElapsedTime at all
//   FAKE_NO_MEMALLOC      no cuMemAlloc at all
//   FAKE_INIT_ERROR       the code cuInit returns (default 0)
//
// Thread-safe as far as the engine's fill workers need: the log is guarded by a mutex, the
// context stack is per thread, an event's "recorded" is atomic.
#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <mutex>
#include <string>
#include <vector>

#ifndef FAKE_DRIVER_VERSION
#define FAKE_DRIVER_VERSION 12040
#endif
#ifndef FAKE_GETPROC
#define FAKE_GETPROC 2
#endif
#ifndef FAKE_INIT_ERROR
#define FAKE_INIT_ERROR 0
#endif

#define FAKE_EXPORT extern "C" __attribute__((visibility("default")))

namespace {

using CUresult = int;
constexpr CUresult kSuccess = 0;
constexpr CUresult kInvalidValue = 1;
constexpr CUresult kNotInitialized = 3;
constexpr CUresult kInvalidDevice = 101;
constexpr CUresult kInvalidContext = 201;
constexpr CUresult kInvalidHandle = 400;
constexpr CUresult kNotReady = 600;

constexpr unsigned kBlockingSync = 0x1;   // CU_EVENT_BLOCKING_SYNC
constexpr unsigned kDisableTiming = 0x2;  // CU_EVENT_DISABLE_TIMING

std::mutex log_mutex;
std::string log_text;
std::string log_copy;

void note(const std::string& line) {
  const std::lock_guard lock(log_mutex);
  log_text += line;
  log_text += '\n';
}

bool initialised = false;
int primary_context = 0;  // its address is the one context
thread_local std::vector<void*> context_stack;

bool has_context() { return !context_stack.empty(); }

// Page-aligned, as the driver's host and device allocations are.
void* page_aligned(std::size_t bytes) {
  const std::size_t rounded = (std::max<std::size_t>(bytes, 1) + 4095) / 4096 * 4096;
  return std::aligned_alloc(4096, rounded);
}

struct FakeEvent {
  unsigned flags = 0;
  std::atomic<bool> recorded{false};
};

}  // namespace

// ---- for the tests -------------------------------------------------------------------------

FAKE_EXPORT const char* fake_cuda_log() {
  const std::lock_guard lock(log_mutex);
  log_copy = log_text;
  return log_copy.c_str();
}

FAKE_EXPORT void fake_cuda_clear_log() {
  const std::lock_guard lock(log_mutex);
  log_text.clear();
}

FAKE_EXPORT int fake_cuda_context_depth() { return static_cast<int>(context_stack.size()); }

// ---- the driver API ------------------------------------------------------------------------

FAKE_EXPORT CUresult cuInit(unsigned flags) {
  note("cuInit flags=" + std::to_string(flags));
  if (FAKE_INIT_ERROR != 0) return FAKE_INIT_ERROR;
  initialised = true;
  return kSuccess;
}

FAKE_EXPORT CUresult cuDriverGetVersion(int* version) {
  note("cuDriverGetVersion");
  *version = FAKE_DRIVER_VERSION;
  return kSuccess;
}

FAKE_EXPORT CUresult cuDeviceGetCount(int* count) {
  note("cuDeviceGetCount");
  if (!initialised) return kNotInitialized;
  *count = 1;
  return kSuccess;
}

FAKE_EXPORT CUresult cuDeviceGet(int* device, int ordinal) {
  note("cuDeviceGet " + std::to_string(ordinal));
  if (!initialised) return kNotInitialized;
  if (ordinal != 0) return kInvalidDevice;
  *device = 0;
  return kSuccess;
}

FAKE_EXPORT CUresult cuDeviceGetName(char* name, int length, int device) {
  note("cuDeviceGetName");
  if (device != 0 || length <= 0) return kInvalidValue;
  std::strncpy(name, "Fake GPU", static_cast<std::size_t>(length) - 1);
  name[length - 1] = '\0';
  return kSuccess;
}

FAKE_EXPORT CUresult cuGetErrorString(CUresult error, const char** text) {
  switch (error) {
    case kNotInitialized:
      *text = "fake: initialization error";
      return kSuccess;
    case 100:
      *text = "fake: no CUDA-capable device is detected";
      return kSuccess;
    case kInvalidContext:
      *text = "fake: invalid device context";
      return kSuccess;
    case kInvalidHandle:
      *text = "fake: invalid resource handle";
      return kSuccess;
    default:
      *text = nullptr;
      return kInvalidValue;
  }
}

FAKE_EXPORT CUresult cuDevicePrimaryCtxRetain(void** context, int device) {
  note("cuDevicePrimaryCtxRetain");
  if (device != 0) return kInvalidDevice;
  *context = &primary_context;
  return kSuccess;
}

FAKE_EXPORT CUresult cuDevicePrimaryCtxRelease_v2(int device) {
  note("cuDevicePrimaryCtxRelease_v2");
  return device == 0 ? kSuccess : kInvalidDevice;
}

FAKE_EXPORT CUresult cuCtxPushCurrent_v2(void* context) {
  note("cuCtxPushCurrent_v2");
  if (context != &primary_context) return kInvalidContext;
  context_stack.push_back(context);
  return kSuccess;
}

FAKE_EXPORT CUresult cuCtxPopCurrent_v2(void** context) {
  note("cuCtxPopCurrent_v2");
  if (context_stack.empty()) return kInvalidContext;
  if (context != nullptr) *context = context_stack.back();
  context_stack.pop_back();
  return kSuccess;
}

FAKE_EXPORT CUresult cuMemGetInfo_v2(std::size_t* free, std::size_t* total) {
  note("cuMemGetInfo_v2");
  if (!has_context()) return kInvalidContext;
  *free = std::size_t{1} << 30;
  *total = std::size_t{2} << 30;
  return kSuccess;
}

#if !defined(FAKE_NO_MEMALLOC)
FAKE_EXPORT CUresult cuMemAlloc_v2(std::uint64_t* pointer, std::size_t bytes) {
  note("cuMemAlloc_v2");
  if (!has_context()) return kInvalidContext;
  *pointer = reinterpret_cast<std::uint64_t>(page_aligned(bytes));
  return *pointer != 0 ? kSuccess : 2;  // CUDA_ERROR_OUT_OF_MEMORY
}
#endif

FAKE_EXPORT CUresult cuMemFree_v2(std::uint64_t pointer) {
  note("cuMemFree_v2");
  if (!has_context()) return kInvalidContext;
  std::free(reinterpret_cast<void*>(pointer));
  return kSuccess;
}

FAKE_EXPORT CUresult cuMemHostAlloc(void** pointer, std::size_t bytes, unsigned flags) {
  note("cuMemHostAlloc flags=" + std::to_string(flags));
  if (!has_context()) return kInvalidContext;
  *pointer = page_aligned(bytes);
  return *pointer != nullptr ? kSuccess : 2;
}

FAKE_EXPORT CUresult cuMemFreeHost(void* pointer) {
  note("cuMemFreeHost");
  std::free(pointer);
  return kSuccess;
}

FAKE_EXPORT CUresult cuMemHostRegister_v2(void*, std::size_t, unsigned flags) {
  note("cuMemHostRegister_v2 flags=" + std::to_string(flags));
  return has_context() ? kSuccess : kInvalidContext;
}

FAKE_EXPORT CUresult cuMemHostUnregister(void*) {
  note("cuMemHostUnregister");
  return has_context() ? kSuccess : kInvalidContext;
}

FAKE_EXPORT CUresult cuMemcpyHtoDAsync_v2(std::uint64_t dst, const void* src, std::size_t bytes,
                                          void*) {
  note("cuMemcpyHtoDAsync_v2");
  if (!has_context()) return kInvalidContext;
  std::memcpy(reinterpret_cast<void*>(dst), src, bytes);
  return kSuccess;
}

FAKE_EXPORT CUresult cuMemcpyDtoHAsync_v2(void* dst, std::uint64_t src, std::size_t bytes, void*) {
  note("cuMemcpyDtoHAsync_v2");
  if (!has_context()) return kInvalidContext;
  std::memcpy(dst, reinterpret_cast<const void*>(src), bytes);
  return kSuccess;
}

FAKE_EXPORT CUresult cuStreamCreate(void** stream, unsigned flags) {
  note("cuStreamCreate flags=" + std::to_string(flags));
  if (!has_context()) return kInvalidContext;
  *stream = new int(0);
  return kSuccess;
}

FAKE_EXPORT CUresult cuStreamDestroy_v2(void* stream) {
  note("cuStreamDestroy_v2");
  delete static_cast<int*>(stream);
  return kSuccess;
}

FAKE_EXPORT CUresult cuStreamSynchronize(void*) {
  note("cuStreamSynchronize");
  return has_context() ? kSuccess : kInvalidContext;
}

FAKE_EXPORT CUresult cuStreamQuery(void*) {
  note("cuStreamQuery");
  return has_context() ? kSuccess : kInvalidContext;
}

FAKE_EXPORT CUresult cuStreamWaitEvent(void*, void* event, unsigned) {
  note("cuStreamWaitEvent");
  if (!has_context()) return kInvalidContext;
  return event != nullptr ? kSuccess : kInvalidHandle;
}

FAKE_EXPORT CUresult cuEventCreate(void** event, unsigned flags) {
  note("cuEventCreate flags=" + std::to_string(flags));
  if (!has_context()) return kInvalidContext;
  auto* e = new FakeEvent;
  e->flags = flags;
  *event = e;
  return kSuccess;
}

FAKE_EXPORT CUresult cuEventDestroy_v2(void* event) {
  note("cuEventDestroy_v2");
  delete static_cast<FakeEvent*>(event);
  return kSuccess;
}

FAKE_EXPORT CUresult cuEventRecord(void* event, void*) {
  note("cuEventRecord");
  if (!has_context()) return kInvalidContext;
  static_cast<FakeEvent*>(event)->recorded = true;
  return kSuccess;
}

FAKE_EXPORT CUresult cuEventSynchronize(void* event) {
  const auto* e = static_cast<FakeEvent*>(event);
  note(std::string("cuEventSynchronize ") +
       ((e->flags & kBlockingSync) != 0 ? "blocking" : "spinning"));
  return has_context() ? kSuccess : kInvalidContext;
}

FAKE_EXPORT CUresult cuEventQuery(void* event) {
  note("cuEventQuery");
  if (!has_context()) return kInvalidContext;
  return static_cast<FakeEvent*>(event)->recorded ? kSuccess : kNotReady;
}

#if !defined(FAKE_NO_TIMING)
FAKE_EXPORT CUresult cuEventElapsedTime(float* ms, void* start, void* end) {
  note("cuEventElapsedTime");
  if (!has_context()) return kInvalidContext;
  const auto* a = static_cast<FakeEvent*>(start);
  const auto* b = static_cast<FakeEvent*>(end);
  if (((a->flags | b->flags) & kDisableTiming) != 0) return kInvalidHandle;
  if (!a->recorded || !b->recorded) return kInvalidHandle;
  *ms = 1.5f;
  return kSuccess;
}
#if FAKE_DRIVER_VERSION >= 12080
// CUDA 12.8's variant, which <cuda.h> of CUDA 13 names cuEventElapsedTime.
FAKE_EXPORT CUresult cuEventElapsedTime_v2(float* ms, void* start, void* end) {
  note("cuEventElapsedTime_v2");
  if (!has_context()) return kInvalidContext;
  (void)start;
  (void)end;
  *ms = 2.5f;
  return kSuccess;
}
#endif
#endif

// ---- cuGetProcAddress ------------------------------------------------------------------------

#if FAKE_GETPROC >= 1
namespace {

// CUresult placeholder for the variants of a call this fake does not implement (the 32-bit
// ABIs of CUDA 2.x): reaching one means the loader asked for the wrong version.
CUresult wrong_abi() {
  note("WRONG ABI");
  return 999;
}

struct Variant {
  const char* name;
  int since;  // the CUDA version that introduced this variant
  void* fn;
};

template <typename F>
void* fp(F* f) {
  return reinterpret_cast<void*>(f);
}

const std::vector<Variant>& variants() {
  static const std::vector<Variant> table = {
    {"cuInit", 2000, fp(cuInit)},
    {"cuDriverGetVersion", 2020, fp(cuDriverGetVersion)},
    {"cuDeviceGetCount", 2000, fp(cuDeviceGetCount)},
    {"cuDeviceGet", 2000, fp(cuDeviceGet)},
    {"cuDeviceGetName", 2000, fp(cuDeviceGetName)},
    {"cuGetErrorString", 6000, fp(cuGetErrorString)},
    {"cuDevicePrimaryCtxRetain", 7000, fp(cuDevicePrimaryCtxRetain)},
    {"cuDevicePrimaryCtxRelease", 7000, fp(wrong_abi)},
    {"cuDevicePrimaryCtxRelease", 11000, fp(cuDevicePrimaryCtxRelease_v2)},
    {"cuCtxPushCurrent", 2000, fp(wrong_abi)},
    {"cuCtxPushCurrent", 4000, fp(cuCtxPushCurrent_v2)},
    {"cuCtxPopCurrent", 2000, fp(wrong_abi)},
    {"cuCtxPopCurrent", 4000, fp(cuCtxPopCurrent_v2)},
    {"cuMemGetInfo", 2000, fp(wrong_abi)},
    {"cuMemGetInfo", 3020, fp(cuMemGetInfo_v2)},
#if !defined(FAKE_NO_MEMALLOC)
    {"cuMemAlloc", 2000, fp(wrong_abi)},
    {"cuMemAlloc", 3020, fp(cuMemAlloc_v2)},
#endif
    {"cuMemFree", 2000, fp(wrong_abi)},
    {"cuMemFree", 3020, fp(cuMemFree_v2)},
    {"cuMemHostAlloc", 2020, fp(cuMemHostAlloc)},
    {"cuMemFreeHost", 2000, fp(cuMemFreeHost)},
    {"cuMemHostRegister", 4000, fp(wrong_abi)},
    {"cuMemHostRegister", 6050, fp(cuMemHostRegister_v2)},
    {"cuMemHostUnregister", 4000, fp(cuMemHostUnregister)},
    {"cuMemcpyHtoDAsync", 2000, fp(wrong_abi)},
    {"cuMemcpyHtoDAsync", 3020, fp(cuMemcpyHtoDAsync_v2)},
    {"cuMemcpyDtoHAsync", 2000, fp(wrong_abi)},
    {"cuMemcpyDtoHAsync", 3020, fp(cuMemcpyDtoHAsync_v2)},
    {"cuStreamCreate", 2000, fp(cuStreamCreate)},
    {"cuStreamDestroy", 2000, fp(wrong_abi)},
    {"cuStreamDestroy", 4000, fp(cuStreamDestroy_v2)},
    {"cuStreamSynchronize", 2000, fp(cuStreamSynchronize)},
    {"cuStreamQuery", 2000, fp(cuStreamQuery)},
    {"cuStreamWaitEvent", 3020, fp(cuStreamWaitEvent)},
    {"cuEventCreate", 2000, fp(cuEventCreate)},
    {"cuEventDestroy", 2000, fp(wrong_abi)},
    {"cuEventDestroy", 4000, fp(cuEventDestroy_v2)},
    {"cuEventRecord", 2000, fp(cuEventRecord)},
    {"cuEventSynchronize", 2000, fp(cuEventSynchronize)},
    {"cuEventQuery", 2000, fp(cuEventQuery)},
#if !defined(FAKE_NO_TIMING)
    {"cuEventElapsedTime", 2000, fp(cuEventElapsedTime)},
#if FAKE_DRIVER_VERSION >= 12080
    {"cuEventElapsedTime", 12080, fp(cuEventElapsedTime_v2)},
#endif
#endif
  };
  return table;
}

// The semantics of cuGetProcAddress in cuda.h: the newest variant introduced at or before
// `version`; CUDA_SUCCESS with a null pointer when there is none.
CUresult get_proc_address(const char* form, const char* symbol, void** pfn, int version,
                          unsigned long long flags, int* status) {
  note(std::string(form) + " " + symbol + " " + std::to_string(version) +
       " flags=" + std::to_string(flags));
  *pfn = nullptr;
#if defined(FAKE_GETPROC_FAILS)
  return kNotInitialized;
#endif
  if (version > FAKE_DRIVER_VERSION) return kInvalidValue;
  bool seen = false;
  const Variant* best = nullptr;
  for (const auto& v : variants()) {
    if (std::strcmp(v.name, symbol) != 0) continue;
    seen = true;
    if (v.since <= version && (best == nullptr || v.since > best->since)) best = &v;
  }
  if (status != nullptr)
    *status = best   ? 0
              : seen ? 2
                     : 1;  // SUCCESS, VERSION_NOT_SUFFICIENT,
                           // SYMBOL_NOT_FOUND
  if (best != nullptr) *pfn = best->fn;
  return kSuccess;
}

}  // namespace

FAKE_EXPORT CUresult cuGetProcAddress(const char* symbol, void** pfn, int version,
                                      unsigned long long flags) {
  return get_proc_address("cuGetProcAddress", symbol, pfn, version, flags, nullptr);
}
#if FAKE_GETPROC >= 2
FAKE_EXPORT CUresult cuGetProcAddress_v2(const char* symbol, void** pfn, int version,
                                         unsigned long long flags, int* status) {
  return get_proc_address("cuGetProcAddress_v2", symbol, pfn, version, flags, status);
}
#endif
#endif  // FAKE_GETPROC >= 1
