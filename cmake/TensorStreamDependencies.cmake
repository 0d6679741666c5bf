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

# CUDA: only the driver API headers are needed (<cuda.h>, and <cudaTypedefs.h> for the
# entry-point types of each CUDA version); libcuda and libcufile are loaded at run time with
# dlopen, so one build runs with and without a GPU.
option(TS_WITH_CUDA "Compile the CUDA code paths when cuda.h is found" ON)
if(TS_WITH_CUDA)
  find_path(TS_CUDA_INCLUDE_DIR cuda.h
    HINTS ENV CUDA_HOME ENV CUDA_PATH
    PATH_SUFFIXES include
    PATHS /usr/local/cuda /usr/local/cuda-13.0 /usr/local/cuda-12 /opt/cuda)
endif()
if(TS_WITH_CUDA AND TS_CUDA_INCLUDE_DIR AND EXISTS "${TS_CUDA_INCLUDE_DIR}/cudaTypedefs.h")
  set(TS_HAVE_CUDA_HEADERS ON)
  message(STATUS "TensorStream: CUDA driver headers in ${TS_CUDA_INCLUDE_DIR}")
elseif(TS_WITH_CUDA AND TS_CUDA_INCLUDE_DIR)
  set(TS_HAVE_CUDA_HEADERS OFF)
  message(STATUS "TensorStream: ${TS_CUDA_INCLUDE_DIR} has cuda.h but no cudaTypedefs.h "
                 "(CUDA 11.3+); building without CUDA support")
else()
  set(TS_HAVE_CUDA_HEADERS OFF)
  message(STATUS "TensorStream: no cuda.h found; building without CUDA support")
endif()

# cuFile (GPUDirect Storage): only <cufile.h> is needed at build time; libcufile.so.0 is
# loaded at run time with dlopen. The header ships with the CUDA toolkit and in the PyPI wheel
# `nvidia-cufile` (nvidia/cu*/include inside site-packages). Looked for, in order: the
# TS_CUFILE_INCLUDE_DIR cache variable or environment variable, the CUDA include directory,
# every site-packages directory of the Python the build runs with (Python_EXECUTABLE, as
# scikit-build-core sets it, else the repository's .venv, else python3 on PATH): its own and
# those on its sys.path, so a venv that sees another interpreter's packages finds the wheel
# there too. Where it looked is printed, and written to tensorstream-features.txt.
# -DTS_WITH_CUFILE=OFF skips it.
option(TS_WITH_CUFILE "Compile GPUDirect Storage (cuFile) support when cufile.h is found" ON)
set(TS_HAVE_CUFILE_HEADERS OFF)
set(TS_CUFILE_SEARCHED "")
set(_ts_site_dirs)
if(TS_HAVE_CUDA_HEADERS AND TS_WITH_CUFILE)
  set(_ts_cufile_hints)
  set(_ts_python "")
  if(Python_EXECUTABLE)
    set(_ts_python "${Python_EXECUTABLE}")
  elseif(Python3_EXECUTABLE)
    set(_ts_python "${Python3_EXECUTABLE}")
  elseif(EXISTS "${CMAKE_CURRENT_SOURCE_DIR}/.venv/bin/python")
    set(_ts_python "${CMAKE_CURRENT_SOURCE_DIR}/.venv/bin/python")
  else()
    find_program(_ts_python_found NAMES python3)
    if(_ts_python_found)
      set(_ts_python "${_ts_python_found}")
    endif()
  endif()
  if(_ts_python)
    execute_process(
      COMMAND "${_ts_python}" -c
        "import sys, sysconfig; p = [sysconfig.get_paths()['purelib']] + [d for d in sys.path if d.endswith(('site-packages', 'dist-packages'))]; print(';'.join(dict.fromkeys(p)))"
      OUTPUT_VARIABLE _ts_site_dirs
      OUTPUT_STRIP_TRAILING_WHITESPACE
      RESULT_VARIABLE _ts_site_result
      ERROR_QUIET)
    if(NOT _ts_site_result EQUAL 0)
      set(_ts_site_dirs)
    endif()
  endif()
  foreach(_ts_site IN LISTS _ts_site_dirs)
    file(GLOB _ts_found LIST_DIRECTORIES true
         "${_ts_site}/nvidia/cu*/include" "${_ts_site}/nvidia/cufile/include")
    list(APPEND _ts_cufile_hints ${_ts_found})
  endforeach()
  set(TS_CUFILE_SEARCHED "$ENV{TS_CUFILE_INCLUDE_DIR};${TS_CUDA_INCLUDE_DIR};${_ts_cufile_hints}")
  list(FILTER TS_CUFILE_SEARCHED EXCLUDE REGEX "^$")
  find_path(TS_CUFILE_INCLUDE_DIR cufile.h
    HINTS ENV TS_CUFILE_INCLUDE_DIR
    PATHS ${TS_CUDA_INCLUDE_DIR} ${_ts_cufile_hints}
    NO_DEFAULT_PATH)
  # A directory given by hand that lacks the header counts as "not found", not as an error.
  if(TS_CUFILE_INCLUDE_DIR AND EXISTS "${TS_CUFILE_INCLUDE_DIR}/cufile.h")
    set(TS_HAVE_CUFILE_HEADERS ON)
    message(STATUS "TensorStream: cuFile header in ${TS_CUFILE_INCLUDE_DIR}")
  else()
    string(REPLACE ";" ", " _ts_where "${TS_CUFILE_SEARCHED}")
    string(REPLACE ";" ", " _ts_sites "${_ts_site_dirs}")
    if(NOT _ts_where)
      set(_ts_where "nowhere: no CUDA include directory, no site-packages with nvidia/cu*")
    endif()
    message(STATUS "TensorStream: cufile.h not found; building without GPUDirect Storage "
                   "(pip install nvidia-cufile, or set TS_CUFILE_INCLUDE_DIR). Looked in: "
                   "${_ts_where}; nvidia/cu*/include looked for in the site-packages of "
                   "${_ts_python}: ${_ts_sites}")
  endif()
