"""Which checkpoint tensors make each parameter of a Hugging Face model, as transformers' own
``from_pretrained`` decides: its conversion mapping for the model (``transformers.
conversion_mapping.get_model_conversion_mapping``: WeightRenaming / WeightConverter).

Hub checkpoints of mixture-of-experts models (and what transformers 5's ``save_pretrained``
writes: it reverses the conversion on save) hold experts one tensor per expert and
projection, which transformers fuses on load into ``[E, ...]`` parameters, e.g. Mixtral::

    model.layers.L.block_sparse_moe.experts.E.w1.weight  (w3, w2)  ->  renamed .mlp.,
    gate_up_proj = MergeModulelist(dim=0) of w1, of w3, then Concatenate(dim=1)
    down_proj    = MergeModulelist(dim=0) of w2
    model.layers.L.block_sparse_moe.gate.weight  ->  model.layers.L.mlp.gate.weight

Every checkpoint name is renamed by transformers' own ``rename_source_key`` (its renamings,
then at most one converter, and the base-model prefix added or removed); a converter of
:class:`MergeModulelist` (dim 0) optionally followed by :class:`Concatenate` is read per
expert: expert ``e``'s slice is the concatenation, along ``Concatenate.dim - 1``, of expert
``e``'s tensor of each source pattern in the converter's order (the stacked dim 0 is the
expert). The expert is the number the pattern's ``*`` matches (transformers stacks in the
checkpoint names' natural order, which is that number for a complete checkpoint). Other
operations (Chunk, Transpose, Interleave, ...) are not streamed per expert: a parameter made
by one of them raises ValueError naming it and the operations.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field
from typing import Any

from ._checkpoint import Checkpoint
from ._experts import FusedRecipe

__all__ = ["CheckpointNames", "checkpoint_names"]

logger = logging.getLogger("tensorstream")


@dataclass
class CheckpointNames:
    """``names``: model tensor name -> the checkpoint tensor transformers loads into it;
    ``fused``: fused experts parameter -> its per-expert recipe; ``unsupported``: parameter
    -> why transformers' conversion of it cannot be read per expert."""

    names: dict[str, str] = field(default_factory=dict)
    fused: dict[str, FusedRecipe] = field(default_factory=dict)
    unsupported: dict[str, str] = field(default_factory=dict)


def _transformers_mapping(model: Any) -> tuple[Any, list, list] | None:
    try:
        from transformers import conversion_mapping, core_model_loading  # noqa: PLC0415
    except ImportError:
        return None
    # The parts of transformers' loader this reads (5.x); another version without them maps
    # nothing here, and names then resolve as they are.
    needed = ("rename_source_key", "apply_renamings", "dot_natural_key", "WeightRenaming",
              "WeightConverter", "MergeModulelist", "Concatenate")  # fmt: skip
    if not all(hasattr(core_model_loading, n) for n in needed) or not hasattr(
        conversion_mapping, "get_model_conversion_mapping"
    ):
        logger.info("tensorstream: this transformers has no conversion mapping to read")
        return None
    try:
        transforms = conversion_mapping.get_model_conversion_mapping(model)
    except Exception as e:  # noqa: BLE001 - a model transformers maps no weights of
        logger.info("tensorstream: no transformers conversion mapping for the model: %s", e)
        return None
    renamings = [t for t in transforms if isinstance(t, core_model_loading.WeightRenaming)]
    converters = [t for t in transforms if isinstance(t, core_model_loading.WeightConverter)]
    return core_model_loading, renamings, converters


def _expert_regex(pattern: str) -> re.Pattern[str] | None:
    """``pattern`` (a converter's source pattern, a regex with one ``*`` for the expert) with
    the expert's number captured."""
    if pattern.count("*") != 1:
        return None
    before, after = pattern.split("*")
    try:
        return re.compile(f"{before}(\\d+){after}(?!\\w)")
    except re.error:
        return None


def _supported(ops: list[Any], sources: int, cml: Any) -> tuple[bool, int]:
    """Whether ``ops`` stack per-expert tensors (and concatenate the stacks), and the
    concatenation's dim within one expert's slice."""
    if not ops or type(ops[0]) is not cml.MergeModulelist or ops[0].dim != 0:
        return False, 0
    if len(ops) == 1:
        return sources == 1, 0
    if len(ops) == 2 and type(ops[1]) is cml.Concatenate and ops[1].dim >= 1:
        return True, ops[1].dim - 1
    return False, 0


