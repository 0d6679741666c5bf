"""The `tensorstream` command line: exit codes and messages."""

from __future__ import annotations

import shutil
import subprocess
import sys

import pytest

import tensorstream as ts
from tensorstream import cli


def test_no_arguments(run_cli) -> None:
    result = run_cli()
    assert result.returncode == 2
    assert "usage: tensorstream" in result.stderr
    assert "demo" in result.stderr


def test_help(run_cli) -> None:
    result = run_cli("--help")
    assert result.returncode == 0
    assert "convert" in result.stdout and "demo" in result.stdout


def test_unknown_command(run_cli) -> None:
    result = run_cli("frobnicate")
    assert result.returncode == 2
    assert "unknown command 'frobnicate'" in result.stderr


def test_convert_missing_source(tmp_path, run_cli) -> None:
    missing = tmp_path / "no-such-checkpoint"
    result = run_cli("convert", missing, tmp_path / "out.tstore")
    assert result.returncode == 1
    assert str(missing) in result.stderr
    assert not (tmp_path / "out.tstore").exists()


def test_convert_usage(run_cli) -> None:
    assert run_cli("convert", "only-one-arg").returncode == 2


def test_doctor(run_cli) -> None:
    result = run_cli("doctor")
    assert result.returncode == 0, result.stderr
    assert "CUDA driver" in result.stdout
    assert "cuFile" in result.stdout


def test_version(run_cli) -> None:
    result = run_cli("version")
    assert result.returncode == 0
    assert ts.__version__ in result.stdout


def test_inspect_verify_missing_store(tmp_path, run_cli) -> None:
    for command in ("inspect", "verify"):
        result = run_cli(command, tmp_path / "absent.tstore")
        assert result.returncode == 1
        assert "absent.tstore" in result.stderr


def test_main_in_process(capfd) -> None:
    assert cli.main(["version"]) == 0
    out, _ = capfd.readouterr()
    assert ts.__version__ in out
    assert cli.main(["bogus"]) == 2
    _, err = capfd.readouterr()
    assert "unknown command" in err


def test_store_tools_do_not_import_torch() -> None:
    code = (
        "import sys, tensorstream; "
        "from tensorstream import cli; "
        "assert cli.main(['version']) == 0; "
        "assert 'torch' not in sys.modules, 'torch was imported'"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def test_native_executable_matches(run_native) -> None:
    result = run_native("version")
    assert result.returncode == 0
    assert ts.__version__ in result.stdout
    assert run_native().returncode == 2


def test_console_script() -> None:
    exe = shutil.which("tensorstream")
    if exe is None:
        pytest.skip("the tensorstream console script is not on PATH")
    result = subprocess.run([exe, "version"], capture_output=True, text=True)
    assert result.returncode == 0
    assert ts.__version__ in result.stdout
