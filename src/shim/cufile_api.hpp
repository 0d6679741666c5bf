// Private: the table of cuFile entry points loaded with dlopen. Only compiled when the build
// found <cufile.h> (which needs <cuda.h>); the public interface (shim/cufile.hpp) never
// exposes cuFile types.
#pragma once

#if defined(TS_HAVE_CUFILE_HEADERS)
#include <cufile.h>

namespace tensorstream::cuda::detail {

// Each member has the type of the cuFile function of the same name in <cufile.h>; where the
// header maps a name to a versioned symbol, the loader resolves the versioned one. Every
// entry is required. cuFileDriverClose is deliberately absent: the driver stays open for the
// life of the process (see shim/cufile.hpp).
#define TS_CUFILE_FUNCTIONS(X) \
  X(cuFileDriverOpen)          \
  X(cuFileHandleRegister)      \
  X(cuFileHandleDeregister)    \
  X(cuFileBufRegister)         \
  X(cuFileBufDeregister)       \
  X(cuFileRead)

struct CuFileApi {
#define TS_CUFILE_MEMBER(name) decltype(&::name) name = nullptr;
  TS_CUFILE_FUNCTIONS(TS_CUFILE_MEMBER)
#undef TS_CUFILE_MEMBER
  /// Optional (older libraries lack it): nullptr when absent.
  decltype(&::cuFileGetVersion) cuFileGetVersion = nullptr;
};

}  // namespace tensorstream::cuda::detail

#endif  // TS_HAVE_CUFILE_HEADERS
