#!/usr/bin/env python3
"""Decode tokens/s of a streamed model from an uncompressed and from a compressed store, on
this machine's disk and on a slower one, in the same run.

    sudo python bench/bench_compressed_decode.py --preset 1gb --level 3 \
        --budget-fraction 0.25 --throttle-mbps 1000,500 --repeat 3

A Llama-style bf16 model (random weights, bench_decode.py's presets and checkpoint) is
streamed with ``tensorstream.offload()`` on the CPU under a budget, once from the store
written without compression and once from the store written with ``compression_level``
(``Config(compression_enabled=True)``), each in a fresh subprocess, and generates greedily.

Cold reads. Every system reads with backend PREAD, whose requests are O_DIRECT: every fill of
every decode step reads its bytes from the device, none from the page cache (the page cache
of the store files is also dropped with posix_fadvise(DONTNEED) before each timed generate;
with O_DIRECT it holds nothing of them anyway). ``--page-cache`` adds the opposite case:
backend AUTO with the stores in the page cache (the raw store is then read in place).

Storage. ``disk``: the stores in ``--workdir`` on this machine's disk. ``--throttle-mbps N``
(root only): a real slower device -- an ext4 file system on a loop device (``losetup
--direct-io=on``, backed by an image file in ``--workdir``), whose reads the block layer
throttles to N MB/s for the benchmark's worker processes (cgroup v1 ``blkio.throttle.
read_bps_device`` on the loop device, or cgroup v2 ``io.max``). Nothing is simulated: when
the throttle cannot be set up, the run says why and measures the disk only. The loop device,
mount, image and cgroup are removed afterwards.

Per system and storage: decode tokens/s (batch 1), prefill seconds, what the engine read
per decode step (stored bytes, compressed bytes, decoded bytes), its decode seconds, I/O
seconds and stall seconds per step, its decode_note, and whether the greedy tokens equal
those of the uncompressed store. The storage bandwidth of each storage is measured in the
same run (``tensorstream bench-io`` on the raw store inside the same cgroup). Medians of
``--repeat`` runs, systems interleaved. The table goes to stdout, everything to
``bench/results/compressed_decode_<host>_<date>.json``.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import resource
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))

import bench_decode as bd  # noqa: E402  - its presets, checkpoint, timing and machine facts

SYSTEMS = ("raw", "compressed")
# A run is "quiet" when the other processes of the machine used less than this many cores
# during it (measured from /proc/stat less the worker's own CPU time).
QUIET_CORES = 0.25
ENGINE_KEYS = (
    "bytes_from_storage",
    "bytes_read_compressed",
    "bytes_decoded",
    "bytes_from_page_cache",
    "decode_seconds",
    "io_seconds",
    "stall_seconds",
    "fill_seconds",
    "fills",
)


# ---- worker: one system on one storage, in a fresh process ---------------------------------


def worker(spec: dict[str, Any]) -> dict[str, Any]:
    import torch  # noqa: PLC0415
    from transformers import AutoModelForCausalLM  # noqa: PLC0415

    import tensorstream as ts  # noqa: PLC0415

    torch.manual_seed(0)
    torch.set_num_threads(spec["torch_threads"])
    model = AutoModelForCausalLM.from_pretrained(spec["model_dir"], dtype=torch.bfloat16)
    model.eval()
    model.generation_config.do_sample = False
    compressed = spec["system"] == "compressed"
    config = ts.Config(
        storage_path=spec["storage"],
        vram_budget_gb=spec["budget"] / 1e9,
        ram_cache_gb=0,
        device="cpu",
        backend=spec["backend"],
        compression_enabled=compressed,
        compression_level=spec["level"],
    )
    t0 = time.perf_counter()
    ts.offload(model, config)
    offload_s = time.perf_counter() - t0
    generator = torch.Generator().manual_seed(1234)
    ids = torch.randint(0, model.config.vocab_size, (1, spec["prompt_len"]), generator=generator)
    bd._generate(model, ids, 1, None)  # warm-up: allocations, the learned order
    store = Path(ts.get_model_statistics(model)["store"])
    if spec["drop_cache"]:
        bd._drop_cache([store])
    snap = bd._engine_snapshot(model)
    before = snap()
    gen = bd._generate(model, ids, spec["new_tokens"], snap)
    after = snap()
    stats = ts.get_model_statistics(model)
    delta = {k: after.get(k, 0) - before.get(k, 0) for k in ENGINE_KEYS}
    model.cleanup_tensorstream()
    header = ts.read_ts_header(store)
    return {
        "system": spec["system"],
        "storage": spec["storage_name"],
        "store": str(store),
        "store_file_bytes": store.stat().st_size,
        "store_ratio": (header.get("compression") or {}).get("ratio", 1.0),
        "offload_s": offload_s,
        "prefill_s": gen["prefill_s"],
        "decode_tok_s": gen["decode_tok_s"],
        "s_per_step": gen["s_per_step"],
        "tokens": gen["tokens"],
        "engine_generate": delta,
        # Each of the new tokens is one forward (the prefill and the decode steps): one pass.
        "per_step": {k: delta[k] / spec["new_tokens"] for k in ENGINE_KEYS},
        "decode_note": stats["decode_note"],
        "backend": stats["backend"],
        "backend_note": stats["backend_note"],
        "in_place": stats["in_place"],
        "decode_threads": stats["decode_threads"],
        "decoded_copy_bytes": stats["decoded_copy_bytes"],
        "decoded_copy_seconds": stats["decoded_copy_seconds"],
        "direct": [f["direct"] for f in stats["io"]["files"]],
    }


def bandwidth_worker(spec: dict[str, Any]) -> dict[str, Any]:
    return bd.storage_bandwidth(Path(spec["store"]), "cpu", repeat=spec["repeat"])


def tier_worker(spec: dict[str, Any]) -> dict[str, Any]:
    """What the RAM tier's choice costs: the engine streams the compressed store with a tier
    that holds every unit (decoded, as it does); pass 1 fills read and decode (tier misses),
    pass 2 fills copy out of the tier (hits). A tier of compressed units would decode on every
    hit instead: `tensorstream bench-codec` gives that rate (decoding from memory into
    memory) on the same store, in the same process tree."""
    from tensorstream import _core  # noqa: PLC0415

    options = {
        "device": "cpu",
        "device_budget": spec["budget"],
        "ram_cache_bytes": 2 * spec["param_bytes"],
        "cache_policy": "lru",
        "backend": "pread",
        "prefetch": "none",
        "compressed_reads": "decode",
    }
    engine = _core.Engine(spec["store"], options, None, None)
    passes = []
    for _ in range(2):
        before = engine.stats()
        for b in range(engine.block_count):
            engine.acquire(b)
            engine.release(b)
        after = engine.stats()
        moved = after["bytes_to_device"] - before["bytes_to_device"]
        seconds = after["fill_seconds"] - before["fill_seconds"]
        passes.append(
            {
                "bytes": moved,
                "fill_seconds": seconds,
                "fill_gbps": moved / seconds / 1e9 if seconds > 0 else None,
                "from_ram_tier": after["bytes_from_ram_tier"] - before["bytes_from_ram_tier"],
                "decoded": after["bytes_decoded"] - before["bytes_decoded"],
            }
        )
    engine.close()
    native = bd._find_native()
    codec = None
    if native:
        p = subprocess.run(
            [native, "bench-codec", spec["store"], "--levels", str(spec["level"]),
             "--threads", "1,2", "--max-mib", "64", "--json"],
            capture_output=True, text=True, timeout=600,
        )  # fmt: skip
        if p.returncode == 0:
            codec = json.loads(p.stdout)
    return {"misses": passes[0], "hits": passes[1], "bench_codec": codec}


# ---- the throttled device --------------------------------------------------------------------


class ThrottledDevice:
    """An ext4 file system on a loop device whose reads are throttled for the processes put
    in its cgroup. ``setup()`` returns None or why it is not possible here."""

    def __init__(self, workdir: Path, image_bytes: int) -> None:
        self.workdir = workdir
        self.image = workdir / "throttle.img"
        self.image_bytes = image_bytes
        self.loop: str | None = None
        self.mount: Path | None = None
        self.cgroups: dict[int, Path] = {}
        self.majmin = ""
        self.how = ""

    def setup(self) -> str | None:
        if os.geteuid() != 0:
            return "not root: a loop device and a blkio cgroup need root"
        for tool in ("losetup", "mkfs.ext4", "mount", "umount"):
            if shutil.which(tool) is None:
                return f"{tool} not found"
        try:
            self.workdir.mkdir(parents=True, exist_ok=True)
            with open(self.image, "wb") as f:
                f.truncate(self.image_bytes)
            self.loop = subprocess.run(
                ["losetup", "-f", "--show", "--direct-io=on", str(self.image)],
                check=True, capture_output=True, text=True,
            ).stdout.strip()  # fmt: skip
            subprocess.run(["mkfs.ext4", "-q", "-F", self.loop], check=True, capture_output=True)
            self.mount = Path(tempfile.mkdtemp(prefix="ts-throttled-"))
            subprocess.run(["mount", self.loop, str(self.mount)], check=True, capture_output=True)
            rdev = os.stat(self.loop).st_rdev
            self.majmin = f"{os.major(rdev)}:{os.minor(rdev)}"
        except (OSError, subprocess.CalledProcessError) as e:
            err = getattr(e, "stderr", "") or ""
            return f"loop device setup failed: {e} {err}".strip()
        if Path("/sys/fs/cgroup/blkio").is_dir():
            self.how = "cgroup v1 blkio.throttle.read_bps_device"
        elif Path("/sys/fs/cgroup/cgroup.controllers").is_file():
            self.how = "cgroup v2 io.max"
        else:
            return "no blkio (v1) or io (v2) cgroup controller mounted"
        return None

    def cgroup(self, mbps: int) -> Path:
        """The cgroup whose reads of the loop device run at ``mbps`` MB/s (made once)."""
        if mbps in self.cgroups:
            return self.cgroups[mbps]
        limit = mbps * 1_000_000
        if self.how.startswith("cgroup v1"):
            path = Path("/sys/fs/cgroup/blkio") / f"ts-bench-{os.getpid()}-{mbps}"
            path.mkdir(exist_ok=True)
            (path / "blkio.throttle.read_bps_device").write_text(f"{self.majmin} {limit}\n")
        else:
            path = Path("/sys/fs/cgroup") / f"ts-bench-{os.getpid()}-{mbps}"
            path.mkdir(exist_ok=True)
            (path / "io.max").write_text(f"{self.majmin} rbps={limit}\n")
        self.cgroups[mbps] = path
        return path

    def teardown(self) -> None:
        for path in self.cgroups.values():
            try:
                path.rmdir()
            except OSError:
                pass
        if self.mount is not None:
            subprocess.run(["umount", str(self.mount)], capture_output=True)
            shutil.rmtree(self.mount, ignore_errors=True)
        if self.loop:
            subprocess.run(["losetup", "-d", self.loop], capture_output=True)
        self.image.unlink(missing_ok=True)


def _busy_seconds() -> float:
    """CPU seconds all processes of the machine have run (user, nice, system, irq, softirq,
    steal of /proc/stat's cpu line)."""
    fields = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
    user, nice, system, _idle, _iowait, irq, softirq, steal = (int(x) for x in fields[:8])
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


def _run_worker(mode: str, spec: dict[str, Any], cgroup: Path | None, timeout: int) -> Any:
    def join() -> None:
        if cgroup is not None:
            (cgroup / "cgroup.procs").write_text(str(os.getpid()))

    env = dict(os.environ)
    env.pop("PYTHONPATH", None)
    # What else ran meanwhile: the machine's CPU time less the worker's, per second of wall
    # time (the VM's cores are shared; a run beside a busy neighbour is a different run).
    busy0, child0, wall0 = (
        _busy_seconds(),
        resource.getrusage(resource.RUSAGE_CHILDREN),
        time.time(),
    )
    p = subprocess.run(
        [sys.executable, __file__, f"--{mode}", json.dumps(spec)],
        capture_output=True, text=True, timeout=timeout, env=env, preexec_fn=join,
        stdin=subprocess.DEVNULL,
    )  # fmt: skip
    child1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    mine = (child1.ru_utime + child1.ru_stime) - (child0.ru_utime + child0.ru_stime)
    wall = time.time() - wall0
    if p.returncode != 0:
        raise RuntimeError(f"{mode} {spec.get('system', '')} failed:\n{p.stdout}\n{p.stderr}")
    result = json.loads(p.stdout.strip().splitlines()[-1])
    result["others_cores"] = max(_busy_seconds() - busy0 - mine, 0.0) / wall if wall > 0 else None
    return result


# ---- driver --------------------------------------------------------------------------------


def _median(values: list[float]) -> float | None:
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--bandwidth-worker", help=argparse.SUPPRESS)
    ap.add_argument("--tier-worker", help=argparse.SUPPRESS)
    ap.add_argument("--preset", default="1gb", choices=sorted(bd.PRESETS))
    ap.add_argument("--level", type=int, default=3, help="compression level (1..9)")
    ap.add_argument("--budget-fraction", type=float, default=0.25)
    ap.add_argument("--new-tokens", type=int, default=16)
    ap.add_argument("--prompt-len", type=int, default=32)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--throttle-mbps", default="", help="comma-separated MB/s limits (root)")
    ap.add_argument("--page-cache", action="store_true", help="also backend AUTO, stores cached")
    ap.add_argument("--torch-threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--workdir", default=str(ROOT / "build" / "bench-data" / "compressed"))
    ap.add_argument("--json-out", default=None)
    ap.add_argument("--smoke", action="store_true", help="tiny model, one repeat, 4 tokens")
    args = ap.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(json.loads(args.worker))))
        return 0
    if args.bandwidth_worker:
        print(json.dumps(bandwidth_worker(json.loads(args.bandwidth_worker))))
        return 0
    if args.tier_worker:
        print(json.dumps(tier_worker(json.loads(args.tier_worker))))
        return 0
    if args.smoke:
        args.preset, args.repeat, args.new_tokens, args.prompt_len = "tiny", 1, 4, 8
    started = dt.datetime.now(dt.timezone.utc)
    argv_line = " ".join([Path(sys.argv[0]).name, *(argv if argv is not None else sys.argv[1:])])
    workdir = Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    model_args = argparse.Namespace(
        preset=args.preset,
        workdir=str(workdir),
        dtype="bfloat16",
        prompt_len=args.prompt_len,
        new_tokens=args.new_tokens,
    )
    model_dir, param_bytes = bd.ensure_model(model_args)
    budget = int(param_bytes * args.budget_fraction)
    load_start = bd._loadavg()

    storages: list[dict[str, Any]] = [
        {"name": "disk", "dir": workdir / "stores", "cgroup": None, "backend": "pread",
         "what": f"this machine's disk ({workdir})"},
    ]  # fmt: skip
    if args.page_cache:
        storages.append(
            {
                "name": "page-cache",
                "dir": workdir / "stores",
                "cgroup": None,
                "backend": "auto",
                "what": "the page cache (backend AUTO, stores cached)",
            }  # fmt: skip
        )
    throttle_note = None
    device = None
    limits = [int(x) for x in args.throttle_mbps.split(",") if x.strip()]
    if limits:
        image = max(4 * param_bytes, 1 << 30)  # both stores, with room to spare
        device = ThrottledDevice(workdir, image)
        throttle_note = device.setup()
        if throttle_note is None:
            for mbps in limits:
                storages.append(
                    {
                        "name": f"throttled-{mbps}",
                        "dir": device.mount / "stores",
                        "cgroup": device.cgroup(mbps),
                        "backend": "pread",
                        "what": f"ext4 on {device.loop} (loop, direct I/O) reads throttled to "
                        f"{mbps} MB/s ({device.how} {device.majmin})",
                    }  # fmt: skip
                )
        else:
            print(f"throttled storage not measured: {throttle_note}", file=sys.stderr)
    runs: list[dict[str, Any]] = []
    bandwidth: dict[str, Any] = {}
    try:
        for r in range(args.repeat):
            for i, storage in enumerate(storages):
                order = list(SYSTEMS) if (r + i) % 2 == 0 else list(reversed(SYSTEMS))
                for system in order:
                    spec = {
                        "system": system,
                        "storage_name": storage["name"],
                        "storage": str(storage["dir"]),
                        "backend": storage["backend"],
                        "drop_cache": storage["backend"] != "auto",
                        "model_dir": str(model_dir),
                        "budget": budget,
                        "level": args.level,
                        "prompt_len": args.prompt_len,
                        "new_tokens": args.new_tokens,
                        "torch_threads": args.torch_threads,
                    }
                    res = _run_worker("worker", spec, storage["cgroup"], 1800)
                    res["repeat"] = r
                    runs.append(res)
                    print(
                        f"[{r}] {storage['name']:>14} {system:>10}: "
                        f"{res['decode_tok_s']:.2f} tok/s",
                        file=sys.stderr,
                    )
        for storage in storages:
            raw = next(x for x in runs if x["storage"] == storage["name"] and x["system"] == "raw")
            bandwidth[storage["name"]] = _run_worker(
                "bandwidth-worker", {"store": raw["store"], "repeat": 3}, storage["cgroup"], 900
            )
        packed = next(x for x in runs if x["storage"] == "disk" and x["system"] == "compressed")
        tier = _run_worker(
            "tier-worker",
            {"store": packed["store"], "budget": budget, "param_bytes": param_bytes,
             "level": args.level},
            None,
            900,
        )  # fmt: skip
    finally:
        if device is not None:
            device.teardown()

    summary: dict[str, Any] = {}
    for storage in storages:
        name = storage["name"]
        rows = {}
        for system in SYSTEMS:
            mine = [x for x in runs if x["storage"] == name and x["system"] == system]
            quiet = [x for x in mine if (x["others_cores"] or 0) < QUIET_CORES]
            rows[system] = {
                "decode_tok_s": _median([x["decode_tok_s"] for x in mine]),
                "decode_tok_s_all": [x["decode_tok_s"] for x in mine],
                "others_cores_all": [x["others_cores"] for x in mine],
                "decode_tok_s_quiet": _median([x["decode_tok_s"] for x in quiet]),
                "quiet_runs": len(quiet),
                "prefill_s": _median([x["prefill_s"] for x in mine]),
                "per_step": {k: _median([x["per_step"][k] for x in mine]) for k in ENGINE_KEYS},
                "store_file_bytes": mine[0]["store_file_bytes"],
                "store_ratio": mine[0]["store_ratio"],
                "decode_note": mine[-1]["decode_note"],
                "backend_note": mine[-1]["backend_note"],
                "in_place": mine[-1]["in_place"],
                "reads": sorted(
                    {"decoded copy" if x["decoded_copy_bytes"] else "decode" for x in mine}
                    if system == "compressed"
                    else {"in place" if x["in_place"] else "O_DIRECT" for x in mine}
                ),
                "decoded_copy_seconds": _median([x["decoded_copy_seconds"] for x in mine]),
                "direct": mine[-1]["direct"],
            }
        raw_tokens = [x["tokens"] for x in runs if x["storage"] == name and x["system"] == "raw"]
        comp_tokens = [
            x["tokens"] for x in runs if x["storage"] == name and x["system"] == "compressed"
        ]
        ref = raw_tokens[0]
        speedup = quiet_speedup = None
        if rows["raw"]["decode_tok_s"] and rows["compressed"]["decode_tok_s"]:
            speedup = rows["compressed"]["decode_tok_s"] / rows["raw"]["decode_tok_s"]
        if rows["raw"]["decode_tok_s_quiet"] and rows["compressed"]["decode_tok_s_quiet"]:
            quiet_speedup = (
                rows["compressed"]["decode_tok_s_quiet"] / rows["raw"]["decode_tok_s_quiet"]
            )
        summary[name] = {
            "what": storage["what"],
            "storage_gbps": (bandwidth.get(name) or {}).get("gbps"),
            "systems": rows,
            "speedup": speedup,
            "quiet_speedup": quiet_speedup,
            "tokens_match": all(t == ref for t in raw_tokens + comp_tokens),
        }
    result = {
        "benchmark": "bench_compressed_decode",
        "command": argv_line,
        "started": started.isoformat(),
        "duration_s": (dt.datetime.now(dt.timezone.utc) - started).total_seconds(),
        "machine": bd._machine(),
        "versions": bd._versions(),
        "loadavg_start": load_start,
        "loadavg_end": bd._loadavg(),
        "preset": {"name": args.preset, **bd.PRESETS[args.preset]},
        "param_bytes": param_bytes,
        "budget_bytes": budget,
        "level": args.level,
        "throttle": {"limits_mbps": limits, "not_measured_because": throttle_note},
        "bandwidth": bandwidth,
        "ram_tier": tier,
        "summary": summary,
        "runs": runs,
    }
    out = Path(args.json_out) if args.json_out else (
        ROOT / "bench" / "results"
        / f"compressed_decode_{socket.gethostname()}_{started.strftime('%Y%m%dT%H%M%SZ')}.json"
    )  # fmt: skip
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))

    print(f"\n{args.preset}: {param_bytes / 1e9:.3f} GB bf16, budget {budget / 1e9:.3f} GB, "
          f"level {args.level}, {args.new_tokens} new tokens, batch 1")  # fmt: skip
    print(
        "| storage | GB/s | store | reads | tok/s (all runs) | compressed / raw | tok/s (quiet "
        "runs) | compressed / raw | MB read/step | MB decoded/step | decode s/step | stall "
        "s/step |"
    )
    print("|---|---:|---|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for name, s in summary.items():
        gbps = s["storage_gbps"]
        for system in SYSTEMS:
            row = s["systems"][system]
            ps = row["per_step"]
            compressed = system == "compressed"
            ratio = f"**{s['speedup']:.2f}x**" if compressed and s["speedup"] else ""
            quiet = row["decode_tok_s_quiet"]
            quiet_ratio = (
                f"**{s['quiet_speedup']:.2f}x**" if compressed and s["quiet_speedup"] else ""
            )
            print(
                f"| {name} | {gbps or 0:.2f} | {system} (x{row['store_ratio']:.2f}) | "
                f"{', '.join(row['reads'])} | {row['decode_tok_s']:.2f} | {ratio} | "
                + (f"{quiet:.2f} ({row['quiet_runs']})" if quiet else f"- ({row['quiet_runs']})")
                + f" | {quiet_ratio} | {ps['bytes_from_storage'] / 1e6:.0f} | "
                f"{ps['bytes_decoded'] / 1e6:.0f} | {ps['decode_seconds']:.3f} | "
                f"{ps['stall_seconds']:.3f} |"
            )
        print(f"|  | tokens match: {s['tokens_match']} | | | | | | | | | | |")
    codec = (tier.get("bench_codec") or {}).get("results") or [{}]
    print(
        f"\nRAM tier (decoded units): hits fill at {tier['hits']['fill_gbps'] or 0:.2f} GB/s, "
        f"misses (read + decode) at {tier['misses']['fill_gbps'] or 0:.2f} GB/s; decoding "
        f"from memory (what a tier of compressed units would do on every hit): "
        f"{codec[0].get('decode_gbps_per_thread')} GB/s per thread"
    )
    print(f"\nJSON: {out}")
    ok = all(s["tokens_match"] for s in summary.values())
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
