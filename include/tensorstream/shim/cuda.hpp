// Run-time loading of the CUDA driver (libcuda.so.1). cuFile (GPUDirect Storage) has its
// own shim, shim/cufile.hpp.
//
// TensorStream never links against CUDA: the driver API is reached through a table of
// function pointers, typed from the real <cuda.h>/<cudaTypedefs.h> when the build found them.
// One binary therefore runs on machines with and without a GPU. The availability queries
// below never throw; they report why CUDA is unusable instead.
//
// Entry points are resolved with cuGetProcAddress for the CUDA version each call was written
// against (so a header that renames a call to a newer versioned symbol, as CUDA 13's does for
// cuEventElapsedTime -> cuEventElapsedTime_v2 of 12.8+ drivers, does not make older drivers
// unusable); drivers without cuGetProcAddress get dlsym of the exported symbols. An optional
// entry point that is missing switches off only the feature that needs it
// (DriverStatus::disabled); the calls of that feature throw CudaError saying so.
//
// The driver library is libcuda.so.1 through the dynamic loader's search path, or the file
// named by TENSORSTREAM_CUDA_LIBRARY (docs/runtime-settings.md), read once per process.
//
// Thread-safety: all functions are thread-safe; the library is loaded once, on first use.
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>
#include <vector>

namespace tensorstream::cuda {

/// The environment variable naming the driver library to load instead of libcuda.so.1
/// (a row of the settings table, settings.hpp).
inline constexpr const char* kCudaLibraryEnv = "TENSORSTREAM_CUDA_LIBRARY";

/// What the process found when it looked for the CUDA driver.
struct DriverStatus {
  bool available = false;  ///< driver loaded, cuInit succeeded, at least one device
  int driver_version = 0;  ///< e.g. 13000 for CUDA 13.0 (0 if not loaded)
  int device_count = 0;
  std::string device0_name;  ///< name of device 0, if any
  std::string reason;        ///< why not available ("" when available)
  std::string library;       ///< the driver library loaded or tried ("" without CUDA support)
  /// How the entry points were resolved: "cuGetProcAddress_v2", "cuGetProcAddress" or "dlsym"
  /// ("" when the library did not load).
  std::string entry_points;
  /// Optional features switched off because the driver lacks an entry point they need, each
  /// "<feature>: <why>"; the rest of the API works.
  std::vector<std::string> disabled;
};

/// True if this build was compiled with the CUDA driver headers (the GPU code paths exist).
[[nodiscard]] bool compiled_with_cuda() noexcept;

/// Loads the driver on first call and reports what it found. Never throws.
[[nodiscard]] DriverStatus driver_status() noexcept;

/// Shorthand for driver_status().available.
[[nodiscard]] bool available() noexcept;

// ---- RAII wrappers over the driver API -------------------------------------------------
// Every constructor and call below throws CudaError naming the driver call and its error
// string when it fails, and when the driver is not available (with driver_status().reason).
// Destructors never throw; they report failures on stderr. Objects made for a Device must
// not outlive it. Thread-safety: a Device may be shared; other objects are used by one
// thread at a time unless stated.

/// A device address (CUdeviceptr).
using DevicePtr = std::uint64_t;
/// A CUstream (nullptr: the legacy default stream).
using StreamHandle = void*;
/// A CUevent.
using EventHandle = void*;

struct MemInfo {
  std::uint64_t free = 0;
  std::uint64_t total = 0;
};

/// A device with its primary context retained for the object's lifetime (the context torch
/// uses too, so pointers and streams are shared with it).
class Device {
 public:
  explicit Device(int ordinal);
  ~Device();
  Device(Device&& other) noexcept;
  Device& operator=(Device&&) = delete;
  Device(const Device&) = delete;
  Device& operator=(const Device&) = delete;

  [[nodiscard]] int ordinal() const noexcept { return ordinal_; }
  [[nodiscard]] void* context() const noexcept { return context_; }
  [[nodiscard]] MemInfo mem_info() const;

 private:
  int ordinal_ = -1;
  void* context_ = nullptr;
};

/// Makes a device's primary context current on this thread for the scope.
class ContextScope {
 public:
  explicit ContextScope(const Device& device);
  ~ContextScope();
  ContextScope(const ContextScope&) = delete;
  ContextScope& operator=(const ContextScope&) = delete;
};

/// Device memory from cuMemAlloc.
class DeviceBuffer {
 public:
  DeviceBuffer(const Device& device, std::size_t bytes);
  ~DeviceBuffer();
  DeviceBuffer(DeviceBuffer&& other) noexcept;
  DeviceBuffer& operator=(DeviceBuffer&&) = delete;
  DeviceBuffer(const DeviceBuffer&) = delete;
  DeviceBuffer& operator=(const DeviceBuffer&) = delete;

  [[nodiscard]] DevicePtr ptr() const noexcept { return ptr_; }
  [[nodiscard]] std::size_t size() const noexcept { return size_; }

