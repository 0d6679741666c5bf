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
from typing import Any

import torch
from torch import nn

from ._experts import (
    ExpertsSite,
    expert_tensor_name,
    expert_unit_name,
    find_experts,
    fused_ids,
    router_ids,
    split_store_params,
)

__all__ = [
    "TIERS",
    "Block",
    "Partition",
    "TensorSlot",
    "block_params",
    "find_blocks",
    "partition",
    "shared_parameters",
    "store_blocks",
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
    # The parameter's own shape where the slot holds a slice of it (one expert of a fused
    # [E, ...] parameter); its placeholder has that shape.
    full_shape: torch.Size | None = None

    @property
    def param_shape(self) -> torch.Size:
        return self.full_shape if self.full_shape is not None else self.shape


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
    # An nn.Embedding's table streamed by rows: its forward reads only the rows it looks up
    # (engine.acquire_rows) instead of acquiring the unit.
    rows: bool = False
    row_handles: list[int] = field(default_factory=list)  # rows held (under ``lock``)
    row_positions: Any = None  # each id's row in the gathered table (under ``lock``)
    # Per thread: forwards of a table by rows that acquired it whole (resident in the plan).
    whole: threading.local = field(default_factory=threading.local)
    # Per thread: how many of this thread's forwards of the block the pre-hook entered, so the
    # post-hook (which torch also calls after a failed pre-hook) only undoes what was done.
    entered: threading.local = field(default_factory=threading.local)
    # One expert of an experts site (_experts): its index, the fused parameters' attributes
    # (one per entry of ``params``, whose parameters are the fused ones) and, while held, the
    # views of its slices by attribute (under ``lock``).
    expert: int | None = None
    expert_attrs: list[str] = field(default_factory=list)
    expert_views: Any = None
    # The share of passes expected to use the unit: 1, except for an expert (top-k of E); the
    # engine learns the actual share (engine option ``unit_use_rate``).
    use_rate: float = 1.0


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


# ---- units: what streams at a given granularity ------------------------------------------

# How finely a model is cut into units, coarsest first. The coarsest that fits a budget wins
# (fewer, larger units: fewer acquires, longer reads); each finer one lowers the minimum.
#  0  "blocks": the blocks above; small leaves and tied weights resident.
#  1  "modules": each module's own parameters inside the blocks (a leaf's weights: a layer
#     that does not fit streams tensor group by tensor group); small leaves, tied resident.
#  2  "all": every module's own parameters stream, small leaves too, and each tied parameter
#     is a unit of its own that every module holding it acquires (one stored copy).
TIERS = ("blocks", "modules", "all")

REST_BLOCK = "(rest)"  # the store block of the parameters no block streams


def _unique_named_parameters(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    return [(n, p) for n, p in model.named_parameters() if p.numel() > 0]


def store_blocks(
    model: nn.Module, min_layer_size: int
) -> list[tuple[str, list[tuple[str, nn.Parameter]]]]:
    """How a store holds every parameter of ``model`` (tied ones once, under their first
    name): the blocks of :func:`block_params`, then one block of everything else, so that
    any tier's units can be cut from one store without rewriting it."""
    out = [(name, params) for name, _, params in block_params(model, min_layer_size)]
    taken = {id(p) for _, params in out for _, p in params}
    rest = [(n, p) for n, p in _unique_named_parameters(model) if id(p) not in taken]
    if rest:
        out.append((REST_BLOCK, rest))
    # Fused experts parameters are stored one slice per expert (_experts).
    sites = find_experts(model)
    if sites:
        out = [(name, split_store_params(params, sites)) for name, params in out]
    return out


@dataclass
class Partition:
    """The units of one tier: ``units`` (numbered as the engine's units), ``sites`` (each
    module whose forward holds some units, with them, in module order), ``resident`` (the
    parameters in no unit: on the device for good), and per unit the other units held while it
    is (``held_with``: those of its own site and of the sites enclosing it)."""

    tier: int
    units: list[Block]
    sites: list[tuple[nn.Module, list[Block]]]
    resident: list[tuple[str, nn.Parameter]]
    held_with: list[set[int]]
    # The experts sites whose experts are units (acquired by their routed forward, not by a
    # site's hooks); their routers are resident.
    experts: list[ExpertsSite] = field(default_factory=list)

    @property
    def groups(self) -> dict[str, list[str]]:
        return {u.name: [name for name, _ in u.params] for u in self.units}


def _is_row_table(
    module: nn.Module, params: list[tuple[str, nn.Parameter]], shared: set[int]
) -> bool:
    # Rows of a table give the same values as the whole table only for a plain lookup:
    # max_norm renormalises the table in place, and a tied table is also used whole.
    # A subclass with its own forward may not call it with ids (OPT's positional embedding
    # takes an attention mask), so only the plain lookup is served by rows.
    return (
        isinstance(module, nn.Embedding)
        and type(module).forward is nn.Embedding.forward
        and module.max_norm is None
        and len(params) == 1
        and params[0][1] is module.weight
        and id(module.weight) not in shared
    )


def partition(model: nn.Module, min_layer_size: int, tier: int) -> Partition:
    """The units of ``model`` at ``tier`` (an index of :data:`TIERS`), parameters named by
    their qualified names; ValueError if nothing streams."""
    shared = shared_parameters(model)
    site_units: dict[int, list[Block]] = {}
    site_module: dict[int, nn.Module] = {}
    units: list[Block] = []

    # Experts: each expert its own unit, the fused parameters in no other unit, the routers
    # resident (the next layer's routing is predicted with them).
    experts = find_experts(model)
    fused, routers = fused_ids(experts), router_ids(experts)
    experts_of = {id(x.module): x for x in experts}

    def add(
        name: str, module: nn.Module, params: list[tuple[str, nn.Parameter]], *sites: nn.Module
    ) -> None:
        params = [(n, p) for n, p in params if id(p) not in fused and id(p) not in routers]
        if params:
            unit = Block(index=len(units), name=name, module=module, params=params)
            unit.rows = _is_row_table(module, params, shared)
            units.append(unit)
            for site in sites:
                site_units.setdefault(id(site), []).append(unit)
                site_module[id(site)] = site
        for sub in module.modules():
            x = experts_of.get(id(sub))
            if x is None or x.units:
                continue
            for e in range(x.num_experts):
                x.units.append(
                    Block(
                        index=len(units),
                        name=expert_unit_name(x.name, e),
                        module=x.module,
                        params=[(expert_tensor_name(q, e), p) for _, q, p in x.params],
                        expert=e,
                        expert_attrs=[attr for attr, _, _ in x.params],
                        use_rate=x.use_rate,
                    )
                )
                units.append(x.units[-1])

    def own(prefix: str, module: nn.Module) -> list[tuple[str, nn.Parameter]]:
        return [
            (f"{prefix}.{n}" if prefix else n, p)
            for n, p in module.named_parameters(recurse=False)
            if id(p) not in shared and p.numel() > 0
        ]

    blocks = list(block_params(model, min_layer_size))
    if tier == 0:
        for name, module, params in blocks:
            add(name, module, params, module)
    else:
        in_blocks: set[int] = set()
        for name, module, _ in blocks:
            for sub_name, sub in module.named_modules(prefix=name):
                in_blocks.add(id(sub))
                params = own(sub_name, sub)
                if params:
                    add(sub_name, sub, params, sub)
        if tier >= 2:
            for name, module in model.named_modules():
                if id(module) in in_blocks:
                    continue
                params = own(name, module)
                if params:
                    add(name, module, params, module)
            # A tied parameter: one unit, acquired by every module that holds it.
            holders: dict[int, list[nn.Module]] = {}
            first: dict[int, tuple[str, nn.Parameter]] = {}
            for mname, module in model.named_modules(remove_duplicate=False):
                for pname, p in module.named_parameters(recurse=False):
                    if id(p) in shared and p.numel() > 0:
                        if module not in holders.setdefault(id(p), []):
                            holders[id(p)].append(module)
                        first.setdefault(id(p), (f"{mname}.{pname}" if mname else pname, p))
            for pid, (qname, p) in first.items():
                add(qname, holders[pid][0], [(qname, p)], *holders[pid])
    if not units:
        raise ValueError(
            "tensorstream: no module is large enough to stream (min_layer_size="
            f"{min_layer_size} bytes); nothing to offload"
        )
    in_units = {id(p) for u in units for _, p in u.params}
    resident = [(n, p) for n, p in _unique_named_parameters(model) if id(p) not in in_units]
    # Sites in module order; a unit is held with its site's other units and with those of
    # every enclosing site (a module's forward runs inside its parent's).
    order = {id(m): i for i, m in enumerate(model.modules())}
    sites = sorted(
        ((site_module[k], v) for k, v in site_units.items()), key=lambda s: order.get(id(s[0]), 0)
    )
    enclosing: dict[int, set[int]] = {}

    def walk(module: nn.Module, held: frozenset[int]) -> None:
        here = held | {u.index for u in site_units.get(id(module), ())}
        for u in site_units.get(id(module), ()):
            enclosing.setdefault(u.index, set()).update(here - {u.index})
        x = experts_of.get(id(module))
        for u in x.units if x is not None else ():
            enclosing.setdefault(u.index, set()).update(here)  # one expert at a time
        for child in module.children():
            walk(child, here)

    walk(model, frozenset())
    held_with = [enclosing.get(u.index, set()) for u in units]
    return Partition(tier, units, sites, resident, held_with, [x for x in experts if x.units])
