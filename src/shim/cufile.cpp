#include "tensorstream/shim/cufile.hpp"

#include <dlfcn.h>
#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <atomic>
#include <cerrno>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <mutex>
#include <string>
#include <utility>
#include <vector>

#include "cuda_api.hpp"
#include "cufile_api.hpp"
#include "tensorstream/errors.hpp"

namespace tensorstream::cuda {
namespace {

using tensorstream::detail::concat;

bool nvidia_fs_loaded() noexcept {
  std::error_code ec;
  return std::filesystem::exists("/proc/driver/nvidia-fs", ec);
}

std::atomic<bool> library_was_loaded{false};

#if defined(TS_HAVE_CUFILE_HEADERS)

// cuFile takes device addresses as pointers; the host never dereferences them.
void* device_pointer(DevicePtr address) noexcept {
  return reinterpret_cast<void*>(address);  // NOLINT(performance-no-int-to-ptr)
}

#define TS_STR(x) #x
#define TS_XSTR(x) TS_STR(x)  // expands a name the header #defines to its versioned symbol

struct Library {
  bool loaded = false;
  std::string name;
  std::string reason;
  int version = 0;
  detail::CuFileApi api;
};

Library load_library() {
  Library lib;
  const char* env = std::getenv(kCufileLibraryEnv);
  const bool explicit_path = env != nullptr && *env != '\0';
  const std::vector<std::string> candidates =
      explicit_path ? std::vector<std::string>{env}
                    : std::vector<std::string>{"libcufile.so.0", "libcufile.so"};
  void* handle = nullptr;
  std::string errors;
  for (const auto& candidate : candidates) {
    lib.name = candidate;
    // RTLD_LOCAL: our copy must not interpose on one the host process (torch) loads itself;
    // if the process already has libcufile.so.0, dlopen returns that very library.
    handle = ::dlopen(candidate.c_str(), RTLD_NOW | RTLD_LOCAL);
    if (handle != nullptr) break;
    const char* e = ::dlerror();
    errors += concat(errors.empty() ? "" : "; ", e ? e : candidate + ": dlopen failed");
  }
  if (handle == nullptr) {
    lib.reason = explicit_path ? concat("cannot load cuFile from ", kCufileLibraryEnv, "='", env,
                                        "': ", errors)
                               : concat("no cuFile library found (", errors, ")");
    return lib;
  }
#define TS_CUFILE_RESOLVE(fn)                                                        \
  lib.api.fn = reinterpret_cast<decltype(lib.api.fn)>(::dlsym(handle, TS_XSTR(fn))); \
  if (lib.api.fn == nullptr) {                                                       \
    lib.reason = concat(lib.name, " lacks " TS_XSTR(fn) " (cuFile too old?)");       \
    ::dlclose(handle);                                                               \
    return lib;                                                                      \
  }
  TS_CUFILE_FUNCTIONS(TS_CUFILE_RESOLVE)
#undef TS_CUFILE_RESOLVE
  lib.api.cuFileGetVersion =
      reinterpret_cast<decltype(lib.api.cuFileGetVersion)>(::dlsym(handle, "cuFileGetVersion"));
  int version = 0;
  if (lib.api.cuFileGetVersion != nullptr &&
      lib.api.cuFileGetVersion(&version).err == CU_FILE_SUCCESS) {
    lib.version = version;
  }
  lib.loaded = true;
  return lib;
}

const Library& library() noexcept {
  static std::once_flag once;
  static Library instance;
  try {
    std::call_once(once, [] {
      try {
        instance = load_library();
      } catch (...) {
        instance = Library{};
        instance.reason = "loading cuFile failed unexpectedly";
      }
      if (instance.loaded) library_was_loaded.store(true);
    });
  } catch (...) {
    static const Library failed = [] {
      Library l;
      l.reason = "loading cuFile failed unexpectedly";
      return l;
    }();
    return failed;
  }
  return instance;
}

// The outcome of the one cuFileDriverOpen this process makes.
struct DriverState {
  std::mutex mutex;
  bool attempted = false;
  bool opened = false;
  std::string reason;
};

DriverState& driver_state() {
  static DriverState state;
  return state;
}

// cuFile returns its own codes (above CUFILEOP_BASE_ERR) or an errno value.
std::string describe(const CUfileError_t& e) {
  const int code = static_cast<int>(e.err);
  std::string text = IS_CUFILE_ERR(code) ? std::string(CUFILE_ERRSTR(code))
                                         : std::string(std::strerror(std::abs(code)));
  if (IS_CUDA_ERR(e)) text += concat(": ", detail::describe_error(e.cu_err));
  return concat(text, " (cuFile error ", code, ")");
}

// Shared by every status query: what is known about the driver, without opening it.
void fill_driver_fields(const Library& lib, CuFileStatus& status) {
  if (!lib.loaded) {
    status.reason = lib.reason;
    return;
  }
  auto& d = driver_state();
  std::lock_guard lock(d.mutex);
  if (d.attempted) {
    status.driver_opened = d.opened;
    status.reason = d.reason;
  } else if (!available()) {
    status.reason = concat("cuFile loaded, but the CUDA driver is not usable (",
                           driver_status().reason, "): cuFileDriverOpen needs it");
  } else {
    status.reason =
        "cuFile loaded; its driver is opened by the first engine that uses GPUDirect Storage "
        "(none has yet in this process)";
  }
}

template <typename Fn>
void noexcept_call(const char* what, Fn&& fn) noexcept {
  try {
    fn();
  } catch (const std::exception& e) {
    std::fprintf(stderr, "tensorstream: %s: %s\n", what, e.what());
  }
}

#else

const char* no_support_reason() noexcept {
  return compiled_with_cuda()
             ? "this build has no GPUDirect Storage support (built without cufile.h)"
             : "this build has no CUDA support (built without cuda.h, so without cufile.h)";
}

#endif

}  // namespace

bool cufile_library_loaded() noexcept { return library_was_loaded.load(); }

#if defined(TS_HAVE_CUFILE_HEADERS)

CuFileStatus cufile_status() noexcept {
  CuFileStatus status;
  try {
    status.compiled = true;
    status.nvidia_fs = nvidia_fs_loaded();
    const Library& lib = library();
    status.library_loaded = lib.loaded;
    status.library = lib.name;
    status.version = lib.version;
    fill_driver_fields(lib, status);
  } catch (...) {
    status.driver_opened = false;
    status.reason = "probing cuFile failed unexpectedly";
  }
  return status;
}

CuFileStatus cufile_open_driver(const Device& device) noexcept {
  try {
    const Library& lib = library();
    if (lib.loaded) {
      auto& d = driver_state();
      std::lock_guard lock(d.mutex);
      if (!d.attempted) {
        d.attempted = true;
        try {
          if (!available()) {
            // cuFileDriverOpen without a CUDA driver spins forever: never call it then.
            d.reason = concat("cuFile loaded, but the CUDA driver is not usable (",
                              driver_status().reason, "): cuFileDriverOpen needs it");
          } else {
            // cuFileDriverOpen fails without a current context.
            ContextScope scope(device);
            const CUfileError_t e = lib.api.cuFileDriverOpen();
            if (e.err == CU_FILE_SUCCESS || e.err == CU_FILE_DRIVER_ALREADY_OPEN) {
              d.opened = true;
            } else {
              d.reason = concat("cuFileDriverOpen failed: ", describe(e));
            }
          }
        } catch (const std::exception& e) {
          d.reason = concat("cuFileDriverOpen not attempted: ", e.what());
        }
      }
    }
  } catch (...) {
    // reported by cufile_status() below
  }
  return cufile_status();
}

namespace {

// Registration needs the driver: say so before touching the file.
void require_driver(const std::filesystem::path& path) {
  const Library& lib = library();
  auto& d = driver_state();
  std::lock_guard lock(d.mutex);
  if (!d.opened) {
    throw CudaError(concat("cannot register '", path.string(), "' with cuFile: ",
                           !lib.loaded   ? lib.reason
                           : d.attempted ? d.reason
                                         : std::string("the cuFile driver is not open")));
  }
}

tensorstream::detail::FileDescriptor open_direct(const std::filesystem::path& path) {
  try {
    return tensorstream::detail::FileDescriptor(path, O_RDONLY | O_DIRECT);
  } catch (const IoError& e) {
    tensorstream::detail::throw_errno(
        concat("cannot open '", path.string(), "' with O_DIRECT for GPUDirect Storage"), e.code());
  }
}

}  // namespace

CuFileHandle::CuFileHandle(const Device& device, const std::filesystem::path& path)
    : CuFileHandle(device, (require_driver(path), open_direct(path))) {}

CuFileHandle::CuFileHandle(const Device& device, tensorstream::detail::FileDescriptor file)
    : device_(&device), path_(file.path()) {
  const Library& lib = library();
  require_driver(path_);
  struct stat st {};
  TS_SYSCALL_CHECK(::fstat(file.get(), &st), "cannot stat '", path_.string(), "'");
  CUfileDescr_t descr{};
  descr.type = CU_FILE_HANDLE_TYPE_OPAQUE_FD;
  descr.handle.fd = file.get();
  descr.fs_ops = nullptr;
  CUfileHandle_t handle = nullptr;
  {
    ContextScope scope(device);
    const CUfileError_t e = lib.api.cuFileHandleRegister(&handle, &descr);
    if (e.err != CU_FILE_SUCCESS) {
      throw CudaError(
          concat("cuFileHandleRegister of '", path_.string(), "' failed: ", describe(e)));
    }
  }
  fd_ = file.release();
  handle_ = handle;
  size_ = static_cast<std::uint64_t>(st.st_size);
}

CuFileHandle::~CuFileHandle() {
  if (handle_ != nullptr) {
    noexcept_call("deregistering a cuFile handle", [this] {
      ContextScope scope(*device_);
      library().api.cuFileHandleDeregister(handle_);
    });
  }
  if (fd_ != -1) ::close(fd_);
}

CuFileHandle::CuFileHandle(CuFileHandle&& other) noexcept
    : device_(other.device_),
      path_(std::move(other.path_)),
      fd_(std::exchange(other.fd_, -1)),
      handle_(std::exchange(other.handle_, nullptr)),
      size_(other.size_) {}

std::size_t CuFileHandle::read(DevicePtr base, std::size_t bytes, std::uint64_t file_offset,
                               std::uint64_t buffer_offset) const {
  ContextScope scope(*device_);
  errno = 0;
  const ssize_t n =
      library().api.cuFileRead(handle_, device_pointer(base), bytes,
                               static_cast<off_t>(file_offset), static_cast<off_t>(buffer_offset));
  if (n >= 0) return static_cast<std::size_t>(n);
  // -1: errno says why; otherwise the negated cuFile code (or, from some versions, errno).
  const int code = n == -1 ? errno : static_cast<int>(-n);
  const std::string cause = IS_CUFILE_ERR(code)
                                ? concat(CUFILE_ERRSTR(code), " (cuFile error ", code, ")")
                                : concat(std::strerror(code), " (errno ", code, ")");
  throw IoError(concat("cuFileRead of ", bytes, " bytes at offset ", file_offset, " of '",
                       path_.string(), "' failed: ", cause),
                IS_CUFILE_ERR(code) ? EIO : code);
}

CuFileBufferRegistration::CuFileBufferRegistration(const Device& device, DevicePtr base,
                                                   std::size_t bytes)
    : device_(&device) {
  const Library& lib = library();
  {
    auto& d = driver_state();
    std::lock_guard lock(d.mutex);
    TS_EXPECT(d.opened, CudaError, "cannot register device memory with cuFile: ",
              !lib.loaded ? lib.reason : "the cuFile driver is not open");
  }
  ContextScope scope(device);
  const CUfileError_t e = lib.api.cuFileBufRegister(device_pointer(base), bytes, 0);
  TS_EXPECT(e.err == CU_FILE_SUCCESS, CudaError, "cuFileBufRegister of ", bytes,
            " bytes of device memory failed: ", describe(e));
  base_ = base;
}

CuFileBufferRegistration::~CuFileBufferRegistration() {
  if (base_ == 0) return;
  noexcept_call("deregistering device memory from cuFile", [this] {
    ContextScope scope(*device_);
    const CUfileError_t e = library().api.cuFileBufDeregister(device_pointer(base_));
    TS_EXPECT(e.err == CU_FILE_SUCCESS, CudaError, "cuFileBufDeregister failed: ", describe(e));
  });
}

CuFileBufferRegistration::CuFileBufferRegistration(CuFileBufferRegistration&& other) noexcept
    : device_(other.device_), base_(std::exchange(other.base_, 0)) {}

#else  // no cufile.h: GDS reports why it is missing and its objects refuse to exist.

CuFileStatus cufile_status() noexcept {
  CuFileStatus status;
  status.nvidia_fs = nvidia_fs_loaded();
  status.reason = no_support_reason();
  return status;
}

CuFileStatus cufile_open_driver(const Device&) noexcept { return cufile_status(); }

CuFileHandle::CuFileHandle(const Device& device, const std::filesystem::path& path)
    : device_(&device), path_(path) {
  throw CudaError(concat("cannot read '", path.string(), "' with cuFile: ", no_support_reason()));
}
CuFileHandle::CuFileHandle(const Device& device, tensorstream::detail::FileDescriptor file)
    : device_(&device), path_(file.path()) {
  throw CudaError(concat("cannot read '", path_.string(), "' with cuFile: ", no_support_reason()));
}
CuFileHandle::~CuFileHandle() = default;
CuFileHandle::CuFileHandle(CuFileHandle&& other) noexcept
    : device_(other.device_), path_(std::move(other.path_)) {}
std::size_t CuFileHandle::read(DevicePtr, std::size_t, std::uint64_t, std::uint64_t) const {
  throw CudaError(no_support_reason());
}
CuFileBufferRegistration::CuFileBufferRegistration(const Device& device, DevicePtr, std::size_t)
    : device_(&device) {
  throw CudaError(no_support_reason());
}
CuFileBufferRegistration::~CuFileBufferRegistration() = default;
CuFileBufferRegistration::CuFileBufferRegistration(CuFileBufferRegistration&& o) noexcept
    : device_(o.device_) {}

#endif

}  // namespace tensorstream::cuda
