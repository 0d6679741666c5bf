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

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from . import _core, _debug
from ._analysis import TIERS, Partition, TensorSlot
from ._dtypes import NAME_TO_TORCH, name_to_dtype
from ._experts import install_routed
from ._hooks import (
    make_guarded_apply,
    make_post_hook,
    make_pre_hook,
    make_rows_post_hook,
    make_rows_pre_hook,
)
from ._pressure import make_pressure_forward, notify
from ._sources import UnitSpec, store_compression
from ._torch_memory import placeholder, placeholder_bytes
from .runtime import OffloadedModel, bind_runtime, engine_options, start_engine

if TYPE_CHECKING:
    from ._analysis import Block
    from ._sources import CheckpointSource, StoreSource

__all__ = ["TierCost", "attach", "check_config", "check_device", "choose_units", "tier_costs"]


def check_config(config: Any) -> None:
    """Settings accepted by Config that this build cannot honour fail loudly here, before any
    work, rather than being ignored (compression without zstd)."""
    store_compression(config)


def check_device(device: torch.device) -> None:
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"tensorstream: device '{device}' is not supported (cpu or cuda)")


def unit_spec(part: Partition, name_of: Callable[[str], str] = str) -> UnitSpec:
    """The engine's view of ``part``: its units' tensors named by ``name_of`` (the source's
    names), what each is held with, which are used by rows, how often each is used."""
    return UnitSpec(
        {u.name: [name_of(n) for n, _ in u.params] for u in part.units},
        tuple(frozenset(h) for h in part.held_with),
        tuple(u.rows for u in part.units),
        tuple(u.use_rate for u in part.units),
    )


class TierCost:
    """What one tier of units costs on a device: the whole budget (resident parameters +
    placeholders + engine) at its physical minimum, with overlap, and with everything
    resident."""

    def __init__(self, part: Partition, source: Any, resident: int, placeholders: int,
                 options: dict[str, Any]) -> None:  # fmt: skip
        self.part = part
        self.source = source
        self.resident = resident
        self.placeholders = placeholders
        reserved = resident + placeholders
        sizes, _, _ = source.demands(str(options.get("device", "cpu")))
        self.minimum = reserved + source.streaming_minimum(options)
        self.all_resident = reserved + sum(_footprint(x) for x in sizes)
        self.overlap = min(reserved + source.overlap_minimum(options), self.all_resident)

    @property
    def name(self) -> str:
        return TIERS[self.part.tier]


