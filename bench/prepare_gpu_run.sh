#!/usr/bin/env bash
# Fills build/gpu-deps/ (ignored by git) with what bench/gpu_run.sh needs to build on a GPU
# machine without network that may lack the development packages: run it on a development
# machine that has them (Debian: libxxhash-dev, googletest, the CUDA toolkit headers, and
# the repository's .venv with nvidia-cufile), then copy build/gpu-deps/ along with the tree.
#
#   bench/prepare_gpu_run.sh [--venv DIR]
#
# What it copies, and how gpu_run.sh uses it:
#   prefix/include/xxhash.h (+ zstd.h, zstd_errors.h, zdict.h and prefix/lib/libzstd.a when
#       present): found through CMAKE_PREFIX_PATH
#   googletest/    Debian's GoogleTest sources (/usr/src/googletest), built with the tests
#       when the machine has no installed GoogleTest (CMake option TS_GTEST_SOURCE_DIR), so
#       no binary built with this machine's compiler has to link on the other
#   cuda/include/cuda.h, cudaTypedefs.h: the driver API headers the code is written against
#       (CUDA_HOME); nothing of CUDA is linked, the driver is loaded at run time
#   cufile/include/cufile.h, cufile/lib/libcufile.so.0 (from the nvidia-cufile wheel): the
#       GPUDirect Storage header (TS_CUFILE_INCLUDE_DIR) and, where the machine has no
#       libcufile.so.0, the library the run loads (TENSORSTREAM_CUFILE_LIBRARY)
# MANIFEST.txt lists every file with its source and SHA-256.
set -euo pipefail

root=$(cd "$(dirname "$0")/.." && pwd)
venv="$root/.venv"
while [[ $# -gt 0 ]]; do
  case "$1" in
    --venv) venv=$2; shift 2 ;;
    -h|--help) sed -n '2,22p' "$0"; exit 0 ;;
    *) echo "prepare_gpu_run.sh: unknown option '$1'" >&2; exit 2 ;;
  esac
done
dest="$root/build/gpu-deps"
rm -rf "$dest"
mkdir -p "$dest/prefix/include" "$dest/prefix/lib" "$dest/cuda/include" "$dest/cufile/include" \
  "$dest/cufile/lib"
manifest="$dest/MANIFEST.txt"
echo "# build/gpu-deps, made $(date -u +%Y-%m-%dT%H:%M:%SZ) on $(hostname) by bench/prepare_gpu_run.sh" >"$manifest"

missing=()
copy() {  # source destination-dir [required]
  local src=$1 dir=$2
  if [[ ! -f $src ]]; then
    [[ ${3:-} == required ]] && missing+=("$src")
    return 0
  fi
  cp -L "$src" "$dir/"
  local rel=${dir#"$dest"/}
  echo "$rel/$(basename "$src")  from $src  sha256 $(sha256sum "$src" | cut -d' ' -f1)" >>"$manifest"
}

cuda_include=""
for d in "${CUDA_HOME:-}/include" /usr/local/cuda/include /usr/include; do
  [[ -f $d/cuda.h && -f $d/cudaTypedefs.h ]] && { cuda_include=$d; break; }
done
multiarch=$(gcc -print-multiarch 2>/dev/null || echo x86_64-linux-gnu)

copy /usr/include/xxhash.h "$dest/prefix/include" required
copy /usr/include/xxh3.h "$dest/prefix/include"
for h in zstd.h zstd_errors.h zdict.h; do copy "/usr/include/$h" "$dest/prefix/include"; done
copy "/usr/lib/$multiarch/libzstd.a" "$dest/prefix/lib"
if [[ -n $cuda_include ]]; then
  copy "$cuda_include/cuda.h" "$dest/cuda/include" required
  copy "$cuda_include/cudaTypedefs.h" "$dest/cuda/include" required
else
  missing+=("cuda.h and cudaTypedefs.h (CUDA toolkit headers; set CUDA_HOME)")
fi
cufile_include=$(ls -d "$venv"/lib/python3*/site-packages/nvidia/cu*/include 2>/dev/null | head -1 || true)
if [[ -n $cufile_include && -f $cufile_include/cufile.h ]]; then
  copy "$cufile_include/cufile.h" "$dest/cufile/include" required
  copy "$cufile_include/../lib/libcufile.so.0" "$dest/cufile/lib"
elif [[ -n $cuda_include && -f $cuda_include/cufile.h ]]; then
  copy "$cuda_include/cufile.h" "$dest/cufile/include" required
else
  missing+=("cufile.h (pip install nvidia-cufile into $venv)")
fi
if [[ -f /usr/src/googletest/CMakeLists.txt ]]; then
  cp -r /usr/src/googletest "$dest/googletest"
  version=$(sed -n 's/.*GOOGLETEST_VERSION \([0-9.]*\).*/\1/p' /usr/src/googletest/CMakeLists.txt | head -1)
  echo "googletest/  from /usr/src/googletest  version ${version:-unknown}" >>"$manifest"
else
  missing+=("/usr/src/googletest (Debian package googletest)")
fi

echo "build/gpu-deps: $(du -sh "$dest" | cut -f1)"
cat "$manifest"
if ((${#missing[@]})); then
  printf 'missing: %s\n' "${missing[@]}" >&2
  exit 1
fi
