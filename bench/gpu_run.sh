#!/usr/bin/env bash
# One GPU run: builds TensorStream, runs every GPU test (C++ and Python) and the GPU
# benchmarks, and writes every log, JSON file and a summary into one folder, within a time
# budget (8 minutes by default). Made for a GPU machine that has torch with CUDA,
# transformers, accelerate, nanobind, scikit-build-core, pytest, cmake (>= 3.24) and ninja
# but no network: it installs nothing, and never replaces the machine's torch. What such a
# machine may lack (xxhash.h, GoogleTest, the CUDA and cuFile headers) comes from
# build/gpu-deps/, filled by bench/prepare_gpu_run.sh on a development machine and copied
# along with the tree.
#
#   bench/gpu_run.sh [--dry-run] [--tests-only] [--python PY] [--out DIR] [--budget-s N]
#                    [--allow-no-gds]
#
#   --dry-run      check what can be checked without a GPU and print the plan (also what
#                  happens when no GPU is found: a "no GPU" line, exit status 0 unless a
#                  check that can run here fails)
#   --tests-only   build and run the GPU tests only, no benchmarks (`make test-gpu`); runs
#                  without a GPU too, where the tests skip
#   --python PY    the interpreter whose packages are used (default: $PYTHON, else python3)
#   --out DIR      where logs, JSON and the summary go (default: $OUT/gpu-run when $OUT is
#                  set, else bench/results/gpu-<UTC time>/)
#   --budget-s N   wall-clock budget of the whole run in seconds (default 480); each step's
#                  limit scales with it
#   --allow-no-gds a build without cufile.h (GPUDirect Storage compiled out) is not a failure
#
# Steps, in two lanes while building (the C++ tree and the Python package build at the
# same time, half the cores each), then the benchmarks alone on the machine:
#   env           nvidia-smi, driver, python, torch, the packages and tools used
#   configure     cmake of the C++ tree with tests, Release, into build/gpu-run/cpp
#   gds-headers   fails when cufile.h was not found (the GPUDirect Storage tests and code
#                 would compile out silently); lists where CMake looked
#   build-cpp     the library, the native tool and the GoogleTest executables
#   test-cpp      ctest -R 'Cuda|Gpu|Gds' (the CUDA shim, the engine on the GPU, GDS)
#   build-python  a venv in build/gpu-run/venv that sees the interpreter's packages, and
#                 pip install --no-build-isolation --no-deps . into it
#   test-python   pytest -m gpu
#   bench-io      store -> device: bench-io --device cuda:0 on a 2 GB store
#   bench-decode  bench_decode.py --device cuda:0: a 7B-shape, 16-layer model (7.0 GB,
#                 bf16) under a 4 GB budget: native full-GPU, TensorStream from the store
#                 and from a warm RAM tier, accelerate's CPU offload (decode.json; what
#                 finished before a time limit cut it short is in decode.json.partial)
# Every step has a time limit, cut to what is left of the budget; a failing step never
# stops the others; a step that no longer fits is recorded as skipped. Each step's status is
# in summary.txt / summary.json; its output in <step>.log.
# Environment: GPU_CMAKE_ARGS, more arguments for the C++ configure step.
# Exit status: 0 when every step passed (and after a dry run), 1 otherwise.
set -uo pipefail

root=$(cd "$(dirname "$0")/.." && pwd)
self="$root/bench/gpu_run.sh"
steps_all=(env configure gds-headers build-cpp test-cpp build-python test-python bench-io
  bench-decode)
steps_tests=(env configure gds-headers build-cpp test-cpp build-python test-python)

# Time limit of each step in seconds (before the budget cuts it).
declare -A limit=([env]=60 [configure]=90 [gds-headers]=10 [build-cpp]=240 [test-cpp]=150
  [build-python]=240 [test-python]=180 [bench-io]=90 [bench-decode]=300)

# ---- the steps (each runs as `gpu_run.sh --step NAME`, with the run's settings in the
# environment) ---------------------------------------------------------------------------

cmake_bin() {
  local dir
  dir=$("$GPU_PY" -c 'import cmake, sys; sys.stdout.write(cmake.CMAKE_BIN_DIR)' 2>/dev/null) &&
    [[ -x $dir/cmake ]] && { echo "$dir/cmake"; return; }
  command -v cmake
}

