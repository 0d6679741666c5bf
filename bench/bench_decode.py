#!/usr/bin/env python3
"""Decode benchmark: a Llama-style model (random weights) generated greedily by several
systems, each in a fresh subprocess so that its peak RSS is its own.

    python bench/bench_decode.py --preset 1gb --budget-fraction 0.25 \
        --systems memory,tensorstream,tensorstream-direct,tensorstream-ram,accelerate-disk

Systems:
  memory               the whole model in memory (from_pretrained on CPU): the reference
  tensorstream         from_pretrained on CPU, then tensorstream.offload() under the budget
                       with the defaults (backend AUTO, no RAM tier): on the CPU the engine
                       reads in place through the page cache when the store fits in it
  tensorstream-direct  the same with backend PREAD: O_DIRECT reads of every block, every
                       step (what a model larger than the page cache gets)
  tensorstream-ram     backend AUTO with ram_cache_gb large enough to hold the model (a warm
                       RAM tier; O_DIRECT reads fill it)
  tensorstream-fp      as tensorstream, but loaded with tensorstream.from_pretrained(dir,
                       config) (the checkpoint is never materialised in this process)
  accelerate-cpu       (--device cuda only) accelerate's CPU offload: device_map="auto",
                       max_memory={gpu: budget, "cpu": plenty}: what does not fit on the GPU
                       stays in CPU RAM and is copied in for each forward
  accelerate-disk   transformers/accelerate disk offload: device_map="auto",
                    max_memory={"cpu": budget}, offload_folder=... (what does not fit in
                    the CPU budget goes to "disk")
  airllm, deepspeed not run here; the reason is recorded

Per system: prefill seconds for the prompt, decode tokens/s at batch 1 and at --batch,
peak RSS (VmHWM of the worker process: over its whole life, and over the timed part only,
after resetting it through /proc/self/clear_refs), the engine's counters where there is an
engine, and whether the greedy tokens equal those of `memory`. The roofline for a streamed
system is (bytes streamed per decode step) / (storage bandwidth measured in the same run).

The table goes to stdout, every number to bench/results/decode_<host>_<date>.json.
Public API only: tensorstream.Config, tensorstream.offload, tensorstream.get_model_statistics.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent

# hidden, intermediate, layers, heads, kv heads, vocab, default dtype, default prompt length
PRESETS: dict[str, dict[str, Any]] = {
    "tiny": dict(hidden=64, intermediate=176, layers=6, heads=4, kv_heads=4, vocab=128,
                 dtype="float32", prompt_len=16),
    # ~0.95 GB in bfloat16: 8 layers of 103 MB, embeddings and head of 66 MB each.
    "1gb": dict(hidden=2048, intermediate=5632, layers=8, heads=16, kv_heads=16, vocab=16000,
                dtype="bfloat16", prompt_len=512),
    # ~1.07 GB in float32: 16 layers of 54 MB, embeddings and head of 131 MB each (the
    # head is the largest single tensor: 12% of the model).
    "1gb-fp32": dict(hidden=1024, intermediate=2816, layers=16, heads=16, kv_heads=16,
                     vocab=32000, dtype="float32", prompt_len=64),
    "7b": dict(hidden=4096, intermediate=11008, layers=32, heads=32, kv_heads=32, vocab=32000,
               dtype="bfloat16", prompt_len=512),
    # The 7B shape with 16 of its 32 layers: 7.0 GB in bfloat16 (16 layers of 405 MB,
    # embeddings and head of 262 MB each); per layer what a 7B model streams, in half the
    # time (bench/gpu_run.sh's decode benchmark).
    "7b-16l": dict(hidden=4096, intermediate=11008, layers=16, heads=32, kv_heads=32,
                   vocab=32000, dtype="bfloat16", prompt_len=512),
    "13b": dict(hidden=5120, intermediate=13824, layers=40, heads=40, kv_heads=40, vocab=32000,
                dtype="bfloat16", prompt_len=512),
}  # fmt: skip

ALL_SYSTEMS = ["memory", "tensorstream", "tensorstream-direct", "tensorstream-ram",
               "tensorstream-fp", "accelerate-cpu", "accelerate-disk", "airllm",
               "deepspeed"]  # fmt: skip
TS_SYSTEMS = {"tensorstream", "tensorstream-direct", "tensorstream-ram", "tensorstream-fp"}
RUNNABLE = {"memory", "accelerate-cpu", "accelerate-disk"} | TS_SYSTEMS
# On a GPU, accelerate-disk keeps this much in CPU RAM (the rest of what misses the GPU
# budget goes to its offload folder).
ACCELERATE_DISK_CPU_BYTES = 1 << 30


# ---- helpers -------------------------------------------------------------------------------


def _proc_status_kb(field: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return None


def _reset_peak_rss() -> bool:
    """Resets VmHWM to the current RSS (Linux: write 5 to /proc/self/clear_refs)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _drop_cache(paths: list[Path]) -> int:
    """Drops the page-cache pages of every file under ``paths``; returns how many files."""
    count = 0
    for root in paths:
        files = [root] if root.is_file() else [p for p in root.rglob("*") if p.is_file()]
        for path in files:
            try:
                fd = os.open(path, os.O_RDONLY)
            except OSError:
                continue
            try:
                os.fdatasync(fd)
            except OSError:
                pass
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            os.close(fd)
            count += 1
    return count


