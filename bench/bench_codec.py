#!/usr/bin/env python3
"""Codec benchmark: how far lossless store compression shrinks weights, and how fast they
decode, per dtype and level, beside plain zstd without byte planes.

    python bench/bench_codec.py --levels 1,3,9 --threads 1,2

Weights come from two sources, each written as an uncompressed store:

  model     a Llama built from a transformers config (weights as transformers initialises
            them: N(0, initializer_range = 0.02) for the linear layers and embeddings, ones
            for the norms), converted to each dtype
  gaussian  N(0, 0.02) samples, the model's size, in each dtype

and each store is measured by the native ``tensorstream bench-codec`` (same run, same
chunks): ratio with byte planes + zstd (as compressed stores hold them), ratio with plain
zstd, encoding MB/s on one thread, decoding GB/s per thread with 1, 2, ... threads at once
(from memory to memory: the codec alone, not the storage path). int8 and float8_e4m3fn are
quantised per tensor to their full range (scale = max|w| / 127 or / 448), as quantised
checkpoints are.

The table goes to stdout, every number to bench/results/codec_<host>_<date>.json
(--json-out to choose).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import socket
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent

# hidden, intermediate, layers, heads, vocab
PRESETS: dict[str, dict[str, int]] = {
    "smoke": dict(hidden=64, intermediate=176, layers=2, heads=4, vocab=256),
    # ~70M parameters: 4 layers of 12.6M, embeddings and head of 8.4M each.
    "small": dict(hidden=1024, intermediate=2816, layers=4, heads=16, vocab=8192),
}
DTYPES = ("bfloat16", "float16", "float32", "int8", "float8_e4m3fn")


def _machine() -> dict[str, Any]:
    cpu = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "host": socket.gethostname(),
        "kernel": platform.release(),
        "cpu": cpu,
        "cpus": os.cpu_count(),
        "loadavg": [float(x) for x in Path("/proc/loadavg").read_text().split()[:3]],
    }


def _convert(tensor: Any, dtype: str) -> Any:
    import torch

    t = tensor.detach().float()
    if dtype == "int8":
        scale = t.abs().max().clamp(min=1e-12) / 127
        return (t / scale).round().clamp(-127, 127).to(torch.int8)
    if dtype == "float8_e4m3fn":
        scale = t.abs().max().clamp(min=1e-12) / 448
        return (t / scale).to(torch.float8_e4m3fn)
    return t.to(getattr(torch, dtype))


def write_stores(preset: str, workdir: Path, seed: int) -> list[dict[str, Any]]:
    """Uncompressed stores of the model and of gaussian weights in every dtype."""
    import torch
    import transformers

    import tensorstream as ts

    p = PRESETS[preset]
    config = transformers.LlamaConfig(
        hidden_size=p["hidden"],
        intermediate_size=p["intermediate"],
        num_hidden_layers=p["layers"],
        num_attention_heads=p["heads"],
        num_key_value_heads=p["heads"],
        vocab_size=p["vocab"],
        initializer_range=0.02,
    )
    torch.manual_seed(seed)
    model = transformers.LlamaForCausalLM(config)
    state = {k: v for k, v in model.state_dict().items() if v.is_floating_point()}
    numel = sum(v.numel() for v in state.values())
    stores = []
    for dtype in DTYPES:
        path = workdir / f"model-{dtype}.tstore"
        ts.save_to_ts({k: _convert(v, dtype) for k, v in state.items()}, path, durable=False)
        stores.append({"source": "model", "dtype": dtype, "path": path})
        # Gaussian weights in matrices of 1M elements (block "g.N"), as many as the model has.
        gen = torch.Generator().manual_seed(seed + 1)
        gaussian = {}
        for i in range(max(1, numel // (1 << 20))):
            w = torch.randn(1 << 20, generator=gen) * 0.02
            gaussian[f"g.{i}.weight"] = _convert(w, dtype)
        path = workdir / f"gaussian-{dtype}.tstore"
        ts.save_to_ts(gaussian, path, durable=False)
        stores.append({"source": "gaussian", "dtype": dtype, "path": path})
    return stores


def bench_store(path: Path, args: argparse.Namespace) -> dict[str, Any]:
    cmd = [
        sys.executable,
        "-m",
        "tensorstream",
        "bench-codec",
        str(path),
        "--levels",
        args.levels,
        "--threads",
        args.threads,
        "--max-mib",
        str(args.max_mib),
        "--repeat",
        str(args.repeat),
        "--json",
    ]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=3600)
    if p.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed: {p.stderr.strip()}")
    return json.loads(p.stdout)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", choices=sorted(PRESETS), default="small")
    parser.add_argument("--levels", default="1,3,9")
    parser.add_argument("--threads", default="1,2")
    parser.add_argument("--max-mib", type=int, default=64, help="raw MiB measured per store")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workdir", type=Path, default=None)
    parser.add_argument("--json-out", type=Path, default=None)
    parser.add_argument(
        "--smoke", action="store_true", help="tiny model, one level, one repeat (for tests)"
    )
    args = parser.parse_args(argv)
    if args.smoke:
        args.preset, args.levels, args.threads, args.max_mib, args.repeat = (
            "smoke",
            "1",
            "1,2",
            1,
            1,
        )
    argv_line = " ".join(["python", "bench/bench_codec.py", *(argv or sys.argv[1:])])
    started = dt.datetime.now(dt.timezone.utc)
    with tempfile.TemporaryDirectory(prefix="tsbench-codec-", dir=args.workdir) as tmp:
        stores = write_stores(args.preset, Path(tmp), args.seed)
        rows = []
        codec = None
        for s in stores:
            result = bench_store(s["path"], args)
            codec = result["codec"]
            for r in result["results"]:
                if r["dtype"] != s["dtype"]:
                    continue  # e.g. the bool or int64 buffers of a model
                rows.append({"source": s["source"], **r})
    threads = [int(t) for t in args.threads.split(",")]
    header = f"{'source':9} {'dtype':14} {'level':>5} {'ratio':>7} {'plain':>7} {'enc MB/s':>9}"
    header += "".join(f" {'dec/thr@' + str(t):>11}" for t in threads) + f" {'plain dec@1':>12}"
    print(header)
    for r in rows:
        line = (
            f"{r['source']:9} {r['dtype']:14} {r['level']:>5} {r['ratio']:>7.3f} "
            f"{r['plain_ratio']:>7.3f} {r['encode_mbps']:>9.0f}"
        )
        line += "".join(f" {r['decode_gbps_per_thread'][str(t)]:>6.2f} GB/s" for t in threads)
        first = str(threads[0])
        line += f" {r['plain_decode_gbps_per_thread'][first]:>7.2f} GB/s"
        print(line)
    out = args.json_out or (
        ROOT / "bench" / "results" / f"codec_{socket.gethostname()}_{started:%Y%m%dT%H%M%SZ}.json"
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(
        json.dumps(
            {
                "command": argv_line,
                "date": started.isoformat(),
                "machine": _machine(),
                "codec": codec,
                "preset": args.preset,
                "rows": rows,
            },
            indent=1,
        )
    )
    print(f"\nwrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
