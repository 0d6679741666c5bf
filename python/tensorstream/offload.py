"""``offload(model, config)``: stream a model's large layers from a store, within a budget.

What happens (torch-facing; everything that moves bytes runs in the C++ engine):

1. **Blocks.** Every child of an ``nn.ModuleList`` of two or more modules of one class (the
   decoder layers of a transformer) is a block; so is any other module whose own parameters
   take at least ``config.min_layer_size`` bytes (embeddings, heads). Everything else —
   norms, small projections, buffers — stays resident on the device.
2. **Tied weights** (a parameter reachable from two places, such as ``lm_head.weight`` and
   ``embed_tokens.weight``) stay resident: one copy, shared as before.
3. **Store.** The streamed parameters are written to ``<storage_path>/<fingerprint>.tstore``;
   the fingerprint hashes names, dtypes, shapes and bytes, so a second ``offload()`` of the
   same weights reuses the store and changed weights get a new one.
4. **Engine.** The residency plan keeps as many blocks resident as the budget allows beside
   the streaming slots; the slots' memory comes from torch, so torch's allocator sees it.
5. **Hooks.** Before a block runs, its parameters become views into the block's slot
   (``param.data = view``: no copy); after it runs they become one-element placeholders
   (right shape and dtype, no memory) and the slot is released. The host copies of the
   streamed weights are dropped, so the process holds no second copy.

6. **dtype.** With ``config.dtype`` (float16/bfloat16), floating-point parameters and buffers
   are converted in place first, one tensor at a time, as ``model.to(dtype)`` would: the store
   holds the converted weights and the whole model runs in that dtype.
7. **Devices.** The model runs on the device it was offloaded to (``config.device``, else
   where its parameters are). ``model.to()`` / ``.cpu()`` that keep that device and dtype are
   no-ops for the streamed weights; moving or converting an offloaded model to anything else
   raises RuntimeError (offload a fresh model with ``Config(device=...)`` instead), and inputs
   on another device are refused by the hooks with both devices named.
8. **Memory pressure.** :func:`set_memory_pressure_callback` sets a function called when the
   engine refuses a budget or torch runs out of memory inside a streamed block.

This slice runs on the CPU device. CUDA devices use the same engine path (acquire makes the
current stream wait for the copy); they are exercised only where a GPU is present.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import sys
import threading
import types
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from . import _core
from ._dtypes import dtype_to_name
from ._store import _host_contiguous, store_writer

__all__ = [
    "OffloadedModel",
    "get_model_statistics",
    "offload",
    "set_memory_pressure_callback",
]

logger = logging.getLogger("tensorstream")

_ATTRIBUTE = "_tensorstream_runtime"


# ---- model analysis ------------------------------------------------------------------------


def _param_bytes(module: nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in module.parameters(recurse=False))


def find_blocks(model: nn.Module, min_layer_size: int) -> list[tuple[str, nn.Module]]:
    """The modules to stream, in module order: repeated layers, then large leaves."""
    layer_lists: set[int] = set()
    blocks: list[tuple[str, nn.Module]] = []
    inside: set[int] = set()
    for name, module in model.named_modules():
        if id(module) in inside:
            for child in module.modules():
                inside.add(id(child))
            continue
        if isinstance(module, nn.ModuleList) and len(module) >= 2:
            kinds = {type(child) for child in module}
            if len(kinds) == 1:
                layer_lists.add(id(module))
                for index, child in enumerate(module):
                    blocks.append((f"{name}.{index}" if name else str(index), child))
                    for sub in child.modules():
                        inside.add(id(sub))
                continue
        if _param_bytes(module) >= min_layer_size:
            blocks.append((name, module))
            inside.add(id(module))
    return blocks


def _shared_parameters(model: nn.Module) -> set[int]:
    """ids of parameters reachable under more than one name (tied weights)."""
    seen: dict[int, int] = {}
    for _, module in model.named_modules(remove_duplicate=False):
        for _, param in module.named_parameters(recurse=False):
            seen[id(param)] = seen.get(id(param), 0) + 1
    return {pid for pid, count in seen.items() if count > 1}


@dataclass
class _TensorSlot:
    """Where one parameter lives inside its block's bytes."""

    param: nn.Parameter
    offset: int
    nbytes: int
    dtype: torch.dtype
    shape: torch.Size


