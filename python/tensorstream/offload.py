"""``offload(model, config)``: stream a model's large layers from a store, within a budget.

What happens (torch-facing; everything that moves bytes runs in the C++ engine):

1. **Blocks.** Every child of an ``nn.ModuleList`` of two or more modules of one class (the
   decoder layers of a transformer) is a block; so is any other module whose own parameters
   take at least ``config.min_layer_size`` bytes (embeddings, heads). Everything else —
   norms, small projections, buffers — stays resident on the device (:mod:`._analysis`).
2. **Tied weights** (a parameter reachable from two places, such as ``lm_head.weight`` and
   ``embed_tokens.weight``) stay resident: one copy, shared as before.
3. **Store.** The streamed parameters are written to ``<storage_path>/<fingerprint>.tstore``;
   the fingerprint hashes names, dtypes, shapes and bytes, so a second ``offload()`` of the
   same weights reuses the store and changed weights get a new one (:mod:`._sources`).
4. **Engine.** The residency plan keeps as many blocks resident as the budget allows beside
   the streaming slots; the slots' memory comes from torch, so torch's allocator sees it.
5. **Hooks.** Before a block runs, its parameters become views into the block's slot
   (``param.data = view``: no copy); after it runs they become placeholders (right
   shape and dtype; views of one zero per dtype, shared) and the slot is released. The
   host copies of the streamed weights are dropped, so the process holds no second copy (4 and 5:
   :func:`._attach.attach`, the same as for :func:`tensorstream.from_pretrained`).

6. **dtype.** With ``config.dtype`` (float16/bfloat16), floating-point parameters and buffers
   are converted in place first, one tensor at a time, as ``model.to(dtype)`` would: the store
   holds the converted weights and the whole model runs in that dtype.
7. **Devices.** The model runs on the device it was offloaded to (``config.device``, else
   where its parameters are). ``model.to()`` / ``.cpu()`` that keep that device and dtype are
   no-ops for the streamed weights; moving or converting an offloaded model to anything else
   raises RuntimeError (offload a fresh model with ``Config(device=...)`` instead), and inputs
   on another device are refused by the hooks with both devices named.
8. **Memory pressure.** :func:`set_memory_pressure_callback` sets a function called when the
   engine refuses a budget or torch runs out of memory inside a streamed block
   (:mod:`._pressure`).

This slice runs on the CPU device. CUDA devices use the same engine path (acquire makes the
current stream wait for the copy); they are exercised only where a GPU is present.
"""

from __future__ import annotations

import sys
import types
from typing import Any

import torch
from torch import nn

from ._analysis import TIERS, partition, store_blocks
from ._attach import attach, check_config, check_device, choose_units
from ._pressure import set_memory_pressure_callback
from ._sources import StoreSource, store_compression, usable_storage
from ._torch_memory import trim_host_heap
from .runtime import OffloadedModel, get_model_statistics, runtime_of

__all__ = [
    "OffloadedModel",
    "get_model_statistics",
    "offload",
    "set_memory_pressure_callback",
]


def offload(model: nn.Module, config: Any = None) -> nn.Module:
    """Streams ``model``'s large layers from a store under ``config``'s budgets; returns the
    same model object, whose ``forward``/``generate`` keep working unchanged."""
    from .config import Config  # noqa: PLC0415 - the config module imports nothing heavy

    config = config if config is not None else Config()
    check_config(config)
    if runtime_of(model) is not None:
        raise RuntimeError("tensorstream: this model is already offloaded")
    device = _resolve_device(model, config)
    check_device(device)
    model.eval()
    if config.torch_dtype is not None:
        _convert_dtype(model, config.torch_dtype)

    # The store holds every parameter once, so that any tier's units are cut from it.
    source = StoreSource.of_blocks(
        usable_storage(config),
        store_blocks(model, config.min_layer_size),
        compression=store_compression(config),
    )
    partitions = [partition(model, config.min_layer_size, tier) for tier in range(len(TIERS))]
    choice = choose_units(
        partitions,
        source,
        config=config,
        device=device,
        # Resident parameters (everything not streamed) count against the device budget too.
        resident_bytes_of=lambda part: sum(p.numel() * p.element_size() for _, p in part.resident),
    )
    streamed_ids = {id(p) for u in choice.part.units for _, p in u.params}
    runtime = attach(model, choice, config=config, device=device)
    # The streamed host copies are gone now; the resident weights go to the device.
    try:
        _place_residents(model, streamed_ids, device)
    except BaseException:
        runtime.close()
        raise
    trim_host_heap()
    return model


def _resolve_device(model: nn.Module, config: Any) -> torch.device:
    if getattr(config, "device", None) is not None:
        return torch.device(config.device)
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


def _convert_dtype(model: nn.Module, dtype: torch.dtype) -> None:
    """Converts the floating-point parameters and buffers to ``dtype`` in place, one tensor at
    a time (the memory peak is one tensor, not a second model), exactly as
    ``model.to(dtype)`` would: the store then holds the converted weights, and the resident
    parameters compute in the same dtype."""
    done: set[int] = set()
    with torch.no_grad():
        for module in model.modules():
            for tensor in (*module.parameters(recurse=False), *module.buffers(recurse=False)):
                if id(tensor) in done or not tensor.is_floating_point() or tensor.dtype == dtype:
                    continue
                done.add(id(tensor))
                tensor.data = tensor.data.to(dtype)


def _place_residents(model: nn.Module, streamed_ids: set[int], device: torch.device) -> None:
    """Moves the resident parameters and the buffers to ``device``; on the CPU gives them
    memory of their own instead. A model loaded from safetensors shares one file mapping
    among all its tensors, so a single resident norm would keep every page of the checkpoint
    that was ever read (the fingerprint reads all of them) in the process's RSS (measured:
    +355 MB RssFile for a 400 MB checkpoint)."""
    with torch.no_grad():
        if device.type != "cpu":
            for p in model.parameters():
                if id(p) not in streamed_ids:
                    p.data = p.data.to(device)
            for b in model.buffers():
                b.data = b.data.to(device)
            return
        for p in model.parameters():
            if id(p) not in streamed_ids and p.numel() > 0:
                p.data = p.data.clone()
        for b in model.buffers():
            b.data = b.data.clone()


class _CallableModule(types.ModuleType):
    """``import tensorstream.offload`` makes the package attribute ``tensorstream.offload``
    this module (Python binds submodules on their package), shadowing the ``offload``
    function exported there: calling the module calls the function, so ``ts.offload(model,
    config)`` works either way."""

    def __call__(self, model: nn.Module, config: Any = None) -> nn.Module:
        return offload(model, config)


sys.modules[__name__].__class__ = _CallableModule