def _versions() -> dict[str, str | None]:
    out: dict[str, str | None] = {"python": platform.python_version()}
    for name in ("torch", "transformers", "accelerate", "tensorstream"):
        try:
            module = __import__(name)
            out[name] = getattr(module, "__version__", "unknown")
        except Exception:  # noqa: BLE001 - recorded as missing
            out[name] = None
    return out


def _machine() -> dict[str, Any]:
    cpu = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem_kb = None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                mem_kb = int(line.split()[1])
    except OSError:
        pass
    return {
        "host": socket.gethostname(),
        "kernel": platform.release(),
        "cpu": cpu,
        "cpus": os.cpu_count(),
        "mem_total_gib": round(mem_kb / 2**20, 1) if mem_kb else None,
        "gpu": None,
    }


def _loadavg() -> list[float]:
    try:
        return [float(x) for x in Path("/proc/loadavg").read_text().split()[:3]]
    except OSError:
        return []


# ---- model ---------------------------------------------------------------------------------


def _model_dir(args: argparse.Namespace) -> Path:
    p = PRESETS[args.preset]
    shape = "_".join(str(p[k]) for k in ("hidden", "intermediate", "layers", "heads", "vocab"))
    return Path(args.workdir) / f"llama_{args.preset}_{shape}_{args.dtype}"