step_env() {
  echo "date: $(date -u +%Y-%m-%dT%H:%M:%SZ)"
  echo "host: $(hostname)  kernel: $(uname -r)  cpus: $(nproc)"
  echo "tree: $(git -C "$root" rev-parse --short HEAD 2>/dev/null || echo unknown)" \
    "$(git -C "$root" status --porcelain 2>/dev/null | grep -q . && echo '(with local changes)')"
  if command -v nvidia-smi >/dev/null; then
    nvidia-smi --query-gpu=name,driver_version,memory.total,pcie.link.gen.max,pcie.link.width.max \
      --format=csv 2>&1 || true
  else
    echo "nvidia-smi: not found"
  fi
  echo "python: $GPU_PY ($("$GPU_PY" -c 'import sys; print(sys.version.split()[0])' 2>&1))"
  local ok=0
  "$GPU_PY" - <<'EOF' || ok=1
import importlib, sys
missing = []
for name in ("torch", "transformers", "accelerate", "nanobind", "scikit_build_core", "pytest",
             "safetensors"):
    try:
        module = importlib.import_module(name)
        print(f"{name}: {getattr(module, '__version__', 'present')}")
    except Exception as e:  # noqa: BLE001
        print(f"{name}: MISSING ({type(e).__name__}: {e})")
        missing.append(name)
try:
    import torch
    print(f"torch.cuda.is_available(): {torch.cuda.is_available()}, torch CUDA {torch.version.cuda}")
    if torch.cuda.is_available():
        print(f"device 0: {torch.cuda.get_device_name(0)}")
except Exception:  # noqa: BLE001
    pass
sys.exit(1 if missing else 0)
EOF
  local c
  c=$(cmake_bin) && echo "cmake: $c ($("$c" --version | head -1))" || { echo "cmake: MISSING"; ok=1; }
  command -v ninja >/dev/null && echo "ninja: $(command -v ninja) ($(ninja --version))" ||
    { echo "ninja: MISSING"; ok=1; }
  command -v c++ >/dev/null && echo "c++: $(c++ --version | head -1)" || { echo "c++: MISSING"; ok=1; }
  echo "free disk in build/: $(df -h "$root" | awk 'NR==2 {print $4}')"
  if [[ -d $GPU_DEPS ]]; then
    echo "build/gpu-deps:"
    sed 's/^/  /' "$GPU_DEPS/MANIFEST.txt" 2>/dev/null || find "$GPU_DEPS" -maxdepth 2 | sed 's/^/  /'
  else
    echo "build/gpu-deps: absent (everything must come from this machine)"
  fi
  return $ok
}

step_configure() {
  local args=(-S "$root" -B "$GPU_BUILD/cpp" -G Ninja -DCMAKE_BUILD_TYPE=Release
    -DTS_BUILD_TESTS=ON -DPython_EXECUTABLE="$GPU_PY")
  [[ -f $GPU_DEPS/googletest/CMakeLists.txt ]] && args+=(-DTS_GTEST_SOURCE_DIR="$GPU_DEPS/googletest")
  local d
  for d in "${deps_defines[@]}"; do args+=("-D$d"); done
  # shellcheck disable=SC2206
  args+=(${GPU_CMAKE_ARGS:-})  # more, by hand (e.g. -DCMAKE_DISABLE_FIND_PACKAGE_GTest=ON)
  echo "\$ cmake ${args[*]}"
  "$(cmake_bin)" "${args[@]}"
}

step_gds-headers() {
  local features="$GPU_BUILD/cpp/tensorstream-features.txt"
  [[ -f $features ]] || { echo "no $features: the configure step did not complete"; return 1; }
  cat "$features"
  if grep -q '^cufile_headers=ON' "$features"; then
    echo "cufile.h found: the GPUDirect Storage code and tests are compiled in"
    return 0
  fi
  echo "FAILED: cufile.h was not found: GPUDirect Storage and its tests are compiled out."
  echo "Put it in build/gpu-deps (bench/prepare_gpu_run.sh), pip install nvidia-cufile, or set"
  echo "TS_CUFILE_INCLUDE_DIR; --allow-no-gds accepts such a build."
  [[ $GPU_ALLOW_NO_GDS == 1 ]]
}

step_build-cpp() {
  "$(cmake_bin)" --build "$GPU_BUILD/cpp" -j "$GPU_JOBS"
}

step_test-cpp() {
  local ctest
  ctest="$(dirname "$(cmake_bin)")/ctest"
  (cd "$GPU_BUILD/cpp" && "$ctest" -R 'Cuda|Gpu|Gds' --output-on-failure --timeout 120 \
    --output-junit "$GPU_OUT/ctest.xml")
}

