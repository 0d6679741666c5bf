"""bench/bench_decode.py --smoke runs end to end: a tiny Llama, generated greedily in memory
and streamed by tensorstream (reading in place, and with O_DIRECT), each in its own
subprocess; the JSON is written and the streamed model's tokens equal the in-memory
reference's. bench/plot_decode.py plots two such runs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("torch")
pytest.importorskip("transformers")

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "bench" / "bench_decode.py"
PLOT = ROOT / "bench" / "plot_decode.py"
SYSTEMS = ("memory", "tensorstream", "tensorstream-direct")


def _smoke(tmp_path: Path, fraction: float) -> Path:
    out = tmp_path / f"decode_{fraction}.json"
    env = dict(os.environ)
    env.pop("PYTHONPATH", None)
    cmd = [
        sys.executable,
        str(SCRIPT),
        "--smoke",
        "--systems",
        ",".join(SYSTEMS),
        "--budget-fraction",
        str(fraction),
        "--workdir",
        str(tmp_path / "work"),
        "--json-out",
        str(out),
    ]
    p = subprocess.run(
        cmd,
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
        stdin=subprocess.DEVNULL,
        cwd=tmp_path,
    )
    assert p.returncode == 0, p.stdout + p.stderr
    assert out.is_file(), p.stdout
    return out


def test_bench_decode_smoke_and_plot(tmp_path: Path) -> None:
    out = _smoke(tmp_path, 0.5)
    data = json.loads(out.read_text())

    summary = data["summary"]
    for system in SYSTEMS:
        assert "note" not in summary[system], summary[system]
        assert summary[system]["tokens_match"] is True, summary[system]
        for run in data["runs"][system]:
            assert run["peak_rss_run_kb"] > 0
            assert run["peak_rss_total_kb"] >= run["peak_rss_run_kb"]
            assert len(run["batch1"]["tokens"][0]) == data["new_tokens"]

    ts_run = data["runs"]["tensorstream"][0]
    memory_run = data["runs"]["memory"][0]
    assert ts_run["batch1"]["tokens"] == memory_run["batch1"]["tokens"]
    # The engine really streamed: some blocks were offloaded and bytes came from the store.
    assert ts_run["layers_offloaded"] > 0
    assert (
        ts_run["engine_final"]["bytes_from_storage"]
        + ts_run["engine_final"]["bytes_from_page_cache"]
        > 0
    )
    # The default reads in place through the page cache (a tiny store fits); the direct
    # system reads every block with O_DIRECT, so every byte comes from storage.
    assert ts_run["read_path"]["in_place"] is True, ts_run["read_path"]
    direct = data["runs"]["tensorstream-direct"][0]
    assert direct["read_path"]["in_place"] is False and direct["read_path"]["backend"] == "pread"
    assert direct["engine_final"]["bytes_from_storage"] > 0
    for key in ("machine", "versions", "command", "storage_bandwidth"):
        assert key in data

    # A second budget, then the plot of both runs.
    pytest.importorskip("matplotlib")
    second = _smoke(tmp_path, 0.8)
    png = tmp_path / "decode.png"
    p = subprocess.run(
        [sys.executable, str(PLOT), str(out), str(second), "--out", str(png)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert p.returncode == 0, p.stdout + p.stderr
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    for system in SYSTEMS:
        assert system in p.stdout
    assert "50%" in p.stdout and "80%" in p.stdout


def test_bench_decode_gpu_variant_dry_run(tmp_path: Path) -> None:
    """The GPU scenario's plan is checked on any machine: budgets, each system's load call,
    tensorstream.Config and accelerate's max_memory for the GPU, without building a model."""
    out = tmp_path / "dry.json"
    p = subprocess.run(
        [sys.executable, str(SCRIPT), "--preset", "7b", "--device", "cuda:0", "--dry-run",
         "--budget-fraction", "0.3", "--json-out", str(out), "--systems",
         "memory,tensorstream,tensorstream-ram,tensorstream-fp,accelerate-cpu,accelerate-disk"],
        capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL,
    )  # fmt: skip
    assert p.returncode == 0, p.stdout + p.stderr
    data = json.loads(out.read_text())
    assert data["dry_run"] is True and data["device"] == "cuda:0"
    assert data["prefill_lens"] == [512, 2048]
    # 7B shape in bfloat16: 6.74 G parameters.
    assert 13.4e9 < data["model"]["param_bytes"] < 13.6e9
    budget = data["budget_bytes"]
    assert budget == int(data["model"]["param_bytes"] * 0.3)
    plan = data["plan"]
    for system in ("tensorstream", "tensorstream-ram", "tensorstream-fp"):
        assert plan[system]["config"]["device"] == "cuda:0"
        assert plan[system]["config"]["vram_budget_gb"] == pytest.approx(budget / 1e9)
    assert plan["tensorstream-ram"]["config"]["ram_cache_gb"] > data["model"]["param_bytes"] / 1e9
    assert plan["accelerate-cpu"]["max_memory"]["0"] == budget
    assert plan["accelerate-disk"]["max_memory"]["0"] == budget
    assert (
        plan["accelerate-disk"]["max_memory"]["cpu"] < plan["accelerate-cpu"]["max_memory"]["cpu"]
    )
    import torch

    if not torch.cuda.is_available():
        assert any("dry run" in x for x in data["lacks"])