def ensure_model(args: argparse.Namespace) -> tuple[Path, int]:
    """Builds the random-weight model once (save_pretrained); returns its dir and bytes."""
    import torch  # noqa: PLC0415
    from transformers import LlamaConfig, LlamaForCausalLM  # noqa: PLC0415

    path = _model_dir(args)
    marker = path / "bench_model.json"
    if marker.exists():
        return path, json.loads(marker.read_text())["param_bytes"]
    p = PRESETS[args.preset]
    config = LlamaConfig(
        hidden_size=p["hidden"],
        intermediate_size=p["intermediate"],
        num_hidden_layers=p["layers"],
        num_attention_heads=p["heads"],
        num_key_value_heads=p["kv_heads"],
        vocab_size=p["vocab"],
        max_position_embeddings=max(2048, args.prompt_len + args.new_tokens + 8),
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    dtype = getattr(torch, args.dtype)
    # Built directly in the target dtype: a 7B model in float32 (27 GB) would not fit the
    # RAM of the machines this runs on.
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device("cpu"):
            model = LlamaForCausalLM(config)
    finally:
        torch.set_default_dtype(previous)
    model.eval()
    # Keep generation deterministic and quiet: no sampling defaults in generation_config.
    model.generation_config.do_sample = False
    param_bytes = sum(t.numel() * t.element_size() for t in model.parameters())
    tmp = path.with_name(path.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    (tmp / "bench_model.json").write_text(
        json.dumps({"preset": args.preset, "dtype": args.dtype, "param_bytes": param_bytes})
    )
    shutil.rmtree(path, ignore_errors=True)
    tmp.rename(path)
    del model
    return path, param_bytes


# ---- worker (one system, one fresh process) ------------------------------------------------


class _StepClock:
    """A logits processor that only records when each generation step's logits arrive: the
    first call follows the prefill forward, each later one a decode forward."""

    def __init__(self, on_step: Any = None, cuda: bool = False) -> None:
        self.times: list[float] = []
        self.on_step = on_step
        self.cuda = cuda

    def __call__(self, input_ids: Any, scores: Any) -> Any:
        if self.cuda:
            import torch  # noqa: PLC0415

            torch.cuda.synchronize()  # the logits are computed, not just queued
        self.times.append(time.perf_counter())
        if self.on_step is not None:
            self.on_step(len(self.times))
        return scores


def _generate(model: Any, ids: Any, new_tokens: int, stats_fn: Any) -> dict[str, Any]:
    import torch  # noqa: PLC0415
    from transformers import LogitsProcessorList  # noqa: PLC0415

    snapshots: dict[int, dict[str, Any]] = {}

    def on_step(n: int) -> None:
        if stats_fn is not None and n == 1:
            snapshots[1] = stats_fn()

    clock = _StepClock(on_step, cuda=ids.device.type == "cuda")
    before = stats_fn() if stats_fn is not None else None
    attention = torch.ones_like(ids)
    t0 = time.perf_counter()
    with torch.inference_mode():
        out = model.generate(
            ids,
            attention_mask=attention,
            max_new_tokens=new_tokens,
            min_new_tokens=new_tokens,
            do_sample=False,
            logits_processor=LogitsProcessorList([clock]),
            pad_token_id=0,
        )
    t_end = time.perf_counter()
    after = stats_fn() if stats_fn is not None else None
    steps = len(clock.times) - 1  # decode forwards timed (the first token comes from prefill)
    prefill_s = clock.times[0] - t0
    decode_s = clock.times[-1] - clock.times[0] if steps > 0 else 0.0
    batch = ids.shape[0]
    result: dict[str, Any] = {
        "batch": batch,
        "prompt_len": ids.shape[1],
        "new_tokens": new_tokens,
        "prefill_s": prefill_s,
        "decode_steps": steps,
        "decode_s": decode_s,
        "s_per_step": decode_s / steps if steps else None,
        # tokens generated across the batch per second of decode
        "decode_tok_s": batch * steps / decode_s if decode_s > 0 else None,
        "total_s": t_end - t0,
        "tokens": out[:, ids.shape[1] :].tolist(),
    }
    if before is not None and after is not None:
        mid = snapshots.get(1, before)
        keys = ("bytes_from_storage", "bytes_from_ram_tier", "bytes_from_page_cache",
                "stall_seconds")  # fmt: skip
        result["engine_prefill"] = {k: mid[k] - before[k] for k in keys if k in mid}
        result["engine_decode"] = {k: after[k] - mid[k] for k in keys if k in after}
        if steps:
            result["bytes_from_storage_per_step"] = (
                after["bytes_from_storage"] - mid["bytes_from_storage"]
            ) / steps
            result["bytes_from_ram_tier_per_step"] = (
                after.get("bytes_from_ram_tier", 0) - mid.get("bytes_from_ram_tier", 0)
            ) / steps
            result["bytes_from_page_cache_per_step"] = (
                after.get("bytes_from_page_cache", 0) - mid.get("bytes_from_page_cache", 0)
            ) / steps
            result["bytes_streamed_per_step"] = (
                result["bytes_from_storage_per_step"]
                + result["bytes_from_ram_tier_per_step"]
                + result["bytes_from_page_cache_per_step"]
            )
    return result


def _engine_snapshot(model: Any) -> Any:
    import tensorstream  # noqa: PLC0415

    def snap() -> dict[str, Any]:
        s = tensorstream.get_model_statistics(model)
        return {k: v for k, v in s.items() if isinstance(v, (int, float))}

    return snap


def worker(args: argparse.Namespace) -> dict[str, Any]:
    import torch  # noqa: PLC0415
    from transformers import AutoModelForCausalLM  # noqa: PLC0415

    system = args.worker
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    model_dir = Path(args.model_dir)
    dtype = getattr(torch, args.dtype)
    budget = int(args.budget_bytes)
    param_bytes = int(args.param_bytes)
    res: dict[str, Any] = {"system": system, "pid": os.getpid()}
    t_load = time.perf_counter()
    stats_fn = None
    drop: list[Path] = []
    if system == "memory":
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype)
        model.eval()
        if cuda:
            try:
                model.to(device)
            except torch.OutOfMemoryError as e:
                return {"system": system, "skipped": f"the model does not fit on {device}: {e}"}
    elif system in TS_SYSTEMS:
        import tensorstream  # noqa: PLC0415

        if system != "tensorstream-fp":
            model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype)
            model.eval()
        ram = 0.0
        if system == "tensorstream-ram":
            ram = param_bytes * 1.25 / 1e9 + 0.1
        config = tensorstream.Config(
            storage_path=str(Path(args.workdir) / "store"),
            vram_budget_gb=budget / 1e9,
            ram_cache_gb=ram,
            prefetch_strategy=args.prefetch,
            backend="pread" if system == "tensorstream-direct" else "auto",
            device=args.device,
        )
        res["config"] = {
            "vram_budget_gb": budget / 1e9,
            "ram_cache_gb": ram,
            "prefetch_strategy": args.prefetch,
            "backend": config.backend.value,
        }
        if system == "tensorstream-fp":
            model = tensorstream.from_pretrained(model_dir, config)
        else:
            model = tensorstream.offload(model, config)
        stats_fn = _engine_snapshot(model)
        s0 = tensorstream.get_model_statistics(model)
        res["store"] = s0.get("store")
        res["layers_offloaded"] = s0.get("layers_offloaded")
        res["layers_resident_in_plan"] = s0.get("layers_resident_in_plan")
        res["resident_param_bytes"] = s0.get("resident_param_bytes")
        res["read_path"] = {k: s0.get(k) for k in ("backend", "in_place", "backend_note")}
        drop += [Path(s0["store"]), Path(args.workdir) / "store"]
    elif system in ("accelerate-disk", "accelerate-cpu"):
        offload_dir = Path(args.workdir) / f"accelerate_offload_{os.getpid()}"
        shutil.rmtree(offload_dir, ignore_errors=True)
        if system == "accelerate-cpu" and not cuda:
            return {"system": system, "skipped": "CPU offload is an option of a GPU run"}
        try:
            model = AutoModelForCausalLM.from_pretrained(
                model_dir,
                dtype=dtype,
                device_map="auto",
                max_memory=_accelerate_max_memory(system, device, budget, param_bytes),
                offload_folder=str(offload_dir),
            )
        except Exception as e:  # noqa: BLE001 - recorded, the run goes on
            return {"system": system, "skipped": f"{type(e).__name__}: {e}"}
        model.eval()
        device_map = getattr(model, "hf_device_map", {}) or {}
        res["device_map_counts"] = {
            d: sum(1 for v in device_map.values() if str(v) == d)
            for d in sorted({str(v) for v in device_map.values()})
        }
        res["load_api"] = (
            'AutoModelForCausalLM.from_pretrained(dir, device_map="auto", '
            'max_memory={"cpu": budget}, offload_folder=dir)'
        )
        drop += [offload_dir, model_dir]
    else:
        raise SystemExit(f"unknown system {system}")
    res["load_s"] = time.perf_counter() - t_load
    res["device"] = str(device)
    res["peak_rss_after_load_kb"] = _proc_status_kb("VmHWM")
    res["rss_after_load_kb"] = {k: _proc_status_kb(k) for k in ("VmRSS", "RssAnon", "RssFile")}

    gen = torch.Generator().manual_seed(1234)
    vocab = PRESETS[args.preset]["vocab"]
    prompts = torch.randint(1, vocab, (max(args.batch, 1), args.prompt_len), generator=gen)
    prompts = prompts.to(device)
    # Warm-up (torch's first-call costs), untimed: 1 token from a 4-token prompt.
    with torch.inference_mode():
        model.generate(prompts[:1, :4], attention_mask=torch.ones_like(prompts[:1, :4]),
                       max_new_tokens=1, do_sample=False, pad_token_id=0)  # fmt: skip
    res["cache_files_dropped"] = _drop_cache(drop)
    res["peak_rss_reset"] = _reset_peak_rss()
    if cuda:
        torch.cuda.synchronize()
        res["device_bytes_after_load"] = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
    res["rss_before_run_kb"] = _proc_status_kb("VmRSS")
    res["batch1"] = _generate(model, prompts[:1], args.new_tokens, stats_fn)
    if args.batch > 1:
        _drop_cache(drop)
        res[f"batch{args.batch}"] = _generate(model, prompts, args.new_tokens, stats_fn)
    res["prefill_forward_s"] = _prefill_times(model, args, vocab, device)
    res["peak_rss_run_kb"] = _proc_status_kb("VmHWM")
    if cuda:
        res["peak_device_bytes"] = torch.cuda.max_memory_allocated(device)
    res["rss_end_kb"] = {k: _proc_status_kb(k) for k in ("VmRSS", "RssAnon", "RssFile")}
    res["peak_rss_total_kb"] = (
        max(res["peak_rss_after_load_kb"] or 0, res["peak_rss_run_kb"] or 0) or None
    )
    if stats_fn is not None:
        import tensorstream  # noqa: PLC0415

        s = tensorstream.get_model_statistics(model)
        res["engine_final"] = {
            k: s.get(k)
            for k in (
                "device_bytes_peak",
                "device_budget",
                "bytes_from_storage",
                "bytes_from_ram_tier",
                "bytes_from_page_cache",
                "stall_seconds",
                "storage_gbps",
                "prefetch_depth",
                "device_hits",
                "device_misses",
                "cache_hit_rate",
            )
        }
    if system == "accelerate-disk":
        shutil.rmtree(Path(args.workdir) / f"accelerate_offload_{os.getpid()}", ignore_errors=True)
    return res