elseif(TS_HAVE_CUDA_HEADERS)
  message(STATUS "TensorStream: GPUDirect Storage disabled (TS_WITH_CUFILE=OFF)")
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

# zstd: store compression (Debian: libzstd-dev). Optional like CUDA: without zstd.h the build
# succeeds, writing compressed stores is refused and opening one fails with an error saying
# the build lacks zstd. Linked dynamically (Debian's libzstd.a is not position-independent);
# libzstd.so.1 is part of every common Linux base system. -DTS_WITH_ZSTD=OFF skips it.
option(TS_WITH_ZSTD "Compile store compression when zstd.h is found" ON)
set(TS_HAVE_ZSTD OFF)
if(TS_WITH_ZSTD)
  find_path(TS_ZSTD_INCLUDE_DIR zstd.h)
  find_library(TS_ZSTD_LIBRARY NAMES zstd)
  if(TS_ZSTD_INCLUDE_DIR AND TS_ZSTD_LIBRARY)
    set(TS_HAVE_ZSTD ON)
    message(STATUS "TensorStream: store compression enabled (${TS_ZSTD_LIBRARY})")
  else()
    message(STATUS "TensorStream: zstd.h or libzstd not found; building without store "
                   "compression (install libzstd-dev)")
  endif()
else()
  message(STATUS "TensorStream: store compression disabled (TS_WITH_ZSTD=OFF)")
endif()

# What this build has, for scripts that must not run on a build that silently lacks a part
# (bench/gpu_run.sh fails its GPU run when cufile.h was not found).
file(WRITE "${CMAKE_BINARY_DIR}/tensorstream-features.txt"
  "cuda_headers=${TS_HAVE_CUDA_HEADERS}\n"
  "cuda_include_dir=${TS_CUDA_INCLUDE_DIR}\n"
  "cufile_headers=${TS_HAVE_CUFILE_HEADERS}\n"
  "cufile_include_dir=${TS_CUFILE_INCLUDE_DIR}\n"
  "cufile_searched=${TS_CUFILE_SEARCHED}\n"
  "cufile_site_packages=${_ts_site_dirs}\n"
  "liburing=${TS_HAVE_LIBURING}\n"
  "zstd=${TS_HAVE_ZSTD}\n")
