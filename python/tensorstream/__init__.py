"""TensorStream: store model weights on disk and stream them to the device layer by layer.

The store tools (``read_ts_header``, ``verify_storage_integrity``, ``cleanup_orphaned_files``,
``convert_checkpoint``) work without torch; the functions that take or return tensors import
torch when called.
"""

from __future__ import annotations

import logging

from . import _core
from ._core import (
    BudgetTooSmallError,
    ChecksumError,
    CudaError,
    FormatError,
    OperationCancelled,
    StoreIOError,
    TensorStreamError,
)
from ._store import (
    IntegrityReport,
    cleanup_orphaned_files,
    convert_checkpoint,
    load_from_ts,
    read_ts_header,
    save_to_ts,
    verify_storage_integrity,
)
from .api import (
    defragment_storage,
    estimate_model_memory,
    get_model_statistics,
    offload,
    optimize_memory_usage,
    set_memory_pressure_callback,
)
from .cli import native_executable
from .config import (
    BackendType,
    Config,
    MemoryPressureMode,
    PrefetchStrategy,
    create_default_config,
    parse_size,
)

__version__: str = _core.__version__


def from_pretrained(path, config=None, **kwargs):  # type: ignore[no-untyped-def]
    """Streams the Hugging Face checkpoint directory ``path`` without loading it into RAM
    (see :func:`tensorstream.pretrained.from_pretrained`; imports torch when called)."""
    from .pretrained import from_pretrained as _from_pretrained

    return _from_pretrained(path, config, **kwargs)


logging.getLogger("tensorstream").addHandler(logging.NullHandler())

__all__ = [
    "BackendType",
    "BudgetTooSmallError",
    "ChecksumError",
    "Config",
    "CudaError",
    "FormatError",
    "IntegrityReport",
    "MemoryPressureMode",
    "OperationCancelled",
    "PrefetchStrategy",
    "StoreIOError",
    "TensorStreamError",
    "__version__",
    "cleanup_orphaned_files",
    "convert_checkpoint",
    "create_default_config",
    "defragment_storage",
    "estimate_model_memory",
    "from_pretrained",
    "get_model_statistics",
    "load_from_ts",
    "native_executable",
    "offload",
    "optimize_memory_usage",
    "parse_size",
    "read_ts_header",
    "save_to_ts",
    "set_memory_pressure_callback",
    "verify_storage_integrity",
]
