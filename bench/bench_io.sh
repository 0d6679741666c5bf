#!/usr/bin/env bash
# Storage -> host benchmark: runs the native `tensorstream bench-io` on a store of a few GB
# and keeps the JSON in bench/results/bench_io_<host>_<date>.json (the table goes to stdout).
#
#   bench/bench_io.sh [--store PATH] [--size-gb N] [--repeat N] [-- more bench-io options]
#
# The store is created on first use with `bench-io --make-store` (pseudo-random blocks of
# 256 MiB, written durably); keep it on the drive you want to measure, not on tmpfs.
# Environment: TENSORSTREAM_BIN (the native tool; default: build/*/tensorstream).
# Results are recorded by hand, with the command, in docs/benchmarks.md.
set -euo pipefail

root=$(cd "$(dirname "$0")/.." && pwd)
size_gb=3
repeat=5
store=""
while [[ $# -gt 0 ]]; do
  case "$1" in
    --store) store=$2; shift 2 ;;
    --size-gb) size_gb=$2; shift 2 ;;
    --repeat) repeat=$2; shift 2 ;;
    --) shift; break ;;
    -h|--help) sed -n '2,10p' "$0"; exit 0 ;;
    *) echo "bench_io.sh: unknown option '$1' (extra bench-io options go after --)" >&2; exit 2 ;;
  esac
done
[[ -n $store ]] || store="$root/build/bench-data/bench_${size_gb}g.tstore"

# Build (or bring up to date) the native tool, so the figures always come from the sources
# in this tree; TENSORSTREAM_BIN overrides.
bin=${TENSORSTREAM_BIN:-}
if [[ -z $bin ]]; then
  cmake -S "$root" -B "$root/build/bench" -G Ninja -DCMAKE_BUILD_TYPE=Release \
    -DTS_BUILD_TESTS=OFF >/dev/null
  cmake --build "$root/build/bench" --target tensorstream_tool >/dev/null
  bin="$root/build/bench/tensorstream"
fi

if [[ ! -f $store ]]; then
  mkdir -p "$(dirname "$store")"
  "$bin" bench-io --make-store "$store" --size-gb "$size_gb"
fi

host=$(hostname -s 2>/dev/null || hostname)
stamp=$(date -u +%Y%m%dT%H%M%SZ)
mkdir -p "$root/bench/results"
out="$root/bench/results/bench_io_${host}_${stamp}.json"

echo "\$ $bin bench-io $store --repeat $repeat --json-out $out $*"
"$bin" bench-io "$store" --repeat "$repeat" --json-out "$out" "$@"
echo
echo "JSON: $out"