 private:
  const Device* device_;
  DevicePtr ptr_ = 0;
  std::size_t size_ = 0;
};

/// Page-locked host memory from cuMemHostAlloc (portable: usable from every context), so
/// host-to-device copies from it run as DMA at full link speed and asynchronously.
/// The driver-level allocation; the engine takes its host memory through host_memory.hpp
/// (PinnedHostAllocator hands these out).
class PinnedHostBuffer {
 public:
  PinnedHostBuffer(const Device& device, std::size_t bytes);
  ~PinnedHostBuffer();
  PinnedHostBuffer(PinnedHostBuffer&& other) noexcept;
  PinnedHostBuffer& operator=(PinnedHostBuffer&&) = delete;
  PinnedHostBuffer(const PinnedHostBuffer&) = delete;
  PinnedHostBuffer& operator=(const PinnedHostBuffer&) = delete;

  [[nodiscard]] std::byte* data() const noexcept { return data_; }
  [[nodiscard]] std::size_t size() const noexcept { return size_; }

 private:
  const Device* device_;
  std::byte* data_ = nullptr;
  std::size_t size_ = 0;
};

/// Page-locks existing host memory (cuMemHostRegister) for the object's lifetime. An optional
/// feature: throws CudaError saying so where the driver lacks the entry points.
class HostRegistration {
 public:
  HostRegistration(const Device& device, void* data, std::size_t bytes);
  ~HostRegistration();
  HostRegistration(HostRegistration&& other) noexcept;
  HostRegistration& operator=(HostRegistration&&) = delete;
  HostRegistration(const HostRegistration&) = delete;
  HostRegistration& operator=(const HostRegistration&) = delete;

 private:
  const Device* device_;
  void* data_ = nullptr;
};

/// A non-blocking stream (does not synchronise with the legacy default stream).
/// synchronize() waits the way the context's scheduling flags say (the primary context's
/// default may spin a core); waits on a fill's hot path use a kHostWait Event instead.
class Stream {
 public:
  explicit Stream(const Device& device);
  ~Stream();
  Stream(Stream&& other) noexcept;
  Stream& operator=(Stream&&) = delete;
  Stream(const Stream&) = delete;
  Stream& operator=(const Stream&) = delete;

  [[nodiscard]] StreamHandle handle() const noexcept { return stream_; }
  void synchronize() const;
  /// True if all work submitted so far has completed.
  [[nodiscard]] bool query() const;

 private:
  const Device* device_;
  StreamHandle stream_ = nullptr;
};

/// How an event will be waited on, which decides its creation flags.
enum class EventKind {
  /// A thread may wait on it with synchronize(): created with CU_EVENT_BLOCKING_SYNC, so the
  /// waiting thread sleeps until the event completes instead of spinning a core, and
  /// CU_EVENT_DISABLE_TIMING (cheaper; elapsed_ms refuses it). Also usable by streams.
  kHostWait,
  /// Only streams wait on it (stream_wait_event) or query() polls it: CU_EVENT_DISABLE_TIMING
  /// alone, the cheapest for cuStreamWaitEvent; synchronize() on it would spin.
  kStreamOnly,
  /// For elapsed_ms: records timestamps; CU_EVENT_BLOCKING_SYNC, so synchronize() sleeps.
  kTiming,
};

/// A CUDA event of the device's primary context; every call makes that context current for
/// its duration.
class Event {
 public:
  explicit Event(const Device& device, EventKind kind = EventKind::kHostWait);
  ~Event();
  Event(Event&& other) noexcept;
  Event& operator=(Event&&) = delete;
  Event(const Event&) = delete;
  Event& operator=(const Event&) = delete;

  [[nodiscard]] EventHandle handle() const noexcept { return event_; }
  [[nodiscard]] EventKind kind() const noexcept { return kind_; }
  [[nodiscard]] const Device& device() const noexcept { return *device_; }
  void record(StreamHandle stream) const;
  void synchronize() const;
  /// True if the work captured by the last record() has completed.
  [[nodiscard]] bool query() const;

 private:
  const Device* device_;
  EventHandle event_ = nullptr;
  EventKind kind_ = EventKind::kHostWait;
};

/// Makes `stream` wait (on the device, not the host) until `event` has completed.
void stream_wait_event(const Device& device, StreamHandle stream, const Event& event);
/// Asynchronous copies on `stream`; host memory must be pinned for them to be asynchronous.
void memcpy_htod_async(const Device& device, DevicePtr dst, const void* src, std::size_t bytes,
                       StreamHandle stream);
void memcpy_dtoh_async(const Device& device, void* dst, DevicePtr src, std::size_t bytes,
                       StreamHandle stream);
/// Milliseconds between two completed timing events (EventKind::kTiming, recorded, on the same
/// device), with the device's context made current for the call. Throws CudaError if either
/// is not a timing event or has not completed, or if the driver lacks event timing.
[[nodiscard]] float elapsed_ms(const Event& start, const Event& end);

}  // namespace tensorstream::cuda