@dataclass
class _Block:
    index: int
    name: str
    module: nn.Module
    params: list[tuple[str, nn.Parameter]]  # (qualified name, parameter)
    slots: list[_TensorSlot] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)
    active: int = 0  # forwards running on this block (threads may share one model)
    # Per thread: how many of this thread's forwards of the block the pre-hook entered, so the
    # post-hook (which torch also calls after a failed pre-hook) only undoes what was done.
    entered: threading.local = field(default_factory=threading.local)


# ---- device memory from torch ----------------------------------------------------------------


_MADV_HUGEPAGE = 14  # Linux


def _advise_huge_pages(address: int, nbytes: int) -> None:
    """Asks for transparent huge pages: O_DIRECT reads into physically contiguous memory
    reach the disk's full speed (docs/benchmarks.md). Advice only; failures are ignored."""
    if nbytes < (2 << 20) or not sys.platform.startswith("linux"):
        return
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.madvise(ctypes.c_void_p(address), ctypes.c_size_t(nbytes), _MADV_HUGEPAGE)
    except (OSError, AttributeError):
        pass


class _TorchMemory:
    """Gives the engine memory allocated by torch on the target device and maps the addresses
    the engine returns back to tensors."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self._buffers: dict[int, torch.Tensor] = {}
        # A CPU engine reading in place returns addresses inside its block windows (the
        # store's pages, mapped): tensors over them, made once per window.
        self.in_place = False
        self._windows: dict[int, torch.Tensor] = {}
        self._lock = threading.Lock()

    def allocate(self, nbytes: int) -> int:
        if self.device.type == "cpu":
            # The engine reads with O_DIRECT into this memory: align it to a page.
            raw = torch.empty(nbytes + 4096, dtype=torch.uint8)
            start = (-raw.data_ptr()) % 4096
            tensor = raw[start : start + nbytes]
            _advise_huge_pages(tensor.data_ptr(), nbytes)
            tensor.zero_()  # fault the pages in now, not during the first fill
        else:
            tensor = torch.empty(nbytes, dtype=torch.uint8, device=self.device)
        with self._lock:
            self._buffers[tensor.data_ptr()] = tensor
        return tensor.data_ptr()

    def release(self, address: int, nbytes: int) -> None:
        with self._lock:
            self._buffers.pop(address, None)

    def view(self, address: int, size: int) -> torch.Tensor:
        with self._lock:
            tensor = self._buffers.get(address)
            if tensor is None and self.in_place:
                tensor = self._windows.get(address)
                if tensor is None or tensor.numel() < size:
                    window = (ctypes.c_uint8 * size).from_address(address)
                    tensor = torch.frombuffer(window, dtype=torch.uint8)
                    self._windows[address] = tensor
        if tensor is None or tensor.numel() < size:
            raise RuntimeError(f"tensorstream: engine returned unknown memory {address:#x}")
        return tensor[:size]

    def forget_windows(self) -> None:
        """Drops the tensors over block windows (call when the engine closes them)."""
        with self._lock:
            self._windows.clear()


# ---- the runtime handle ------------------------------------------------------------------------


class OffloadedModel:
    """The runtime of a streamed model: statistics, trace export and clean-up. Reached as
    ``model.tensorstream`` after :func:`offload`; also a context manager (closing on exit)."""

    def __init__(
        self,
        model: nn.Module,
        engine: Any,
        blocks: list[_Block],
        memory: _TorchMemory,
        store_path: Path,
        device: torch.device,
        resident_bytes: int,
        options: dict[str, Any] | None = None,
        budget: int = 0,
    ) -> None:
        self._model = model
        self._engine = engine
        self._blocks = blocks
        self._memory = memory
        self._hooks: list[Any] = []
        self._guarded: list[nn.Module] = []  # modules whose _apply refuses device/dtype moves
        self.store_path = store_path
        self.device = device
        self.resident_param_bytes = resident_bytes
        self.options = dict(options or {})  # the engine's options; device_budget excludes
        self.budget = budget  # the whole weight budget: resident parameters + engine
        self.closed = False
        # What an out-of-memory error in a forward does (see _PRESSURE_POLICY).
        self.pressure_mode = "balanced"
        self.config: Any = None  # the Config it was offloaded with (for device moves)
        self._root: nn.Module | None = None  # the model whose forward is wrapped
        self._forwards = threading.local()  # per thread: depth of wrapped forwards running

    def move_to(self, device: torch.device) -> None:
        """Moves the streamed model to ``device`` (``model.to(device)`` after offload): the
        resident parameters and buffers move, the engine restarts for the new device on the
        same store, the budget is the Config's for that device (its automatic budget is
        recomputed there). If the engine cannot start there, everything moves back and the
        error is raised. No forward may be running."""
        self._check_open()
        if any(block.active for block in self._blocks):
            raise RuntimeError("tensorstream: cannot move the model while a forward is running")
        old = self.device
        target = "cpu" if device.type == "cpu" else f"cuda:{device.index or 0}"
        options = dict(self.config.engine_options(device=target))
        options["device"] = target
        budget = options["device_budget"]
        self._engine.close()
        self._memory.forget_windows()
        self._place(device)
        try:
            engine, memory = _start_engine(
                self.store_path, options, budget, self.resident_param_bytes, device
            )
        except BaseException:
            self._place(old)
            self._engine, self._memory = _start_engine(
                self.store_path, self.options, self.budget, self.resident_param_bytes, old
            )
            raise
        self._engine, self._memory = engine, memory
        self.device, self.options, self.budget = device, options, budget
        logger.info("tensorstream: moved to %s (budget %d bytes)", device, budget)

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
                    slot.param.data = _placeholder(slot.dtype, slot.shape, device)

    def replan(self, budget: int) -> None:
        """Restarts the engine on the same store (or checkpoint) under a new whole weight
        budget; nothing is rewritten. If the engine refuses ``budget`` (BudgetTooSmallError,
        after the memory-pressure callback) the model keeps its previous budget and the
        error is raised. No forward may be running."""
        self._check_open()
        if any(block.active for block in self._blocks):
            raise RuntimeError("tensorstream: cannot re-plan while a forward is running")
        old_budget = self.budget
        self._engine.close()
        self._memory.forget_windows()
        try:
            engine, memory = _start_engine(
                self.store_path, self.options, budget, self.resident_param_bytes, self.device
            )
        except BaseException:
            # Keep the model usable under its previous budget.
            self._engine, self._memory = _start_engine(
                self.store_path, self.options, old_budget, self.resident_param_bytes, self.device
            )
            raise
        self._engine, self._memory = engine, memory
        self.budget = budget
        logger.info("tensorstream: re-planned for a budget of %d bytes", budget)

    # statistics
    def statistics(self) -> dict[str, Any]:
        self._check_open()
        stats = self._engine.stats()
        plan = self._engine.plan
        stats.update(
            layers_offloaded=sum(1 for r in plan["resident"] if not r),
            layers_resident_in_plan=sum(1 for r in plan["resident"] if r),
            blocks=len(self._blocks),
            store=str(self.store_path),
            device=str(self.device),
            resident_param_bytes=self.resident_param_bytes,
            budget=self.budget,
            vram_in_use=stats["device_bytes_in_use"] + self.resident_param_bytes,
            cache_hit_rate=stats["ram_tier"]["hit_rate"],
            io_throughput_gbps=stats["storage_gbps"],
            stall_time_seconds=stats["stall_seconds"],
        )
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
                slot.param.data = _placeholder(slot.dtype, slot.shape, self.device)
            block.module.register_forward_pre_hook(_closed_hook)
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


def _closed_hook(module: nn.Module, args: Any) -> None:
    raise RuntimeError(
        f"tensorstream: {type(module).__name__} was streamed by a runtime that has been closed "
        "(cleanup_tensorstream()); its weights are no longer available"
    )


def _placeholder(dtype: torch.dtype, shape: torch.Size, device: torch.device) -> torch.Tensor:
    """A tensor of the right dtype and shape that holds one element (stride 0)."""
    return torch.zeros((), dtype=dtype, device=device).expand(shape)


# ---- offload -------------------------------------------------------------------------------------


def _named_block_params(
    model: nn.Module, blocks: list[tuple[str, nn.Module]], shared: set[int]
) -> Iterator[tuple[int, str, nn.Module, list]]:
    for index, (name, module) in enumerate(blocks):
        params = [
            (f"{name}.{pname}" if name else pname, p)
            for pname, p in module.named_parameters()
            if id(p) not in shared and p.numel() > 0
        ]
        if params:
            yield index, name, module, params


def _fingerprint(blocks: list[_Block]) -> str:
    entries = []
    for block in blocks:
        for qname, p in block.params:
            t = _host_contiguous(p)
            entries.append(
                (
                    qname,
                    dtype_to_name(t.dtype, qname),
                    list(t.shape),
                    _core.checksum64(t.data_ptr(), t.numel() * t.element_size()),
                )
            )
    return _core.fingerprint(entries)


def _write_store(path: Path, blocks: list[_Block]) -> None:
    with store_writer(path) as writer:
        for block in blocks:
            writer.begin_block(block.name)
            for qname, p in block.params:
                t = _host_contiguous(p)
                writer.add_tensor(
                    qname,
                    dtype_to_name(t.dtype, qname),
                    list(t.shape),
                    t.data_ptr(),
                    t.numel() * t.element_size(),
                )
            writer.end_block()
        writer.commit()


def _convert_dtype(model: nn.Module, dtype: torch.dtype) -> None:
    """Converts the floating-point parameters and buffers to ``dtype`` in place, one tensor at
    a time (the memory peak is one tensor, not a second model), exactly as
    ``model.to(dtype)`` would: the store then holds the converted weights, and the resident
    parameters compute in the same dtype."""
    done: set[int] = set()
    with torch.no_grad():
        for module in model.modules():
            for tensor in (*module.parameters(recurse=False), *module.buffers(recurse=False)):
                if id(tensor) in done or not tensor.is_floating_point() or tensor.dtype == dtype:
                    continue
                done.add(id(tensor))
                tensor.data = tensor.data.to(dtype)


def _refuse_unimplemented(config: Any) -> None:
    """Settings accepted by Config whose feature does not exist yet fail loudly here rather
    than being ignored."""
    if config.compression_enabled:
        raise NotImplementedError(
            "tensorstream: compression_enabled=True: store compression is not implemented "
            "yet (stores are written uncompressed); set compression_enabled=False"
        )


def _usable_storage(config: Any) -> Path:
    """``config.storage_path``, created if missing; OSError/PermissionError naming it if it
    cannot hold a store."""
    storage = Path(config.storage_path)
    try:
        storage.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise OSError(
            e.errno, f"tensorstream: storage path '{storage}' is not usable: {e.strerror}"
        ) from e
    if not os.access(storage, os.W_OK):
        raise PermissionError(f"tensorstream: storage path '{storage}' is not writable")
    return storage


def _resolve_device(model: nn.Module, config: Any) -> torch.device:
    if getattr(config, "device", None) is not None:
        return torch.device(config.device)
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


def offload(model: nn.Module, config: Any = None) -> nn.Module:
    """Streams ``model``'s large layers from a store under ``config``'s budgets; returns the
    same model object, whose ``forward``/``generate`` keep working unchanged."""
    from .config import Config  # noqa: PLC0415 - the config module imports nothing heavy

    config = config if config is not None else Config()
    _refuse_unimplemented(config)
    if getattr(model, _ATTRIBUTE, None) is not None:
        raise RuntimeError("tensorstream: this model is already offloaded")
    device = _resolve_device(model, config)
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"tensorstream: device '{device}' is not supported (cpu or cuda)")
    model.eval()
    if config.torch_dtype is not None:
        _convert_dtype(model, config.torch_dtype)

    shared = _shared_parameters(model)
    blocks = [
        _Block(index=i, name=name, module=module, params=params)
        for i, (_, name, module, params) in enumerate(
            _named_block_params(model, find_blocks(model, config.min_layer_size), shared)
        )
    ]
    if not blocks:
        raise ValueError(
            "tensorstream: no module is large enough to stream (min_layer_size="
            f"{config.min_layer_size} bytes); nothing to offload"
        )
    streamed_ids = {id(p) for b in blocks for _, p in b.params}

    storage = _usable_storage(config)
    fingerprint = _fingerprint(blocks)
    store_path = storage / f"{fingerprint}.tstore"
    reuse = False
    if store_path.exists():
        try:
            reuse = _core.Store(str(store_path)).info["fingerprint"] == fingerprint
        except _core.TensorStreamError:
            reuse = False
    if reuse:
        logger.info("tensorstream: reusing store %s", store_path)
    else:
        logger.info("tensorstream: writing store %s", store_path)
        _write_store(store_path, blocks)

    # Resident parameters (everything not streamed) count against the device budget too.
    resident_bytes = sum(
        p.numel() * p.element_size() for p in model.parameters() if id(p) not in streamed_ids
    )
    target = "cpu" if device.type == "cpu" else f"cuda:{device.index or 0}"
    options = dict(config.engine_options(device=target))
    options["device"] = target
    budget = options["device_budget"]
    engine, memory = _start_engine(store_path, options, budget, resident_bytes, device)
    store = _core.Store(str(store_path))
    # Map each parameter to its bytes in the block, then drop the host copies.
    tensors = {t["name"]: t for t in store.tensors}
    for block in blocks:
        for qname, p in block.params:
            info = tensors[qname]
            block.slots.append(
                _TensorSlot(p, info["offset_in_block"], info["nbytes"], p.dtype, p.shape)
            )
            p.data = _placeholder(p.dtype, p.shape, device)
            p.requires_grad_(False)
    if device.type != "cpu":
        for p in model.parameters():
            if id(p) not in streamed_ids:
                p.data = p.data.to(device)
        for b in model.buffers():
            b.data = b.data.to(device)
    else:
        _own_resident_memory(model, streamed_ids)

    runtime = OffloadedModel(
        model, engine, blocks, memory, store_path, device, resident_bytes, options, budget
    )
    runtime.pressure_mode = config.memory_pressure_mode.value
    runtime.config = config
    _install_runtime(model, runtime)
    return model


def _install_runtime(model: nn.Module, runtime: OffloadedModel) -> None:
    """Hooks every block of ``runtime`` (its slots filled, its parameters placeholders), guards
    ``.to()``/``.cpu()`` moves and attaches the runtime handle to ``model``."""
    blocks = runtime._blocks
    for block in blocks:
        runtime._hooks.append(
            block.module.register_forward_pre_hook(_make_pre_hook(runtime, block), with_kwargs=True)
        )
        runtime._hooks.append(
            block.module.register_forward_hook(_make_post_hook(runtime, block), always_call=True)
        )
    for module in {id(m): m for m in (model, *(b.module for b in blocks))}.values():
        module._apply = _make_guarded_apply(runtime, module)  # type: ignore[method-assign]
        runtime._guarded.append(module)
    model.forward = _make_pressure_forward(runtime, model.forward)  # type: ignore[method-assign]
    runtime._root = model
    _trim_host_heap()
    setattr(model, _ATTRIBUTE, runtime)
    model.tensorstream = runtime
    model.cleanup_tensorstream = runtime.close


def _start_engine(
    store_path: Path,
    options: dict[str, Any],
    budget: int,
    resident_bytes: int,
    device: torch.device,
    open_engine: Any = None,
    streaming_minimum: Any = None,
) -> tuple[Any, _TorchMemory]:
    """An engine for ``store_path`` whose budget is ``budget`` less the resident parameters.
    A refused budget reaches the memory-pressure callback, then the caller, as a
    BudgetTooSmallError naming the whole budget that would work.

    ``open_engine(options, allocate, release)`` opens another kind of engine (default: a
    store's); ``streaming_minimum(options)`` is then the smallest budget of its streamed blocks."""
    # A source that is not a store (from_pretrained's checkpoint) says how to open its engine.
    open_engine = open_engine or getattr(store_path, "open_engine", None)
    streaming_minimum = streaming_minimum or getattr(store_path, "streaming_minimum", None)
    options = dict(options)
    options["device_budget"] = budget - resident_bytes
    if options["device_budget"] <= 0:
        error = _core.BudgetTooSmallError(
            f"tensorstream: vram budget of {budget:,} bytes does not even hold the "
            f"{resident_bytes:,} bytes of resident (non-streamed) parameters"
        )
        # The smallest budget for the streamed blocks alone, read from the store.
        if streaming_minimum is not None:
            error.minimum_budget = resident_bytes + streaming_minimum(options)
        else:
            sizes = [b["raw_size"] for b in _core.Store(str(store_path)).blocks]
            error.minimum_budget = resident_bytes + _core.minimum_budget(sizes, options["slots"])
        _notify_pressure("budget_too_small", device, budget, error, resident_bytes)
        raise error
    memory = _TorchMemory(device)
    try:
        if open_engine is not None:
            engine = open_engine(options, memory.allocate, memory.release)
        else:
            engine = _core.Engine(str(store_path), options, memory.allocate, memory.release)
        memory.in_place = bool(engine.stats()["in_place"])
    except _core.BudgetTooSmallError as e:
        minimum = e.minimum_budget + resident_bytes
        error = _core.BudgetTooSmallError(
            f"tensorstream: vram budget of {budget:,} bytes is too small for this model: at "
            f"least {minimum:,} bytes are needed ({resident_bytes:,} resident + "
            f"{e.minimum_budget:,} for streaming)"
        )
        error.minimum_budget = minimum
        _notify_pressure("budget_too_small", device, budget, error, resident_bytes)
        raise error from e
    return engine, memory


# ---- memory pressure ---------------------------------------------------------------------------

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


def _notify_pressure(
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


def _is_out_of_memory(error: BaseException | None) -> bool:
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
_PRESSURE_POLICY: dict[str, tuple[float, int]] = {
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
    fraction, _ = _PRESSURE_POLICY[runtime.pressure_mode]
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


def _make_pressure_forward(runtime: OffloadedModel, forward: Any):
    """``forward`` of the offloaded model, retried under a smaller budget after an
    out-of-memory error as the runtime's pressure mode says; the callback hears of every
    such error, with what was done."""

    def pressure_forward(*args: Any, **kwargs: Any) -> Any:
        _, retries = _PRESSURE_POLICY[runtime.pressure_mode]
        # Only a forward that may be retried needs its caches' state (AGGRESSIVE never is).
        caches = _caches_in(args, kwargs) if retries > 0 else []
        snapshot = _CacheSnapshot.take(caches) if caches else None
        state = runtime._forwards
        while True:
            state.depth = getattr(state, "depth", 0) + 1
            try:
                return forward(*args, **kwargs)
            except BaseException as error:
                if not _is_out_of_memory(error) or runtime.closed or state.depth > 1:
                    raise
                old_budget = runtime.budget
                # Undo what the failed attempt appended before anything else: a retry on a
                # cache holding a token twice would compute wrong numbers, silently.
                restorable = not caches or (snapshot is not None and snapshot.restore())
                if _PRESSURE_POLICY[runtime.pressure_mode][0] >= 1.0 or retries > 0:
                    action = _relieve_pressure(runtime, error, restorable)
                else:
                    action = f"raised: no retry left (memory_pressure_mode {runtime.pressure_mode})"
                _notify_pressure(
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


def _make_guarded_apply(runtime: OffloadedModel, module: nn.Module):
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


def _own_resident_memory(model: nn.Module, streamed_ids: set[int]) -> None:
    """Gives resident parameters and buffers memory of their own. A model loaded from
    safetensors shares one file mapping among all its tensors, so a single resident norm
    would keep every page of the checkpoint that was ever read (the fingerprint reads all of
    them) in the process's RSS (measured: +355 MB RssFile for a 400 MB checkpoint)."""
    with torch.no_grad():
        for p in model.parameters():
            if id(p) not in streamed_ids and p.numel() > 0:
                p.data = p.data.clone()
        for b in model.buffers():
            b.data = b.data.clone()


def _trim_host_heap() -> None:
    """Returns the freed host copies to the OS now (glibc keeps freed heap memory otherwise)."""
    if not sys.platform.startswith("linux"):
        return
    try:
        ctypes.CDLL(None).malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _current_stream(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.current_stream(device).cuda_stream
    return 0


def _make_pre_hook(runtime: OffloadedModel, block: _Block):
    def pre_hook(module: nn.Module, args: Any, kwargs: dict[str, Any]) -> None:
        if module.training:
            raise RuntimeError(
                "tensorstream: streamed models run in inference mode only; call model.eval()"
            )
        _check_input_device(runtime, block, args, kwargs)
        with block.lock:
            if block.active == 0:
                address, size, _ = runtime._engine.acquire(
                    block.index, _current_stream(runtime.device)
                )
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
    runtime: OffloadedModel, block: _Block, args: Any, kwargs: dict[str, Any]
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


def _make_post_hook(runtime: OffloadedModel, block: _Block):
    def post_hook(module: nn.Module, args: Any, output: Any) -> None:
        # Torch calls this hook also while an exception leaves the block (always_call).
        error = sys.exc_info()[1]
        if _is_out_of_memory(error) and not hasattr(error, "_tensorstream_block"):
            # The innermost streamed block the error left; the model's forward reports it
            # (and applies the pressure mode); a block called on its own reports here.
            with contextlib.suppress(AttributeError, TypeError):
                error._tensorstream_block = block.name  # type: ignore[union-attr]
            if getattr(runtime._forwards, "depth", 0) == 0:
                _notify_pressure(
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
                s.param.data = _placeholder(s.dtype, s.shape, runtime.device)
            runtime._engine.release(block.index, _current_stream(runtime.device))

    return post_hook


def get_model_statistics(model: nn.Module) -> dict[str, Any]:
    """Statistics of a streamed model (device bytes in use and peak, layers offloaded, cache
    hit rate, I/O throughput, stall time, ...)."""
    runtime = getattr(model, _ATTRIBUTE, None)
    if runtime is None:
        raise ValueError("tensorstream: this model is not offloaded (call tensorstream.offload)")
    return runtime.statistics()


class _CallableModule(types.ModuleType):
    """``import tensorstream.offload`` makes the package attribute ``tensorstream.offload``
    this module (Python binds submodules on their package), shadowing the ``offload``
    function exported there: calling the module calls the function, so ``ts.offload(model,
    config)`` works either way."""

    def __call__(self, model: nn.Module, config: Any = None) -> nn.Module:
        return offload(model, config)


sys.modules[__name__].__class__ = _CallableModule
