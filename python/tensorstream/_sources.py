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
from pathlib import Path
from typing import TYPE_CHECKING, Any

from . import _core
from ._dtypes import dtype_to_name
from ._store import _host_contiguous, store_writer

if TYPE_CHECKING:
    import torch

    from ._analysis import Block
    from ._checkpoint import Checkpoint
    from ._torch_memory import TorchMemory

__all__ = ["CheckpointSource", "StoreSource", "store_compression", "usable_storage"]

logger = logging.getLogger("tensorstream")


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


class StoreSource:
    """A store file; its blocks are the runtime's blocks, in order."""

    def __init__(self, path: Path) -> None:
        self.path = path

    @property
    def description(self) -> str:
        return f"store '{self.path}'"

    def open(self, options: dict[str, Any], memory: TorchMemory) -> Any:
        """An engine streaming this store under ``options`` with ``memory``'s buffers."""
        return _core.Engine(str(self.path), options, memory.allocate, memory.release)

    def streaming_minimum(self, options: dict[str, Any]) -> int:
        """The smallest engine budget for this store's blocks (the physical minimum)."""
        sizes = [b["raw_size"] for b in _open_store(self.path).blocks]
        return int(_core.minimum_budget(sizes, 1))

    def dtype_names(self) -> set[str]:
        """The dtypes (torch names) of the store's tensors, from its metadata."""
        return {t["dtype"] for t in _open_store(self.path).tensors}

    @classmethod
    def of_blocks(cls, storage: Path, blocks: list[Block], *, compression: int = 0) -> StoreSource:
        """The store of ``blocks``' parameters (their current values) in ``storage``:
        ``<fingerprint>.tstore``, or ``<fingerprint>.z<level>.tstore`` written at compression
        level ``compression`` (1..9; 0: none), reused when it exists with that fingerprint,
        else written (crash-safe). The compression is in the name: the fingerprint is the same
        compressed or not."""
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
        *,
        compression: int = 0,
    ) -> StoreSource:
        """A store of ``groups`` read from ``checkpoint`` with floating-point tensors
        converted to ``dtype`` (None: kept), one tensor in memory at a time, compressed at
        level ``compression`` (1..9; 0: none). Its name hashes the checkpoint files' identity
        (path, size, modification time, inode), the groups, the dtype and the compression, so
        it is reused until any of them changes; the write is crash-safe (a store is complete
        or absent)."""
        identity = []
        for file in checkpoint.files:
            st = file.stat()
            identity.append([str(file.resolve()), st.st_size, st.st_mtime_ns, st.st_ino])
        fields: dict[str, Any] = {"files": identity, "groups": groups, "dtype": str(dtype)}
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
        logger.info(
            "tensorstream: converting the streamed tensors (dtype %s, compression %s) into %s",
            dtype if dtype is not None else "kept",
            compression or "none",
            path,
        )
        with store_writer(path, compression=compression or None) as writer:
            for name, keys in groups.items():
                writer.begin_block(name)
                for k in keys:
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
                writer.end_block()
            writer.commit()
        return cls(path)


class CheckpointSource:
    """A safetensors checkpoint (a file, a Hugging Face checkpoint directory or an index)
    streamed in place; ``groups`` maps each block's name to its tensors' names in the
    checkpoint, in run order."""

    def __init__(self, path: Path, groups: dict[str, list[str]]) -> None:
        self.path = path
        self.groups = groups

    @property
    def description(self) -> str:
        return f"checkpoint '{self.path}'"

    def open(self, options: dict[str, Any], memory: TorchMemory) -> Any:
        """An engine streaming the checkpoint's groups under ``options`` with ``memory``'s
        buffers."""
        return _core.Engine.from_safetensors(
            str(self.path), options, memory.allocate, memory.release, self.groups
        )

    def streaming_minimum(self, options: dict[str, Any]) -> int:
        """The smallest engine budget for the groups with ``options``' slots (the engine
        computes it from the checkpoint's layout: tensors keep their file alignment)."""
        probe = dict(options, device_budget=1)
        try:
            _core.Engine.from_safetensors(str(self.path), probe, None, None, self.groups).close()
        except _core.BudgetTooSmallError as e:
            return int(e.minimum_budget)
        return 1

    def dtype_names(self) -> set[str]:
        """The dtypes (torch names) of the groups' tensors, from the checkpoint's headers."""
        reader = _core.SafetensorsCheckpoint(str(self.path))
        return {reader.find(name)["dtype"] for names in self.groups.values() for name in names}


def _fingerprint(blocks: list[Block]) -> str:
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


def _open_store(path: Path) -> Any:
    """The store at ``path`` for its metadata (compressed blocks accepted: the engine decodes
    them)."""
    return _core.Store(str(path), decode_compressed=True)


def _write_blocks(path: Path, blocks: list[Block], compression: int = 0) -> None:
    with store_writer(path, compression=compression or None) as writer:
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
