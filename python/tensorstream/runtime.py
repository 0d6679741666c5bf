"""The runtime handle of a streamed model (:class:`OffloadedModel`, ``model.tensorstream``).

It owns the engine, the torch memory the engine's buffers live in and the source they stream
from, and it is the one place where the engine is restarted: a device move
(:meth:`OffloadedModel.move_to`), a new budget (:meth:`OffloadedModel.replan`, used by
:func:`tensorstream.optimize_memory_usage` and the memory-pressure retry) both close the
engine, start one from the same source, and start the previous one again if that fails.
:func:`start_engine` is how an engine is started, the first time (by
:func:`tensorstream._attach.attach`) and on every restart.
"""

from __future__ import annotations

import logging
import os
import threading
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from . import _core
from ._dtypes import NAME_TO_TORCH
from ._hooks import closed_hook
from ._pressure import notify
from ._torch_memory import TorchMemory, placeholder, placeholder_bytes

if TYPE_CHECKING:
    from ._analysis import Block
    from ._sources import CheckpointSource, StoreSource

__all__ = [
    "OffloadedModel",
    "bind_runtime",
    "engine_options",
    "get_model_statistics",
    "runtime_of",
    "start_engine",
]

logger = logging.getLogger("tensorstream")

_ATTRIBUTE = "_tensorstream_runtime"


def runtime_of(model: nn.Module) -> OffloadedModel | None:
    """The runtime attached to ``model``, or None if it was never offloaded."""
    return getattr(model, _ATTRIBUTE, None)


def bind_runtime(model: nn.Module, runtime: OffloadedModel) -> None:
    """Attaches ``runtime`` to ``model``: ``model.tensorstream`` is the handle,
    ``model.cleanup_tensorstream()`` closes it, :func:`runtime_of` finds it."""
    setattr(model, _ATTRIBUTE, runtime)
    model.tensorstream = runtime
    model.cleanup_tensorstream = runtime.close


def get_model_statistics(model: nn.Module) -> dict[str, Any]:
    """Statistics of a streamed model (device bytes in use and peak, layers offloaded, cache
    hit rate, I/O throughput, stall time, ...)."""
    runtime = runtime_of(model)
    if runtime is None:
        raise ValueError("tensorstream: this model is not offloaded (call tensorstream.offload)")
    return runtime.statistics()


def engine_options(config: Any, device: torch.device) -> tuple[dict[str, Any], int]:
    """The engine options ``config`` gives for ``device``, and the whole weight budget
    (resident parameters + engine) they hold as ``device_budget``. ``debug_mode`` adds
    ``check_invariants``: the engine checks its invariants after every call."""
    target = "cpu" if device.type == "cpu" else f"cuda:{device.index or 0}"
    options = dict(config.engine_options(device=target))
    options["device"] = target
    if config.debug_mode:
        options["check_invariants"] = True
    return options, options["device_budget"]