def test_bench_codec_smoke(tmp_path: Path) -> None:
    """bench/bench_codec.py --smoke: a tiny Llama and gaussian weights in every dtype, each
    measured by the native bench-codec; every row has a ratio, plain zstd's beside it, and
    decode speeds for 1 and 2 threads."""
    from tensorstream import _core

    if not _core.compression_info()["available"]:
        pytest.skip(_core.compression_info()["codec"])
    out = tmp_path / "codec.json"
    env = dict(os.environ)
    env.pop("PYTHONPATH", None)
    p = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "bench_codec.py"), "--smoke", "--json-out", str(out)],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
        stdin=subprocess.DEVNULL,
        cwd=tmp_path,
    )
    assert p.returncode == 0, p.stdout + p.stderr
    data = json.loads(out.read_text())
    rows = data["rows"]
    assert {(r["source"], r["dtype"]) for r in rows} == {
        (source, dtype)
        for source in ("model", "gaussian")
        for dtype in ("bfloat16", "float16", "float32", "int8", "float8_e4m3fn")
    }
    for r in rows:
        assert r["ratio"] >= 1.0 and r["plain_ratio"] >= 1.0
        assert set(r["decode_gbps_per_thread"]) == {"1", "2"}
        assert all(v > 0 for v in r["decode_gbps_per_thread"].values())
    bf16 = next(r for r in rows if r["source"] == "gaussian" and r["dtype"] == "bfloat16")
    assert bf16["ratio"] > 1.3 and bf16["ratio"] > bf16["plain_ratio"]
    assert data["machine"]["cpus"] >= 1 and data["command"].startswith("python bench/")


def test_bench_compressed_decode_smoke(tmp_path: Path) -> None:
    """bench/bench_compressed_decode.py --smoke: a tiny bf16 Llama streamed with O_DIRECT from
    its uncompressed and its compressed store, each in its own subprocess; the tokens agree,
    the compressed system decoded what it streamed, and the RAM-tier measurement ran."""
    from tensorstream import _core

    if not _core.compression_info()["available"]:
        pytest.skip(_core.compression_info()["codec"])
    out = tmp_path / "compressed.json"
    env = dict(os.environ)
    env.pop("PYTHONPATH", None)
    script = ROOT / "bench" / "bench_compressed_decode.py"
    p = subprocess.run(
        [sys.executable, str(script), "--smoke", "--workdir", str(tmp_path / "work"),
         "--json-out", str(out)],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
        stdin=subprocess.DEVNULL,
        cwd=tmp_path,
    )  # fmt: skip
    assert p.returncode == 0, p.stdout + p.stderr
    data = json.loads(out.read_text())
    disk = data["summary"]["disk"]
    assert disk["tokens_match"]
    raw, packed = disk["systems"]["raw"], disk["systems"]["compressed"]
    assert raw["decode_tok_s"] > 0 and packed["decode_tok_s"] > 0
    assert packed["store_ratio"] > 1.0 and raw["store_ratio"] == 1.0
    assert packed["per_step"]["bytes_decoded"] > packed["per_step"]["bytes_read_compressed"] > 0
    assert raw["per_step"]["bytes_decoded"] == 0
    assert data["ram_tier"]["hits"]["decoded"] == 0
    assert data["ram_tier"]["hits"]["from_ram_tier"] == data["ram_tier"]["hits"]["bytes"] > 0
    assert data["ram_tier"]["misses"]["decoded"] > 0
