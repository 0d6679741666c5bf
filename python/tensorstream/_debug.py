"""``Config.debug_mode``: the logger set-up, and the log lines of the forward hooks.

With ``debug_mode`` the ``tensorstream`` logger is set to DEBUG (with a stderr handler if it
has none besides the package's ``NullHandler``), the hooks acquire and release streamed
blocks through :func:`acquire` and :func:`released` instead of calling the engine directly,
and the engine checks its invariants after every call (the engine option
``check_invariants``, set by ``Config.engine_options``). Without it the hooks never reach this
module.
"""

from __future__ import annotations

import logging
import sys
import time
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ._analysis import Block
    from .runtime import OffloadedModel

__all__ = ["acquire", "enable_logging", "released"]

logger = logging.getLogger("tensorstream")


def enable_logging() -> None:
    """Sets the ``tensorstream`` logger to DEBUG; adds a stderr handler only when it has no
    handler of its own (an application's handlers and format are kept)."""
    logger.setLevel(logging.DEBUG)
    if not any(not isinstance(h, logging.NullHandler) for h in logger.handlers):
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(asctime)s %(name)s %(levelname)s: %(message)s"))
        logger.addHandler(handler)


def acquire(runtime: OffloadedModel, block: Block, stream: int) -> tuple[Any, ...]:
    """``engine.acquire`` of ``block``, logged: ready or stalled (the engine's miss counter
    around the call; exact when one thread runs the model), with the time the call took."""
    engine = runtime._engine
    misses = engine.stats()["device_misses"]
    start = time.perf_counter()
    result = engine.acquire(block.index, stream)
    end = time.perf_counter()
    stalled = engine.stats()["device_misses"] > misses
    runtime._acquired_at[block.index] = end
    resident = " (resident)" if result[2] else ""
    if stalled:
        logger.debug(
            "acquire %s (block %d)%s: stalled %.3f ms waiting for its fill",
            block.name,
            block.index,
            resident,
            (end - start) * 1e3,
        )
    else:
        logger.debug(
            "acquire %s (block %d)%s: ready in %.3f ms",
            block.name,
            block.index,
            resident,
            (end - start) * 1e3,
        )
    return result


def released(runtime: OffloadedModel, block: Block) -> None:
    """Logs the release of ``block`` with the time since its acquire."""
    start = runtime._acquired_at.pop(block.index, None)
    held = "" if start is None else f": held {(time.perf_counter() - start) * 1e3:.3f} ms"
    logger.debug("release %s (block %d)%s", block.name, block.index, held)
