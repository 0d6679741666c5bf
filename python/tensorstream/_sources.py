"""Where a runtime's blocks come from: one class per kind of source.

* :class:`StoreSource`: a store file -- written from the model's own weights by
  :func:`tensorstream.offload` (:meth:`StoreSource.of_blocks`, named by the weights'
  fingerprint and reused while they are unchanged), or converted from a checkpoint into
  ``Config.dtype`` by :func:`tensorstream.from_pretrained` (:meth:`StoreSource.converted`).
  Either is written compressed when the Config asks (:func:`store_compression`); the engine
  decodes it on its fill path.
* :class:`CheckpointSource`: a safetensors checkpoint streamed in place, its tensors grouped
  into the model's blocks.

Each source opens an engine (:meth:`open`), tells the smallest budget its streamed blocks
need (:meth:`streaming_minimum`) and the dtypes of their tensors (:meth:`dtype_names`: one
shared placeholder each, counted in the budget), which is all a runtime's restart needs. Sources are
immutable and may be shared between threads. Torch-facing: writing a store reads tensors.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from . import _core
from ._dtypes import dtype_to_name
from ._store import _host_contiguous, store_writer

if TYPE_CHECKING:
    import torch

    from ._checkpoint import Checkpoint
    from ._experts import SliceRecipe
    from ._torch_memory import TorchMemory

__all__ = ["CheckpointSource", "StoreSource", "UnitSpec", "store_compression", "usable_storage"]

logger = logging.getLogger("tensorstream")


@dataclass(frozen=True)
class UnitSpec:
    """The engine units a runtime streams: ``groups`` (unit name -> tensor names in the
    source, in unit order), per unit the indices of the units held while it is
    (``held_with``: a module's weights while its parent's are held) and whether it is used by
    rows (``rows``: an embedding table) and the share of passes expected to use it
    (``rates``: below 1 for an expert). Torch-free, so a source can tell the engine's needs."""

    groups: dict[str, list[str]]
    held_with: tuple[frozenset[int], ...] = ()
    rows: tuple[bool, ...] = ()
    rates: tuple[float, ...] = ()


