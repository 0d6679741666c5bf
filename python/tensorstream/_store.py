"""The low-level store API: save, load, inspect, verify and convert TensorStream stores.

torch is imported only inside the functions that take or return tensors, so the store tools
(``read_ts_header``, ``verify_storage_integrity``, ``cleanup_orphaned_files``,
``convert_checkpoint``) work without it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import json
import logging
import os
import sys
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Union

from . import _core

if TYPE_CHECKING:
    import torch

__all__ = [
    "IntegrityReport",
    "cleanup_orphaned_files",
    "convert_checkpoint",
    "load_from_ts",
    "read_ts_header",
    "save_to_ts",
    "store_writer",
    "verify_storage_integrity",
]

logger = logging.getLogger("tensorstream")

PathLike = Union[str, "os.PathLike[str]"]
ProgressArg = Union[bool, None, Callable[[int, int], Any]]

# Work smaller than this finishes too fast for a progress bar to be worth drawing.
_PROGRESS_MIN_BYTES = 64 << 20


# ---- helpers -------------------------------------------------------------------------------


def _human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def _stderr_is_terminal() -> bool:
    try:
        return sys.stderr is not None and sys.stderr.isatty()
    except (AttributeError, ValueError):
        return False


class _ProgressBar:
    """A one-line progress bar on stderr, redrawn at most ten times a second."""

    def __init__(self, label: str, total: int, enabled: bool | None = None) -> None:
        if enabled is None:
            enabled = _stderr_is_terminal() and total >= _PROGRESS_MIN_BYTES
        self.label = label
        self.total = total
        self.enabled = enabled
        self.start = time.monotonic()
        self._last = 0.0
        self._drawn = False

    def __call__(self, done: int, total: int | None = None) -> bool:
        if total is not None:
            self.total = total
        if not self.enabled:
            return True
        now = time.monotonic()
        if done < self.total and now - self._last < 0.1:
            return True
        self._last = now
        fraction = done / self.total if self.total else 1.0
        width = 30
        filled = int(fraction * width)
        elapsed = now - self.start
        rate = f" {_human_bytes(done / elapsed)}/s" if elapsed > 0 else ""
        sys.stderr.write(
            f"\r{self.label} [{'#' * filled}{' ' * (width - filled)}] {int(fraction * 100):3d}% "
            f"{_human_bytes(done)}/{_human_bytes(self.total)}{rate}   "
        )
        sys.stderr.flush()
        self._drawn = True
        return True

    def close(self) -> None:
        if self._drawn:
            sys.stderr.write("\n")
            sys.stderr.flush()
            self._drawn = False


def _store_file(path: PathLike) -> Path:
    """The store file that ``path`` designates (``path/model.tstore`` for a directory)."""
    return Path(_core.resolve_store_path(os.fspath(path)))


def _existing_store_file(path: PathLike) -> Path:
    store = _store_file(path)
    if not store.exists():
        raise FileNotFoundError(errno.ENOENT, "no TensorStream store at this path", str(store))
    return store


def _writable_destination(path: PathLike) -> Path:
    store = _store_file(path)
    parent = store.parent
    if not parent.exists():
        raise FileNotFoundError(
            errno.ENOENT, f"cannot write store '{store}': directory does not exist", str(parent)
        )
    if not parent.is_dir():
        raise NotADirectoryError(
            errno.ENOTDIR, f"cannot write store '{store}': not a directory", str(parent)
        )
    return store


def _open(path: PathLike) -> _core.Store:
    # Every reader here goes through read_block_into, which decodes compressed blocks.
    return _core.Store(str(_existing_store_file(path)), decode_compressed=True)


CompressionArg = Union[bool, int, None]


def _compression_level(compression: CompressionArg) -> int:
    """The native writer's compression level for a ``compression`` argument: None, False or 0
    mean none (0); True means the default level; 1..9 is the level. Raises TypeError/ValueError
    otherwise, and RuntimeError-derived TensorStreamError when compression is asked of a
    build without zstd."""
    if compression is None or compression is False:
        return 0
    if compression is True:
        level = _core.compression_info()["default_level"]
    elif isinstance(compression, int):
        level = compression
    else:
        raise TypeError(
            f"compression must be None, a bool or a level 1..9, not {type(compression).__name__}"
        )
    if level == 0:
        return 0
    info = _core.compression_info()
    if not info["min_level"] <= level <= info["max_level"]:
        raise ValueError(f"compression level {level} is not in 1..9 (0 or None: no compression)")
    return level


def _parse_metadata(text: str) -> Any:
    try:
        return json.loads(text)
    except ValueError:
        return text


def _named_tensors(obj: Any) -> dict[str, torch.Tensor]:
    """Normalises save_to_ts's input to {name: tensor}; TypeError/ValueError name the key."""
    import torch

    if isinstance(obj, torch.Tensor):
        return {"tensor": obj}
    if isinstance(obj, torch.nn.Module):
        obj = obj.state_dict()
    if not isinstance(obj, Mapping):
        raise TypeError(
            "save_to_ts expects a tensor, a mapping of names to tensors or an nn.Module, "
            f"not {type(obj).__name__}"
        )
    out: dict[str, torch.Tensor] = {}
    for key, value in obj.items():
        if not isinstance(key, str):
            raise TypeError(f"key {key!r}: tensor names must be str, not {type(key).__name__}")
        if not key:
            raise ValueError("empty tensor name")
        if not isinstance(value, torch.Tensor):
            raise TypeError(f"key '{key}': expected a torch.Tensor, got {type(value).__name__}")
        if value.layout != torch.strided:
            raise ValueError(f"key '{key}': layout {value.layout} cannot be stored (dense only)")
        if value.device.type == "meta":
            raise ValueError(f"key '{key}': tensor on the meta device has no data to store")
        out[key] = value
    return out


