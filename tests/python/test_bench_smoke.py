"""bench/bench_decode.py --smoke runs end to end: a tiny Llama, generated greedily in memory
and streamed by tensorstream, each in its own subprocess; the JSON is written and the
streamed model's tokens equal the in-memory reference's."""

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


def test_bench_decode_smoke(tmp_path: Path) -> None:
    out = tmp_path / "decode.json"
    env = dict(os.environ)
    env.pop("PYTHONPATH", None)
    cmd = [
        sys.executable,
        str(SCRIPT),
        "--smoke",
        "--systems",
        "memory,tensorstream",
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
    data = json.loads(out.read_text())

    summary = data["summary"]
    for system in ("memory", "tensorstream"):
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
    for key in ("machine", "versions", "command", "storage_bandwidth"):
        assert key in data