def _accelerate_max_memory(
    system: str, device: Any, budget: int, param_bytes: int
) -> dict[Any, int]:
    """accelerate's max_memory for ``system`` under the weight ``budget`` on ``device``."""
    if device.type != "cuda":
        return {"cpu": budget}  # CPU-only: what does not fit goes to disk
    gpu = device.index or 0
    if system == "accelerate-cpu":
        return {gpu: budget, "cpu": 2 * param_bytes + (8 << 30)}
    return {gpu: budget, "cpu": ACCELERATE_DISK_CPU_BYTES}


def _prefill_times(model: Any, args: argparse.Namespace, vocab: int, device: Any) -> dict:
    """Seconds of one forward over a prompt of each --prefill-lens length (batch 1, no
    cache): the prefill cost on its own, where compute per layer is largest."""
    import torch  # noqa: PLC0415

    out: dict[str, float] = {}
    for length in [int(x) for x in str(args.prefill_lens or "").split(",") if x.strip()]:
        ids = torch.randint(1, vocab, (1, length), generator=torch.Generator().manual_seed(7))
        ids = ids.to(device)
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        with torch.inference_mode():
            model(ids, use_cache=False)
        if device.type == "cuda":
            torch.cuda.synchronize()
        out[str(length)] = time.perf_counter() - t0
    return out


# ---- storage bandwidth (roofline) ----------------------------------------------------------


def _find_native() -> str | None:
    explicit = os.environ.get("TENSORSTREAM_BIN")
    if explicit:
        return explicit
    on_path = shutil.which("tensorstream-native") or None
    for cand in sorted(ROOT.glob("build/*/tensorstream")):
        if cand.is_file() and os.access(cand, os.X_OK):
            return str(cand)
    return on_path