def _footprint(nbytes: int) -> int:
    alignment = _core.SLOT_ALIGNMENT
    return max(alignment, (nbytes + alignment - 1) // alignment * alignment)


def unit_demands(
    spec: UnitSpec, sizes: list[int], row_bytes: list[int]
) -> tuple[list[int], list[bool]]:
    """Per unit, the bytes that must be in the arena at once while it is used -- its own
    footprint (one row for a table used by rows) plus the footprints of the units held with
    it -- and whether it is used by rows (engine options ``unit_needs``/``unit_partial``)."""
    needs, partial = [], []
    for u, size in enumerate(sizes):
        rows = bool(spec.rows[u]) if u < len(spec.rows) else False
        own = _footprint(row_bytes[u]) if rows else _footprint(size)
        held = spec.held_with[u] if u < len(spec.held_with) else frozenset()
        needs.append(own + sum(_footprint(sizes[v]) for v in held))
        partial.append(rows)
    return needs, partial


class _Units:
    """What a store and a checkpoint source share: the units they stream (``spec``) and what
    the engine needs for them."""

    path: Path
    spec: UnitSpec | None

    def _is_checkpoint(self) -> bool:
        return False

    def unit_sizes(self, device: str) -> list[int]:
        """Bytes each unit takes in ``device``'s memory, as the engine lays it out."""
        groups = self.spec.groups if self.spec is not None else None
        return list(
            _core.unit_sizes(
                str(self.path), groups, self._is_checkpoint(), device.startswith("cuda")
            )
        )

    def _row_bytes(self) -> list[int]:
        if self.spec is None:
            return []
        out = []
        for u, names in enumerate(self.spec.groups.values()):
            if u < len(self.spec.rows) and self.spec.rows[u]:
                info = self._tensor_info(names[0])
                out.append(info["nbytes"] // max(1, info["shape"][0]) if info["shape"] else 0)
            else:
                out.append(0)
        return out

    def _tensor_info(self, name: str) -> dict[str, Any]:
        raise NotImplementedError

    def demands(self, device: str) -> tuple[list[int], list[int], list[bool]]:
        """(sizes, needs, partial) of the units on ``device``."""
        sizes = self.unit_sizes(device)
        if self.spec is None:
            return sizes, [0] * len(sizes), [False] * len(sizes)
        needs, partial = unit_demands(self.spec, sizes, self._row_bytes())
        return sizes, needs, partial

    def engine_options(self, options: dict[str, Any]) -> dict[str, Any]:
        """``options`` with the units' needs for the engine, and their use rates where some
        unit is routed (an expert)."""
        _, needs, partial = self.demands(str(options.get("device", "cpu")))
        out = dict(options, unit_needs=needs, unit_partial=partial)
        if self.spec is not None and any(r < 1 for r in self.spec.rates):
            out["unit_use_rate"] = list(self.spec.rates)
        return out

    def streaming_minimum(self, options: dict[str, Any]) -> int:
        """The smallest engine budget for the units (the physical minimum)."""
        sizes, needs, partial = self.demands(str(options.get("device", "cpu")))
        return int(_core.minimum_budget(sizes, 1, needs, partial)) if sizes else 0

    def overlap_minimum(self, options: dict[str, Any]) -> int:
        """The smallest engine budget under which a unit loads while another computes."""
        sizes, needs, partial = self.demands(str(options.get("device", "cpu")))
        return int(_core.minimum_budget(sizes, 2, needs, partial)) if sizes else 0


def store_compression(config: Any) -> int:
    """The writer's compression level that ``config`` asks for: ``compression_level`` with
    ``compression_enabled``, else 0 (none). Raises TensorStreamError at once, before any work,
    when compression is asked of a build without zstd."""
    if not config.compression_enabled:
        return 0
    info = _core.compression_info()
    if not info["available"]:
        raise _core.TensorStreamError(
            f"tensorstream: compression_enabled=True cannot be honoured: {info['codec']}"
        )
    return int(config.compression_level)


def usable_storage(config: Any) -> Path:
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


class StoreSource(_Units):
    """A store file; the runtime's units are ``spec``'s groups of its tensors (or, without a
    spec, its blocks, in order)."""

    def __init__(self, path: Path, spec: UnitSpec | None = None) -> None:
        self.path = path
        self.spec = spec

    def with_units(self, spec: UnitSpec) -> StoreSource:
        return StoreSource(self.path, spec)

    @property
    def description(self) -> str:
        return f"store '{self.path}'"

    def open(self, options: dict[str, Any], memory: TorchMemory) -> Any:
        """An engine streaming this store's units under ``options`` with ``memory``'s buffers."""
        groups = self.spec.groups if self.spec is not None else None
        return _core.Engine(
            str(self.path), self.engine_options(options), memory.allocate, memory.release, groups
        )

    def _tensor_info(self, name: str) -> dict[str, Any]:
        return next(t for t in _open_store(self.path).tensors if t["name"] == name)

    def tensor_nbytes(self) -> dict[str, int]:
        """Bytes of each tensor of the store, by name."""
        return {t["name"]: int(t["nbytes"]) for t in _open_store(self.path).tensors}

    def dtype_names(self) -> set[str]:
        """The dtypes (torch names) of the units' tensors, from the store's metadata."""
        names = None
        if self.spec is not None:
            names = {n for group in self.spec.groups.values() for n in group}
        return {
            t["dtype"]
            for t in _open_store(self.path).tensors
            if names is None or t["name"] in names
        }

    @classmethod
    def of_blocks(
        cls,
        storage: Path,
        blocks: list[tuple[str, list[tuple[str, Any]]]],
        *,
        compression: int = 0,
    ) -> StoreSource:
        """The store of ``blocks`` -- (block name, [(tensor name, tensor)]), their current
        values -- in ``storage``: ``<fingerprint>.tstore``, or ``<fingerprint>.z<level>.tstore``
        written at compression level ``compression`` (1..9; 0: none), reused when it exists
        with that fingerprint, else written (crash-safe). The compression is in the name: the
        fingerprint is the same compressed or not."""
        fingerprint = _fingerprint(blocks)
        suffix = f".z{compression}" if compression else ""
        path = storage / f"{fingerprint}{suffix}.tstore"
        reuse = False
        if path.exists():
            try:
                reuse = _open_store(path).info["fingerprint"] == fingerprint
            except _core.TensorStreamError:
                reuse = False
        if reuse:
            logger.info("tensorstream: reusing store %s", path)
        else:
            logger.info("tensorstream: writing store %s", path)
            _write_blocks(path, blocks, compression)
        return cls(path)

    @classmethod
    def converted(
        cls,
        storage: Path,
        checkpoint: Checkpoint,
        groups: dict[str, list[str]],
        dtype: torch.dtype | None,
        slices: dict[str, SliceRecipe] | None = None,
        *,
        compression: int = 0,
    ) -> StoreSource:
        """A store of ``groups`` read from ``checkpoint`` with floating-point tensors
        converted to ``dtype``, one tensor in memory at a time. Its name hashes the checkpoint
        files' identity (path, size, modification time, inode), the groups and the dtype, so
        it is reused until any of them changes; the write is crash-safe (a store is complete
        or absent). ``slices`` names tensors that are one expert's slice of a fused parameter
        (name -> :class:`._experts.SliceRecipe`: a slice of a fused checkpoint tensor, or
        per-expert checkpoint tensors concatenated); ``dtype`` None keeps the
        checkpoint's dtypes. Compressed at level ``compression`` (1..9; 0: none), which the
        name also hashes."""
        identity = []
        for file in checkpoint.files:
            st = file.stat()
            identity.append([str(file.resolve()), st.st_size, st.st_mtime_ns, st.st_ino])
        recipes = {k: r.fingerprint() for k, r in (slices or {}).items()}
        fields: dict[str, Any] = {
            "files": identity, "groups": groups, "dtype": str(dtype), "slices": recipes,
        }  # fmt: skip
        if compression:  # absent for none: uncompressed stores keep their earlier names
            fields["compression"] = compression
        key = json.dumps(fields, sort_keys=True)
        digest = hashlib.sha256(key.encode()).hexdigest()[:32]
        path = storage / f"pretrained-{digest}.tstore"
        if path.exists():
            try:
                _open_store(path)
                logger.info("tensorstream: reusing converted store %s", path)
                return cls(path)
            except _core.TensorStreamError:
                logger.warning("tensorstream: converted store %s is unreadable; rewriting", path)
        logger.info("tensorstream: converting the checkpoint's tensors to %s into %s", dtype, path)
        slices = slices or {}
        with store_writer(path, compression=compression or None) as writer:
            for name, keys in groups.items():
                writer.begin_block(name)
                fused: dict[str, Any] = {}  # the block's sliced checkpoint tensors, read once
                for k in keys:
                    if k in slices:
                        t = _read_slice(checkpoint, slices[k], fused)
                    else:
                        t = checkpoint.load(k)
                    if dtype is not None and t.is_floating_point() and t.dtype != dtype:
                        t = t.to(dtype)
                    t = t.contiguous()
                    writer.add_tensor(
                        k,
                        dtype_to_name(t.dtype, k),
                        list(t.shape),
                        t.data_ptr(),
                        t.numel() * t.element_size(),
                    )
                    del t
                fused.clear()
                writer.end_block()
            writer.commit()
        return cls(path)


class CheckpointSource(_Units):
    """A safetensors checkpoint (a file, a Hugging Face checkpoint directory or an index)
    streamed in place; ``spec``'s groups map each unit's name to its tensors' names in the
    checkpoint, in run order."""

    def __init__(self, path: Path, spec: UnitSpec | dict[str, list[str]]) -> None:
        self.path = path
        self.spec = spec if isinstance(spec, UnitSpec) else UnitSpec(dict(spec))

    def with_units(self, spec: UnitSpec) -> CheckpointSource:
        return CheckpointSource(self.path, spec)

    @property
    def groups(self) -> dict[str, list[str]]:
        return self.spec.groups

    @property
    def description(self) -> str:
        return f"checkpoint '{self.path}'"

    def _is_checkpoint(self) -> bool:
        return True

    def open(self, options: dict[str, Any], memory: TorchMemory) -> Any:
        """An engine streaming the checkpoint's groups under ``options`` with ``memory``'s
        buffers."""
        return _core.Engine.from_safetensors(
            str(self.path), self.engine_options(options), memory.allocate, memory.release,
            self.groups,
        )  # fmt: skip

    def _tensor_info(self, name: str) -> dict[str, Any]:
        return dict(_core.SafetensorsCheckpoint(str(self.path)).find(name))

    def dtype_names(self) -> set[str]:
        """The dtypes (torch names) of the groups' tensors, from the checkpoint's headers."""
        reader = _core.SafetensorsCheckpoint(str(self.path))
        return {reader.find(name)["dtype"] for names in self.groups.values() for name in names}


def _read_slice(checkpoint: Checkpoint, recipe: SliceRecipe, fused: dict[str, Any]) -> Any:
    """The tensor ``recipe`` makes of ``checkpoint``'s tensors; a fused tensor sliced is read
    once into ``fused`` (the block's cache)."""
    import torch  # noqa: PLC0415

    parts = []
    for name, index in recipe.parts:
        if index is None:
            parts.append(checkpoint.load(name))
            continue
        if name not in fused:
            fused[name] = checkpoint.load(name)
        parts.append(fused[name][index])
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim=recipe.dim)


def _fingerprint(blocks: list[tuple[str, list[tuple[str, Any]]]]) -> str:
    entries = []
    for _, params in blocks:
        for qname, p in params:
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


def _open_store(path: Path) -> Any:
    """The store at ``path`` for its metadata (compressed blocks accepted: the engine decodes
    them)."""
    return _core.Store(str(path), decode_compressed=True)


def _write_blocks(
    path: Path, blocks: list[tuple[str, list[tuple[str, Any]]]], compression: int = 0
) -> None:
    with store_writer(path, compression=compression or None) as writer:
        for name, params in blocks:
            writer.begin_block(name)
            for qname, p in params:
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