def _host_contiguous(tensor: torch.Tensor) -> torch.Tensor:
    """``tensor``'s values as a dense CPU tensor whose memory holds exactly those values."""
    t = tensor.detach()
    if t.is_conj():
        t = t.resolve_conj()
    if t.is_neg():
        t = t.resolve_neg()
    if t.device.type != "cpu":
        t = t.to("cpu")
    return t.contiguous()


# ---- public API ----------------------------------------------------------------------------


@contextlib.contextmanager
def store_writer(
    path: PathLike,
    *,
    block_alignment: int = _core.BLOCK_ALIGNMENT,
    tensor_alignment: int = _core.TENSOR_ALIGNMENT,
    durable: bool = True,
    compression: CompressionArg = None,
) -> Iterator[_core.StoreWriter]:
    """A native StoreWriter for ``path`` (a directory means ``path/model.tstore``) as a
    context manager: call ``commit()`` inside the block to publish the store; leaving the block
    without committing (or by an exception) discards everything written. ``compression``: None
    or False (none), True (the default level, 3) or a level 1..9 (lossless, see
    docs/store-format.md)."""
    writer = _core.StoreWriter(
        str(_writable_destination(path)),
        block_alignment=block_alignment,
        tensor_alignment=tensor_alignment,
        durable=durable,
        compression_level=_compression_level(compression),
    )
    try:
        yield writer
    finally:
        writer.abort()  # a no-op after a successful commit()


def save_to_ts(
    tensor_or_state_dict: Any,
    path: PathLike,
    *,
    metadata: Any = None,
    durable: bool = True,
    progress: ProgressArg = None,
    compression: CompressionArg = None,
) -> dict[str, Any]:
    """Writes a tensor, a ``{name: tensor}`` mapping or an ``nn.Module``'s state dict to a store.

    A single tensor is stored under the name ``"tensor"``. Tensors are grouped into blocks by
    name (one block per decoder layer for transformer naming), detached, copied to the CPU if
    needed and made contiguous; their values are stored bit for bit. ``path`` is the store
    file, or a directory (then ``path/model.tstore``). ``metadata`` (JSON-serialisable) is
    kept in the store's user metadata. The write is crash-safe: on any error nothing is left
    at ``path`` (a previous store there stays untouched).

    ``compression``: None or False (none), True (level 3) or a level 1..9: blocks are stored
    losslessly compressed (byte planes + zstd, chunk by chunk; about 1.46x smaller for bf16
    weights). The fingerprint and every tensor's bytes are the same either way;
    ``load_from_ts`` decodes.

    Returns a summary: ``path``, ``file_size``, ``blocks``, ``tensors``, ``fingerprint`` and
    ``raw_size`` (the bytes before compression).
    Raises TypeError/ValueError naming the key for values that cannot be stored.
    """
    import torch

    from ._dtypes import dtype_to_name

    level = _compression_level(compression)
    tensors = _named_tensors(tensor_or_state_dict)
    dtype_names = {name: dtype_to_name(t.dtype, name) for name, t in tensors.items()}
    user_metadata: dict[str, Any] = {
        "format": "tensorstream",
        "producer": "tensorstream.save_to_ts",
        "torch_version": torch.__version__,
    }
    if metadata is not None:
        user_metadata["metadata"] = metadata
    metadata_text = json.dumps(user_metadata)
    destination = _writable_destination(path)
    groups = _core.group_into_blocks(list(tensors))
    total = sum(t.numel() * t.element_size() for t in tensors.values())

    started = time.monotonic()
    bar = _ProgressBar(
        "save", total, None if progress is None or callable(progress) else bool(progress)
    )
    callback = progress if callable(progress) else None
    done = 0
    try:
        with store_writer(destination, durable=durable, compression=level) as writer:
            writer.set_user_metadata(metadata_text)
            for block, names in groups:
                writer.begin_block(block)
                for name in names:
                    t = _host_contiguous(tensors[name])
                    nbytes = t.numel() * t.element_size()
                    # `t` stays alive across the call, so C++ reads valid memory.
                    writer.add_tensor(name, dtype_names[name], list(t.shape), t.data_ptr(), nbytes)
                    del t
                    done += nbytes
                    bar(done)
                    if callback is not None and callback(done, total) is False:
                        raise _core.OperationCancelled(f"writing '{destination}' cancelled")
                writer.end_block()
            summary = writer.commit()
    finally:
        bar.close()
    seconds = time.monotonic() - started
    logger.info(
        "wrote %s: %d blocks, %d tensors, %s%s in %.2f s",
        summary["path"],
        summary["block_count"],
        summary["tensor_count"],
        _human_bytes(summary["file_size"]),
        f" (compressed, level {level}, from {_human_bytes(total)})" if level else "",
        seconds,
    )
    return {
        "path": summary["path"],
        "file_size": summary["file_size"],
        "blocks": summary["block_count"],
        "tensors": summary["tensor_count"],
        "fingerprint": summary["fingerprint"],
        "raw_size": total,
    }


