"""Which modules of a model stream, and with which parameters (torch-facing).

* A **block** is every child of an ``nn.ModuleList`` of two or more modules of one class (the
  decoder layers of a transformer), and any other module whose own parameters take at least
  ``min_layer_size`` bytes (embeddings, heads). Everything else stays resident.
* Parameters reachable under two names (tied weights, such as ``lm_head.weight`` and
  ``embed_tokens.weight``) stay resident: one copy, shared as before.

:func:`streamed_blocks` gives the blocks as :class:`Block` objects, which the runtime then
fills (:class:`TensorSlot`) and its hooks use; :func:`block_params` is the same analysis as
plain tuples, for estimates that stream nothing.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
from torch import nn

__all__ = [
    "Block",
    "TensorSlot",
    "block_params",
    "find_blocks",
    "shared_parameters",
    "streamed_blocks",
]


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


def shared_parameters(model: nn.Module) -> set[int]:
    """ids of parameters reachable under more than one name (tied weights)."""
    seen: dict[int, int] = {}
    for _, module in model.named_modules(remove_duplicate=False):
        for _, param in module.named_parameters(recurse=False):
            seen[id(param)] = seen.get(id(param), 0) + 1
    return {pid for pid, count in seen.items() if count > 1}


def block_params(
    model: nn.Module, min_layer_size: int
) -> Iterator[tuple[str, nn.Module, list[tuple[str, nn.Parameter]]]]:
    """(block name, module, [(qualified name, parameter)]) of every block that streams at
    least one parameter (tied and empty parameters stay resident), in module order."""
    shared = shared_parameters(model)
    for name, module in find_blocks(model, min_layer_size):
        params = [
            (f"{name}.{pname}" if name else pname, p)
            for pname, p in module.named_parameters()
            if id(p) not in shared and p.numel() > 0
        ]
        if params:
            yield name, module, params


@dataclass
class TensorSlot:
    """Where one parameter lives inside its block's bytes."""

    param: nn.Parameter
    offset: int
    nbytes: int
    dtype: torch.dtype
    shape: torch.Size


@dataclass
class Block:
    """One streamed module. ``params`` pairs each parameter with the name of its tensor in
    the source (the qualified name, unless the source names it otherwise); ``slots`` are
    filled when the runtime maps them to the engine's bytes. ``lock`` guards ``active``."""

    index: int
    name: str
    module: nn.Module
    params: list[tuple[str, nn.Parameter]]  # (name in the source, parameter)
    slots: list[TensorSlot] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)
    active: int = 0  # forwards running on this block (threads may share one model)
    # Per thread: how many of this thread's forwards of the block the pre-hook entered, so the
    # post-hook (which torch also calls after a failed pre-hook) only undoes what was done.
    entered: threading.local = field(default_factory=threading.local)


def streamed_blocks(model: nn.Module, min_layer_size: int) -> list[Block]:
    """The blocks of ``model`` as :class:`Block` objects, numbered in module order; ValueError
    if no module is large enough to stream."""
    blocks = [
        Block(index=i, name=name, module=module, params=params)
        for i, (name, module, params) in enumerate(block_params(model, min_layer_size))
    ]
    if not blocks:
        raise ValueError(
            "tensorstream: no module is large enough to stream (min_layer_size="
            f"{min_layer_size} bytes); nothing to offload"
        )
    return blocks
