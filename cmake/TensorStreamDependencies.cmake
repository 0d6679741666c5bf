# Optional and required third-party pieces, probed once.
#
# xxHash is used header-only (XXH_INLINE_ALL), so no shared library is needed at run time.
# Its header comes from the system (Debian: libxxhash-dev) or from TS_XXHASH_INCLUDE_DIR.
find_path(TS_XXHASH_INCLUDE_DIR xxhash.h
  HINTS ENV TS_XXHASH_INCLUDE_DIR
  PATHS /usr/include /usr/local/include)
if(NOT TS_XXHASH_INCLUDE_DIR)
  message(FATAL_ERROR "xxhash.h not found: install libxxhash-dev (Debian) or set TS_XXHASH_INCLUDE_DIR")
endif()
add_library(ts_xxhash INTERFACE)
target_include_directories(ts_xxhash SYSTEM INTERFACE ${TS_XXHASH_INCLUDE_DIR})

# CUDA: only the driver API header is needed; libcuda and libcufile are loaded at run time
# with dlopen, so one build runs with and without a GPU.
option(TS_WITH_CUDA "Compile the CUDA code paths when cuda.h is found" ON)
if(TS_WITH_CUDA)
  find_path(TS_CUDA_INCLUDE_DIR cuda.h
    HINTS ENV CUDA_HOME ENV CUDA_PATH
    PATH_SUFFIXES include
    PATHS /usr/local/cuda /usr/local/cuda-13.0 /usr/local/cuda-12 /opt/cuda)
endif()
if(TS_WITH_CUDA AND TS_CUDA_INCLUDE_DIR)
  set(TS_HAVE_CUDA_HEADERS ON)
  message(STATUS "TensorStream: CUDA driver headers in ${TS_CUDA_INCLUDE_DIR}")
else()
  set(TS_HAVE_CUDA_HEADERS OFF)
  message(STATUS "TensorStream: no cuda.h found; building without CUDA support")
endif()

# io_uring: an optional backend, compiled in when liburing (Debian: liburing-dev) is found.
# Linked statically when the static archive exists, so the wheel does not need liburing.so.
find_path(TS_LIBURING_INCLUDE_DIR liburing.h)
find_library(TS_LIBURING_LIBRARY NAMES liburing.a uring)
if(TS_LIBURING_INCLUDE_DIR AND TS_LIBURING_LIBRARY)
  set(TS_HAVE_LIBURING ON)
  message(STATUS "TensorStream: io_uring backend enabled (${TS_LIBURING_LIBRARY})")
else()
  set(TS_HAVE_LIBURING OFF)
  message(STATUS "TensorStream: liburing not found; io_uring backend not built")
endif()