def load_from_ts(
    path: PathLike, device: Any = "cpu", verify: bool = True
) -> dict[str, torch.Tensor]:
    """Reads every tensor of a store, in store order.

    Each block is read in one request into one buffer (with its checksum verified when
    ``verify``; a mismatch raises ChecksumError naming the block); the tensors are views into
    their block's buffer, so nothing is copied per tensor. With a ``device`` other than the
    CPU, each block buffer is moved there once and the tensors view the device copy.
    """
    import torch

    from ._dtypes import name_to_dtype

    store = _open(path)
    target = torch.device(device)
    blocks = store.blocks
    infos = store.tensors
    dtypes = [name_to_dtype(info["dtype"], info["name"]) for info in infos]
    bar = _ProgressBar("load", sum(b["raw_size"] for b in blocks))
    done = 0
    out: dict[str, torch.Tensor] = {}
    try:
        for index, block in enumerate(blocks):
            _load_block(store, index, block, infos, dtypes, target, verify, out)
            done += block["raw_size"]
            bar(done)
    finally:
        bar.close()
    return out


def _load_block(
    store: _core.Store,
    index: int,
    block: dict[str, Any],
    infos: list[dict[str, Any]],
    dtypes: list[torch.dtype],
    target: torch.device,
    verify: bool,
    out: dict[str, torch.Tensor],
) -> None:
    import torch

    size = block["raw_size"]
    buffer = torch.empty(size, dtype=torch.uint8)
    store.read_block_into(index, buffer.data_ptr(), size, verify)
    if target.type != "cpu":
        buffer = buffer.to(target)
    first = block["first_tensor"]
    for i in range(first, first + block["tensor_count"]):
        info = infos[i]
        begin = info["offset_in_block"]
        raw = buffer[begin : begin + info["nbytes"]]
        out[info["name"]] = raw.view(dtypes[i]).view(info["shape"])


def read_ts_header(path: PathLike) -> dict[str, Any]:
    """Describes a store without reading its data.

    Returns ``path``, ``version``, ``file_size``, ``fingerprint``, ``block_alignment``,
    ``tensor_alignment``, ``metadata`` (parsed as JSON when it is JSON, else the raw text),
    ``compression`` (raw_size, stored_size, ratio, compressed_blocks, chunks, raw_chunks,
    level), ``blocks`` (list of dicts, each with the names of its tensors, its codec, sizes and
    chunk count) and ``tensors`` (name -> dtype, shape, block, block_index, offset, offset_in_block,
    nbytes, checksum). ``offset`` is the absolute file offset of the tensor's bytes in an
    uncompressed block, None in a compressed one (its bytes exist only once decoded).
    """
    store = _open(path)
    info = store.info
    blocks = store.blocks
    block_list = []
    tensors: dict[str, dict[str, Any]] = {}
    infos = store.tensors
    for index, block in enumerate(blocks):
        first = block["first_tensor"]
        names = []
        for t in infos[first : first + block["tensor_count"]]:
            names.append(t["name"])
            tensors[t["name"]] = {
                "dtype": t["dtype"],
                "shape": list(t["shape"]),
                "block": block["name"],
                "block_index": index,
                "offset": block["offset"] + t["offset_in_block"]
                if block["codec"] == "none"
                else None,
                "offset_in_block": t["offset_in_block"],
                "nbytes": t["nbytes"],
                "checksum": f"{t['checksum']:016x}",
            }
        block_list.append(
            {
                "name": block["name"],
                "index": index,
                "offset": block["offset"],
                "size": block["raw_size"],
                "stored_size": block["stored_size"],
                "codec": block["codec"],
                "chunks": len(_core.block_chunks(store, index)),
                "checksum": f"{block['checksum']:016x}",
                "raw_checksum": f"{block['raw_checksum']:016x}",
                "tensors": names,
            }
        )
    return {
        "path": store.path,
        "version": info["version"],
        "file_size": info["file_size"],
        "fingerprint": info["fingerprint"],
        "block_alignment": info["block_alignment"],
        "tensor_alignment": info["tensor_alignment"],
        "metadata": _parse_metadata(info["user_metadata"]),
        "compression": _core.store_compression(store),
        "blocks": block_list,
        "tensors": tensors,
    }


