"""The ``tensorstream`` command line.

The store tools are native (``_core.native_commands()``: convert, inspect, verify, bench-io,
bench-codec, doctor, settings, version) and run in the C++ engine without torch; this front
forwards them and adds the commands written in Python (``demo``, ``run``).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Callable

from . import _core

_PYTHON_USAGE = (
    "\n"
    "python commands:\n"
    "  demo [--size-mb N] [--keep DIR]\n"
    "                       build a small Llama-style model, convert, verify and reload it\n"
    "  run MODEL_DIR (--prompt TEXT | --prompt-ids 1,2,3) --vram-budget SIZE\n"
    "      [--max-new-tokens N] [--device cpu|cuda:N] [--ram-cache SIZE] [--storage-path DIR]\n"
    "                       stream a Hugging Face checkpoint and generate greedily\n"
)


def native_executable() -> str | None:
    """Path of the native ``tensorstream`` executable installed with the package, or None."""
    path = Path(__file__).resolve().parent / "bin" / "tensorstream"
    if path.is_file() and os.access(path, os.X_OK):
        return str(path)
    return None


def _run_demo(args: list[str]) -> int:
    from .demo import main as demo_main

    return demo_main(args)


def _run_pretrained(args: list[str]) -> int:
    from ._run import main as run_main

    return run_main(args)


_PYTHON_COMMANDS: dict[str, Callable[[list[str]], int]] = {
    "demo": _run_demo,
    "run": _run_pretrained,
}


def _interactive() -> bool:
    try:
        return sys.stderr is not None and sys.stderr.isatty()
    except (AttributeError, ValueError):
        return False


def _run_native(args: list[str]) -> int:
    # Python's buffered text must come out before the native code writes to the same fds.
    for stream in (sys.stdout, sys.stderr):
        if stream is not None:
            stream.flush()
    return int(_core.cli_run(args, _interactive()))


def main(argv: Sequence[str] | None = None) -> int:
    """Runs ``tensorstream <argv...>`` and returns the exit code (0 ok, 1 failure, 2 usage)."""
    args = list(sys.argv[1:] if argv is None else argv)
    command = args[0] if args else None
    if command in _PYTHON_COMMANDS:
        return _PYTHON_COMMANDS[command](args[1:])
    code = _run_native(args)
    if command in ("-h", "--help", "help"):
        sys.stdout.write(_PYTHON_USAGE)
        sys.stdout.flush()
    elif command is None or command not in _core.native_commands():
        sys.stderr.write(_PYTHON_USAGE)  # after the native usage message
        sys.stderr.flush()
    return code


if __name__ == "__main__":
    sys.exit(main())
