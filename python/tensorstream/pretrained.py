"""``from_pretrained(path, config)``: stream a Hugging Face checkpoint in place, never holding
the whole model in CPU RAM.

1. The model is built from ``path/config.json`` on the meta device (no weights allocated).
   Its parameters are named in the checkpoint as transformers' own ``from_pretrained`` names
   them (:mod:`._hf_mapping`: renames, and experts held one tensor per expert and projection,
   which are concatenated into each expert's slice of the fused parameters).
2. Blocks are found as :func:`tensorstream.offload` finds them; each block's parameters are
   streamed by the engine straight from the ``.safetensors`` files (no store is written) --
   unless ``Config.dtype`` asks for another floating-point dtype than the checkpoint's, or
   ``Config.compression_enabled`` for a compressed store: the tensors are then converted one
   at a time into a store in ``storage_path`` (kept and reused while the checkpoint's files
   are unchanged), which the engine streams.
3. Everything else (norms, tied weights, persistent buffers) is read from the checkpoint one
   tensor at a time and placed on the device; non-persistent buffers (rotary ``inv_freq``)
   are recomputed by building a fresh copy of the small module that owns them.
4. The engine, hooks and runtime handle are those of :func:`tensorstream.offload`
   (:func:`._attach.attach`).

The checkpoint is read by the engine's safetensors reader (:mod:`._checkpoint`): a bad file
raises its FormatError naming the file. The command ``tensorstream run MODEL_DIR ...``
(:mod:`._run`) loads a model this way and decodes greedily.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ._analysis import TIERS, partition, store_blocks
from ._attach import attach, check_config, check_device, choose_units
from ._checkpoint import Checkpoint
from ._experts import FusedRecipe, expert_slices, find_experts
from ._hf_mapping import checkpoint_names
from ._sources import CheckpointSource, StoreSource, store_compression, usable_storage
from ._torch_memory import placeholder, trim_host_heap

__all__ = ["from_pretrained", "main"]


def from_pretrained(path: str | os.PathLike[str], config: Any = None, **kwargs: Any) -> nn.Module:
    """Builds the Hugging Face model of the checkpoint directory ``path`` (``config.json`` and
    ``*.safetensors``) and streams its large layers straight from the checkpoint's files under
    ``config``'s budgets. The weights are never all held in CPU RAM; no store is written.
    ``kwargs`` go to ``AutoModelForCausalLM.from_config``. Returns the model, whose
    ``forward``/``generate`` work unchanged; ``model.tensorstream`` is its runtime handle."""
    from .config import Config  # noqa: PLC0415

    config = config if config is not None else Config()
    check_config(config)
    root = Path(path)
    if not root.is_dir():
        raise FileNotFoundError(f"tensorstream: '{root}' is not a checkpoint directory")
    if not (root / "config.json").is_file():
        raise FileNotFoundError(f"tensorstream: '{root}' has no config.json")
    # Nothing of a checkpoint at all is a missing file; which files and whether they are
    # valid is the reader's business.
    suffixes = (".safetensors", ".safetensors.index.json")
    if not any(p.name.endswith(suffixes) for p in root.iterdir()):
        raise FileNotFoundError(f"tensorstream: '{root}' holds no .safetensors file")
    checkpoint = Checkpoint(root)  # validates every header (and the index) now
    device = torch.device(config.device) if config.device is not None else torch.device("cpu")
    check_device(device)

    model = _build_meta_model(root, kwargs)
    model.eval()
    prefix = getattr(model, "base_model_prefix", "") or ""

    # The checkpoint's names as transformers' from_pretrained maps them (renames, experts held
    # one tensor per expert and projection).
    mapped = checkpoint_names(model, checkpoint)
    checkpoint = checkpoint.named(mapped.names)
    sites = find_experts(model)
    site_params = {q for site in sites for _, q, _ in site.params}
    # Every parameter by the checkpoint's name (shapes checked), tied ones once; a fused
    # experts parameter made of per-expert tensors by its own name (it is stored by slices).
    key_of: dict[str, str] = {}
    for qname, p in model.named_parameters():
        if p.numel() == 0:
            continue
        recipe = mapped.fused.get(qname)
        if recipe is None:
            key_of[qname] = _tensor_for(checkpoint, qname, p, prefix, mapped.unsupported)
            continue
        if qname not in site_params:
            raise ValueError(
                f"tensorstream: checkpoint '{root}' holds the model's parameter '{qname}' one "
                "tensor per expert, which streams only with its experts as units (not "
                "under whole_layers())"
            )
        _check_recipe(checkpoint, recipe, tuple(p.shape))
        key_of[qname] = qname
    dtype = config.torch_dtype
    # Experts stream one expert at a time from a store of per-expert slices (the checkpoint's
    # fused [E, ...] tensors are not cut in place, per-expert tensors are concatenated as
    # transformers does): the store is converted, in Config.dtype if one is given, else in
    # the checkpoint's dtypes.
    slices = expert_slices(sites, key_of, mapped.fused)
    # A compressed store is written when asked: safetensors are never compressed.
    compression = store_compression(config)
    source: StoreSource | CheckpointSource
    if (
        slices
        or compression
        or (dtype is not None and checkpoint.needs_conversion(key_of.values(), dtype))
    ):
        # A store of every tensor (in Config.dtype when given), so that any tier's units are
        # cut from it.
        layout = {
            name: [key_of[q] for q, _ in params]
            for name, params in store_blocks(model, config.min_layer_size)
        }
        source = StoreSource.converted(
            usable_storage(config), checkpoint, layout, dtype, slices=slices or None,
            compression=compression,
        )  # fmt: skip
    else:
        source = CheckpointSource(root, {})

    def stored_bytes(key: str) -> int:
        entry = checkpoint.entry(key)
        numel = 1
        for d in entry["shape"]:
            numel *= d
        stored = checkpoint.dtype(key)
        target = dtype if dtype is not None and stored.is_floating_point else stored
        return numel * torch.empty((), dtype=target).element_size()

    partitions = [partition(model, config.min_layer_size, tier) for tier in range(len(TIERS))]
    choice = choose_units(
        partitions,
        source,
        config=config,
        device=device,
        resident_bytes_of=lambda part: sum(stored_bytes(key_of[q]) for q, _ in part.resident),
        name_of=lambda qname: key_of[qname],
    )
    replacements: dict[int, nn.Parameter] = {}  # id of a meta parameter -> what replaces it
    for block in choice.part.units:
        named = []
        for qname, p in block.params:
            # A placeholder until the engine's placements set its dtype and device (a meta
            # parameter cannot take data on another device). On the CPU: the source's dtype
            # is not known yet, and a shared placeholder of another dtype on the device would
            # be held there outside the budget.
            param = replacements.get(id(p))  # the experts' units share their fused parameters
            if param is None:
                param = nn.Parameter(
                    placeholder(p.dtype, p.shape, torch.device("cpu")), requires_grad=False
                )
                replacements[id(p)] = param
            named.append((key_of[qname], param))
        block.params = named

    residents, _ = _load_residents(model, checkpoint, prefix, set(replacements), config, device)
    replacements.update(residents)
    _replace_parameters(model, replacements)
    _load_buffers(model, checkpoint, prefix, device)
    attach(model, choice, config=config, device=device)
    trim_host_heap()
    return model


def main(argv: Any = None) -> int:
    """``tensorstream run MODEL_DIR ...`` (see :func:`tensorstream._run.main`)."""
    from ._run import main as run  # noqa: PLC0415

    return run(argv)


def _missing(root: Path, name: str, what: str = "parameter") -> ValueError:
    return ValueError(
        f"tensorstream: checkpoint '{root}' does not hold the model's {what} '{name}' "
        "(its safetensors files have no tensor of that name)"
    )


def _tensor_for(
    checkpoint: Checkpoint,
    qname: str,
    p: torch.Tensor,
    prefix: str,
    unsupported: dict[str, str] | None = None,
) -> str:
    """The checkpoint's name of parameter ``qname``, checked to have ``p``'s shape."""
    key = checkpoint.resolve(qname, prefix)
    if key is None:
        why = (unsupported or {}).get(qname)
        if why is not None:
            raise ValueError(
                f"tensorstream: checkpoint '{checkpoint.path}' does not hold the model's "
                f"parameter '{qname}' as one tensor, and {why}, which tensorstream does not "
                "read"
            )
        raise _missing(checkpoint.path, qname)
    _check_shape(checkpoint, key, tuple(checkpoint.entry(key)["shape"]), tuple(p.shape))
    return key


def _check_recipe(checkpoint: Checkpoint, recipe: FusedRecipe, shape: tuple) -> None:
    """Each per-expert tensor of ``recipe`` has its share of an expert's slice of a fused
    parameter of ``shape`` (the parts of a concatenation are equal, as transformers' reverse
    Chunk of them on save requires)."""
    expected = list(shape[1:])
    parts = len(recipe.experts[0]) if recipe.experts else 1
    expected[recipe.dim] //= parts
    for keys in recipe.experts:
        for key in keys:
            _check_shape(checkpoint, key, tuple(checkpoint.entry(key)["shape"]), tuple(expected))


def _check_shape(checkpoint: Checkpoint, key: str, stored: tuple, expected: tuple) -> None:
    if stored != expected:
        raise ValueError(
            f"tensorstream: checkpoint '{checkpoint.path}' holds '{key}' with shape "
            f"{stored}, the model expects {expected}"
        )


def _build_meta_model(root: Path, kwargs: dict[str, Any]) -> nn.Module:
    import transformers  # noqa: PLC0415

    hf_config = transformers.AutoConfig.from_pretrained(str(root))
    with torch.device("meta"):
        try:
            model = transformers.AutoModelForCausalLM.from_config(hf_config, **kwargs)
        except ValueError:
            model = transformers.AutoModel.from_config(hf_config, **kwargs)
    if (root / "generation_config.json").is_file() and hasattr(model, "generation_config"):
        try:
            model.generation_config = transformers.GenerationConfig.from_pretrained(str(root))
        except (OSError, ValueError):
            pass
    return model


def _load_residents(
    model: nn.Module,
    checkpoint: Checkpoint,
    prefix: str,
    streamed_ids: set[int],
    config: Any,
    device: torch.device,
) -> tuple[dict[int, nn.Parameter], int]:
    """Reads every parameter that does not stream, one tensor at a time, onto ``device``.
    Returns {id of the meta parameter: its replacement} and the resident bytes."""
    aliases: dict[int, list[str]] = {}
    originals: dict[int, nn.Parameter] = {}
    for qname, p in model.named_parameters(remove_duplicate=False):
        aliases.setdefault(id(p), []).append(qname)
        originals[id(p)] = p
    new: dict[int, nn.Parameter] = {}
    resident_bytes = 0
    for pid, names in aliases.items():
        if pid in streamed_ids:
            continue
        key = next(
            (k for k in (checkpoint.resolve(n, prefix) for n in names) if k is not None), None
        )
        if key is None:
            raise _missing(checkpoint.path, names[0])
        tensor = checkpoint.load(key)
        _check_shape(checkpoint, key, tuple(tensor.shape), tuple(originals[pid].shape))
        if config.torch_dtype is not None and tensor.is_floating_point():
            tensor = tensor.to(config.torch_dtype)
        tensor = tensor.to(device)
        resident_bytes += tensor.numel() * tensor.element_size()
        new[pid] = nn.Parameter(tensor, requires_grad=False)
    return new, resident_bytes


def _replace_parameters(model: nn.Module, new: dict[int, nn.Parameter]) -> None:
    """Puts ``new[id(old)]`` wherever ``old`` is registered (keeps tied parameters tied)."""
    for module in model.modules():
        for pname, p in list(module._parameters.items()):
            if p is not None and id(p) in new:
                module._parameters[pname] = new[id(p)]


def _fresh_buffers(module: nn.Module, model: nn.Module) -> dict[str, torch.Tensor]:
    """The buffers of a freshly built copy of ``module`` (on the CPU), for buffers that are
    not saved in checkpoints (rotary ``inv_freq``)."""
    config = getattr(module, "config", None) or getattr(model, "config", None)
    attempts = [
        lambda: type(module)(config=config),
        lambda: type(module)(config),
    ]
    errors = []
    for attempt in attempts:
        try:
            with torch.device("cpu"):
                fresh = attempt()
        except Exception as e:  # noqa: BLE001 - try the next way of building it
            errors.append(e)
            continue
        return dict(fresh.named_buffers(recurse=False))
    raise ValueError(
        f"tensorstream: cannot rebuild the buffers of {type(module).__name__} (not in the "
        f"checkpoint): {errors[-1] if errors else 'unknown'}"
    )


def _load_buffers(
    model: nn.Module, checkpoint: Checkpoint, prefix: str, device: torch.device
) -> None:
    """Buffers saved in the checkpoint are read from it; the others (non-persistent, such as
    rotary ``inv_freq``) are rebuilt by constructing a fresh copy of the module owning them."""
    done: dict[int, torch.Tensor] = {}
    for module_name, module in model.named_modules(remove_duplicate=False):
        fresh: dict[str, torch.Tensor] | None = None
        for bname, buffer in list(module._buffers.items()):
            if buffer is None:
                continue
            if id(buffer) in done:
                module._buffers[bname] = done[id(buffer)]
                continue
            qname = f"{module_name}.{bname}" if module_name else bname
            key = checkpoint.resolve(qname, prefix)
            if key is not None:
                value = checkpoint.load(key)
            elif buffer.device.type == "meta":
                if fresh is None:
                    fresh = _fresh_buffers(module, model)
                if bname not in fresh or fresh[bname].shape != buffer.shape:
                    raise _missing(checkpoint.path, qname, "buffer")
                value = fresh[bname]
            else:
                value = buffer
            value = value.to(device)
            done[id(buffer)] = value
            module._buffers[bname] = value
