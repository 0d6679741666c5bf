"""What a runtime installs on the modules of a streamed model (torch-facing).

* A forward **pre-hook** per block acquires the block from the engine (on CUDA, on the
  current stream) and makes its parameters views into the block's bytes
  (``param.data = view``: no copy); the **post-hook** (``always_call=True``) puts the
  placeholders back (views of one zero per dtype, shared: nothing is allocated) and releases
  the block. A per-block count lets several threads run the
  same block at once with one acquire; a thread-local count makes the post-hook undo only
  what its own pre-hook did.
* A **guarded** ``_apply`` (behind ``.to()``, ``.cpu()``, ``.half()``, ...) lets through what
  keeps the runtime's device and dtype, moves the runtime for a whole-model device move, and
  refuses the rest before anything is touched.
* After the runtime closes, :func:`closed_hook` makes a streamed block's forward fail clearly.
* With ``Config.debug_mode`` the acquire and release go through :mod:`tensorstream._debug`,
  which logs them.

Hooks read the runtime's engine and memory at each call (a restart replaces them); this
module does not import :mod:`tensorstream.runtime`.
"""

from __future__ import annotations

import contextlib
import sys
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from . import _debug
from ._pressure import is_out_of_memory, notify
from ._torch_memory import placeholder

if TYPE_CHECKING:
    from ._analysis import Block
    from .runtime import OffloadedModel

__all__ = [
    "closed_hook",
    "make_guarded_apply",
    "make_post_hook",
    "make_pre_hook",
    "make_rows_post_hook",
    "make_rows_pre_hook",
]


def closed_hook(module: nn.Module, args: Any) -> None:
    raise RuntimeError(
        f"tensorstream: {type(module).__name__} was streamed by a runtime that has been closed "
        "(cleanup_tensorstream()); its weights are no longer available"
    )


