"""``attach(model, source, blocks, ...)``: makes a model stream its blocks from a source.

Both entry points end here -- :func:`tensorstream.offload` with the store it wrote or
reused, :func:`tensorstream.from_pretrained` with the checkpoint (or its converted store):

1. the engine starts from the source under the budget ``config`` gives for ``device``, less
   the resident parameters (:func:`tensorstream.runtime.start_engine`);
2. each block's parameters are mapped to their bytes in the engine's block buffer
   (``engine.tensors``) and become placeholders (the host copies, if any, are dropped);
3. the forward hooks are installed on the blocks, ``.to()`` is guarded, the model's
   ``forward`` is wrapped for memory pressure, and the runtime handle is attached as
   ``model.tensorstream`` (``model.cleanup_tensorstream`` closes it).

The entry points also share the checks here that come before any work (:func:`check_config`,
:func:`check_device`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from . import _debug
from ._analysis import TensorSlot
from ._dtypes import name_to_dtype
from ._hooks import make_guarded_apply, make_post_hook, make_pre_hook
from ._pressure import make_pressure_forward
from ._sources import store_compression
from ._torch_memory import placeholder
from .runtime import OffloadedModel, bind_runtime, engine_options, start_engine

if TYPE_CHECKING:
    from ._analysis import Block
    from ._sources import CheckpointSource, StoreSource

__all__ = ["attach", "check_config", "check_device"]


def check_config(config: Any) -> None:
    """Settings accepted by Config that this build cannot honour fail loudly here, before any
    work, rather than being ignored (compression without zstd)."""
    store_compression(config)


def check_device(device: torch.device) -> None:
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"tensorstream: device '{device}' is not supported (cpu or cuda)")


def attach(
    model: nn.Module,
    source: StoreSource | CheckpointSource,
    blocks: list[Block],
    *,
    config: Any,
    device: torch.device,
    resident_bytes: int,
) -> OffloadedModel:
    """Streams ``blocks`` of ``model`` from ``source`` on ``device`` under ``config``'s
    budgets and returns the runtime attached to ``model``. ``blocks`` are numbered as the
    source's blocks, and each block's ``params`` name their tensors as the source does;
    ``resident_bytes`` are the parameters that stay on the device (already there)."""
    if config.debug_mode:
        _debug.enable_logging()
    options, budget = engine_options(config, device)
    engine, memory = start_engine(source, options, budget, resident_bytes, device)
    try:
        _map_parameters(engine, source, blocks, device)
    except BaseException:
        engine.close()
        raise
    runtime = OffloadedModel(
        source,
        engine,
        memory,
        blocks,
        device=device,
        resident_param_bytes=resident_bytes,
        options=options,
        budget=budget,
        config=config,
    )
    _install(model, runtime)
    return runtime


def _map_parameters(
    engine: Any, source: StoreSource | CheckpointSource, blocks: list[Block], device: torch.device
) -> None:
    """Fills each block's slots from the engine's placements and makes its parameters
    placeholders of the source's dtype on ``device``."""
    for block in blocks:
        if engine.block_name(block.index) != block.name:
            raise RuntimeError(
                f"tensorstream: engine block {block.index} is "
                f"'{engine.block_name(block.index)}', expected '{block.name}'"
            )
        placements = {t["name"]: t for t in engine.tensors(block.index)}
        for name, param in block.params:
            info = placements[name]
            dtype = name_to_dtype(info["dtype"], name)
            shape = torch.Size(info["shape"])
            if shape != param.shape:
                raise ValueError(
                    f"tensorstream: {source.description} holds '{name}' with shape "
                    f"{tuple(shape)}, the model expects {tuple(param.shape)}"
                )
            block.slots.append(TensorSlot(param, info["offset"], info["nbytes"], dtype, shape))
    # Only once every block maps: a failure above leaves the parameters as they were.
    for block in blocks:
        for slot in block.slots:
            slot.param.data = placeholder(slot.dtype, slot.shape, device)
            slot.param.requires_grad_(False)


def _install(model: nn.Module, runtime: OffloadedModel) -> None:
    """Hooks every block of ``runtime`` (its slots filled, its parameters placeholders), guards
    ``.to()``/``.cpu()`` moves and attaches the runtime handle to ``model``."""
    blocks = runtime._blocks
    for block in blocks:
        runtime._hooks.append(
            block.module.register_forward_pre_hook(make_pre_hook(runtime, block), with_kwargs=True)
        )
        runtime._hooks.append(
            block.module.register_forward_hook(make_post_hook(runtime, block), always_call=True)
        )
    for module in {id(m): m for m in (model, *(b.module for b in blocks))}.values():
        module._apply = make_guarded_apply(runtime, module)  # type: ignore[method-assign]
        runtime._guarded.append(module)
    model.forward = make_pressure_forward(runtime, model.forward)  # type: ignore[method-assign]
    runtime._root = model
    bind_runtime(model, runtime)