def checkpoint_names(model: Any, checkpoint: Checkpoint) -> CheckpointNames:
    """What transformers' ``from_pretrained`` loads ``checkpoint``'s tensors into, for
    ``model`` (built from the checkpoint's config). Without transformers' conversion mapping
    (another transformers version), nothing: names are then resolved as they are. Raises
    ValueError naming a per-expert tensor missing from the checkpoint."""
    found = _transformers_mapping(model)
    out = CheckpointNames()
    if found is None:
        return out
    cml, renamings, converters = found
    by_pattern = {p: c for c in converters for p in c.source_patterns}
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    prefix = getattr(model, "base_model_prefix", None) or None
    # target -> (converter, {source pattern: [(checkpoint name, renamed name)]})
    groups: dict[str, tuple[Any, dict[str, list[tuple[str, str]]]]] = {}
    for key in sorted(checkpoint.names(), key=cml.dot_natural_key):
        renamed, pattern = cml.rename_source_key(key, renamings, converters, prefix, shapes)
        if renamed not in shapes and key in shapes:
            renamed, pattern = cml.rename_source_key(key, [], [], prefix, shapes)
        if renamed not in shapes:
            continue  # a tensor the model has no use for (transformers: unexpected)
        if pattern is None:
            out.names.setdefault(renamed, key)
            continue
        converter = by_pattern[pattern]
        entry = groups.setdefault(renamed, (converter, {}))
        entry[1].setdefault(pattern, []).append((key, cml.apply_renamings(key, renamings)))
    for target, (converter, collected) in groups.items():
        ok, dim = _supported(list(converter.operations), len(converter.source_patterns), cml)
        if not ok or len(shapes[target]) < 2:
            out.unsupported[target] = (
                f"transformers makes it of {converter.source_patterns} by "
                f"{list(converter.operations)}"
            )
            continue
        experts = shapes[target][0]
        per_pattern = [
            _by_expert(checkpoint, target, p, collected.get(p, []), experts, renamings, cml)
            for p in converter.source_patterns
        ]
        out.fused[target] = FusedRecipe(
            tuple(tuple(keys[e] for keys in per_pattern) for e in range(experts)), dim
        )
    return out


def _by_expert(
    checkpoint: Checkpoint,
    target: str,
    pattern: str,
    keys: list[tuple[str, str]],
    experts: int,
    renamings: list[Any],
    cml: Any,
) -> list[str]:
    """The checkpoint tensors of ``pattern`` for ``target``, by expert; ValueError naming
    the first missing one."""
    regex = _expert_regex(pattern)
    found: dict[int, tuple[str, str, re.Match[str]]] = {}
    for rank, (key, renamed) in enumerate(keys):
        match = regex.search(renamed) if regex is not None else None
        expert = int(match.group(1)) if match is not None else rank
        found.setdefault(expert, (key, renamed, match))
    for e in range(experts):
        if e not in found:
            raise _missing_expert(checkpoint, target, pattern, e, found, renamings, cml)
    extra = sorted(e for e in found if e >= experts)
    if extra:
        raise ValueError(
            f"tensorstream: checkpoint '{checkpoint.path}' holds '{found[extra[0]][0]}', "
            f"expert {extra[0]} of the model's parameter '{target}', which has {experts} experts"
        )
    return [found[e][0] for e in range(experts)]


def _missing_expert(
    checkpoint: Checkpoint,
    target: str,
    pattern: str,
    expert: int,
    found: dict[int, tuple[str, str, re.Match[str] | None]],
    renamings: list[Any],
    cml: Any,
) -> ValueError:
    name = None
    if found:
        # The missing tensor's checkpoint name: another expert's, with its number changed
        # where renaming it gives the missing expert's renamed name.
        key, renamed, match = next(iter(found.values()))
        if match is not None:
            start, end = match.span(1)
            wanted = renamed[:start] + str(expert) + renamed[end:]
            number = match.group(1)
            for m in re.finditer(rf"(?<![\w]){re.escape(number)}(?![\w])", key):
                candidate = key[: m.start()] + str(expert) + key[m.end() :]
                if cml.apply_renamings(candidate, renamings) == wanted:
                    name = candidate
                    break
            name = name or wanted
    what = f"'{name}'" if name else f"a tensor matching '{pattern}'"
    return ValueError(
        f"tensorstream: checkpoint '{checkpoint.path}' does not hold {what}: expert {expert}'s "
        f"'{pattern}' of the model's parameter '{target}' (transformers fuses the experts' "
        "tensors into it; its safetensors files have no tensor of that name)"
    )
