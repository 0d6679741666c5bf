"""Memory pressure: the callback, and what an out-of-memory error in a forward does.

* :func:`set_memory_pressure_callback` sets the function told of every pressure event
  (:func:`notify`): a budget the engine refuses, or torch running out of memory in a forward.
* :func:`make_pressure_forward` wraps the offloaded model's ``forward``: an out-of-memory
  error leaving it is answered as ``Config.memory_pressure_mode`` says (:data:`PRESSURE_POLICY`)
  by re-planning the engine under a smaller budget (``runtime.replan``) and running the
  forward again -- after restoring the KV caches it received to their state before the failed
  attempt (:class:`_CacheSnapshot`).

The runtime is used through its public surface (``budget``, ``device``, ``replan``, ...); this
module does not import :mod:`tensorstream.runtime`.
"""

from __future__ import annotations

import logging
import threading
from typing import TYPE_CHECKING, Any

import torch

from . import _core

if TYPE_CHECKING:
    from .runtime import OffloadedModel

__all__ = [
    "PRESSURE_POLICY",
    "is_out_of_memory",
    "make_pressure_forward",
    "notify",
    "set_memory_pressure_callback",
]

logger = logging.getLogger("tensorstream")

_pressure_callback: Any = None
_pressure_lock = threading.Lock()


def set_memory_pressure_callback(fn: Any) -> Any:
    """Sets the module-level function the runtime calls on memory pressure; returns the
    previous one. ``None`` removes it.

    ``fn(event)`` receives a dict: ``kind`` ("budget_too_small" when the engine refuses a
    budget — in :func:`offload` or :func:`optimize_memory_usage` — or "out_of_memory" when
    torch raises an out-of-memory error during a forward of a streamed model), ``device``,
    ``budget`` (the whole weight budget in bytes when it happened), ``minimum_budget`` (the
    budget that would work, for "budget_too_small"; else None), ``resident_bytes``,
    ``block`` (the innermost streamed block the error left, for "out_of_memory"; else None),
    ``error`` (the exception), ``action`` (for "out_of_memory": "demoted" when the
    ``memory_pressure_mode`` shrank the budget — resident blocks became streamed — and the
    forward is run again, else "raised: <why not>"; None otherwise) and ``new_budget`` (the
    budget after "demoted"; else None). It is called before the error reaches the caller
    or the forward is retried. An exception raised by the callback is logged and ignored.

    Modes (``Config.memory_pressure_mode``): CONSERVATIVE shrinks the budget to half and
    retries up to twice per call; BALANCED to three quarters, once; AGGRESSIVE never
    demotes (the error reaches the caller). A forward whose KV cache cannot be cut back to
    its length before the failed attempt is not retried.
    """
    global _pressure_callback
    if fn is not None and not callable(fn):
        raise TypeError(f"set_memory_pressure_callback: {fn!r} is not callable")
    with _pressure_lock:
        previous, _pressure_callback = _pressure_callback, fn
    return previous


def notify(
    kind: str,
    device: torch.device,
    budget: int | None,
    error: BaseException,
    resident_bytes: int | None = None,
    block: str | None = None,
    action: str | None = None,
    new_budget: int | None = None,
) -> None:
    callback = _pressure_callback
    if callback is None:
        return
    event = {
        "kind": kind,
        "device": str(device),
        "budget": budget,
        "minimum_budget": getattr(error, "minimum_budget", None),
        "resident_bytes": resident_bytes,
        "block": block,
        "error": error,
        "action": action,
        "new_budget": new_budget,
    }
    try:
        callback(event)
    except Exception:  # noqa: BLE001 - a broken callback must not mask the real error
        logger.exception("tensorstream: the memory pressure callback raised")


def is_out_of_memory(error: BaseException | None) -> bool:
    if error is None:
        return False
    if isinstance(error, getattr(torch, "OutOfMemoryError", ())):
        return True
    text = str(error)
    return isinstance(error, (RuntimeError, MemoryError)) and (
        "out of memory" in text.lower() or "can't allocate memory" in text
    )


# What each MemoryPressureMode does when torch runs out of memory during a forward of the
# model: shrink the weight budget to this fraction of what it was (at least the minimum that
# works; resident blocks become streamed, giving their memory to activations) and run the
# forward again, at most `retries` times per call. AGGRESSIVE keeps every resident block and
# lets the error reach the caller. (The headroom each mode leaves when the budget is
# automatic is in config.default_vram_budget.)
PRESSURE_POLICY: dict[str, tuple[float, int]] = {
    "conservative": (0.5, 2),
    "balanced": (0.75, 1),
    "aggressive": (1.0, 0),
}


def _caches_in(args: tuple, kwargs: dict[str, Any]) -> list[Any] | None:
    """The transformers KV caches among a forward's arguments, whatever the keyword
    (``past_key_values`` before transformers 5.2x, ``cache`` after) or position; an
    encoder-decoder cache counts as its two caches. None when transformers is absent."""
    try:
        from transformers.cache_utils import Cache  # noqa: PLC0415
    except ImportError:
        return None
    found: list[Any] = []
    pending = [v for v in (*args, *kwargs.values()) if isinstance(v, Cache)]
    while pending:
        cache = pending.pop()
        inner = [
            getattr(cache, name, None) for name in ("self_attention_cache", "cross_attention_cache")
        ]
        if any(isinstance(c, Cache) for c in inner):
            pending.extend(c for c in inner if isinstance(c, Cache))
        else:
            found.append(cache)
    return found