def storage_bandwidth(store: Path, device: str = "cpu", repeat: int = 3) -> dict[str, Any]:
    """GB/s of a plain sequential O_DIRECT read of ``store`` (the native bench-io's
    reference row when the binary is there; a Python O_DIRECT loop otherwise) and, for a
    CUDA ``device``, the pinned host-to-device copy bandwidth (``h2d_gbps``)."""
    native = _find_native()
    if native:
        on = device if device.startswith("cuda") else "none"
        cmd = [native, "bench-io", str(store), "--json", "--no-fio", "--repeat", str(repeat),
               "--device", on, "--backends", "pread"]  # fmt: skip
        try:
            p = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
            data = json.loads(p.stdout)
            ref = ((data.get("reference") or {}).get("odirect_read") or {}).get("gbps")
            rows = {k: v.get("gbps") for k, v in (data.get("backends") or {}).items()}
            best = max([v for v in (ref, *rows.values()) if v] or [0.0]) or None
            h2d = ((data.get("reference") or {}).get("pinned_h2d") or {}).get("gbps")
            if best:
                # The best storage reference (as in docs/benchmarks.md): the faster of the
                # single-thread O_DIRECT read and the pread backend, medians of `repeat`.
                return {"method": " ".join(cmd), "o_direct_gbps": ref, "backends_gbps": rows,
                        "bytes": data.get("bytes"), "gbps": best, "h2d_gbps": h2d}  # fmt: skip
            return {"method": " ".join(cmd), "raw": data, "gbps": None}
        except Exception as e:  # noqa: BLE001 - fall back to Python
            native_error = f"{type(e).__name__}: {e}"
    else:
        native_error = "native tensorstream binary not found"
    import mmap  # noqa: PLC0415

    _drop_cache([store])
    size = 8 << 20
    buf = mmap.mmap(-1, size)
    fd = os.open(store, os.O_RDONLY | getattr(os, "O_DIRECT", 0))
    total = 0
    t0 = time.perf_counter()
    try:
        while True:
            n = os.readv(fd, [buf])
            total += n
            if n < size:
                break
    finally:
        os.close(fd)
    elapsed = time.perf_counter() - t0
    return {"method": "python O_DIRECT readv 8 MiB", "native_error": native_error,
            "bytes": total, "gbps": total / elapsed / 1e9}  # fmt: skip


# ---- driver --------------------------------------------------------------------------------