step_build-python() {
  local venv="$GPU_BUILD/venv"
  rm -rf "$venv"
  # A venv of this interpreter that sees its packages (torch, transformers, pip, ...), by a
  # .pth file rather than --system-site-packages, which would skip them when PY is itself a
  # venv. Only tensorstream is installed into it.
  "$GPU_PY" -m venv --without-pip "$venv" || return 1
  local site
  site=$("$venv/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
  "$GPU_PY" -c 'import site, sys; print("\n".join(p for p in sys.path if p.endswith(("site-packages", "dist-packages"))))' \
    >"$site/gpu-run-base.pth"
  echo "base packages from:"; sed 's/^/  /' "$site/gpu-run-base.pth"
  local settings=(-C build-dir="$GPU_BUILD/wheel" -C cmake.build-type=Release) d
  for d in "${deps_defines[@]}"; do settings+=(-C "cmake.define.$d"); done
  CMAKE_BUILD_PARALLEL_LEVEL=$GPU_JOBS "$venv/bin/python" -m pip install --no-build-isolation \
    --no-deps --no-index -v "${settings[@]}" "$root" || return 1
  "$venv/bin/python" -c 'import tensorstream, torch; from tensorstream import _core
print("tensorstream", tensorstream.__file__)
print("cuda driver:", _core.cuda_driver_status())
print("cufile:", _core.cufile_status())
print("torch", torch.__version__, torch.__file__)'
}

step_test-python() {
  (cd "$root" && "$GPU_BUILD/venv/bin/python" -m pytest -m gpu -rs -q \
    --junitxml="$GPU_OUT/pytest.xml" tests/python)
}

step_bench-io() {
  local bin="$GPU_BUILD/cpp/tensorstream" store="$GPU_BUILD/bench-data/bench_2g.tstore"
  mkdir -p "$(dirname "$store")"
  [[ -f $store ]] || "$bin" bench-io --make-store "$store" --size-gb 2 || return 1
  echo "\$ $bin bench-io $store --device cuda:0 --repeat 3 --no-fio --json-out $GPU_OUT/bench_io.json"
  "$bin" bench-io "$store" --device cuda:0 --repeat 3 --no-fio --json-out "$GPU_OUT/bench_io.json"
}

decode_args() {
  echo --preset 7b-16l --device cuda:0 --budget-gb 4 --repeat 1 --new-tokens 8 --batch 1 \
    --prefill-lens 512 --bandwidth-repeat 1 \
    --systems memory,tensorstream,accelerate-cpu,tensorstream-ram
}

step_bench-decode() {
  # shellcheck disable=SC2046
  TENSORSTREAM_BIN="$GPU_BUILD/cpp/tensorstream" "$GPU_BUILD/venv/bin/python" \
    "$root/bench/bench_decode.py" $(decode_args) --workdir "$GPU_BUILD/bench-data/decode" \
    --json-out "$GPU_OUT/decode.json"
}

GPU_DEPS=${GPU_DEPS:-$root/build/gpu-deps}
# The headers of build/gpu-deps, named explicitly (an existing CMake cache would otherwise
# keep what it found before).
deps_defines=()
[[ -f $GPU_DEPS/cuda/include/cuda.h ]] && deps_defines+=("TS_CUDA_INCLUDE_DIR=$GPU_DEPS/cuda/include")
[[ -f $GPU_DEPS/cufile/include/cufile.h ]] &&
  deps_defines+=("TS_CUFILE_INCLUDE_DIR=$GPU_DEPS/cufile/include")

if [[ ${1:-} == --step ]]; then
  "step_$2"
  exit $?
fi

# ---- the run ------------------------------------------------------------------------------

dry_run=0
tests_only=0
budget=480
out=""
py=${PYTHON:-}
allow_no_gds=0
while [[ $# -gt 0 ]]; do
  case "$1" in
    --dry-run) dry_run=1; shift ;;
    --tests-only) tests_only=1; shift ;;
    --python) py=$2; shift 2 ;;
    --out) out=$2; shift 2 ;;
    --budget-s) budget=$2; shift 2 ;;
    --allow-no-gds) allow_no_gds=1; shift ;;
    -h|--help) sed -n '2,/^set -uo/p' "$0" | grep '^#' | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "gpu_run.sh: unknown option '$1' (see --help)" >&2; exit 2 ;;
  esac
done
py=${py:-python3}
if ! py_path=$(command -v "$py"); then
  echo "gpu_run.sh: no python '$py'" >&2
  exit 2
