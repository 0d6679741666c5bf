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

This slice runs on the CPU device. CUDA devices use the same engine path (acquire makes the
current stream wait for the copy); they are exercised only where a GPU is present.
"""

from __future__ import annotations

import ctypes
import logging
import os
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from . import _core
from ._dtypes import dtype_to_name
from ._store import _host_contiguous, store_writer

__all__ = ["OffloadedModel", "get_model_statistics", "offload"]

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
        if tensor is None or tensor.numel() < size:
            raise RuntimeError(f"tensorstream: engine returned unknown memory {address:#x}")
        return tensor[:size]


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
    ) -> None:
        self._model = model
        self._engine = engine
        self._blocks = blocks
        self._memory = memory
        self._hooks: list[Any] = []
        self.store_path = store_path
        self.device = device
        self.resident_param_bytes = resident_bytes
        self.closed = False

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
            ("bytes from storage", f"{s['bytes_from_storage']:,}"),
            ("bytes from RAM tier", f"{s['bytes_from_ram_tier']:,}"),
            ("RAM tier hit rate", f"{s['cache_hit_rate']:.1%}"),
            ("storage throughput", f"{s['io_throughput_gbps']:.2f} GB/s"),
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
        for block in self._blocks:
            for slot in block.slots:
                slot.param.data = _placeholder(slot.dtype, slot.shape, self.device)
            block.module.register_forward_pre_hook(_closed_hook)
        self._engine.close()

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
    if getattr(model, _ATTRIBUTE, None) is not None:
        raise RuntimeError("tensorstream: this model is already offloaded")
    device = _resolve_device(model, config)
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"tensorstream: device '{device}' is not supported (cpu or cuda)")
    model.eval()

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

    storage = Path(config.storage_path)
    try:
        storage.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise OSError(
            e.errno, f"tensorstream: storage path '{storage}' is not usable: {e.strerror}"
        ) from e
    if not os.access(storage, os.W_OK):
        raise PermissionError(f"tensorstream: storage path '{storage}' is not writable")
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
    options["device_budget"] = budget - resident_bytes
    if options["device_budget"] <= 0:
        raise _core.BudgetTooSmallError(
            f"tensorstream: vram budget of {budget:,} bytes does not even hold the "
            f"{resident_bytes:,} bytes of resident (non-streamed) parameters"
        )
    memory = _TorchMemory(device)
    store = _core.Store(str(store_path))
    try:
        engine = _core.Engine(str(store_path), options, memory.allocate, memory.release)
    except _core.BudgetTooSmallError as e:
        minimum = e.minimum_budget + resident_bytes
        error = _core.BudgetTooSmallError(
            f"tensorstream: vram budget of {budget:,} bytes is too small for this model: at "
            f"least {minimum:,} bytes are needed ({resident_bytes:,} resident + "
            f"{e.minimum_budget:,} for streaming)"
        )
        error.minimum_budget = minimum
        raise error from e

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

    runtime = OffloadedModel(model, engine, blocks, memory, store_path, device, resident_bytes)
    for block in blocks:
        runtime._hooks.append(
            block.module.register_forward_pre_hook(_make_pre_hook(runtime, block))
        )
        runtime._hooks.append(
            block.module.register_forward_hook(_make_post_hook(runtime, block), always_call=True)
        )
    setattr(model, _ATTRIBUTE, runtime)
    model.tensorstream = runtime
    model.cleanup_tensorstream = runtime.close
    return model


def _current_stream(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.current_stream(device).cuda_stream
    return 0


def _make_pre_hook(runtime: OffloadedModel, block: _Block):
    def pre_hook(module: nn.Module, args: Any) -> None:
        if module.training:
            raise RuntimeError(
                "tensorstream: streamed models run in inference mode only; call model.eval()"
            )
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


def _make_post_hook(runtime: OffloadedModel, block: _Block):
    def post_hook(module: nn.Module, args: Any, output: Any) -> None:
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