@dataclasses.dataclass
class IntegrityReport:
    """Outcome of verify_storage_integrity; true when the store is intact."""

    path: str
    ok: bool
    blocks_checked: int = 0
    bytes_checked: int = 0
    problems: list[str] = dataclasses.field(default_factory=list)

    def __bool__(self) -> bool:
        return self.ok


def verify_storage_integrity(path: PathLike) -> IntegrityReport:
    """Checks every checksum of a store: each block's stored bytes, its decoded bytes (for a
    compressed block, after decoding every chunk) and each tensor's bytes.

    A damaged store is reported, not raised: a header that does not validate gives
    ``ok=False`` with the error as the problem; damaged blocks are listed by index and name.
    A missing path raises FileNotFoundError.
    """
    store_path = _existing_store_file(path)
    try:
        store = _core.Store(str(store_path), decode_compressed=True)
    except _core.FormatError as e:
        return IntegrityReport(path=str(store_path), ok=False, problems=[str(e)])
    blocks = store.blocks
    problems = [f"block {index} '{blocks[index]['name']}': {msg}" for index, msg in store.verify()]
    report = IntegrityReport(
        path=str(store_path),
        ok=not problems,
        blocks_checked=len(blocks),
        bytes_checked=sum(b["stored_size"] for b in blocks),
        problems=problems,
    )
    if problems:
        logger.warning("%s: %d damaged block(s)", store_path, len(problems))
    return report


def cleanup_orphaned_files(path: PathLike) -> list[str]:
    """Removes temporaries left by interrupted writes (whose writer process is gone) in the
    directory of ``path`` (or in ``path`` itself if it is a directory). Returns their paths."""
    removed = _core.cleanup_orphaned_files(os.fspath(path))
    for file in removed:
        logger.info("removed orphaned temporary %s", file)
    return removed


def convert_checkpoint(
    source: PathLike,
    destination: PathLike,
    *,
    progress: ProgressArg = None,
    durable: bool = True,
    compression: CompressionArg = None,
) -> dict[str, Any]:
    """Converts a .safetensors file or a Hugging Face checkpoint directory (sharded, with its
    index) into a store, natively and with bounded memory; crash-safe. ``compression`` as for
    :func:`save_to_ts`.

    ``progress``: None shows a bar on a terminal, True always, False never; a callable gets
    ``(done_bytes, total_bytes)`` and may return False to cancel (OperationCancelled).
    Returns ``path``, ``file_size``, ``block_count``, ``tensor_count``, ``fingerprint`` and
    ``seconds``.
    """
    level = _compression_level(compression)
    src = Path(os.fspath(source))
    if not src.exists():
        raise FileNotFoundError(errno.ENOENT, "no safetensors checkpoint at this path", str(src))
    _writable_destination(destination)
    bar = None
    callback: Callable[[int, int], Any] | None = None
    if callable(progress):
        callback = progress
    elif progress or (progress is None and _stderr_is_terminal()):
        bar = _ProgressBar("convert", 0, enabled=True)
        callback = bar
    started = time.monotonic()
    try:
        summary = _core.convert_safetensors(
            os.fspath(src),
            os.fspath(destination),
            progress=callback,
            durable=durable,
            compression_level=level,
        )
    finally:
        if bar is not None:
            bar.close()
    summary["seconds"] = time.monotonic() - started
    logger.info(
        "converted %s -> %s: %d blocks, %d tensors, %s in %.2f s",
        src,
        summary["path"],
        summary["block_count"],
        summary["tensor_count"],
        _human_bytes(summary["file_size"]),
        summary["seconds"],
    )
    return summary