fi
# Absolute, without resolving symbolic links (a venv's python is one).
py_path="$(cd "$(dirname "$py_path")" && pwd)/$(basename "$py_path")"
stamp=$(date -u +%Y%m%dT%H%M%SZ)
if [[ -z $out ]]; then
  if [[ -n ${OUT:-} ]]; then out="$OUT/gpu-run"; else out="$root/bench/results/gpu-$stamp"; fi
fi
mkdir -p "$out"
out=$(cd "$out" && pwd)

export GPU_PY=$py_path GPU_OUT=$out GPU_BUILD="$root/build/gpu-run" GPU_DEPS
export GPU_ALLOW_NO_GDS=$allow_no_gds
# The interpreter's own bin directory first (pip's cmake and ninja live there), then what
# build/gpu-deps brings: headers and static libraries (CMAKE_PREFIX_PATH), the CUDA headers
# the code was written against (CUDA_HOME), cuFile's header and library.
export PATH="$(dirname "$py_path"):$PATH"
if [[ -d $GPU_DEPS ]]; then
  [[ -d $GPU_DEPS/prefix ]] && export CMAKE_PREFIX_PATH="$GPU_DEPS/prefix${CMAKE_PREFIX_PATH:+:$CMAKE_PREFIX_PATH}"
  [[ -f $GPU_DEPS/cuda/include/cuda.h ]] && export CUDA_HOME="$GPU_DEPS/cuda"
  [[ -f $GPU_DEPS/cufile/include/cufile.h ]] && export TS_CUFILE_INCLUDE_DIR="$GPU_DEPS/cufile/include"
  if [[ -f $GPU_DEPS/cufile/lib/libcufile.so.0 && -z ${TENSORSTREAM_CUFILE_LIBRARY:-} ]] &&
    ! ldconfig -p 2>/dev/null | grep -q 'libcufile\.so\.0 '; then
    export TENSORSTREAM_CUFILE_LIBRARY="$GPU_DEPS/cufile/lib/libcufile.so.0"
  fi
fi

if [[ $tests_only == 1 ]]; then steps=("${steps_tests[@]}"); else steps=("${steps_all[@]}"); fi

gpu_reason=""
if ! { command -v nvidia-smi >/dev/null && nvidia-smi -L >/dev/null 2>&1; } && [[ ! -e /dev/nvidia0 ]]; then
  gpu_reason="no NVIDIA GPU on this machine (no nvidia-smi -L, no /dev/nvidia0)"
elif ! "$py_path" -c 'import sys, torch; sys.exit(not torch.cuda.is_available())' 2>/dev/null; then
  gpu_reason="torch of $py_path does not see a CUDA device"
fi
if [[ -n $gpu_reason && $tests_only == 0 ]]; then dry_run=1; fi

summary_tsv="$out/summary.tsv"
: >"$summary_tsv"
start=$(date +%s)
deadline=$((start + budget - 5))  # a few seconds for the summary

record() {  # step status seconds note
  printf '%s\t%s\t%s\t%s\n' "$1" "$2" "$3" "$4" >>"$summary_tsv"
}

run_step() {  # name [jobs]
  local name=$1 now left lim t0 rc status note
  now=$(date +%s)
  left=$((deadline - now))
  lim=$((limit[$name] * budget / 480))  # the limits are sized for the default 480 s budget
  ((lim > left)) && lim=$left
  if ((lim < 5)); then
    record "$name" skipped 0 "out of time (budget ${budget} s)"
    return
  fi
  echo "[$(date -u +%H:%M:%S)] $name (limit ${lim} s)"
  t0=$(date +%s)
  GPU_JOBS=${2:-$(nproc)} timeout -k 10 "$lim" "$self" --step "$name" >"$out/$name.log" 2>&1
  rc=$?
  local secs=$(($(date +%s) - t0))
  case $rc in
    0) status=ok; note="" ;;
    124|137) status=FAILED; note="timed out after ${lim} s" ;;
    *) status=FAILED; note="exit status $rc; see $name.log" ;;
  esac
  [[ $status == FAILED ]] && note="$note: $(grep -v '^\s*$' "$out/$name.log" | tail -1 | cut -c1-200)"
  record "$name" "$status" "$secs" "$note"
  echo "[$(date -u +%H:%M:%S)] $name: $status (${secs} s)"
}

# A step runs only when what it needs passed.
needs_ok() {  # name prerequisite...
  local name=$1 p
  shift
  for p in "$@"; do
    if ! grep -q "^$p	ok	" "$summary_tsv"; then
      record "$name" skipped 0 "needs $p"
      return 1
    fi
  done
}

