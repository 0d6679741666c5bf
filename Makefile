# TensorStream developer entry points. `make demo` and `make test` work on a fresh Debian
# machine with Python 3.9+: they install what is missing, build and run.
SHELL := /bin/bash
.DEFAULT_GOAL := help

PYTHON_SYSTEM ?= python3
VENV          ?= .venv
PY            := $(VENV)/bin/python
PIP           := $(PY) -m pip
JOBS          ?= $(shell nproc)
BUILD         ?= build/cpp
FUZZ_SECONDS  ?= 60
# torch is pinned for development and CI; the package itself accepts any torch 2.x.
TORCH_SPEC    ?= torch==2.13.0
# Every Python package the build and the tests use, pinned to versions known to pass
# (nvidia-cufile brings cufile.h for the GPUDirect Storage code paths and the libcufile.so.0
# the tests load; no CUDA torch comes with it). `make test-latest` tries the newest ones.
PY_REQUIREMENTS := requirements/test.txt
VENV_LATEST   ?= .venv-latest
APT_PACKAGES  := build-essential git libgtest-dev libgmock-dev libxxhash-dev libzstd-dev \
                 liburing-dev fio clang clang-format clang-tidy libclang-rt-14-dev python3-venv
CMAKE         := $(VENV)/bin/cmake
CTEST         := $(VENV)/bin/ctest

.PHONY: help demo test test-unit test-integration test-gpu test-gpu-venv gpu-run test-cpp test-python \
        test-latest test-asan test-tsan test-nocuda test-nozstd fuzz fuzz-smoke format lint deps deps-system venv build-cpp \
        install-python clean

help:
	@echo "make demo             install, build, run the demo (store round trip of a real model)"
	@echo "make test             install test deps, build, run all C++ (ctest) and Python (pytest) tests"
	@echo "make test-unit        C++ tests + Python unit tests"
	@echo "make test-integration Python tests that convert real transformers checkpoints, CLI, demo"
	@echo "make test-gpu         GPU tests only (skip cleanly without a GPU); PYTHON=... uses that"
	@echo "                      interpreter's torch & build tools, installing nothing (offline GPU machines)"
	@echo "make gpu-run          bench/gpu_run.sh: build, every GPU test and the GPU benchmarks in 8 min"
	@echo "make test-latest      Python tests against the newest transformers, accelerate, ... (drift check)"
	@echo "make test-asan        C++ tests under AddressSanitizer + UBSan"
	@echo "make test-tsan        C++ tests under ThreadSanitizer"
	@echo "make test-nozstd      build without zstd.h: compression refused and reported, the rest works"
	@echo "make fuzz             build libFuzzer targets, run each FUZZ_SECONDS (default 60)"
	@echo "make format / lint    clang-format + ruff format / clang-format check, clang-tidy, ruff"