def start_engine(
    source: StoreSource | CheckpointSource,
    options: dict[str, Any],
    budget: int,
    resident_bytes: int,
    device: torch.device,
) -> tuple[Any, TorchMemory]:
    """An engine for ``source`` whose budget is ``budget`` less the resident parameters and
    the shared placeholders of the source's dtypes on ``device``, and the torch memory its
    buffers live in. A refused budget reaches the memory-pressure callback, then the caller,
    as a BudgetTooSmallError naming the whole budget that would work."""
    # A dtype this torch lacks is left to the parameter mapping, which names the tensor.
    dtypes = (NAME_TO_TORCH[n] for n in source.dtype_names() if n in NAME_TO_TORCH)
    placeholders = placeholder_bytes(dtypes, device)
    reserved = resident_bytes + placeholders
    options = dict(options)
    options["device_budget"] = budget - reserved
    if options["device_budget"] <= 0:
        error = _core.BudgetTooSmallError(
            f"tensorstream: vram budget of {budget:,} bytes does not even hold the "
            f"{resident_bytes:,} bytes of resident (non-streamed) parameters and the "
            f"{placeholders:,} bytes of placeholders"
        )
        # The smallest budget for the streamed blocks alone, from the source.
        error.minimum_budget = reserved + source.streaming_minimum(options)
        notify("budget_too_small", device, budget, error, resident_bytes)
        raise error
    memory = TorchMemory(device)
    try:
        engine = source.open(options, memory)
        memory.in_place = bool(engine.stats()["in_place"])
    except _core.BudgetTooSmallError as e:
        minimum = e.minimum_budget + reserved
        error = _core.BudgetTooSmallError(
            f"tensorstream: vram budget of {budget:,} bytes is too small for this model: at "
            f"least {minimum:,} bytes are needed ({resident_bytes:,} resident + "
            f"{placeholders:,} placeholders + {e.minimum_budget:,} for streaming)"
        )
        error.minimum_budget = minimum
        notify("budget_too_small", device, budget, error, resident_bytes)
        raise error from e
    plan = engine.plan
    if not plan["overlap"] and not all(plan["resident"]):
        overlap_budget = reserved + source.overlap_minimum(options)
        if budget < overlap_budget:
            warnings.warn(
                f"tensorstream: a budget of {budget:,} bytes holds only one streamed unit at a "
                "time: every load waits in front of the computation (no overlap). A budget of "
                f"{overlap_budget:,} bytes lets loads overlap compute",
                RuntimeWarning,
                stacklevel=3,
            )
    return engine, memory