def _current_stream(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.current_stream(device).cuda_stream
    return 0


def make_pre_hook(runtime: OffloadedModel, units: list[Block]):
    """The pre-hook of a module whose forward holds ``units`` (a block; a module's own
    weights; a tied parameter it shares)."""

    def pre_hook(module: nn.Module, args: Any, kwargs: dict[str, Any]) -> None:
        if module.training:
            raise RuntimeError(
                "tensorstream: streamed models run in inference mode only; call model.eval()"
            )
        _check_input_device(runtime, units[0], args, kwargs)
        for block in units:
            _enter(runtime, block)

    return pre_hook


def acquire_bytes(runtime: OffloadedModel, block: Block) -> torch.Tensor:
    """Acquires ``block``'s unit on the current stream: its bytes, as a uint8 tensor (the
    caller holds ``block.lock`` and counts its holders)."""
    stream = _current_stream(runtime.device)
    if runtime.debug:
        address, size, _ = _debug.acquire(runtime, block, stream)
    else:
        address, size, _ = runtime._engine.acquire(block.index, stream)
    return runtime._memory.view(address, size)


def release_bytes(runtime: OffloadedModel, block: Block) -> None:
    """Releases ``block``'s unit on the current stream (its last holder, under its lock)."""
    runtime._engine.release(block.index, _current_stream(runtime.device))
    if runtime.debug:
        _debug.released(runtime, block)


def _enter(runtime: OffloadedModel, block: Block) -> None:
    with block.lock:
        if block.active == 0:
            raw = acquire_bytes(runtime, block)
            for s in block.slots:
                s.param.data = raw[s.offset : s.offset + s.nbytes].view(s.dtype).view(s.shape)
        # else: another thread (or an enclosing module) already made these weights available
        block.active += 1
        block.entered.count = getattr(block.entered, "count", 0) + 1


def _leave(runtime: OffloadedModel, block: Block) -> None:
    with block.lock:
        if getattr(block.entered, "count", 0) == 0:
            return  # the pre-hook failed before making the weights available
        block.entered.count -= 1
        block.active -= 1
        if block.active > 0:
            return
        for s in block.slots:
            s.param.data = placeholder(s.dtype, s.shape, runtime.device)
        release_bytes(runtime, block)


def make_rows_pre_hook(runtime: OffloadedModel, block: Block):
    """The pre-hook of an ``nn.Embedding`` whose table streams by rows: it reads only the rows
    of the ids it is called with (``engine.acquire_rows``), makes the table parameter those
    rows, in order, and calls the forward with each id replaced by its row's position -- the
    same lookup, the same values. Lookups of one table are serialised (its weight is one
    parameter); the rows are released by the post-hook."""
    slot = block.slots[0]

    def pre_hook(module: nn.Module, args: Any, kwargs: dict[str, Any]) -> tuple[Any, Any]:
        if module.training:
            raise RuntimeError(
                "tensorstream: streamed models run in inference mode only; call model.eval()"
            )
        _check_input_device(runtime, block, args, kwargs)
        if runtime.unit_resident(block.index):
            # Kept whole in device memory by the plan: the whole table, no gather.
            _enter(runtime, block)
            block.whole.count = getattr(block.whole, "count", 0) + 1
            return args, kwargs
        from_args = bool(args)
        ids = args[0] if from_args else kwargs["input"]
        block.lock.acquire()
        try:
            table, handles = _gather_rows(runtime, block, slot, ids)
            block.row_handles = handles
            slot.param.data = table
            block.entered.count = getattr(block.entered, "count", 0) + 1
        except BaseException:
            block.lock.release()
            raise
        positions = block.row_positions
        if from_args:
            return (positions, *args[1:]), kwargs
        return args, dict(kwargs, input=positions)

    return pre_hook


def _gather_rows(
    runtime: OffloadedModel, block: Block, slot: Any, ids: torch.Tensor
) -> tuple[torch.Tensor, list[int]]:
    if ids.dtype not in (torch.int32, torch.int64):
        raise TypeError(
            f"tensorstream: {block.name} ({type(block.module).__name__}) expects integer ids, "
            f"got {ids.dtype}"
        )
    unique, inverse = torch.unique(ids.reshape(-1), sorted=True, return_inverse=True)
    block.row_positions = inverse.reshape(ids.shape)
    rows = unique.to(device="cpu", dtype=torch.int64).contiguous()
    count = rows.numel()
    shape = (count, *slot.shape[1:])
    if count == 0:
        return torch.empty(shape, dtype=slot.dtype, device=runtime.device), []
    engine = runtime._engine
    stream = _current_stream(runtime.device)
    limit = max(1, int(engine.max_rows(block.index, 0)))

    def acquire(chunk: torch.Tensor) -> tuple[int, torch.Tensor]:
        try:
            handle, address, nbytes = engine.acquire_rows(
                block.index, 0, chunk.data_ptr(), chunk.numel(), stream
            )
        except ValueError as e:
            raise IndexError(
                f"tensorstream: {block.name} ({type(block.module).__name__}): {e}"
            ) from e
        view = runtime._memory.view(address, nbytes).view(slot.dtype)
        return handle, view.view(chunk.numel(), *slot.shape[1:])

    if count <= limit:
        handle, table = acquire(rows)
        return table, [handle]
    # More distinct ids than the arena holds rows: gathered chunk by chunk into a table of
    # their own (activation memory, the size of the lookup's output at most).
    table = torch.empty(shape, dtype=slot.dtype, device=runtime.device)
    for start in range(0, count, limit):
        chunk = rows[start : start + limit]
        handle, part = acquire(chunk)
        try:
            table[start : start + chunk.numel()].copy_(part)
        finally:
            engine.release_rows(handle, stream)
    return table, []


def make_rows_post_hook(runtime: OffloadedModel, block: Block):
    slot = block.slots[0]

    def post_hook(module: nn.Module, args: Any, output: Any) -> None:
        if getattr(block.whole, "count", 0) > 0:
            block.whole.count -= 1
            _leave(runtime, block)
            return
        if getattr(block.entered, "count", 0) == 0:
            return  # the pre-hook failed (and released the lock)
        block.entered.count -= 1
        try:
            slot.param.data = placeholder(slot.dtype, slot.shape, runtime.device)
            block.row_positions = None
            stream = _current_stream(runtime.device)
            for handle in block.row_handles:
                runtime._engine.release_rows(handle, stream)
            block.row_handles = []
        finally:
            block.lock.release()

    return post_hook


def _first_tensor(value: Any, depth: int = 0) -> torch.Tensor | None:
    if isinstance(value, torch.Tensor):
        return value
    if depth < 2 and isinstance(value, (tuple, list)):
        for item in value:
            found = _first_tensor(item, depth + 1)
            if found is not None:
                return found
    return None


def _check_input_device(
    runtime: OffloadedModel, block: Block, args: Any, kwargs: dict[str, Any]
) -> None:
    """Streamed weights live on the runtime's device: inputs elsewhere (the model was moved
    with ``.to()`` after offload) are refused with both devices named."""
    tensor = _first_tensor(args)
    if tensor is None:
        tensor = _first_tensor(tuple(kwargs.values()))
    if tensor is None or tensor.device.type == runtime.device.type:
        if tensor is None or tensor.device.type != "cuda":
            return
        if (tensor.device.index or 0) == (runtime.device.index or 0):
            return
    raise RuntimeError(
        f"tensorstream: {block.name} ({type(block.module).__name__}) streams its weights to "
        f"{runtime.device} but received inputs on {tensor.device}; an offloaded model runs on "
        "the device it was offloaded to. To use another device, load a fresh model and call "
        "tensorstream.offload(model, Config(device=...)) for that device"
    )


def make_post_hook(runtime: OffloadedModel, units: list[Block]):
    def post_hook(module: nn.Module, args: Any, output: Any) -> None:
        # Torch calls this hook also while an exception leaves the block (always_call).
        error = sys.exc_info()[1]
        name = units[0].name
        if is_out_of_memory(error) and not hasattr(error, "_tensorstream_block"):
            # The innermost streamed block the error left; the model's forward reports it
            # (and applies the pressure mode); a block called on its own reports here.
            with contextlib.suppress(AttributeError, TypeError):
                error._tensorstream_block = name  # type: ignore[union-attr]
            if getattr(runtime._forwards, "depth", 0) == 0:
                notify(
                    "out_of_memory",
                    runtime.device,
                    runtime.budget,
                    error,
                    runtime.resident_param_bytes,
                    name,
                    action="raised: the block was called outside the model's forward",
                )
        for block in reversed(units):
            _leave(runtime, block)

    return post_hook


def make_guarded_apply(runtime: OffloadedModel, module: nn.Module):
    """``module._apply`` (behind ``.to()``, ``.cpu()``, ``.cuda()``, ``.half()``, ...) for a
    streamed model. A conversion that keeps the runtime's device and the weights' dtype goes
    through (``.to("cpu")`` after a CPU offload: a no-op for the streamed placeholders). A
    move of the whole model to another CPU/CUDA device, dtype unchanged, moves the runtime
    (:meth:`OffloadedModel.move_to`). Anything else -- another dtype, a part of the model, a
    device kind the engine does not serve -- is refused with a clear error before anything
    is touched: a placeholder must never be moved or converted (that would allocate the full
    tensor and break the swap)."""
    original = type(module)._apply

    def _apply(fn: Any, *args: Any, **kwargs: Any) -> nn.Module:
        if not runtime.closed:
            dtype = runtime._blocks[0].slots[0].dtype if runtime._blocks[0].slots else None
            probe = torch.zeros((), dtype=dtype or torch.float32, device=runtime.device)
            moved = fn(probe)
            if isinstance(moved, torch.Tensor) and (
                moved.device != probe.device or moved.dtype != probe.dtype
            ):
                if (
                    moved.dtype == probe.dtype
                    and moved.device.type in ("cpu", "cuda")
                    and module is runtime._root
                ):
                    runtime.move_to(moved.device)
                    return module
                raise RuntimeError(
                    f"tensorstream: this model is offloaded to {runtime.device} with "
                    f"{probe.dtype} weights; it cannot be moved or converted to "
                    f"{moved.device} / {moved.dtype} afterwards (only the whole model can "
                    "move, to another CPU or CUDA device, keeping its dtype). Offload a fresh "
                    "model with tensorstream.offload(model, Config(device=..., dtype=...)) "
                    "instead"
                )
        return original(module, fn, *args, **kwargs)

    return _apply
