// Run-time loading of the CUDA driver (libcuda.so.1) and of cuFile (libcufile.so.0).
//
// TensorStream never links against CUDA: the driver API is reached through a table of
// function pointers filled by dlopen/dlsym, typed from the real <cuda.h> when the build found
// it. One binary therefore runs on machines with and without a GPU. The availability
// queries below never throw; they report why CUDA is unusable instead.
//
// Thread-safety: all functions are thread-safe; the library is loaded once, on first use.
#pragma once

#include <string>

namespace tensorstream::cuda {

/// What the process found when it looked for the CUDA driver.
struct DriverStatus {
  bool available = false;     ///< driver loaded, cuInit succeeded, at least one device
  int driver_version = 0;     ///< e.g. 13000 for CUDA 13.0 (0 if not loaded)
  int device_count = 0;
  std::string device0_name;   ///< name of device 0, if any
  std::string reason;         ///< why not available ("" when available)
};

/// True if this build was compiled with the CUDA driver headers (the GPU code paths exist).
[[nodiscard]] bool compiled_with_cuda() noexcept;

/// Loads the driver on first call and reports what it found. Never throws.
[[nodiscard]] DriverStatus driver_status() noexcept;

/// Shorthand for driver_status().available.
[[nodiscard]] bool available() noexcept;

/// What the process found when it looked for cuFile (GPUDirect Storage).
struct CuFileStatus {
  bool library_loaded = false;  ///< libcufile.so.0 was found and has the expected symbols
  std::string reason;           ///< why not ("" when loaded)
};

/// Looks for libcufile on first call. Never throws.
[[nodiscard]] CuFileStatus cufile_status() noexcept;

}  // namespace tensorstream::cuda
