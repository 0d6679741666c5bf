"""bench/gpu_run.sh, the one-script GPU run, checked where there is no GPU: its dry run finds
the tools and packages, checks the decode benchmark's GPU plan (its configurations are
constructed), writes the summary of every step, and says plainly that nothing ran on a GPU."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "bench" / "gpu_run.sh"
STEPS = ["env", "configure", "gds-headers", "build-cpp", "test-cpp", "build-python",
         "test-python", "bench-io", "bench-decode"]  # fmt: skip

pytest.importorskip("torch")


def _has_gpu() -> bool:
    return shutil.which("nvidia-smi") is not None or Path("/dev/nvidia0").exists()


def _dry_run(tmp_path: Path, *extra: str) -> tuple[subprocess.CompletedProcess[str], Path]:
    out = tmp_path / "gpu-run"
    env = dict(os.environ)
    env.pop("OUT", None)
    p = subprocess.run(
        ["bash", str(SCRIPT), "--dry-run", "--python", sys.executable, "--out", str(out), *extra],
        capture_output=True, text=True, timeout=300, env=env, stdin=subprocess.DEVNULL,
    )  # fmt: skip
    return p, out


def test_gpu_run_dry_run_plans_every_step(tmp_path: Path) -> None:
    p, out = _dry_run(tmp_path)
    assert p.returncode == 0, p.stdout + p.stderr
    if not _has_gpu():
        assert "no GPU: dry run only, nothing measured" in p.stdout, p.stdout
    summary = json.loads((out / "summary.json").read_text())
    assert summary["dry_run"] is True
    assert list(summary["steps"]) == STEPS
    for step in STEPS[1:]:
        assert summary["steps"][step]["status"] == "planned", summary["steps"][step]
    assert summary["steps"]["env"]["status"] in ("ok", "incomplete")
    text = (out / "summary.txt").read_text()
    for step in STEPS:
        assert step in text
    assert "dry run: nothing was built or measured" in text
    env_log = (out / "env.log").read_text()
    assert "torch:" in env_log and "cmake:" in env_log and "python:" in env_log

    # The decode benchmark's GPU plan: a 7B-shape 16-layer model under a 4 GB budget.
    plan = json.loads((out / "decode_plan.json").read_text())
    assert plan["dry_run"] is True and plan["device"] == "cuda:0"
    assert plan["model"]["preset"] == "7b-16l"
    assert 6.9e9 < plan["model"]["param_bytes"] < 7.1e9
    assert plan["budget_bytes"] == 4_000_000_000
    assert set(plan["plan"]) == {"memory", "tensorstream", "accelerate-cpu", "tensorstream-ram"}
    assert plan["plan"]["tensorstream"]["config"]["vram_budget_gb"] == pytest.approx(4.0)
    assert plan["plan"]["accelerate-cpu"]["max_memory"]["0"] == 4_000_000_000


def test_gpu_run_tests_only_dry_run_has_no_benchmarks(tmp_path: Path) -> None:
    p, out = _dry_run(tmp_path, "--tests-only")
    assert p.returncode == 0, p.stdout + p.stderr
    summary = json.loads((out / "summary.json").read_text())
    assert list(summary["steps"]) == STEPS[:7]
    assert not (out / "decode_plan.json").exists()


def test_gpu_run_rejects_unknown_options(tmp_path: Path) -> None:
    p = subprocess.run(["bash", str(SCRIPT), "--what"], capture_output=True, text=True,
                       timeout=60)  # fmt: skip
    assert p.returncode == 2
    assert "unknown option '--what'" in p.stderr
