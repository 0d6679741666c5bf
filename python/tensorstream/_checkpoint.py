"""A safetensors checkpoint as torch tensors, read through the engine's reader.

:class:`Checkpoint` is the torch face of ``_core.SafetensorsCheckpoint`` (the C++
``SafetensorsCheckpoint``: shard discovery, the index, and header validation by the reference
rules), so a checkpoint is read by one parser whether the engine streams it or Python loads a
tensor from it. A bad checkpoint raises that reader's FormatError (or StoreIOError for a file
that cannot be read) naming the file and the tensor.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch

from . import _core
from ._dtypes import name_to_dtype

__all__ = ["Checkpoint"]

# The floating-point dtypes a conversion to Config.dtype applies to, by the reader's names
# (the float8 formats are kept as they are).
_CONVERTIBLE = {
    "float64": torch.float64,
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
}


class Checkpoint:
    """The tensors of the safetensors checkpoint at ``path`` (a file, a Hugging Face
    checkpoint directory or an index file); reads one tensor at a time. Immutable; ``load``
    may run in several threads at once."""

    def __init__(self, path: Path, names: dict[str, str] | None = None) -> None:
        self.path = path
        self._reader = _core.SafetensorsCheckpoint(str(path))
        self.files = [Path(f) for f in self._reader.files]
        self._names = dict(names or {})

    def named(self, names: dict[str, str]) -> Checkpoint:
        """This checkpoint (the same reader) with ``names`` (model tensor name -> checkpoint
        tensor name: the renames transformers applies when it loads the checkpoint,
        :mod:`._hf_mapping`) taking precedence in :meth:`resolve`."""
        other = object.__new__(Checkpoint)
        other.path, other._reader, other.files = self.path, self._reader, self.files
        other._names = dict(names)
        return other

    def __contains__(self, name: str) -> bool:
        return name in self._reader

    def names(self) -> list[str]:
        """Every tensor's name, in file then offset order."""
        return [e["name"] for e in self._reader.entries]

    def file_of(self, name: str) -> Path:
        """The file holding tensor ``name``."""
        return self.files[self.entry(name)["file"]]

    def resolve(self, name: str, prefix: str = "") -> str | None:
        """The checkpoint's name of the model's tensor ``name``: the one :meth:`named` gave,
        else ``name`` itself (some checkpoints save the base model without its ``prefix``, or
        the other way round), or None."""
        mapped = self._names.get(name)
        if mapped is not None:
            return mapped
        if name in self._reader:
            return name
        if prefix:
            if name.startswith(prefix + "."):
                bare = name[len(prefix) + 1 :]
                if bare in self._reader:
                    return bare
            prefixed = f"{prefix}.{name}"
            if prefixed in self._reader:
                return prefixed
        return None

    def entry(self, name: str) -> dict[str, Any]:
        """The reader's entry of tensor ``name``: name, dtype, shape, file, offset, nbytes."""
        entry = self._reader.find(name)
        if entry is None:
            raise KeyError(f"tensorstream: checkpoint '{self.path}' has no tensor '{name}'")
        return entry

    def dtype(self, name: str) -> torch.dtype:
        return name_to_dtype(self.entry(name)["dtype"], name)

    def load(self, name: str) -> torch.Tensor:
        """Tensor ``name`` as a new CPU tensor (its bytes read straight into it)."""
        entry = self.entry(name)
        tensor = torch.empty(entry["shape"], dtype=name_to_dtype(entry["dtype"], name))
        self._reader.read_into(name, tensor.data_ptr(), entry["nbytes"])
        return tensor

    def needs_conversion(self, names: Iterable[str], dtype: torch.dtype) -> bool:
        """Whether any of ``names`` is a floating-point tensor stored in another dtype than
        ``dtype`` (read from the headers, no data)."""
        for name in names:
            stored = _CONVERTIBLE.get(self.entry(name)["dtype"])
            if stored is not None and stored != dtype:
                return True
        return False
