"""The demo (the project's main job) runs end to end and reports a bitwise match."""

from __future__ import annotations

import pytest

pytest.importorskip("transformers")


@pytest.mark.slow
def test_demo(run_cli, tmp_path) -> None:
    result = run_cli("demo", "--size-mb", "8", "--keep", tmp_path, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "MATCH: all" in result.stdout
    assert "bitwise identical" in result.stdout
    assert "STREAMED: greedy tokens identical" in result.stdout
    assert (tmp_path / "store" / "model.tstore").is_file()
    assert len(list((tmp_path / "checkpoint").glob("*.safetensors"))) >= 2


def test_demo_rejects_bad_size(run_cli) -> None:
    result = run_cli("demo", "--size-mb", "-1")
    assert result.returncode == 2
