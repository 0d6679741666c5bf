"""Mapping between torch dtypes and the store's dtype names (torch-facing: imports torch).

The engine names dtypes like torch does (``torch.bfloat16`` -> ``"bfloat16"``), so the map is
built by name. Dtypes missing from an older torch are simply absent; storing or loading one
raises ValueError naming the tensor.
"""

from __future__ import annotations

import torch

# Every dtype a store can hold, in the engine's numbering order.
STORE_DTYPE_NAMES: tuple[str, ...] = (
    "bool",
    "uint8",
    "int8",
    "int16",
    "uint16",
    "int32",
    "uint32",
    "int64",
    "uint64",
    "float16",
    "bfloat16",
    "float32",
    "float64",
    "complex32",
    "complex64",
    "complex128",
    "float8_e4m3fn",
    "float8_e4m3fnuz",
    "float8_e5m2",
    "float8_e5m2fnuz",
    "float8_e8m0fnu",
    "float4_e2m1fn_x2",
)

NAME_TO_TORCH: dict[str, torch.dtype] = {
    name: getattr(torch, name)
    for name in STORE_DTYPE_NAMES
    if isinstance(getattr(torch, name, None), torch.dtype)
}
TORCH_TO_NAME: dict[torch.dtype, str] = {dtype: name for name, dtype in NAME_TO_TORCH.items()}


def supported_dtypes() -> list[torch.dtype]:
    """The torch dtypes that can be stored with the installed torch."""
    return list(NAME_TO_TORCH.values())


def dtype_to_name(dtype: torch.dtype, tensor: str) -> str:
    """The store name of ``dtype``; ValueError naming ``tensor`` if a store cannot hold it."""
    name = TORCH_TO_NAME.get(dtype)
    if name is None:
        raise ValueError(f"tensor '{tensor}': dtype {dtype} cannot be stored by tensorstream")
    return name


def name_to_dtype(name: str, tensor: str) -> torch.dtype:
    """The torch dtype of store dtype ``name``; ValueError if the installed torch lacks it."""
    dtype = NAME_TO_TORCH.get(name)
    if dtype is None:
        raise ValueError(
            f"tensor '{tensor}': dtype '{name}' is not available in torch {torch.__version__}"
        )
    return dtype
