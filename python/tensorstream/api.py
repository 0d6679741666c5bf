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


def _store_offsets(blocks: list[tuple[str, list[tuple[str, int]]]]) -> dict[str, tuple[int, int]]:
    """Where a store written from ``blocks`` ((name, [(tensor, nbytes)])) puts each tensor:
    (offset in its block, nbytes). Blocks start at block_alignment (4096) in the file and
    their tensors at tensor_alignment apart (docs/store-format.md)."""
    out: dict[str, tuple[int, int]] = {}
    for _, tensors in blocks:
        end = 0
        for name, nbytes in tensors:
            offset = _align(end, _core.TENSOR_ALIGNMENT)
            out[name] = (offset, nbytes)
            end = offset + nbytes
    return out


def _unit_size(offsets: dict[str, tuple[int, int]], names: list[str]) -> int:
    """Bytes a unit of a store's tensors ``names`` (consecutive in one block) takes in device
    memory, as the engine lays it out: one read of them, aligned to 4096 around them."""
    first = min(offsets[n][0] for n in names)
    last = max(offsets[n][0] + offsets[n][1] for n in names)
    skip = first % _SLOT_ALIGNMENT
    return _align(skip + last - first, _SLOT_ALIGNMENT)


def _engine_minimum(sizes: list[int], slots: int, needs: list[int], partial: list[bool]) -> int:
    return int(_core.minimum_budget(sizes, slots, needs, partial)) if sizes else 0


def estimate_model_memory(model: Any, config: Any = None) -> dict[str, Any]:
    """What :func:`tensorstream.offload` would do with ``model`` under ``config`` (default
    ``Config()``), without writing or loading anything. Sizes in bytes (after ``config.dtype``
    conversion, when set). Budgets are whole weight budgets (``vram_budget``), the smallest
    over the ways the model can be cut into units (``tiers``: whole blocks, each module's
    own weights, everything including small leaves and tied weights):

    * ``minimum_budget``: the smallest budget that works -- the physical minimum: what stays
      resident plus the largest single unit that must be present at once (loads then wait
      in front of compute, with a warning);
    * ``overlap_budget``: the smallest budget under which a unit loads while another computes;
    * ``all_resident_budget``: the budget under which nothing streams;
    * ``suggested_budget``: ``all_resident_budget`` when the device's automatic budget holds
      it, else the automatic budget, but never less than ``minimum_budget``;
    * ``tiers``: per tier, ``minimum_budget``, ``overlap_budget``, ``all_resident_budget``,
      ``units`` and ``largest_unit_bytes``.

    And for the tier that ``offload`` picks at ``config``'s budget (``tier``; the one of the
    smallest minimum when the budget holds none): ``total_parameter_bytes`` (every parameter,
    tied ones counted once), ``resident_bytes`` (parameters that stay on the device outside
    the engine), ``streamed_bytes``, ``block_bytes`` (``{unit name: bytes}`` as laid out in a
    store), ``largest_block_bytes``, ``slots``, ``placeholder_bytes`` (the placeholders the
    streamed parameters share: one element per dtype; 512 bytes each on CUDA).
    """
    import torch

    from ._analysis import TIERS, partition, store_blocks
    from ._sources import UnitSpec, unit_demands
    from ._torch_memory import placeholder_bytes
    from .config import Config, default_vram_budget

    config = config if config is not None else Config()
    target = config.torch_dtype

    def dtype_of(p: torch.Tensor) -> torch.dtype:
        return target if target is not None and p.is_floating_point() else p.dtype

    def size_of(p: torch.Tensor) -> int:
        return p.numel() * torch.empty((), dtype=dtype_of(p)).element_size()

    unique = {id(p): p for p in model.parameters()}
    total = sum(size_of(p) for p in unique.values())
    device = config.device
    if device is None:
        first = next(iter(unique.values()), None)
        device = str(first.device) if first is not None else "cpu"
    layout = store_blocks(model, config.min_layer_size)
    offsets = _store_offsets([(n, [(q, size_of(p)) for q, p in ps]) for n, ps in layout])
    slots = config.engine_options(device="cpu")["slots"]

    tiers = []
    for tier in range(len(TIERS)):
        part = partition(model, config.min_layer_size, tier)
        names = [[q for q, _ in u.params] for u in part.units]
        sizes = [_unit_size(offsets, n) for n in names]
        spec = UnitSpec(
            dict(zip([u.name for u in part.units], names, strict=True)),
            tuple(frozenset(h) for h in part.held_with),
            tuple(u.rows for u in part.units),
        )
        row_bytes = [
            size_of(u.params[0][1]) // max(1, u.params[0][1].shape[0]) if u.rows else 0
            for u in part.units
        ]
        needs, partial = unit_demands(spec, sizes, row_bytes)
        resident = sum(size_of(p) for _, p in part.resident)
        dtypes = {dtype_of(p) for u in part.units for _, p in u.params}
        placeholders = placeholder_bytes(dtypes, device)
        reserved = resident + placeholders
        all_resident = reserved + sum(_align(max(x, 1), _SLOT_ALIGNMENT) for x in sizes)
        tiers.append(
            {
                "tier": TIERS[tier],
                "units": len(sizes),
                "largest_unit_bytes": max(sizes, default=0),
                "minimum_budget": reserved + _engine_minimum(sizes, 1, needs, partial),
                "overlap_budget": min(
                    reserved + _engine_minimum(sizes, max(slots, 2), needs, partial),
                    all_resident,
                ),
                "all_resident_budget": all_resident,
                "_resident": resident,
                "_placeholders": placeholders,
                "_units": {u.name: size for u, size in zip(part.units, sizes, strict=True)},
                "_streamed": sum(
                    size_of(p) // (p.shape[0] if u.expert is not None else 1)
                    for u in part.units
                    for _, p in u.params
                ),
            }
        )
    if config.vram_budget_bytes is not None:
        available = config.vram_budget_bytes
    else:
        try:
            available = default_vram_budget(device)
        except RuntimeError:
            available = default_vram_budget("cpu")
    # As offload chooses (_attach.choose_units): the coarsest tier that overlaps, else the
    # coarsest that fits, else (refused) the one of the smallest minimum.
    fits = [t for t in tiers if available >= t["minimum_budget"]]
    overlapping = [t for t in fits if available >= t["overlap_budget"]]
    chosen = (overlapping or fits or [min(tiers, key=lambda t: t["minimum_budget"])])[0]
    minimum = min(t["minimum_budget"] for t in tiers)
    overlap = min(t["overlap_budget"] for t in tiers)
    all_resident = min(t["all_resident_budget"] for t in tiers)
    suggested = max(minimum, all_resident if all_resident <= available else available)
    units = chosen["_units"]
    return {
        "total_parameter_bytes": total,
        "tier": chosen["tier"],
        "resident_bytes": chosen["_resident"],
        "streamed_bytes": chosen["_streamed"],
        "placeholder_bytes": chosen["_placeholders"],
        "block_bytes": units,
        "largest_block_bytes": max(units.values(), default=0),
        "slots": slots,
        "minimum_budget": minimum,
        "overlap_budget": overlap,
        "all_resident_budget": all_resident,
        "suggested_budget": suggested,
        "tiers": [{k: v for k, v in t.items() if not k.startswith("_")} for t in tiers],
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
