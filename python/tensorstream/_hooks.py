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

__all__ = ["closed_hook", "make_guarded_apply", "make_post_hook", "make_pre_hook"]


def closed_hook(module: nn.Module, args: Any) -> None:
    raise RuntimeError(
        f"tensorstream: {type(module).__name__} was streamed by a runtime that has been closed "
        "(cleanup_tensorstream()); its weights are no longer available"
    )


def _current_stream(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.current_stream(device).cuda_stream
    return 0


def make_pre_hook(runtime: OffloadedModel, block: Block):
    def pre_hook(module: nn.Module, args: Any, kwargs: dict[str, Any]) -> None:
        if module.training:
            raise RuntimeError(
                "tensorstream: streamed models run in inference mode only; call model.eval()"
            )
        _check_input_device(runtime, block, args, kwargs)
        with block.lock:
            if block.active == 0:
                stream = _current_stream(runtime.device)
                if runtime.debug:
                    address, size, _ = _debug.acquire(runtime, block, stream)
                else:
                    address, size, _ = runtime._engine.acquire(block.index, stream)
                raw = runtime._memory.view(address, size)
                for s in block.slots:
                    s.param.data = raw[s.offset : s.offset + s.nbytes].view(s.dtype).view(s.shape)
            # else: another thread already made this block's weights available
            block.active += 1
            block.entered.count = getattr(block.entered, "count", 0) + 1

    return pre_hook


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


def make_post_hook(runtime: OffloadedModel, block: Block):
    def post_hook(module: nn.Module, args: Any, output: Any) -> None:
        # Torch calls this hook also while an exception leaves the block (always_call).
        error = sys.exc_info()[1]
        if is_out_of_memory(error) and not hasattr(error, "_tensorstream_block"):
            # The innermost streamed block the error left; the model's forward reports it
            # (and applies the pressure mode); a block called on its own reports here.
            with contextlib.suppress(AttributeError, TypeError):
                error._tensorstream_block = block.name  # type: ignore[union-attr]
            if getattr(runtime._forwards, "depth", 0) == 0:
                notify(
                    "out_of_memory",
                    runtime.device,
                    runtime.budget,
                    error,
                    runtime.resident_param_bytes,
                    block.name,
                    action="raised: the block was called outside the model's forward",
                )
        with block.lock:
            if getattr(block.entered, "count", 0) == 0:
                return  # the pre-hook failed before making the weights available
            block.entered.count -= 1
            block.active -= 1
            if block.active > 0:
                return
            for s in block.slots:
                s.param.data = placeholder(s.dtype, s.shape, runtime.device)
            runtime._engine.release(block.index, _current_stream(runtime.device))
            if runtime.debug:
                _debug.released(runtime, block)

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