write_summary() {
  local passed=0 planned=0 failed=0 skipped=0 s line
  {
    echo "TensorStream GPU run, $(date -u +%Y-%m-%dT%H:%M:%SZ), $(hostname)"
    [[ -n $gpu_reason ]] && echo "no GPU: $gpu_reason"
    ((dry_run)) && echo "dry run: nothing was built or measured"
    printf '%-13s %-8s %6s  %s\n' step status seconds note
    for s in "${steps[@]}"; do
      line=$(grep "^$s	" "$summary_tsv" | tail -1)
      if [[ -z $line ]]; then line="$s	missing	0	"; fi
      IFS=$'\t' read -r _ st secs note <<<"$line"
      printf '%-13s %-8s %6s  %s\n' "$s" "$st" "$secs" "$note"
      case $st in
        ok) passed=$((passed + 1)) ;;
        planned|incomplete) planned=$((planned + 1)) ;;
        skipped) skipped=$((skipped + 1)) ;;
        *) failed=$((failed + 1)) ;;
      esac
    done
    echo "total: $(($(date +%s) - start)) s of a ${budget} s budget; $passed ok, $failed failed," \
      "$skipped skipped$( ((planned)) && echo ", $planned planned or incomplete")"
  } >"$out/summary.txt"
  "$py_path" - "$summary_tsv" "$out/summary.json" "$dry_run" "$gpu_reason" "$budget" \
    "$(($(date +%s) - start))" "${steps[@]}" <<'EOF'
import json, sys
tsv, out, dry, reason, budget, elapsed, *steps = sys.argv[1:]
rows = {}
for line in open(tsv):
    name, status, secs, note = (line.rstrip("\n").split("\t") + [""] * 4)[:4]
    rows[name] = {"status": status, "seconds": int(secs or 0), "note": note}
json.dump({"dry_run": dry == "1", "no_gpu": reason or None, "budget_s": int(budget),
           "elapsed_s": int(elapsed),
           "steps": {s: rows.get(s, {"status": "missing"}) for s in steps}}, open(out, "w"),
          indent=1)
EOF
  cat "$out/summary.txt"
  [[ $failed == 0 ]]
}

if ((dry_run)); then
  # What can be checked here: the tools and packages, build/gpu-deps, and the decode
  # benchmark's plan (its configurations are constructed, so a bad one fails now).
  echo "dry run: $([[ -n $gpu_reason ]] && echo "$gpu_reason" || echo "--dry-run")"
  GPU_JOBS=1 "$self" --step env >"$out/env.log" 2>&1
  env_rc=$?
  record env "$([[ $env_rc == 0 ]] && echo ok || echo incomplete)" 0 \
    "$([[ $env_rc == 0 ]] && echo "every tool and package found" || echo "some missing: see env.log")"
  for s in "${steps[@]}"; do
    [[ $s == env ]] && continue
    record "$s" planned 0 "limit ${limit[$s]} s"
  done
  if [[ $tests_only == 0 ]]; then
    # shellcheck disable=SC2046
    if "$py_path" "$root/bench/bench_decode.py" $(decode_args) --dry-run \
      --json-out "$out/decode_plan.json" >"$out/decode_plan.log" 2>&1; then
      echo "bench-decode plan: $out/decode_plan.json"
    else
      record bench-decode FAILED 0 "its dry run failed: see decode_plan.log"
    fi
  fi
  echo
  echo "plan (${budget} s budget):"
  for s in "${steps[@]}"; do printf '  %-13s limit %4s s\n' "$s" "${limit[$s]}"; done
  echo "decode benchmark: bench/bench_decode.py $(decode_args)"
  echo
  write_summary >/dev/null
  dry_rc=$?
  cat "$out/summary.txt"
  [[ -n $gpu_reason ]] && echo "no GPU: dry run only, nothing measured ($gpu_reason)"
  exit $dry_rc  # 0 unless a check that runs here failed
fi

run_step env
half=$(( $(nproc) > 1 ? $(nproc) / 2 : 1 ))
(
  run_step configure "$half"
  needs_ok gds-headers configure && run_step gds-headers
  needs_ok build-cpp configure && run_step build-cpp "$half"
  needs_ok test-cpp build-cpp && run_step test-cpp
) &
lane_cpp=$!
(
  run_step build-python "$half"
  needs_ok test-python build-python && run_step test-python
) &
lane_python=$!
wait "$lane_cpp" "$lane_python"
if [[ $tests_only == 0 ]]; then
  needs_ok bench-io build-cpp && run_step bench-io
  needs_ok bench-decode build-python build-cpp && run_step bench-decode
fi
write_summary
