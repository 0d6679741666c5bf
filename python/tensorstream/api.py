"""Planning and maintenance functions of the public surface: ``estimate_model_memory``,
``optimize_memory_usage`` and ``defragment_storage`` (``offload``, ``get_model_statistics``
and ``set_memory_pressure_callback`` live in :mod:`tensorstream.offload`, which re-exports
them from :mod:`tensorstream.runtime` and :mod:`tensorstream._pressure`)."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

from . import _core
from ._store import cleanup_orphaned_files, store_writer

__all__ = [
    "defragment_storage",
    "estimate_model_memory",
    "get_model_statistics",
    "offload",
    "optimize_memory_usage",
    "set_memory_pressure_callback",
]

logger = logging.getLogger("tensorstream")

PathLike = str | os.PathLike[str]

# The engine's residency planner counts each block rounded up to this (kSlotAlignment).
_SLOT_ALIGNMENT = _core.SLOT_ALIGNMENT


# ``import tensorstream`` does not import torch (the store tools work without it): these
# forward to :mod:`tensorstream.offload`, imported on first call.


def offload(model: Any, config: Any = None) -> Any:
    """Streams ``model``'s large layers from a store under ``config``'s budgets; returns the
    same model object. See :func:`tensorstream.offload.offload`."""
    from .offload import offload as _offload

    return _offload(model, config)


def get_model_statistics(model: Any) -> dict[str, Any]:
    """Statistics of a streamed model. See :func:`tensorstream.offload.get_model_statistics`."""
    from .offload import get_model_statistics as _statistics

    return _statistics(model)


def set_memory_pressure_callback(fn: Any) -> Any:
    """Sets the memory-pressure callback; returns the previous one. See
    :func:`tensorstream.offload.set_memory_pressure_callback`."""
    from .offload import set_memory_pressure_callback as _set

    return _set(fn)


def _align(value: int, alignment: int) -> int:
    return (value + alignment - 1) // alignment * alignment


def estimate_model_memory(model: Any, config: Any = None) -> dict[str, Any]:
    """What :func:`tensorstream.offload` would do with ``model`` under ``config`` (default
    ``Config()``), without writing or loading anything. Sizes in bytes (after ``config.dtype``
    conversion, when set):

    * ``total_parameter_bytes``: every parameter, tied ones counted once;
    * ``resident_bytes``: the parameters that stay on the device (small modules, tied weights);
    * ``streamed_bytes``: the parameters of the blocks that would stream;
    * ``block_bytes``: ``{block name: bytes}`` for each block that would stream (as laid out
      in a store);
    * ``largest_block_bytes``, ``slots`` (streaming slots of this config);
    * ``placeholder_bytes``: the placeholders the streamed parameters share on the device
      (one element per dtype; 512 bytes each on CUDA);
    * ``minimum_budget``: the smallest ``vram_budget`` that works (the physical minimum: the
      resident bytes and placeholders plus the largest streamed block; loads then never
      overlap compute);
    * ``overlap_budget``: the smallest budget under which a block loads while another
      computes (room for two of the largest streamed blocks);
    * ``all_resident_budget``: the budget under which nothing streams;
    * ``suggested_budget``: ``all_resident_budget`` when the device's automatic budget holds
      it, else the automatic budget, but never less than ``minimum_budget``.
    """
    import torch

    from ._analysis import block_params
    from ._torch_memory import placeholder_bytes
    from .config import Config, default_vram_budget

    config = config if config is not None else Config()
    target = config.torch_dtype

    def dtype_of(p: torch.Tensor) -> torch.dtype:
        return target if target is not None and p.is_floating_point() else p.dtype

    def size_of(p: torch.Tensor) -> int:
        return p.numel() * torch.empty((), dtype=dtype_of(p)).element_size()

    block_bytes: dict[str, int] = {}
    streamed_ids: set[int] = set()
    streamed_dtypes: set[torch.dtype] = set()
    for name, _module, params in block_params(model, config.min_layer_size):
        end = 0
        for _, p in params:
            end = _align(end, _core.TENSOR_ALIGNMENT) + size_of(p)
            streamed_ids.add(id(p))
            streamed_dtypes.add(dtype_of(p))
        block_bytes[name] = end
    unique = {id(p): p for p in model.parameters()}
    total = sum(size_of(p) for p in unique.values())
    resident = sum(size_of(p) for pid, p in unique.items() if pid not in streamed_ids)
    slots = config.engine_options(device="cpu")["slots"]
    sizes = list(block_bytes.values())
    device = config.device
    if device is None:
        first = next(iter(unique.values()), None)
        device = str(first.device) if first is not None else "cpu"
    placeholders = placeholder_bytes(streamed_dtypes, device)
    minimum = resident + placeholders + (_core.minimum_budget(sizes, 1) if sizes else 0)
    overlap = resident + placeholders + (_core.minimum_budget(sizes, max(slots, 2)) if sizes else 0)
    all_resident = resident + placeholders + sum(_align(size, _SLOT_ALIGNMENT) for size in sizes)
    if config.vram_budget_bytes is not None:
        available = config.vram_budget_bytes
    else:
        try:
            available = default_vram_budget(device)
        except RuntimeError:
            available = default_vram_budget("cpu")
    suggested = max(minimum, all_resident if all_resident <= available else available)
    return {
        "total_parameter_bytes": total,
        "resident_bytes": resident,
        "streamed_bytes": sum(sizes),
        "placeholder_bytes": placeholders,
        "block_bytes": block_bytes,
        "largest_block_bytes": max(sizes, default=0),
        "slots": slots,
        "minimum_budget": minimum,
        "overlap_budget": min(overlap, all_resident),
        "all_resident_budget": all_resident,
        "suggested_budget": suggested,
        "device": device,
    }


def optimize_memory_usage(model: Any, target_utilization: float = 0.9) -> dict[str, Any]:
    """Re-plans a streamed model for a new budget: ``target_utilization`` (in (0, 1] for a
    CUDA device's free memory; any positive factor of the current budget otherwise) × the
    current weight budget — or, on a CUDA device, × the device's free memory plus what the
    model's weights already hold. The engine is closed and a new one started on the same store
    (nothing is rewritten); the outputs stay the same. Returns the new statistics.

    A budget the engine refuses raises BudgetTooSmallError (after the memory-pressure
    callback); the model then keeps running under its previous budget. Call it between
    forwards, not while one runs."""
    from .runtime import runtime_of

    runtime = runtime_of(model)
    if runtime is None:
        raise ValueError("tensorstream: this model is not offloaded (call tensorstream.offload)")
    return runtime.optimize_memory_usage(target_utilization)


def _store_files(path: Path) -> list[Path]:
    if path.is_dir():
        return sorted(p for p in path.glob("*.tstore") if p.is_file())
    if path.is_file():
        return [path]
    raise FileNotFoundError(f"defragment_storage: '{path}' does not exist")


def _rewrite_store(store_file: Path) -> tuple[int, int]:
    """Rewrites ``store_file`` into a fresh compact file, block by block, and replaces it once
    the new file's fingerprint is verified equal. Returns (bytes before, bytes after)."""
    import torch

    store = _core.Store(str(store_file), decode_compressed=True)
    info = store.info
    before = store_file.stat().st_size
    temp = store_file.with_name(f".{store_file.stem}.defrag-{os.getpid()}.tstore")
    tensors = store.tensors
    # A compressed store stays compressed, at the level it was written with.
    level = _core.store_compression(store)["level"]
    with store_writer(temp, compression=level or None) as writer:
        if info.get("user_metadata"):
            writer.set_user_metadata(info["user_metadata"])
        for index, block in enumerate(store.blocks):
            buffer = torch.empty(max(block["raw_size"], 1), dtype=torch.uint8)
            store.read_block_into(index, buffer.data_ptr(), block["raw_size"], True)
            writer.begin_block(block["name"])
            first = block["first_tensor"]
            for t in tensors[first : first + block["tensor_count"]]:
                address = buffer.data_ptr() + t["offset_in_block"]
                writer.add_tensor(t["name"], t["dtype"], list(t["shape"]), address, t["nbytes"])
            writer.end_block()
            del buffer
        summary = writer.commit()
    try:
        if summary["fingerprint"] != info["fingerprint"]:
            raise _core.FormatError(
                f"defragment_storage: rewriting '{store_file}' changed its fingerprint "
                f"({info['fingerprint']} -> {summary['fingerprint']}); the original is kept"
            )
        os.replace(temp, store_file)
    finally:
        if temp.exists():
            temp.unlink()
    return before, store_file.stat().st_size


def defragment_storage(path: PathLike) -> dict[str, Any]:
    """Compacts the stores in the directory ``path`` (or the one store file ``path``): each is
    rewritten block by block (one block in memory at a time, checksums verified on read) into
    a fresh file by the native writer, its fingerprint checked unchanged, then renamed over the
    original (crash-safe: an interruption leaves the original). A compressed store is
    rewritten compressed, at the level it was written with. Orphaned temporaries of
    interrupted writes are removed first (:func:`cleanup_orphaned_files`). A runtime that has
    a store open keeps reading its old file until it closes.

    Returns ``bytes_before``, ``bytes_after`` (sums over the stores), ``stores`` (per file:
    path, bytes before/after) and ``removed_temporaries``."""
    root = Path(path)
    removed = cleanup_orphaned_files(root)
    report: list[dict[str, Any]] = []
    for store_file in _store_files(root):
        before, after = _rewrite_store(store_file)
        report.append({"path": str(store_file), "bytes_before": before, "bytes_after": after})
        logger.info("defragmented %s: %d -> %d bytes", store_file, before, after)
    return {
        "bytes_before": sum(r["bytes_before"] for r in report),
        "bytes_after": sum(r["bytes_after"] for r in report),
        "stores": report,
        "removed_temporaries": removed,
    }