def _not_run(system: str) -> str:
    if system == "airllm":
        try:
            d = tempfile.mkdtemp()
            p = subprocess.run(
                [sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", d, "airllm"],
                capture_output=True, text=True, timeout=60,
            )  # fmt: skip
            exists = p.returncode == 0
            shutil.rmtree(d, ignore_errors=True)
        except Exception:  # noqa: BLE001
            exists = False
        return (
            "not run: airllm is on PyPI but needs a CUDA GPU (and optimum/bitsandbytes); "
            "no GPU here"
            if exists
            else "not run: airllm could not be fetched from the package index here"
        )
    if system == "deepspeed":
        return (
            "not run: DeepSpeed ZeRO-Inference NVMe offload needs CUDA (and a compiled "
            "async_io op); no GPU here, heavy dependencies not installed"
        )
    return "not run: unknown system"


def _median(values: list[float | None]) -> float | None:
    vals = [v for v in values if v is not None]
    return statistics.median(vals) if vals else None


def summarise(runs: list[dict[str, Any]], batch: int) -> dict[str, Any]:
    def pick(key: str, sub: str | None = None) -> float | None:
        out = []
        for r in runs:
            src = r.get(sub) if sub else r
            out.append(src.get(key) if isinstance(src, dict) else None)
        return _median(out)

    bk = f"batch{batch}"
    return {
        "prefill_s_b1": pick("prefill_s", "batch1"),
        "decode_tok_s_b1": pick("decode_tok_s", "batch1"),
        "s_per_step_b1": pick("s_per_step", "batch1"),
        f"prefill_s_b{batch}": pick("prefill_s", bk),
        f"decode_tok_s_b{batch}": pick("decode_tok_s", bk),
        "peak_rss_total_mb": (pick("peak_rss_total_kb") or 0) / 1024 or None,
        "peak_rss_run_mb": (pick("peak_rss_run_kb") or 0) / 1024 or None,
        "bytes_streamed_per_step_b1": pick("bytes_streamed_per_step", "batch1"),
        "bytes_from_storage_per_step_b1": pick("bytes_from_storage_per_step", "batch1"),
        "bytes_from_ram_tier_per_step_b1": pick("bytes_from_ram_tier_per_step", "batch1"),
        "peak_device_mb": (pick("peak_device_bytes") or 0) / 2**20 or None,
        "prefill_forward_s": {
            k: _median([(r.get("prefill_forward_s") or {}).get(k) for r in runs])
            for k in sorted({k for r in runs for k in (r.get("prefill_forward_s") or {})})
        },
        "device_bytes_peak": _median(
            [(r.get("engine_final") or {}).get("device_bytes_peak") for r in runs]
        ),
        "load_s": pick("load_s"),
    }


def _roofline_seconds(sm: dict[str, Any], bandwidth: dict[str, Any], device: str) -> float | None:
    storage = sm.get("bytes_from_storage_per_step_b1") or 0
    tier = sm.get("bytes_from_ram_tier_per_step_b1") or 0
    streamed = sm.get("bytes_streamed_per_step_b1") or 0
    disk = bandwidth.get("gbps")
    if not device.startswith("cuda"):
        if storage and disk and storage >= 0.5 * streamed:
            return storage / (disk * 1e9)
        return None
    h2d = bandwidth.get("h2d_gbps")
    if not h2d or not (storage or tier):
        return None
    link = min(disk, h2d) if disk else h2d
    return storage / (link * 1e9) + tier / (h2d * 1e9)


def _fmt(v: Any, spec: str) -> str:
    return "—" if v is None else format(v, spec)


def _preset_param_bytes(args: argparse.Namespace) -> int:
    """Parameter bytes of the preset's model, counted on the meta device (nothing allocated)."""
    import torch  # noqa: PLC0415
    from transformers import LlamaConfig, LlamaForCausalLM  # noqa: PLC0415

    p = PRESETS[args.preset]
    config = LlamaConfig(
        hidden_size=p["hidden"], intermediate_size=p["intermediate"],
        num_hidden_layers=p["layers"], num_attention_heads=p["heads"],
        num_key_value_heads=p["kv_heads"], vocab_size=p["vocab"], tie_word_embeddings=False,
    )  # fmt: skip
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    size = torch.empty((), dtype=getattr(torch, args.dtype)).element_size()
    return sum(t.numel() for t in model.parameters()) * size


def _budget_bytes(args: argparse.Namespace, param_bytes: int) -> int:
    """The weight budget: --budget-gb when given (then --budget-fraction is set to match),
    else --budget-fraction of the model."""
    if args.budget_gb:
        budget = int(args.budget_gb * 1e9)
        args.budget_fraction = budget / param_bytes
        return budget
    return int(param_bytes * args.budget_fraction)


def dry_run(args: argparse.Namespace, systems: list[str], argv_line: str) -> int:
    """What each system would run under these arguments, checked as far as possible without
    the device: the budget, each system's load call and configuration (tensorstream.Config
    is constructed, so a bad field fails here), and what this machine lacks."""
    import torch  # noqa: PLC0415

    param_bytes = _preset_param_bytes(args)
    budget = _budget_bytes(args, param_bytes)
    device = torch.device(args.device)
    plan: dict[str, Any] = {}
    for system in systems:
        if system not in RUNNABLE:
            plan[system] = {"note": _not_run(system)}
            continue
        if system == "memory":
            plan[system] = {"load": f"AutoModelForCausalLM.from_pretrained(dir).to({device})"}
        elif system in TS_SYSTEMS:
            import tensorstream  # noqa: PLC0415

            ram = param_bytes * 1.25 / 1e9 + 0.1 if system == "tensorstream-ram" else 0.0
            config = tensorstream.Config(
                vram_budget_gb=budget / 1e9,
                ram_cache_gb=ram,
                prefetch_strategy=args.prefetch,
                backend="pread" if system == "tensorstream-direct" else "auto",
                device=args.device,
            )
            call = "from_pretrained(dir, config)" if system == "tensorstream-fp" else (
                "offload(AutoModelForCausalLM.from_pretrained(dir), config)")  # fmt: skip
            plan[system] = {"load": f"tensorstream.{call}", "config": config.to_dict()}
        else:
            if system == "accelerate-cpu" and device.type != "cuda":
                plan[system] = {"note": "not run: CPU offload is an option of a GPU run"}
                continue
            memory = _accelerate_max_memory(system, device, budget, param_bytes)
            plan[system] = {
                "load": 'AutoModelForCausalLM.from_pretrained(dir, device_map="auto", '
                "max_memory=..., offload_folder=...)",
                "max_memory": {str(k): v for k, v in memory.items()},
            }
    lacks = []
    if device.type == "cuda" and not torch.cuda.is_available():
        lacks.append("no CUDA device visible to torch: only a dry run is possible here")
    result = {
        "benchmark": "bench_decode",
        "dry_run": True,
        "command": argv_line,
        "device": args.device,
        "model": {"preset": args.preset, "dtype": args.dtype, "param_bytes": param_bytes},
        "budget_bytes": budget,
        "prompt_len": args.prompt_len,
        "prefill_lens": [int(x) for x in args.prefill_lens.split(",") if x.strip()],
        "new_tokens": args.new_tokens,
        "batch": args.batch,
        "plan": plan,
        "machine": _machine(),
        "lacks": lacks,
    }
    print(json.dumps(result, indent=1, default=str))
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(result, indent=1, default=str))
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", choices=sorted(PRESETS), default="1gb")
    ap.add_argument("--dtype", choices=["float32", "bfloat16"], default=None)
    ap.add_argument("--budget-fraction", type=float, default=None, help="0.25 (--smoke: 0.5)")
    ap.add_argument(
        "--budget-gb", type=float, default=None, help="the budget in GB (overrides the fraction)"
    )
    ap.add_argument(
        "--bandwidth-repeat",
        type=int,
        default=3,
        help="repeats of the storage-bandwidth measurement (bench-io) after the systems (3)",
    )
    ap.add_argument(
        "--systems",
        default="memory,tensorstream,tensorstream-direct,tensorstream-ram,accelerate-disk",
    )
    ap.add_argument("--repeat", type=int, default=1)
    ap.add_argument("--workdir", default=str(ROOT / "build/bench-data/decode"))
    ap.add_argument("--json-out", default=None)
    ap.add_argument("--prompt-len", type=int, default=None)
    ap.add_argument("--new-tokens", type=int, default=16)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--prefetch", default="adaptive", choices=["none", "next_layer", "adaptive"])
    ap.add_argument("--smoke", action="store_true", help="tiny model, 2 new tokens (seconds)")
    ap.add_argument("--threads", type=int, default=None, help="torch threads in each worker")
    ap.add_argument("--device", default="cpu", help="cpu (default) or cuda[:N]")
    ap.add_argument(
        "--prefill-lens",
        default=None,
        help="prompt lengths whose single forward is timed, e.g. 512,2048 (cuda default)",
    )
    ap.add_argument(
        "--dry-run",
        action="store_true",
        help="print and record what each system would run (no model is built); works "
        "without the device, so the GPU variant can be checked on a CPU machine",
    )
    # internal: run one system in this process
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--worker-out", help=argparse.SUPPRESS)
    ap.add_argument("--model-dir", help=argparse.SUPPRESS)
    ap.add_argument("--budget-bytes", help=argparse.SUPPRESS)
    ap.add_argument("--param-bytes", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.smoke:
        args.preset = "tiny"
        args.new_tokens = 2
        args.batch = 2
        # The tiny model's resident embeddings are a large share of it: 0.25 is below the
        # engine's minimum (resident + two slots); 0.5 still streams most layers.
        args.budget_fraction = args.budget_fraction or 0.5
    args.budget_fraction = args.budget_fraction or 0.25
    if args.device != "cpu" and not args.device.startswith("cuda"):
        ap.error(f"--device {args.device!r}: cpu or cuda[:N]")
    if args.prefill_lens is None:
        args.prefill_lens = "512,2048" if args.device.startswith("cuda") and not args.smoke else ""
    preset = PRESETS[args.preset]
    args.dtype = args.dtype or preset["dtype"]
    args.prompt_len = args.prompt_len or preset["prompt_len"]

    if args.worker:
        if args.threads:
            import torch  # noqa: PLC0415

            torch.set_num_threads(args.threads)
        result = worker(args)
        Path(args.worker_out).write_text(json.dumps(result))
        return 0

    argv_line = " ".join(["python", *sys.argv]) if argv is None else " ".join(argv)
    systems = [s.strip() for s in args.systems.split(",") if s.strip()]
    for s in systems:
        if s not in ALL_SYSTEMS:
            ap.error(f"unknown system '{s}' (choose from {', '.join(ALL_SYSTEMS)})")
    if args.dry_run:
        return dry_run(args, systems, argv_line)
    Path(args.workdir).mkdir(parents=True, exist_ok=True)
    t_start = time.time()
    load_start = _loadavg()
    model_dir, param_bytes = ensure_model(args)
    budget = _budget_bytes(args, param_bytes)
    # The tiny model's blocks are smaller than the default min_layer_size: nothing would
    # stream. Its budget is fine as a fraction; the smoke run is a correctness check.
    print(
        f"model {model_dir} ({param_bytes / 1e9:.3f} GB params, {args.dtype}); "
        f"budget {budget / 1e9:.3f} GB ({args.budget_fraction:.0%}); "
        f"prompt {args.prompt_len}, {args.new_tokens} new tokens, batch 1 and {args.batch}",
        flush=True,
    )

    runs: dict[str, list[dict[str, Any]]] = {s: [] for s in systems}
    notes: dict[str, str] = {}
    order = [s for s in systems if s in RUNNABLE]
    for s in systems:
        if s not in RUNNABLE:
            notes[s] = _not_run(s)
    for rep in range(args.repeat):
        rot = order[rep % len(order) :] + order[: rep % len(order)] if order else []
        for system in rot:
            with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as tf:
                out_path = tf.name
            cmd = [
                sys.executable, str(Path(__file__).resolve()), "--worker", system,
                "--worker-out", out_path, "--model-dir", str(model_dir),
                "--budget-bytes", str(budget), "--param-bytes", str(param_bytes),
                "--preset", args.preset, "--dtype", args.dtype, "--workdir", args.workdir,
                "--prompt-len", str(args.prompt_len), "--new-tokens", str(args.new_tokens),
                "--batch", str(args.batch), "--prefetch", args.prefetch,
                "--device", args.device, "--prefill-lens", args.prefill_lens,
            ]  # fmt: skip
            if args.threads:
                cmd += ["--threads", str(args.threads)]
            t0 = time.perf_counter()
            p = subprocess.run(cmd, capture_output=True, text=True)
            wall = time.perf_counter() - t0
            if p.returncode != 0:
                notes[system] = f"failed (rc {p.returncode}): {p.stderr.strip()[-800:]}"
                print(f"[{system}] FAILED rc={p.returncode}\n{p.stderr[-2000:]}", flush=True)
                continue
            r = json.loads(Path(out_path).read_text())
            os.unlink(out_path)
            r["wall_s"] = wall
            r["repeat"] = rep
            if "skipped" in r:
                notes[system] = f"not run: {r['skipped']}"
                print(f"[{system}] skipped: {r['skipped']}", flush=True)
                continue
            runs[system].append(r)
            b1 = r["batch1"]
            print(
                f"[{system}] rep {rep}: prefill {b1['prefill_s']:.2f} s, "
                f"decode {_fmt(b1['decode_tok_s'], '.2f')} tok/s, wall {wall:.1f} s",
                flush=True,
            )
            if args.json_out:
                # What is measured so far survives a run cut short by a time limit.
                Path(str(args.json_out) + ".partial").write_text(
                    json.dumps(
                        {"partial": True, "command": argv_line, "runs": runs, "notes": notes},
                        indent=1,
                    )
                )

    # Storage bandwidth of the store, same run (after the systems, so it does not warm them).
    bandwidth = None
    stores = [Path(r["store"]) for s in runs.values() for r in s if r.get("store")]
    if not any(p.is_file() for p in stores):
        stores += sorted((Path(args.workdir) / "store").glob("*.tstore"))
    store = next((p for p in stores if p.is_file()), None)
    if store:
        bandwidth = storage_bandwidth(store, args.device, args.bandwidth_repeat)

    ref = runs.get("memory", [])
    ref_tokens = {k: ref[0][k]["tokens"] for k in ref[0] if k.startswith("batch")} if ref else {}
    summary: dict[str, Any] = {}
    bk = f"batch{args.batch}"
    for system in systems:
        if not runs.get(system):
            summary[system] = {"note": notes.get(system, "no result")}
            continue
        sm = summarise(runs[system], args.batch)
        if ref_tokens:
            sm["tokens_match_b1"] = all(
                r["batch1"]["tokens"] == ref_tokens["batch1"] for r in runs[system]
            )
            if bk in ref_tokens:
                sm[f"tokens_match_b{args.batch}"] = all(
                    r.get(bk, {}).get("tokens") == ref_tokens[bk] for r in runs[system]
                )
            sm["tokens_match"] = all(v for k, v in sm.items() if k.startswith("tokens_match_"))
        else:
            sm["tokens_match"] = None
        # The roofline: the time the step's streamed bytes need on their slowest link. On the
        # CPU that link is storage, and only where most bytes come from it (bytes served by
        # the page cache or a RAM tier cross no storage link). On a GPU: storage bytes at
        # min(storage, pinned H2D), RAM-tier bytes at pinned H2D.
        io_s = _roofline_seconds(sm, bandwidth or {}, args.device)
        if io_s and sm.get("s_per_step_b1"):
            sm["roofline_s_per_step"] = io_s
            sm["fraction_of_roofline"] = io_s / sm["s_per_step_b1"]
        summary[system] = sm

    now = dt.datetime.now(dt.timezone.utc)
    result = {
        "benchmark": "bench_decode",
        "date_utc": now.isoformat(timespec="seconds"),
        "command": argv_line,
        "cwd": os.getcwd(),
        "machine": _machine(),
        "loadavg_start": load_start,
        "loadavg_end": _loadavg(),
        "versions": _versions(),
        "model": {
            "preset": args.preset,
            "shape": preset,
            "dtype": args.dtype,
            "param_bytes": param_bytes,
            "dir": str(model_dir),
        },
        "budget_bytes": budget,
        "budget_fraction": args.budget_fraction,
        "prompt_len": args.prompt_len,
        "new_tokens": args.new_tokens,
        "batch": args.batch,
        "repeat": args.repeat,
        "storage_bandwidth": bandwidth,
        "summary": summary,
        "notes": notes,
        "runs": runs,
        "elapsed_s": time.time() - t_start,
        "definitions": {
            "decode_tok_s": "batch x decode steps / seconds from the first to the last "
            "generated token's logits (prefill excluded)",
            "prefill_s": "from generate() call to the first token's logits",
            "peak_rss_total": "VmHWM of the worker over its whole life (load included)",
            "peak_rss_run": "VmHWM over the timed part only (reset through clear_refs)",
            "bytes_streamed_per_step": "engine bytes_from_storage + bytes_from_ram_tier + "
            "bytes_from_page_cache during decode / decode steps (batch 1)",
            "fraction_of_roofline": "(bytes from storage per step / storage GB/s) / measured "
            "seconds per step; only where most streamed bytes come from storage",
        },
    }
    if args.json_out:
        out = Path(args.json_out)
    else:
        host = socket.gethostname().split(".")[0]
        out = ROOT / "bench/results" / f"decode_{host}_{now.strftime('%Y%m%dT%H%M%SZ')}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    Path(str(out) + ".partial").unlink(missing_ok=True)

    b = args.batch
    header = (
        f"| system | prefill s | tok/s b1 | tok/s b{b} | peak RSS MB (run / total) "
        "| streamed MB/step (from storage) | roofline | tokens match |"
    )
    print()
    print(header)
    print("|" + "---|" * 8)
    for system in systems:
        sm = summary[system]
        if "note" in sm:
            print(f"| {system} | {sm['note'][:90]} |")
            continue
        streamed = sm.get("bytes_streamed_per_step_b1")
        storage = sm.get("bytes_from_storage_per_step_b1")
        streamed_text = (
            f"{_fmt(streamed / 1e6, '.0f')} ({_fmt((storage or 0) / 1e6, '.0f')})"
            if streamed
            else "—"
        )
        rss = f"{_fmt(sm['peak_rss_run_mb'], '.0f')} / {_fmt(sm['peak_rss_total_mb'], '.0f')}"
        print(
            f"| {system} | {_fmt(sm['prefill_s_b1'], '.2f')} | "
            f"{_fmt(sm['decode_tok_s_b1'], '.2f')} | {_fmt(sm.get(f'decode_tok_s_b{b}'), '.2f')} | "
            f"{rss} | {streamed_text} | "
            f"{_fmt(sm.get('fraction_of_roofline'), '.2f')} | {sm.get('tokens_match')} |"
        )
    if bandwidth:
        print(f"\nstorage: {_fmt(bandwidth.get('gbps'), '.2f')} GB/s ({bandwidth['method']})")
    print(f"load average start {load_start}, end {_loadavg()}")
    print(f"JSON: {out}")
    failed = [s for s in systems if s in RUNNABLE and not runs.get(s) and "not run" not in
              notes.get(s, "")]  # fmt: skip
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