# ---- dependencies ------------------------------------------------------------------------
deps-system:
	@missing=""; for p in $(APT_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then \
	  echo "installing system packages:$$missing"; \
	  SUDO=""; [ "$$(id -u)" = 0 ] || SUDO=sudo; \
	  $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq $$missing; \
	fi

$(VENV)/.stamp: pyproject.toml Makefile $(PY_REQUIREMENTS)
	@[ -x $(PY) ] || $(PYTHON_SYSTEM) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q $(TORCH_SPEC)
	$(PIP) install -q -r $(PY_REQUIREMENTS)
	@touch $@

venv: $(VENV)/.stamp
deps: deps-system venv

# ---- builds ------------------------------------------------------------------------------
build-cpp: deps
	$(CMAKE) -S . -B $(BUILD) -G Ninja -DTS_BUILD_TESTS=ON -DTS_WERROR=ON >/dev/null
	$(CMAKE) --build $(BUILD) -j $(JOBS)

install-python: deps
	$(PIP) install -q --no-build-isolation --config-settings=cmake.define.TS_WERROR=ON .

# ---- tests -------------------------------------------------------------------------------
test: build-cpp install-python
	cd $(BUILD) && ../../$(CTEST) --output-on-failure -j $(JOBS)
	$(PY) -m pytest -q tests/python

test-cpp: build-cpp
	cd $(BUILD) && ../../$(CTEST) --output-on-failure -j $(JOBS)

test-unit: build-cpp install-python
	cd $(BUILD) && ../../$(CTEST) --output-on-failure -j $(JOBS)
	$(PY) -m pytest -q tests/python -m "not integration and not gpu"

test-integration: install-python
	$(PY) -m pytest -q tests/python -m integration

# GPU tests. With PYTHON=... (or when python3 imports torch with a CUDA device), everything
# comes from that interpreter and the machine, nothing is installed and no network is needed:
# bench/gpu_run.sh --tests-only builds with it (the packages it needs: torch, nanobind,
# scikit-build-core, pytest; cmake and ninja) and installs tensorstream into a venv of its own
# under build/gpu-run/; it fails loudly when cufile.h was not found (the GPUDirect Storage
# tests would compile out). Otherwise the development venv is set up as for `make test`.
PYTHON        ?=
GPU_RUN_ARGS  ?=
test-gpu:
	@if [ -n "$(PYTHON)" ] || $(PYTHON_SYSTEM) -c 'import sys, torch; sys.exit(not torch.cuda.is_available())' 2>/dev/null; then \
	  bench/gpu_run.sh --tests-only --python "$(or $(PYTHON),$(PYTHON_SYSTEM))" --out build/gpu-run/test-gpu --budget-s 1800 $(GPU_RUN_ARGS); \
	else \
	  $(MAKE) --no-print-directory test-gpu-venv; \
	fi

test-gpu-venv: build-cpp install-python
	@grep -q '^cufile_headers=ON' $(BUILD)/tensorstream-features.txt || { \
	  echo "cufile.h was not found: the GPUDirect Storage code and tests are compiled out"; \
	  grep '^cufile_searched=' $(BUILD)/tensorstream-features.txt; exit 1; }
	cd $(BUILD) && ../../$(CTEST) --output-on-failure -R 'Cuda|Gpu|Gds'
	$(PY) -m pytest -q tests/python -m gpu -rs

# The one GPU run (bench/gpu_run.sh): build, every GPU test, the GPU benchmarks, within 8
# minutes; logs, JSON and summary in $$OUT/gpu-run or bench/results/gpu-<date>/. Without a
# GPU it is a dry run. Run bench/prepare_gpu_run.sh first on a development machine if the
# GPU machine lacks the development packages.
gpu-run:
	bench/gpu_run.sh $(if $(PYTHON),--python "$(PYTHON)") $(GPU_RUN_ARGS)

# The Python suite against the newest releases of the test dependencies (torch stays pinned),
# in a venv of its own: drift is seen on purpose, never by accident in `make test`.
test-latest: deps-system
	@[ -x $(VENV_LATEST)/bin/python ] || $(PYTHON_SYSTEM) -m venv $(VENV_LATEST)
	$(VENV_LATEST)/bin/python -m pip install -q --upgrade pip
	$(VENV_LATEST)/bin/python -m pip install -q $(TORCH_SPEC)
	$(VENV_LATEST)/bin/python -m pip install -q --upgrade -r requirements/latest.txt
	$(VENV_LATEST)/bin/python -m pip install -q --no-build-isolation .
	$(VENV_LATEST)/bin/python -m pip freeze | grep -i -E '^(transformers|accelerate|safetensors|torch)[=@ ]'
	$(VENV_LATEST)/bin/python -m pytest -q tests/python

test-asan: deps
	$(CMAKE) -S . -B build/asan -G Ninja -DTS_BUILD_TESTS=ON -DTS_BUILD_TOOLS=OFF \
	  -DTS_SANITIZE=address,undefined -DCMAKE_BUILD_TYPE=Debug >/dev/null
	$(CMAKE) --build build/asan -j $(JOBS)
	cd build/asan && ASAN_OPTIONS=detect_leaks=1 ../../$(CTEST) --output-on-failure -j $(JOBS)

test-tsan: deps
	$(CMAKE) -S . -B build/tsan -G Ninja -DTS_BUILD_TESTS=ON -DTS_BUILD_TOOLS=OFF \
	  -DTS_SANITIZE=thread -DCMAKE_BUILD_TYPE=Debug >/dev/null
	$(CMAKE) --build build/tsan -j $(JOBS)
	cd build/tsan && TSAN_OPTIONS=halt_on_error=1 ../../$(CTEST) --output-on-failure -j $(JOBS)

# The same sources must build and run without CUDA headers (the GPU paths compiled out).
test-nocuda: deps
	$(CMAKE) -S . -B build/nocuda -G Ninja -DTS_BUILD_TESTS=ON -DTS_WITH_CUDA=OFF -DTS_WERROR=ON >/dev/null
	$(CMAKE) --build build/nocuda -j $(JOBS) --target test_cuda_shim test_gds tensorstream_tool
	build/nocuda/tests/cpp/test_cuda_shim
	build/nocuda/tests/cpp/test_gds
	build/nocuda/tensorstream doctor | grep -q "CUDA support compiled in: no"

# Store compression is optional too: without zstd.h the build must succeed, compressed stores
# be refused with a clear error and every other store test pass.
test-nozstd: deps
	$(CMAKE) -S . -B build/nozstd -G Ninja -DTS_BUILD_TESTS=ON -DTS_WITH_ZSTD=OFF -DTS_WITH_CUDA=OFF \
	  -DTS_WERROR=ON >/dev/null
	$(CMAKE) --build build/nozstd -j $(JOBS) --target test_codec test_store_compression test_store \
	  test_store_validation test_cli tensorstream_tool
	for t in codec store_compression store store_validation cli; do build/nozstd/tests/cpp/test_$$t || exit 1; done
	build/nozstd/tensorstream convert --compress fuzz/seeds/safetensors/basic.safetensors \
	  build/nozstd/x.tstore 2>&1 | grep -q "compiled without zstd"
	build/nozstd/tensorstream verify fuzz/seeds/store/compressed.tstore 2>&1 | grep -q "compiled without zstd"

fuzz: deps
	CC=clang CXX=clang++ $(CMAKE) -S . -B build/fuzz -G Ninja -DTS_BUILD_FUZZERS=ON \
	  -DTS_BUILD_TOOLS=OFF -DTS_SANITIZE=address,undefined -DCMAKE_BUILD_TYPE=Debug >/dev/null
	$(CMAKE) --build build/fuzz -j $(JOBS)
	@for t in store chunk safetensors json; do \
	  corpus=build/fuzz/corpus/$$t; mkdir -p $$corpus; cp -n fuzz/seeds/$$t/* $$corpus/; \
	  echo "fuzzing $$t for $(FUZZ_SECONDS) s"; \
	  build/fuzz/fuzz/fuzz_$$t -max_total_time=$(FUZZ_SECONDS) -print_final_stats=1 \
	    -artifact_prefix=build/fuzz/crash-$$t- $$corpus 2>&1 | grep -E 'stat::number_of_executed_units|ERROR|crash' ; \
	  test $${PIPESTATUS[0]} -eq 0 || exit 1; \
	done

fuzz-smoke:
	$(MAKE) fuzz FUZZ_SECONDS=15

# ---- style -------------------------------------------------------------------------------
CXX_SOURCES := $(shell git ls-files '*.cpp' '*.hpp' 2>/dev/null)
PY_SOURCES  := python tests/python bench

format: deps
	clang-format -i $(CXX_SOURCES)
	$(VENV)/bin/ruff format $(PY_SOURCES)

lint: build-cpp
	clang-format --dry-run -Werror $(CXX_SOURCES)
	$(VENV)/bin/ruff check $(PY_SOURCES)
	clang-tidy -p $(BUILD) --quiet $(filter src/%.cpp,$(CXX_SOURCES))

# ---- main job ----------------------------------------------------------------------------
demo: install-python
	$(VENV)/bin/tensorstream demo

clean:
	rm -rf build $(VENV) $(VENV_LATEST) *.egg-info
