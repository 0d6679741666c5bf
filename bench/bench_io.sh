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

bin=${TENSORSTREAM_BIN:-}
if [[ -z $bin ]]; then
  for candidate in "$root/build/bench/tensorstream" "$root"/build/*/tensorstream; do
    if [[ -x $candidate && -f $candidate ]]; then bin=$candidate; break; fi
  done
fi
if [[ -z $bin ]] && command -v tensorstream >/dev/null; then bin=$(command -v tensorstream); fi
if [[ -z $bin ]]; then
  echo "bench_io.sh: no tensorstream binary; build it first:" >&2
  echo "  cmake -S . -B build/bench -G Ninja && cmake --build build/bench" >&2
  exit 1
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
