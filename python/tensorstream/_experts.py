"""Mixture-of-experts layers: each expert is a unit, and only the routed experts stream.

Transformers 5.x keeps the experts of one layer as fused 3-D parameters ``[E, ...]`` on one
module, whose class is decorated ``@use_experts_implementation`` (``MixtralExperts``,
``Qwen2MoeExperts``, ``Qwen3MoeExperts``, ``GptOssExperts``: ``gate_up_proj``,
``down_proj``, and for gpt-oss their biases). For such a module (an **experts site**):

* **Store.** Each fused parameter is stored as one tensor per expert, its slice ``p[e]``,
  named ``<qualified parameter name>.<e>`` (``model.layers.0.mlp.experts.gate_up_proj.3``),
  expert after expert (an expert's slices are adjacent in the store).
* **Units.** Expert ``e`` is one unit, ``<experts module name>.<e>``
  (``model.layers.0.mlp.experts.3``), of its slices of every fused parameter. The router
  beside the experts (the sibling module with a ``[E, H]`` weight and ``top_k``) stays
  resident, so that the next layer's routing can be predicted; attention, norms and shared
  experts stream or reside as the tier decides.
* **Routed forward.** The experts module's forward runs transformers' own eager experts
  forward of its class (the undecorated ``forward``: same ops, same order, so the outputs are
  bitwise those of the in-memory model under the ``"eager"`` experts implementation) on a
  proxy whose fused parameters are tables: ``table[e]`` acquires expert ``e``'s unit (once
  per forward) and gives its slice, a view into the unit's bytes. The eager forward visits
  the hit experts one after another, so an expert is released as soon as the next one is
  asked for: one expert at a time is held. Whatever ``config._experts_implementation``
  the model had, a streamed experts module computes with the eager op sequence.
* **Prediction.** Before the eager loop, every expert the current tokens hit is prefetched,
  then the next experts site's router is applied to this layer's experts input and the
  experts it picks are prefetched as well (``engine.prefetch``: loads in the background,
  never displacing a held or not-yet-used unit). When that layer runs, the experts it
  really uses are compared with the prediction (``prediction_recall``). Misses load on
  demand.
* **Expert cache.** Each expert unit tells the engine the share of passes expected to use
  it (top-k of E, engine option ``unit_use_rate``). The engine learns the real share from
  the acquires, keeps experts out of its learned order (its own prefetch never replays the
  experts of an earlier token), ranks a released expert's place in the arena by how soon it
  is expected back — a frequently routed expert stays, a rarely routed one goes first — and
  makes every-pass units (attention, routers, shared experts) resident before experts.
* **Statistics** (``model.tensorstream.statistics()["experts"]``): expert acquires, the
  share that found the expert in device memory (``hit_rate``, from the engine's device
  hits/misses across each experts forward), bytes brought to the device during experts
  forwards, experts predicted and the recall of the prediction, the time acquires of
  experts waited (``stall_seconds``), and per experts site (``layers``): its acquires, hit
  rate, stall, resident experts and each expert's learned use rate.

Torch-facing. Several threads may run one model: a unit's count is kept under its block's
lock as for every other unit; the statistics are guarded by ``ExpertsRuntime.lock``.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

if TYPE_CHECKING:
    from ._analysis import Block
    from .runtime import OffloadedModel

logger = logging.getLogger("tensorstream")

__all__ = [
    "ExpertsSite",
    "ExpertsRuntime",
    "FusedRecipe",
    "SliceRecipe",
    "expert_tensor_name",
    "expert_slices",
    "expert_unit_name",
    "find_experts",
    "install_routed",
    "split_store_params",
]


def expert_tensor_name(qname: str, expert: int) -> str:
    """The store's name of expert ``expert``'s slice of the fused parameter ``qname``."""
    return f"{qname}.{expert}"


def expert_unit_name(site_name: str, expert: int) -> str:
    return f"{site_name}.{expert}"


@dataclass
class ExpertsSite:
    """One experts module: its qualified ``name``, its fused parameters
    ``[(attribute, qualified name, parameter)]`` (all ``[num_experts, ...]``), the resident
    ``router`` beside it (None if none is found), and its expert units (filled by
    :func:`tensorstream._analysis.partition`)."""

    name: str
    module: nn.Module
    params: list[tuple[str, str, nn.Parameter]]
    num_experts: int
    router: nn.Module | None
    units: list[Block] = field(default_factory=list)

    @property
    def use_rate(self) -> float:
        """The share of passes expected to use one expert: top-k of E (the router's
        ``top_k``; 1 of E without a router), before the engine learns the real share. 1
        inside :class:`every_pass_rates`."""
        if not _RATES[0]:
            return 1.0
        top_k = getattr(self.router, "top_k", 1) if self.router is not None else 1
        return min(1.0, max(1, int(top_k)) / self.num_experts)


def _is_experts(module: nn.Module) -> bool:
    forward = type(module).forward
    experts = getattr(module, "num_experts", None)
    if getattr(forward, "__wrapped__", None) is None or not hasattr(module, "has_gate"):
        return False
    if not isinstance(experts, int) or experts < 2:
        return False
    own = list(module.named_parameters(recurse=False))
    return bool(own) and all(p.dim() >= 2 and p.shape[0] == experts for _, p in own)


def _router_of(parent: nn.Module | None, experts: nn.Module) -> nn.Module | None:
    if parent is None:
        return None
    for child in parent.children():
        if child is experts:
            continue
        weight = getattr(child, "weight", None)
        if (
            isinstance(weight, nn.Parameter)
            and hasattr(child, "top_k")
            and weight.dim() == 2
            and weight.shape[0] == experts.num_experts
        ):
            return child
    return None


# Whether experts stream as units of their own; off, an MoE layer streams like any other
# (its fused expert tensors whole): the baseline of bench/bench_moe.py. Set via whole_layers().
_ENABLED = [True]


class whole_layers:  # noqa: N801 - used as a context manager, like a function
    """``with whole_layers(): offload(...)``: offloads inside stream MoE layers whole, every
    expert read each pass (for comparisons; not thread-safe)."""

    def __enter__(self) -> None:
        _ENABLED[0] = False

    def __exit__(self, *exc: object) -> None:
        _ENABLED[0] = True


# Whether expert units tell the engine their use rate; off, the engine treats them as units
# used on every pass (cached by the order of the first pass, possibly made resident): the
# expert-cache baseline of bench/bench_moe.py. Set via every_pass_rates().
_RATES = [True]


class every_pass_rates:  # noqa: N801 - used as a context manager, like a function
    """``with every_pass_rates(): offload(...)``: expert units are planned and cached as if
    used on every pass, not by their learned rate (for comparisons; not thread-safe)."""

    def __enter__(self) -> None:
        _RATES[0] = False

    def __exit__(self, *exc: object) -> None:
        _RATES[0] = True


def find_experts(model: nn.Module) -> list[ExpertsSite]:
    """The experts sites of ``model`` in module order (none for a dense model)."""
    if not _ENABLED[0]:
        return []
    modules = dict(model.named_modules())
    sites = []
    for name, module in modules.items():
        if not _is_experts(module):
            continue
        parent = modules.get(name.rpartition(".")[0]) if "." in name else model
        params = [
            (attr, f"{name}.{attr}" if name else attr, p)
            for attr, p in module.named_parameters(recurse=False)
        ]
        sites.append(
            ExpertsSite(name, module, params, module.num_experts, _router_of(parent, module))
        )
    return sites


def fused_ids(sites: list[ExpertsSite]) -> set[int]:
    return {id(p) for s in sites for _, _, p in s.params}


def router_ids(sites: list[ExpertsSite]) -> set[int]:
    return {id(p) for s in sites if s.router is not None for p in s.router.parameters()}


def split_store_params(
    params: list[tuple[str, Any]], sites: list[ExpertsSite]
) -> list[tuple[str, Any]]:
    """``params`` (a store block's tensors) with each fused experts parameter replaced by its
    per-expert slices, expert after expert, where the first of its parameters was."""
    by_id = {id(p): s for s in sites for _, _, p in s.params}
    out: list[tuple[str, Any]] = []
    done: set[int] = set()
    for qname, p in params:
        site = by_id.get(id(p))
        if site is None:
            out.append((qname, p))
            continue
        if id(site) in done:
            continue
        done.add(id(site))
        for e in range(site.num_experts):
            for _, q, fused in site.params:
                out.append((expert_tensor_name(q, e), fused.detach()[e]))
    return out


@dataclass(frozen=True)
class SliceRecipe:
    """How one expert's slice of a fused parameter is read from a checkpoint: ``parts``, each
    (checkpoint tensor, index or None: ``tensor[index]`` or the whole tensor), concatenated
    along ``dim`` (a single part is taken as it is)."""

    parts: tuple[tuple[str, int | None], ...]
    dim: int = 0

    def fingerprint(self) -> Any:
        """A JSON value naming the recipe (a single indexed part: [tensor, index])."""
        if len(self.parts) == 1 and self.parts[0][1] is not None:
            return list(self.parts[0])
        return {"parts": [list(p) for p in self.parts], "dim": self.dim}


@dataclass(frozen=True)
class FusedRecipe:
    """A fused ``[E, ...]`` parameter the checkpoint holds one tensor per expert and
    projection: ``experts[e]`` are expert ``e``'s checkpoint tensors, concatenated along
    ``dim`` of the slice (transformers' MergeModulelist then Concatenate, :mod:`._hf_mapping`)."""

    experts: tuple[tuple[str, ...], ...]
    dim: int = 0


def expert_slices(
    sites: list[ExpertsSite],
    key_of: dict[str, str],
    fused: dict[str, FusedRecipe] | None = None,
) -> dict[str, SliceRecipe]:
    """For a checkpoint whose tensors ``key_of`` names (model name -> checkpoint name, or the
    model's own name for a parameter in ``fused``): each expert slice's store name -> its
    recipe, with ``key_of`` extended by the slices' names (``<key_of name>.<e>``). A
    parameter in ``fused`` (model name -> :class:`FusedRecipe`) is made of per-expert
    checkpoint tensors; any other is sliced from the checkpoint's fused tensor."""
    fused = fused or {}
    out = {}
    for site in sites:
        for _, qname, _ in site.params:
            recipe = fused.get(qname)
            for e in range(site.num_experts):
                key = expert_tensor_name(key_of[qname], e)
                key_of[expert_tensor_name(qname, e)] = key
                if recipe is None:
                    out[key] = SliceRecipe(((key_of[qname], e),))
                else:
                    out[key] = SliceRecipe(tuple((k, None) for k in recipe.experts[e]), recipe.dim)
    return out


# ---- the routed forward ---------------------------------------------------------------------


class ExpertsRuntime:
    """The routed forwards of one runtime and their statistics (guarded by ``lock``)."""

    def __init__(self, sites: list[ExpertsSite], predict: bool) -> None:
        self.sites = sites
        self.predict = predict
        self.lock = threading.Lock()
        self.acquires = 0
        self.device_hits = 0
        self.device_misses = 0
        self.bytes_to_device = 0
        self.forwards = 0
        self.predicted = 0  # experts prefetched by prediction
        self.predicted_used = 0  # of the experts used by predicted forwards, those predicted
        self.used_in_predicted = 0  # experts used by forwards that had a prediction
        self.pending: dict[int, set[int]] = {}  # site index -> predicted experts
        self.site_acquires = [0] * len(sites)
        self.site_hits = [0] * len(sites)
        self.site_misses = [0] * len(sites)

    def statistics(self, engine: dict[str, Any], resident: list[bool]) -> dict[str, Any]:
        """The experts' statistics, from these counters and the engine's ``engine`` (its
        stats: each unit's stall time and learned use rate) under the plan ``resident``."""
        stall, rates = engine["block_stall_seconds"], engine["use_rates"]
        with self.lock:
            looked = self.device_hits + self.device_misses
            layers = []
            for i, site in enumerate(self.sites):
                hits, misses = self.site_hits[i], self.site_misses[i]
                layers.append(
                    {
                        "name": site.name,
                        "acquires": self.site_acquires[i],
                        "hit_rate": hits / (hits + misses) if hits + misses else 0.0,
                        "stall_seconds": sum(stall[u.index] for u in site.units),
                        "resident_experts": sum(1 for u in site.units if resident[u.index]),
                        "use_rates": [rates[u.index] for u in site.units],
                    }
                )
            return {
                "sites": len(self.sites),
                "units": sum(len(s.units) for s in self.sites),
                "forwards": self.forwards,
                "acquires": self.acquires,
                "hit_rate": self.device_hits / looked if looked else 0.0,
                "bytes_to_device": self.bytes_to_device,
                "prediction": self.predict,
                "predicted": self.predicted,
                "prediction_recall": (
                    self.predicted_used / self.used_in_predicted if self.used_in_predicted else 0.0
                ),
                "stall_seconds": sum(layer["stall_seconds"] for layer in layers),
                "layers": layers,
            }


class _Held:
    """The expert units one routed forward holds: at most one at a time."""

    def __init__(self, runtime: OffloadedModel, site: ExpertsSite) -> None:
        self.runtime = runtime
        self.site = site
        self.expert: int | None = None
        self.views: dict[str, torch.Tensor] = {}
        self.acquires = 0

    def view(self, expert: int, attr: str) -> torch.Tensor:
        if expert != self.expert:
            self.release()
            unit = self.site.units[expert]
            self.views = _acquire_expert(self.runtime, unit)
            self.expert = expert
            self.acquires += 1
        return self.views[attr]

    def release(self) -> None:
        if self.expert is not None:
            unit = self.site.units[self.expert]
            self.expert = None
            self.views = {}
            _release_expert(self.runtime, unit)


class _Table:
    """Stands for a fused ``[E, ...]`` parameter: ``table[e]`` is expert ``e``'s slice."""

    def __init__(self, held: _Held, attr: str) -> None:
        self._held = held
        self._attr = attr

    def __getitem__(self, index: Any) -> torch.Tensor:
        if isinstance(index, torch.Tensor) and index.numel() == 1:
            index = int(index.item())
        if not isinstance(index, int):
            raise TypeError(
                f"tensorstream: streamed experts '{self._held.site.name}' are read one expert "
                f"at a time (got an index of type {type(index).__name__})"
            )
        return self._held.view(index, self._attr)


class _Proxy:
    """The experts module as an experts forward sees it, fused parameters replaced by
    ``tables`` (a :class:`_Table` each for the eager forward; one expert's slices, as
    ``[1, ...]`` tensors, for a fused implementation) and any other attribute overridden by
    ``extra``."""

    def __init__(self, module: nn.Module, tables: dict[str, Any], **extra: Any) -> None:
        object.__setattr__(self, "_module", module)
        object.__setattr__(self, "_tables", {**tables, **extra})

    def __getattr__(self, name: str) -> Any:
        tables = object.__getattribute__(self, "_tables")
        if name in tables:
            return tables[name]
        return getattr(object.__getattribute__(self, "_module"), name)


def _acquire_expert(runtime: OffloadedModel, unit: Block) -> dict[str, torch.Tensor]:
    from ._hooks import acquire_bytes  # noqa: PLC0415

    with unit.lock:
        if unit.active == 0:
            raw = acquire_bytes(runtime, unit)
            unit.expert_views = {
                attr: raw[s.offset : s.offset + s.nbytes].view(s.dtype).view(s.shape)
                for attr, s in zip(unit.expert_attrs, unit.slots, strict=True)
            }
        unit.active += 1
        return unit.expert_views


def _release_expert(runtime: OffloadedModel, unit: Block) -> None:
    from ._hooks import release_bytes  # noqa: PLC0415

    with unit.lock:
        unit.active -= 1
        if unit.active > 0:
            return
        unit.expert_views = None
        release_bytes(runtime, unit)


# Fused implementations whose result is the sum over each token's k routed slots of
# (expert output × routing weight), taken as ``view(tokens, k, hidden).sum(1)``, each slot's
# output computed from its own row: they run one expert at a time (:func:`_per_expert`).
# grouped_mm (transformers' default) multiplies each expert's rows on their own, so that is
# bitwise its result; batched_mm's one bmm over every (token, slot) pair rounds by the size
# of that batch, which streamed is one expert's pairs: its last bits may differ.
_PER_SLOT_SUM = {"grouped_mm": True, "batched_mm": False}  # name -> bitwise
_warned: set[str] = set()


def _warn_once(name: str, why: str) -> None:
    if name not in _warned:
        _warned.add(name)
        logger.warning(
            "tensorstream: streamed experts under experts implementation '%s' %s: outputs may "
            "differ from the in-memory model's in the last bits",
            name,
            why,
        )


def _fused_implementation(module: nn.Module) -> Any:
    """The experts forward ``module.config._experts_implementation`` names, where it is one
    of _PER_SLOT_SUM; None for the eager forward, which any other implementation computes
    with (warned once)."""
    name = getattr(getattr(module, "config", None), "_experts_implementation", None)
    if name in (None, "eager"):
        return None
    if name not in _PER_SLOT_SUM:
        _warn_once(name, "compute with the eager experts forward")
        return None
    if not _PER_SLOT_SUM[name]:
        _warn_once(name, "run one expert's batch at a time")
    from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS  # noqa: PLC0415

    return ALL_EXPERTS_FUNCTIONS.get_interface(name, None)


def _per_expert(
    forward: Any,
    held: _Held,
    hidden_states: torch.Tensor,
    top_k_index: torch.Tensor,
    top_k_weights: torch.Tensor,
    hit: list[int],
) -> torch.Tensor:
    """A fused experts ``forward`` (grouped_mm, batched_mm) computed one routed expert at a
    time: for expert ``e``, the implementation itself runs on the (token, slot) pairs routed
    to ``e`` with a one-expert module (its slices as ``[1, ...]`` tensors) and k = 1, which
    gives those pairs' weighted outputs; they are laid out as the implementation lays out
    its own, ``[tokens · k, hidden]``, and summed over the slots as it sums them. The input
    rows are given in the dtype of (weights × routing weights), so that a pair's output is
    not rounded before the sum (the implementation casts its input to the weights' dtype),
    and each expert's pairs in the order the implementation's own sort gives them."""
    tokens, k = top_k_index.shape[0], top_k_index.shape[-1]
    hidden = hidden_states.shape[-1]
    flat = top_k_index.reshape(-1)
    weights = top_k_weights.reshape(-1, 1)
    # Each expert's pairs in the order the implementation sorts them (its matmuls round a
    # row differently by where in the block of rows it is).
    sorted_ids, perm = torch.sort(flat)
    attrs = [attr for attr, _, _ in held.site.params]
    out = None
    for e in hit:
        pairs = perm[sorted_ids == e]
        slices = {attr: held.view(e, attr).unsqueeze(0) for attr in attrs}
        dtype = torch.promote_types(slices[attrs[0]].dtype, top_k_weights.dtype)
        one = _Proxy(held.site.module, slices, num_experts=1)
        rows = hidden_states[pairs // k].to(dtype)
        ids = torch.zeros((len(pairs), 1), dtype=top_k_index.dtype, device=flat.device)
        result = forward(one, rows, ids, weights[pairs])
        if out is None:
            out = result.new_zeros((tokens * k, hidden))
        out[pairs] = result
    if out is None:
        return hidden_states.new_zeros((tokens, hidden))
    return out.view(tokens, k, hidden).sum(dim=1).to(hidden_states.dtype)


def _indices(router_out: Any) -> torch.Tensor:
    return router_out[-1] if isinstance(router_out, tuple) else router_out


def _routed_forward(runtime: OffloadedModel, state: ExpertsRuntime, index: int):
    site = state.sites[index]
    module = site.module
    eager = type(module).forward.__wrapped__
    following = state.sites[index + 1] if index + 1 < len(state.sites) else None

    def forward(hidden_states: torch.Tensor, top_k_index: torch.Tensor, *args: Any, **kwargs: Any):
        engine = runtime._engine
        with torch.no_grad():
            hit = [e for e in torch.unique(top_k_index).tolist() if 0 <= e < site.num_experts]
        for e in hit:
            if not runtime.unit_resident(site.units[e].index):
                engine.prefetch(site.units[e].index)
        predicted: set[int] = set()
        if state.predict and following is not None and following.router is not None:
            with torch.no_grad():
                picks = _indices(
                    following.router(hidden_states.reshape(-1, hidden_states.shape[-1]))
                )
            predicted = {e for e in torch.unique(picks).tolist() if 0 <= e < following.num_experts}
            for e in sorted(predicted):
                unit = following.units[e]
                if not runtime.unit_resident(unit.index):
                    engine.prefetch(unit.index)
        held = _Held(runtime, site)
        fused = _fused_implementation(module)
        before = engine.counters()
        try:
            if fused is None:
                proxy = _Proxy(module, {attr: _Table(held, attr) for attr, _, _ in site.params})
                out = eager(proxy, hidden_states, top_k_index, *args, **kwargs)
            else:
                weights = args[0] if args else kwargs["top_k_weights"]
                out = _per_expert(fused, held, hidden_states, top_k_index, weights, hit)
        finally:
            held.release()
        hits, misses, moved = (a - b for a, b in zip(engine.counters(), before, strict=True))
        with state.lock:
            state.forwards += 1
            state.acquires += held.acquires
            state.device_hits += hits
            state.device_misses += misses
            state.site_acquires[index] += held.acquires
            state.site_hits[index] += hits
            state.site_misses[index] += misses
            state.bytes_to_device += moved
            expected = state.pending.pop(index, None)
            if expected is not None:
                used = set(hit)
                state.used_in_predicted += len(used)
                state.predicted_used += len(used & expected)
            if predicted:
                state.pending[index + 1] = predicted
                state.predicted += len(predicted)
        return out

    return forward


def install_routed(runtime: OffloadedModel, sites: list[ExpertsSite], predict: bool) -> None:
    """Replaces each experts module's forward by its routed forward (an instance attribute,
    removed by :func:`uninstall_routed`)."""
    state = ExpertsRuntime(sites, predict)
    runtime._experts = state
    for i, site in enumerate(sites):
        site.module.forward = _routed_forward(runtime, state, i)  # type: ignore[method-assign]


def uninstall_routed(runtime: OffloadedModel) -> None:
    state = getattr(runtime, "_experts", None)
    if state is None:
        return
    for site in state.sites:
        site.module.__dict__.pop("forward", None)