class OffloadedModel:
    """The runtime of a streamed model: statistics, trace export and clean-up. Reached as
    ``model.tensorstream`` after :func:`offload`; also a context manager (closing on exit).

    Forwards may run in several threads at once (the hooks keep per-block counts under each
    block's lock); a restart (:meth:`move_to`, :meth:`replan`) and :meth:`close` must not run
    while a forward does."""

    def __init__(
        self,
        source: StoreSource | CheckpointSource,
        engine: Any,
        memory: TorchMemory,
        blocks: list[Block],
        *,
        device: torch.device,
        resident_param_bytes: int,
        options: dict[str, Any],
        budget: int,
        config: Any,
    ) -> None:
        self._engine = engine
        self._blocks = blocks
        self._memory = memory
        self._hooks: list[Any] = []
        self._guarded: list[nn.Module] = []  # modules whose _apply refuses device/dtype moves
        self.source = source
        self.device = device
        self.resident_param_bytes = resident_param_bytes
        self.options = dict(options)  # the engine's options; device_budget excludes
        self.budget = budget  # the whole weight budget: resident parameters + engine
        self.closed = False
        # What an out-of-memory error in a forward does (see _pressure.PRESSURE_POLICY).
        self.pressure_mode = config.memory_pressure_mode.value
        self.config = config  # the Config it was offloaded with (for device moves)
        # Config.debug_mode: the hooks log acquires and releases (_debug).
        self.debug = bool(config.debug_mode)
        self._acquired_at: dict[int, float] = {}  # debug: block index -> acquire time
        self._root: nn.Module | None = None  # the model whose forward is wrapped (attach)
        self._forwards = threading.local()  # per thread: depth of wrapped forwards running
        self._sites: list[nn.Module] = []  # the modules whose hooks hold units (attach)
        self._padding: list[tuple[nn.Module, Any]] = []  # tables by rows: their padding_idx
        self._resident: list[bool] = []  # the plan's resident units, of engine _resident_of
        self._resident_of: Any = None
        self.tier = "blocks"  # how finely the model is cut into units (_analysis.TIERS)
        self._experts: Any = None  # the routed experts forwards (_experts.ExpertsRuntime)

    @property
    def predict_experts(self) -> bool:
        """Whether each experts layer prefetches the experts the next layer's router picks
        for its input (True by default; a model without experts: False)."""
        return bool(self._experts is not None and self._experts.predict)

    @predict_experts.setter
    def predict_experts(self, value: bool) -> None:
        if self._experts is None:
            raise ValueError("tensorstream: this model has no streamed experts")
        self._experts.predict = bool(value)

    def unit_resident(self, index: int) -> bool:
        """Whether the engine's plan keeps unit ``index`` in device memory for good."""
        engine = self._engine
        if self._resident_of is not engine:
            self._resident = list(engine.plan["resident"])
            self._resident_of = engine
        return self._resident[index]

    @property
    def store_path(self) -> Path:
        """The file (store) or directory (checkpoint) the blocks stream from."""
        return self.source.path

    def move_to(self, device: torch.device) -> None:
        """Moves the streamed model to ``device`` (``model.to(device)`` after offload): the
        resident parameters and buffers move, the engine restarts for the new device on the
        same store, the budget is the Config's for that device (its automatic budget is
        recomputed there). If the engine cannot start there, everything moves back and the
        error is raised. No forward may be running."""
        self._check_open()
        self._check_idle("tensorstream: cannot move the model while a forward is running")
        options, budget = engine_options(self.config, device)
        self._restart(options, budget, device)
        logger.info("tensorstream: moved to %s (budget %d bytes)", device, budget)

    def replan(self, budget: int) -> None:
        """Restarts the engine on the same store (or checkpoint) under a new whole weight
        budget; nothing is rewritten. If the engine refuses ``budget`` (BudgetTooSmallError,
        after the memory-pressure callback) the model keeps its previous budget and the
        error is raised. No forward may be running."""
        self._check_open()
        self._check_idle("tensorstream: cannot re-plan while a forward is running")
        self._restart(self.options, budget)
        logger.info("tensorstream: re-planned for a budget of %d bytes", budget)

    def optimize_memory_usage(self, target_utilization: float) -> dict[str, Any]:
        """:func:`tensorstream.optimize_memory_usage` of this model: re-plans for
        ``target_utilization`` × the current budget (on CUDA: × the device's free memory
        plus what the weights hold) and returns the new statistics."""
        self._check_open()
        if not isinstance(target_utilization, (int, float)) or not target_utilization > 0:
            raise ValueError(
                f"optimize_memory_usage: target_utilization must be > 0, got {target_utilization!r}"
            )
        self._check_idle("tensorstream: optimize_memory_usage() called while a forward is running")
        if self.device.type == "cuda":
            free, _ = torch.cuda.mem_get_info(self.device)
            held = (
                self._engine.stats()["device_bytes_in_use"]
                + self.resident_param_bytes
                + self.placeholder_bytes
            )
            base = free + held
        else:
            base = self.budget
        self.replan(int(base * target_utilization))
        return self.statistics()

    def _restart(
        self, options: dict[str, Any], budget: int, device: torch.device | None = None
    ) -> None:
        """Closes the engine and starts one from the same source with ``options`` and
        ``budget`` -- on ``device`` when given, the resident parameters and buffers moved
        there first. If that fails, the model goes back to its previous device, an engine is
        started again with the previous options and budget, and the error is raised."""
        previous = (self.options, self.budget, self.device)
        target = device if device is not None else self.device
        self._engine.close()
        self._memory.forget_windows()
        if device is not None:
            self._place(device)
        try:
            engine, memory = start_engine(
                self.source, options, budget, self.resident_param_bytes, target
            )
        except BaseException:
            old_options, old_budget, old_device = previous
            if device is not None:
                self._place(old_device)
            self._engine, self._memory = start_engine(
                self.source, old_options, old_budget, self.resident_param_bytes, old_device
            )
            raise
        self._engine, self._memory = engine, memory
        self.options, self.budget, self.device = options, budget, target

    def _check_idle(self, message: str) -> None:
        if any(block.active for block in self._blocks):
            raise RuntimeError(message)

    def _place(self, device: torch.device) -> None:
        """Resident parameters and buffers to ``device``; streamed placeholders re-made there."""
        streamed = {id(s.param) for b in self._blocks for s in b.slots}
        with torch.no_grad():
            for module in self._root.modules() if self._root is not None else ():
                for p in module.parameters(recurse=False):
                    if id(p) not in streamed:
                        p.data = p.data.to(device)
                for name, b in module.named_buffers(recurse=False):
                    module._buffers[name] = b.to(device)
            for block in self._blocks:
                for slot in block.slots:
                    slot.param.data = placeholder(slot.dtype, slot.param_shape, device)

    @property
    def placeholder_bytes(self) -> int:
        """Device bytes of the placeholders the streamed parameters share (one per dtype),
        counted in the budget beside the resident parameters and the engine."""
        dtypes = {slot.dtype for block in self._blocks for slot in block.slots}
        return placeholder_bytes(dtypes, self.device)

    # statistics
    def statistics(self) -> dict[str, Any]:
        self._check_open()
        stats = self._engine.stats()
        plan = self._engine.plan
        stats.update(
            layers_offloaded=sum(1 for r in plan["resident"] if not r),
            layers_resident_in_plan=sum(1 for r in plan["resident"] if r),
            blocks=len(self._blocks),
            units=len(self._blocks),
            unit_tier=self.tier,
            units_by_rows=sum(1 for b in self._blocks if b.rows),
            # A unit loads while another computes; False at budgets below that (loads wait).
            overlap=bool(plan["overlap"]) or not any(not r for r in plan["resident"]),
            store=str(self.store_path),
            device=str(self.device),
            resident_param_bytes=self.resident_param_bytes,
            placeholder_bytes=self.placeholder_bytes,
            budget=self.budget,
            # Everything the weights hold on the device: <= budget.
            vram_in_use=stats["device_bytes_in_use"]
            + self.resident_param_bytes
            + self.placeholder_bytes,
            cache_hit_rate=stats["ram_tier"]["hit_rate"],
            io_throughput_gbps=stats["storage_gbps"],
            stall_time_seconds=stats["stall_seconds"],
        )
        if self._experts is not None:
            stats["experts"] = self._experts.statistics(stats, list(plan["resident"]))
        return stats

    def print_statistics(self) -> None:
        s = self.statistics()
        rows = [
            ("device", s["device"]),
            (
                "blocks streamed / resident",
                f"{s['layers_offloaded']} / {s['layers_resident_in_plan']}",
            ),
            (
                "device bytes (peak / budget)",
                f"{s['device_bytes_peak']:,} / {s['device_budget']:,}",
            ),
            ("acquires (ready / waited)", f"{s['device_hits']} / {s['device_misses']}"),
            ("read path", s["backend"] + (" (in place)" if s["in_place"] else "")),
            ("bytes from storage", f"{s['bytes_from_storage']:,}"),
            ("bytes from page cache", f"{s['bytes_from_page_cache']:,}"),
            ("bytes from RAM tier", f"{s['bytes_from_ram_tier']:,}"),
            ("RAM tier hit rate", f"{s['cache_hit_rate']:.1%}"),
            (
                "storage throughput",
                f"{s['io_throughput_gbps']:.2f} GB/s"
                if s["bytes_from_storage"]
                else "- (nothing read from storage)",
            ),
            ("stall time", f"{s['stall_time_seconds'] * 1e3:.1f} ms"),
            ("prefetch depth", str(s["prefetch_depth"])),
        ]
        width = max(len(k) for k, _ in rows)
        for key, value in rows:
            print(f"  {key:<{width}}  {value}")

    def export_trace(self, path: str | os.PathLike[str]) -> Path:
        """Writes a Chrome/Perfetto trace of reads, copies and stalls to ``path``."""
        self._check_open()
        target = Path(path)
        target.write_text(self._engine.trace_json())
        return target

    def close(self) -> None:
        """Removes the hooks, stops the engine and returns its memory. The model cannot run
        its streamed layers afterwards (a clear error says so). Idempotent."""
        if self.closed:
            return
        self.closed = True
        for handle in self._hooks:
            handle.remove()
        self._hooks.clear()
        for module in self._guarded:
            module.__dict__.pop("_apply", None)
        self._guarded.clear()
        for block in self._blocks:
            for slot in block.slots:
                slot.param.data = placeholder(slot.dtype, slot.param_shape, self.device)
        for module in self._sites:
            module.register_forward_pre_hook(closed_hook)
        for module, padding_idx in self._padding:
            module.padding_idx = padding_idx
        self._padding.clear()
        if self._root is not None:
            self._root.__dict__.pop("forward", None)
            self._root = None
        self._engine.close()
        self._memory.forget_windows()

    def __enter__(self) -> OffloadedModel:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _check_open(self) -> None:
        if self.closed:
            raise RuntimeError("tensorstream: this model's streaming runtime was closed")
