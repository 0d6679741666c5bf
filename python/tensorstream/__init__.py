"""TensorStream: store model weights on disk and stream them to the device layer by layer.

The store tools (``read_ts_header``, ``verify_storage_integrity``, ``cleanup_orphaned_files``,
``convert_checkpoint``) work without torch; the functions that take or return tensors import
torch when called.
"""

from __future__ import annotations

import logging

from . import _core
from ._core import (
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
from .cli import native_executable

__version__: str = _core.__version__

logging.getLogger("tensorstream").addHandler(logging.NullHandler())

__all__ = [
    "ChecksumError",
    "CudaError",
    "FormatError",
    "IntegrityReport",
    "OperationCancelled",
    "StoreIOError",
    "TensorStreamError",
    "__version__",
    "cleanup_orphaned_files",
    "convert_checkpoint",
    "load_from_ts",
    "native_executable",
    "read_ts_header",
    "save_to_ts",
    "verify_storage_integrity",
]
