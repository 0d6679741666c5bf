// Run-time loading of cuFile (libcufile.so.0), the library behind GPUDirect Storage (GDS):
// reads from a file straight into device memory, without a copy through host memory.
//
// TensorStream never links against cuFile. The entry points it uses are reached through a
// table of function pointers filled by dlopen/dlsym and typed from the real <cufile.h> when
// the build found it (TS_HAVE_CUFILE_HEADERS); a build without the header compiles the same
// interface and reports "built without cufile.h" as the reason GDS is unusable.
//
// Where the library comes from: the path in the environment variable
// TENSORSTREAM_CUFILE_LIBRARY when it is set (and then only that path), else
// "libcufile.so.0", else "libcufile.so", through the dynamic loader's usual search
// (LD_LIBRARY_PATH, the ld.so cache). The library is loaded at most once per process, on the
// first call below that needs it; nothing here loads it before that (an engine with GDS off
// never does).
//
// Three stages, each needed by the next:
//
//   1. library   dlopen + every entry point found                (cufile_status())
//   2. driver    cuFileDriverOpen, with a CUDA context current   (cufile_open_driver(device))
//   3. file      open(O_DIRECT) + cuFileHandleRegister, per file (CuFileHandle)
//
// cuFileDriverOpen is only attempted when the CUDA driver is usable (cuda::available()):
// without libcuda it does not fail, it spins forever (measured with libcufile 1.20). The
// driver stays open for the life of the process once opened: cuFile is shared by everything
// in the process (torch, other libraries), and closing it under them would break their
// handles; cuFile releases it at exit.
//
// Where the nvidia-fs kernel module is absent, cuFile may run in "compatibility mode" (its
// default configuration allows it): handles register and reads work, through cuFile's own
// pinned bounce buffers instead of peer-to-peer DMA. CuFileStatus::nvidia_fs tells the two
// apart. cuFile writes its log to ./cufile.log unless CUFILE_LOGFILE_PATH names a file.
//
// Thread-safety: every function is thread-safe. A CuFileHandle may be read from by several
// threads at once (cuFileRead is thread-safe on one handle).
#pragma once

#include <cstddef>
#include <cstdint>
#include <filesystem>
#include <string>

#include "tensorstream/detail/file.hpp"
#include "tensorstream/shim/cuda.hpp"

namespace tensorstream::cuda {

/// The environment variable naming the one cuFile library to load (a row of the settings
/// table, settings.hpp).
inline constexpr const char* kCufileLibraryEnv = "TENSORSTREAM_CUFILE_LIBRARY";
/// cuFile's own variables, which TensorStream documents but does not read.
inline constexpr const char* kCufileLogfileEnv = "CUFILE_LOGFILE_PATH";
inline constexpr const char* kCufileConfigEnv = "CUFILE_ENV_PATH_JSON";

/// What the process found when it looked for cuFile.
struct CuFileStatus {
  /// This build has the GDS code paths (cufile.h was found at build time).
  bool compiled = false;
  /// libcufile was loaded and has every entry point TensorStream uses.
  bool library_loaded = false;
  /// What was loaded (or last tried): a path or a soname.
  std::string library;
  /// cuFile's version as cuFileGetVersion reports it (e.g. 1200), 0 if unknown.
  int version = 0;
  /// cuFileDriverOpen succeeded in this process (see cufile_open_driver).
  bool driver_opened = false;
  /// /proc/driver/nvidia-fs exists: the GDS kernel module is loaded. Without it cuFile runs
  /// in compatibility mode, if at all.
  bool nvidia_fs = false;
  /// Why GDS cannot be used yet: "" once the driver is open. When the library is loaded but
  /// the driver was not opened, says why (CUDA driver not usable, cuFileDriverOpen's error,
  /// or that nothing has asked for it yet).
  std::string reason;
};

/// Loads libcufile on first call (dlopen only: the driver is not opened) and reports what
/// the process knows. Never throws.
[[nodiscard]] CuFileStatus cufile_status() noexcept;

/// Opens the cuFile driver, once per process, with `device`'s primary context current (the
/// first call decides; later calls return the same outcome). Loads the library first if
/// needed. Does not call cuFileDriverOpen when the CUDA driver is not usable. Never throws.
[[nodiscard]] CuFileStatus cufile_open_driver(const Device& device) noexcept;

/// True if this process has loaded libcufile through this shim (cufile_status or
/// cufile_open_driver was called and the dlopen succeeded). Never loads anything.
[[nodiscard]] bool cufile_library_loaded() noexcept;

/// A file opened read-only with O_DIRECT and registered with cuFile (cuFileHandleRegister),
/// for reads straight into device memory. Move-only; the destructor deregisters the handle
/// and closes the descriptor.
class CuFileHandle {
 public:
  /// Opens and registers `path`. Throws IoError (errno) when open(O_DIRECT) fails — tmpfs
  /// and some other file systems refuse O_DIRECT — and CudaError naming the cuFile error when
  /// the driver is not open or registration fails (e.g. a file system GDS does not support
  /// with compatibility mode off). Messages name the path.
  CuFileHandle(const Device& device, const std::filesystem::path& path);
  /// Registers `file`, already opened read-only with O_DIRECT by the caller (e.g. through an
  /// io::Env), and takes ownership of it. Throws as above (CudaError, IoError if it cannot be
  /// stat'ed).
  CuFileHandle(const Device& device, tensorstream::detail::FileDescriptor file);
  ~CuFileHandle();
  CuFileHandle(CuFileHandle&& other) noexcept;
  CuFileHandle& operator=(CuFileHandle&&) = delete;
  CuFileHandle(const CuFileHandle&) = delete;
  CuFileHandle& operator=(const CuFileHandle&) = delete;

  [[nodiscard]] const std::filesystem::path& path() const noexcept { return path_; }
  /// Size of the file when it was opened.
  [[nodiscard]] std::uint64_t size() const noexcept { return size_; }

  /// One cuFileRead: up to `bytes` bytes at `file_offset` into device memory at
  /// `base + buffer_offset` (`base`: the start of the allocation, or of a range registered
  /// with CuFileBufferRegistration), with the device's context current on the calling thread.
  /// Returns the bytes read: fewer than asked at the end of the file, or when cuFile stops
  /// early (the caller resumes). Throws IoError naming the path, offset, size and the cause
  /// (errno or the cuFile error).
  std::size_t read(DevicePtr base, std::size_t bytes, std::uint64_t file_offset,
                   std::uint64_t buffer_offset) const;

 private:
  const Device* device_;
  std::filesystem::path path_;
  int fd_ = -1;
  void* handle_ = nullptr;
  std::uint64_t size_ = 0;
};

/// Registers a range of device memory with cuFile (cuFileBufRegister) for the object's
/// lifetime, so reads into it are DMA straight into the range instead of going through
/// cuFile's internal bounce buffers. Costs BAR1 space: register buffers that are read into
/// again and again (streaming slots), not everything. Throws CudaError when registration
/// fails; the memory must outlive the registration.
class CuFileBufferRegistration {
 public:
  CuFileBufferRegistration(const Device& device, DevicePtr base, std::size_t bytes);
  ~CuFileBufferRegistration();
  CuFileBufferRegistration(CuFileBufferRegistration&& other) noexcept;
  CuFileBufferRegistration& operator=(CuFileBufferRegistration&&) = delete;
  CuFileBufferRegistration(const CuFileBufferRegistration&) = delete;
  CuFileBufferRegistration& operator=(const CuFileBufferRegistration&) = delete;

 private:
  const Device* device_;
  DevicePtr base_ = 0;
};

}  // namespace tensorstream::cuda