class _CacheSnapshot:
    """The state of the KV caches a forward received, taken before it runs, so that a failed
    attempt can be undone exactly before a retry. Dynamic layers grow by concatenation (new
    tensors each step), so keeping references to their tensors restores them bit for bit;
    static layers are written in place at the forward's positions, which a retry writes
    again with the same values. Any other kind of layer (sliding windows drop tokens,
    quantised layers re-quantise) cannot be restored: ``take`` returns None for it."""

    def __init__(self, entries: list[tuple[Any, dict[str, Any], list[Any], list[Any]]]) -> None:
        # per cache: (cache, its attributes, its layers, each layer's attributes)
        self._entries = entries
        self._lengths = [[int(x.get_seq_length()) for x in layers] for _, _, layers, _ in entries]

    @classmethod
    def take(cls, caches: list[Any]) -> _CacheSnapshot | None:
        from transformers.cache_utils import DynamicLayer, StaticLayer  # noqa: PLC0415

        entries = []
        for cache in caches:
            layers = getattr(cache, "layers", None)
            if not isinstance(layers, list):
                return None
            if any(type(layer) not in (DynamicLayer, StaticLayer) for layer in layers):
                return None
            entries.append(
                (cache, dict(cache.__dict__), list(layers), [dict(x.__dict__) for x in layers])
            )
        return cls(entries)

    def restore(self) -> bool:
        """Puts every cache back as it was; False if a cache then disagrees with the
        snapshot (its length per layer), i.e. it could not be restored exactly."""
        for cache, attributes, layers, layer_attributes in self._entries:
            for layer, saved in zip(layers, layer_attributes):
                layer.__dict__.clear()
                layer.__dict__.update(saved)
            cache.__dict__.clear()
            cache.__dict__.update(attributes)
            cache.layers = list(layers)  # drops the layers the failed attempt created
        return [
            [int(x.get_seq_length()) for x in cache.layers] for cache, _, _, _ in self._entries
        ] == self._lengths


def _relieve_pressure(runtime: OffloadedModel, error: BaseException, restorable: bool) -> str:
    """Applies the runtime's pressure mode after ``error`` (an out-of-memory error that left
    a forward); returns what was done: "demoted" (the budget shrank: retry) or why not."""
    fraction, _ = PRESSURE_POLICY[runtime.pressure_mode]
    if fraction >= 1.0:
        return f"raised: memory_pressure_mode {runtime.pressure_mode} does not demote"
    if not restorable:
        return "raised: the forward's KV cache was partly updated and cannot be restored"
    if any(block.active for block in runtime._blocks):
        return "raised: other forwards are running on this model"
    if runtime.device.type == "cuda":
        torch.cuda.empty_cache()
    old = runtime.budget
    target = int(old * fraction)
    try:
        runtime.replan(target)
    except _core.BudgetTooSmallError as e:
        if e.minimum_budget >= old:
            return "raised: the budget is already the minimum that works"
        runtime.replan(e.minimum_budget)
    return "demoted"


def make_pressure_forward(runtime: OffloadedModel, forward: Any):
    """``forward`` of the offloaded model, retried under a smaller budget after an
    out-of-memory error as the runtime's pressure mode says; the callback hears of every
    such error, with what was done."""

    def pressure_forward(*args: Any, **kwargs: Any) -> Any:
        _, retries = PRESSURE_POLICY[runtime.pressure_mode]
        # Only a forward that may be retried needs its caches' state (AGGRESSIVE never is).
        caches = _caches_in(args, kwargs) if retries > 0 else []
        snapshot = _CacheSnapshot.take(caches) if caches else None
        state = runtime._forwards
        while True:
            state.depth = getattr(state, "depth", 0) + 1
            try:
                return forward(*args, **kwargs)
            except BaseException as error:
                if not is_out_of_memory(error) or runtime.closed or state.depth > 1:
                    raise
                old_budget = runtime.budget
                # Undo what the failed attempt appended before anything else: a retry on a
                # cache holding a token twice would compute wrong numbers, silently.
                restorable = not caches or (snapshot is not None and snapshot.restore())
                if PRESSURE_POLICY[runtime.pressure_mode][0] >= 1.0 or retries > 0:
                    action = _relieve_pressure(runtime, error, restorable)
                else:
                    action = f"raised: no retry left (memory_pressure_mode {runtime.pressure_mode})"
                notify(
                    "out_of_memory",
                    runtime.device,
                    old_budget,
                    error,
                    runtime.resident_param_bytes,
                    getattr(error, "_tensorstream_block", None),
                    action=action,
                    new_budget=runtime.budget if action == "demoted" else None,
                )
                if action != "demoted":
                    raise
                retries -= 1
                logger.warning(
                    "tensorstream: out of memory in a forward; budget %d -> %d bytes, retrying",
                    old_budget,
                    runtime.budget,
                )
            finally:
                state.depth -= 1

    pressure_forward.__wrapped__ = forward  # type: ignore[attr-defined]
    return pressure_forward