def _footprint(nbytes: int) -> int:
    a = _core.SLOT_ALIGNMENT
    return max(a, (nbytes + a - 1) // a * a)


def tier_costs(
    partitions: list[Partition],
    source: StoreSource | CheckpointSource,
    device: torch.device,
    options: dict[str, Any],
    resident_bytes_of: Callable[[Partition], int],
    name_of: Callable[[str], str] = str,
) -> list[TierCost]:
    """The cost of each partition (coarsest first) streamed from ``source`` on ``device``."""
    costs = []
    for part in partitions:
        src = source.with_units(unit_spec(part, name_of))
        dtypes = (NAME_TO_TORCH[n] for n in src.dtype_names() if n in NAME_TO_TORCH)
        costs.append(
            TierCost(part, src, resident_bytes_of(part), placeholder_bytes(dtypes, device), options)
        )
    return costs


def choose_units(
    partitions: list[Partition],
    source: StoreSource | CheckpointSource,
    *,
    config: Any,
    device: torch.device,
    resident_bytes_of: Callable[[Partition], int],
    name_of: Callable[[str], str] = str,
) -> TierCost:
    """The tier to run under ``config``'s budget on ``device``: the coarsest under which a
    unit loads while another computes, else the coarsest that fits at all (loads then wait:
    :func:`tensorstream.runtime.start_engine` warns). Below every tier's minimum: a
    BudgetTooSmallError whose ``minimum_budget`` is the smallest of them (after the
    memory-pressure callback)."""
    options, budget = engine_options(config, device)
    costs = tier_costs(partitions, source, device, options, resident_bytes_of, name_of)
    fits = [c for c in costs if budget >= c.minimum]
    if not fits:
        best = min(costs, key=lambda c: c.minimum)
        streaming = best.minimum - best.resident - best.placeholders
        error = _core.BudgetTooSmallError(
            f"tensorstream: vram budget of {budget:,} bytes is too small for this model: at "
            f"least {best.minimum:,} bytes are needed ({best.resident:,} resident + "
            f"{best.placeholders:,} placeholders + {streaming:,} "
            f"for streaming its {len(best.part.units)} units of {best.name!r}; the largest "
            "single tensor that must be present at once sets this minimum)"
        )
        error.minimum_budget = best.minimum
        notify("budget_too_small", device, budget, error, best.resident)
        raise error
    overlapping = [c for c in fits if budget >= c.overlap]
    return (overlapping or fits)[0]


def attach(
    model: nn.Module,
    choice: TierCost,
    *,
    config: Any,
    device: torch.device,
) -> OffloadedModel:
    """Streams the units of ``choice`` (from :func:`choose_units`) of ``model`` on ``device``
    under ``config``'s budgets and returns the runtime attached to ``model``. The units'
    ``params`` name their tensors as the source does; the partition's resident parameters
    stay on the device (already there, or placed by the caller)."""
    if config.debug_mode:
        _debug.enable_logging()
    source, blocks, resident_bytes = choice.source, choice.part.units, choice.resident
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
    runtime.tier = choice.name
    _install(model, runtime, choice.part, config)
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
            # An expert's tensor is its slice of a fused [E, ...] parameter.
            expected = param.shape[1:] if block.expert is not None else param.shape
            if shape != expected:
                raise ValueError(
                    f"tensorstream: {source.description} holds '{name}' with shape "
                    f"{tuple(shape)}, the model expects {tuple(expected)}"
                )
            full = param.shape if block.expert is not None else None
            block.slots.append(
                TensorSlot(param, info["offset"], info["nbytes"], dtype, shape, full)
            )
    # Only once every block maps: a failure above leaves the parameters as they were.
    for block in blocks:
        for slot in block.slots:
            slot.param.data = placeholder(slot.dtype, slot.param_shape, device)
            slot.param.requires_grad_(False)


def _install(model: nn.Module, runtime: OffloadedModel, part: Partition, config: Any) -> None:
    """Hooks every site of ``part`` (its units' slots filled, their parameters placeholders),
    guards ``.to()``/``.cpu()`` moves and attaches the runtime handle to ``model``."""
    for module, units in part.sites:
        if len(units) == 1 and units[0].rows:
            pre, post = (
                make_rows_pre_hook(runtime, units[0]),
                make_rows_post_hook(runtime, units[0]),
            )
            # The gathered table is indexed by position: padding_idx (which only matters for
            # gradients) would be out of its range. Restored by close().
            runtime._padding.append((module, module.padding_idx))
            module.padding_idx = None
        else:
            pre, post = make_pre_hook(runtime, units), make_post_hook(runtime, units)
        runtime._hooks.append(module.register_forward_pre_hook(pre, with_kwargs=True))
        runtime._hooks.append(module.register_forward_hook(post, always_call=True))
    runtime._sites = [module for module, _ in part.sites]
    if part.experts:
        # Only the routed experts stream; a closed runtime's experts fail like other sites.
        install_routed(runtime, part.experts, predict=True)
        runtime._sites += [x.module for x in part.experts]
    for module in {id(m): m for m in (model, *runtime._sites)}.values():
        module._apply = make_guarded_apply(runtime, module)  # type: ignore[method-assign]
        runtime._guarded.append(module)
    model.forward = make_pressure_forward(runtime, model.forward)  # type: ignore[method-assign]
    runtime._root = model
    bind_runtime(model, runtime)
