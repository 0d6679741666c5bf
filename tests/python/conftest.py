"""Shared fixtures of the Python suite: real files in tmp_path, real subprocesses, no mocks."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Callable

import pytest

torch = pytest.importorskip("torch")


def bytes_of(t: torch.Tensor) -> torch.Tensor:
    """The raw bytes of ``t`` (NaN-safe comparisons for every dtype)."""
    return t.detach().contiguous().reshape(-1).view(torch.uint8)


def assert_bitwise_equal(actual: torch.Tensor, expected: torch.Tensor, name: str = "") -> None:
    assert actual.dtype == expected.dtype, f"{name}: dtype {actual.dtype} != {expected.dtype}"
    assert actual.shape == expected.shape, f"{name}: shape {actual.shape} != {expected.shape}"
    assert torch.equal(bytes_of(actual), bytes_of(expected)), f"{name}: bytes differ"


@pytest.fixture
def bitwise_equal() -> Callable[[torch.Tensor, torch.Tensor, str], None]:
    return assert_bitwise_equal


def _run(args: list[str], timeout: float = 120) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ)
    env.pop("PYTHONPATH", None)
    return subprocess.run(
        args, capture_output=True, text=True, timeout=timeout, env=env, stdin=subprocess.DEVNULL
    )


@pytest.fixture
def run_cli() -> Callable[..., subprocess.CompletedProcess[str]]:
    """Runs ``python -m tensorstream <args>`` in a subprocess; returns the CompletedProcess."""

    def run(
        *args: str | os.PathLike[str], timeout: float = 120
    ) -> subprocess.CompletedProcess[str]:
        return _run([sys.executable, "-m", "tensorstream", *map(os.fspath, args)], timeout)

    return run


@pytest.fixture
def run_native() -> Callable[..., subprocess.CompletedProcess[str]]:
    """Runs the installed native ``tensorstream`` executable (skips if it is not installed)."""
    import tensorstream

    exe = tensorstream.native_executable()
    if exe is None:
        pytest.skip("the native tensorstream executable is not installed")

    def run(
        *args: str | os.PathLike[str], timeout: float = 120
    ) -> subprocess.CompletedProcess[str]:
        return _run([exe, *map(os.fspath, args)], timeout)

    return run


def flip_byte(path: Path, offset: int) -> None:
    """Inverts the bits of the byte at ``offset`` of ``path`` in place."""
    with open(path, "r+b") as f:
        f.seek(offset)
        value = f.read(1)[0]
        f.seek(offset)
        f.write(bytes([value ^ 0xFF]))


@pytest.fixture
def corrupt() -> Callable[[Path, int], None]:
    return flip_byte


# Files whose tests run the product end to end (real transformers checkpoints, the CLI in
# subprocesses, the demo): `make test-integration` selects them, `make test-unit` skips them.
_INTEGRATION_FILES = {"test_convert_hf.py", "test_cli.py", "test_demo.py"}


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if item.path.name in _INTEGRATION_FILES:
            item.add_marker(pytest.mark.integration)
