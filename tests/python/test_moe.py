"""Mixture-of-experts models stream only their routed experts (tiny random-weight models of
four architectures built from configs, no downloads; CPU device).

Each expert is its own unit (its slices of the fused ``[E, ...]`` parameters), the experts
forward acquires only the experts the tokens are routed to, computing with transformers'
eager experts forward: logits and greedy ``generate()`` are bitwise those of the in-memory
model (experts implementation "eager") at 30% and 10% of the model's bytes, the budget is
kept, a decode token reads about k/E of the experts' bytes, and the next layer's experts
are predicted from its router."""

from __future__ import annotations

import json
import re
import warnings

import pytest

import tensorstream as ts
from tensorstream.config import Config
from tensorstream.offload import get_model_statistics, offload

torch = pytest.importorskip("torch")
T = pytest.importorskip("transformers")

VOCAB = 128
EXPERTS = 8
TOP_K = 2
LAYERS = 3


def _config(arch: str):
    base = dict(
        hidden_size=64,
        num_hidden_layers=LAYERS,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=VOCAB,
        max_position_embeddings=128,
        num_experts_per_tok=TOP_K,
    )
    if arch == "mixtral":
        cfg = T.MixtralConfig(intermediate_size=128, num_local_experts=EXPERTS, **base)
        return cfg, T.MixtralForCausalLM
    if arch == "qwen2_moe":
        cfg = T.Qwen2MoeConfig(
            intermediate_size=128, moe_intermediate_size=64, shared_expert_intermediate_size=64,
            num_experts=EXPERTS, **base,
        )  # fmt: skip
        return cfg, T.Qwen2MoeForCausalLM
    if arch == "qwen3_moe":
        cfg = T.Qwen3MoeConfig(
            intermediate_size=128, moe_intermediate_size=64, num_experts=EXPERTS, head_dim=16,
            **base,
        )  # fmt: skip
        return cfg, T.Qwen3MoeForCausalLM
    cfg = T.GptOssConfig(
        intermediate_size=64, num_local_experts=EXPERTS, head_dim=16, sliding_window=8, **base
    )
    return cfg, T.GptOssForCausalLM


ARCHS = ("mixtral", "qwen2_moe", "qwen3_moe", "gpt_oss")


def _build(arch: str):
    torch.manual_seed(0)
    cfg, cls = _config(arch)
    cfg._experts_implementation = "eager"
    return cls(cfg).eval()


def _ids(shape=(1, 9), seed=1):
    return torch.randint(2, VOCAB, shape, generator=torch.Generator().manual_seed(seed))


def _total(model) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())


def _base(tmp_path) -> Config:
    return Config(storage_path=tmp_path, min_layer_size=1 << 14, verify_checksums=True)


def _offload(arch, config, budget):
    model = _build(arch)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # no overlap at the smallest budgets
        offload(model, config.replace(vram_budget_gb=f"{budget}B"))
    return model


def _check_budget_kept(model, budget: int) -> dict:
    stats = get_model_statistics(model)
    peak = stats["device_bytes_peak"] + stats["resident_param_bytes"] + stats["placeholder_bytes"]
    assert peak <= budget, f"device bytes {peak} exceed the budget {budget}"
    return stats


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("fraction", (0.30, 0.10))
def test_moe_bitwise_streaming_only_routed_experts(tmp_path, arch, fraction):
    reference = _build(arch)
    ids = _ids()
    with torch.no_grad():
        ref_logits = reference(ids).logits
        ref_tokens = reference.generate(ids, max_new_tokens=6, do_sample=False, pad_token_id=0)
    config = _base(tmp_path)
    budget = int(_total(reference) * fraction)
    minimum = ts.estimate_model_memory(reference, config)["minimum_budget"]
    if budget < minimum:
        with pytest.raises(ts.BudgetTooSmallError) as info:
            _offload(arch, config, budget)
        assert info.value.minimum_budget == minimum
        return
    model = _offload(arch, config, budget)
    runtime = model.tensorstream
    expert_units = [u for u in runtime._blocks if u.expert is not None]
    assert len(expert_units) == LAYERS * EXPERTS
    assert expert_units[3].name == "model.layers.0.mlp.experts.3"
    with torch.no_grad():
        logits = model(ids).logits
        tokens = model.generate(ids, max_new_tokens=6, do_sample=False, pad_token_id=0)
    assert torch.equal(logits, ref_logits), f"{arch} at {fraction:.0%}: logits differ"
    assert torch.equal(tokens, ref_tokens), f"{arch} at {fraction:.0%}: tokens differ"
    stats = _check_budget_kept(model, budget)
    experts = stats["experts"]
    assert experts["sites"] == LAYERS and experts["units"] == LAYERS * EXPERTS
    # One forward per layer and pass (the logits, generate's prompt and 5 decode steps); a
    # prompt acquires each expert at most once a layer, a one-token step at most k.
    assert experts["forwards"] == LAYERS * 7
    assert experts["acquires"] <= LAYERS * (2 * EXPERTS + 5 * TOP_K)
    assert 0.0 <= experts["hit_rate"] <= 1.0
    assert experts["predicted"] > 0 and 0.0 < experts["prediction_recall"] <= 1.0
    model.cleanup_tensorstream()


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("implementation", ("grouped_mm", "batched_mm"))
def test_moe_streams_under_the_models_experts_implementation(
    tmp_path, caplog, arch, implementation
):
    """A model whose experts run a fused implementation streams its experts one at a time
    through that same implementation. grouped_mm (transformers' default): logits and greedy
    tokens bitwise those of the in-memory model. batched_mm rounds by the size of its one
    batch of every (token, slot) pair, which streamed is one expert's pairs: equal to
    rounding, said once in a warning."""
    from tensorstream import _experts

    _experts._warned.discard(implementation)

    def build():
        model = _build(arch)
        model.config._experts_implementation = implementation
        return model

    reference = build()
    ids = _ids((2, 9))
    with torch.no_grad():
        ref_logits = reference(ids).logits
        ref_tokens = reference.generate(ids, max_new_tokens=4, do_sample=False, pad_token_id=0)
    budget = int(_total(reference) * 0.30)
    model = build()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        offload(model, _base(tmp_path).replace(vram_budget_gb=f"{budget}B"))
    with caplog.at_level("WARNING", logger="tensorstream"), torch.no_grad():
        logits = model(ids).logits
        tokens = model.generate(ids, max_new_tokens=4, do_sample=False, pad_token_id=0)
    warned = [r for r in caplog.records if implementation in r.getMessage()]
    if implementation == "grouped_mm":
        assert torch.equal(logits, ref_logits), f"{arch}/{implementation}: logits differ"
        assert torch.equal(tokens, ref_tokens), f"{arch}/{implementation}: tokens differ"
        assert not warned
    else:
        torch.testing.assert_close(logits, ref_logits, rtol=1e-5, atol=1e-5)
        assert len(warned) == 1, [r.getMessage() for r in caplog.records]
    stats = _check_budget_kept(model, budget)
    assert stats["experts"]["acquires"] > 0
    model.cleanup_tensorstream()


def _decode_bytes_per_token(model, steps=12) -> float:
    runtime = model.tensorstream
    with torch.no_grad():
        out = model(_ids(), use_cache=True)
        cache, token = out.past_key_values, out.logits[:, -1:].argmax(-1)
        before = runtime._engine.stats()["bytes_to_device"]
        for _ in range(steps):
            out = model(token, past_key_values=cache, use_cache=True)
            cache, token = out.past_key_values, out.logits[:, -1:].argmax(-1)
        after = runtime._engine.stats()["bytes_to_device"]
    return (after - before) / steps


@pytest.mark.parametrize("arch", ("mixtral", "qwen3_moe"))
@pytest.mark.parametrize("predict", (True, False))
def test_moe_decode_reads_about_k_of_e_experts(tmp_path, arch, predict):
    """A decode token reads the non-expert units it streams plus at most k experts a layer
    (2k with prefetches that miss): far below a pass over every streamed byte."""
    reference = _build(arch)
    budget = int(_total(reference) * 0.10)
    model = _offload(arch, _base(tmp_path), budget)
    runtime = model.tensorstream
    runtime.predict_experts = predict
    sizes = runtime.source.unit_sizes("cpu")
    resident = runtime._engine.plan["resident"]
    units = runtime._blocks
    streamed = [(u, s) for u, s, r in zip(units, sizes, resident, strict=True) if not r]
    non_expert = sum(s for u, s in streamed if u.expert is None)
    expert = max(s for u, s in streamed if u.expert is not None)
    every = sum(s for _, s in streamed)
    per_token = _decode_bytes_per_token(model)
    # Prefetches of the router's prediction that miss load at most as many experts again as
    # are routed; without prediction nothing but the routed experts loads (the engine's own
    # prefetch never replays the experts of an earlier token).
    routed_bound = non_expert + LAYERS * TOP_K * (2 if predict else 1) * expert
    assert per_token <= routed_bound, (per_token, routed_bound)
    # The experts are most of the model: reading k of E of them is well under a full pass.
    assert per_token * 2 < every, (per_token, every)
    _check_budget_kept(model, budget)
    assert runtime.predict_experts is predict
    if not predict:
        assert runtime.statistics()["experts"]["predicted"] == 0
    model.cleanup_tensorstream()


def _routing(reference, ids) -> list[set[int]]:
    """The experts each layer of the in-memory model routes ``ids`` to."""
    seen: list[set[int]] = []
    hooks = [
        layer.mlp.gate.register_forward_hook(
            lambda m, a, out: seen.append(set(out[-1].reshape(-1).tolist()))
        )
        for layer in reference.model.layers
    ]
    with torch.no_grad():
        logits = reference(ids).logits
    for h in hooks:
        h.remove()
    return seen, logits


def test_moe_prompt_routing_to_every_expert(tmp_path):
    reference = _build("mixtral")
    ids = _ids((2, 48), seed=3)
    seen, ref_logits = _routing(reference, ids)
    assert all(s == set(range(EXPERTS)) for s in seen), seen
    budget = int(_total(reference) * 0.10)
    model = _offload("mixtral", _base(tmp_path), budget)
    with torch.no_grad():
        logits = model(ids).logits
    assert torch.equal(logits, ref_logits)
    stats = _check_budget_kept(model, budget)
    assert stats["experts"]["acquires"] == LAYERS * EXPERTS
    # The trace shows the expert loads by unit name.
    trace = model.tensorstream.export_trace(tmp_path / "trace.json").read_text()
    json.loads(trace)
    assert "model.layers.2.mlp.experts.7" in trace
    model.cleanup_tensorstream()
    with pytest.raises(RuntimeError, match="closed"):
        model(ids)


HOT = 5


def _hot_expert_model():
    """gpt-oss-style (its router has a bias): every token of every layer routes to expert
    HOT, and to one other expert as its hidden state decides."""
    model = _build("gpt_oss")
    with torch.no_grad():
        for layer in model.model.layers:
            layer.mlp.router.bias[HOT] = 50.0
    return model


def _reads(runtime, tmp_path) -> dict[int, int]:
    """Reads per unit index in the engine's trace so far."""
    trace = json.loads(runtime.export_trace(tmp_path / "trace.json").read_text())
    events = trace["traceEvents"] if isinstance(trace, dict) else trace
    out: dict[int, int] = {}
    for e in events:
        if e.get("cat") == "read":
            block = e["args"]["block"]
            out[block] = out.get(block, 0) + 1
    return out


def test_moe_expert_cache_keeps_the_frequently_routed_experts(tmp_path):
    """Once their use rate is learned the experts routed on every token stay in the arena:
    decode steps never read them again, while the arena's other places cycle the experts
    the tokens pick besides. The engine's learned rates follow the routing."""
    reference = _hot_expert_model()
    ids = _ids()
    with torch.no_grad():
        ref_tokens = reference.generate(ids, max_new_tokens=14, do_sample=False, pad_token_id=0)
    sizes_of = {}
    for layer in reference.model.layers:
        experts = layer.mlp.experts
        sizes_of[layer] = sum(p[0].numel() * p.element_size() for p in experts.parameters())
    expert_bytes = max(sizes_of.values())
    non_expert = _total(reference) - LAYERS * EXPERTS * expert_bytes
    # The attention and the rest resident, an arena of LAYERS + 2 experts (and some slack for
    # placeholders and alignment).
    budget = non_expert + (LAYERS + 2) * expert_bytes + (64 << 10)
    model = _hot_expert_model()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        offload(model, _base(tmp_path).replace(vram_budget_gb=f"{budget}B"))
    runtime = model.tensorstream
    runtime.predict_experts = False
    units = runtime._blocks
    resident = runtime._engine.plan["resident"]
    assert all(r for u, r in zip(units, resident, strict=True) if u.expert is None)
    assert not any(r for u, r in zip(units, resident, strict=True) if u.expert is not None)
    hot = {u.index for u in units if u.expert == HOT}
    with torch.no_grad():
        out = model(ids, use_cache=True)
        cache, token = out.past_key_values, out.logits[:, -1:].argmax(-1)
        tokens = [token]
        for step in range(13):
            if step == 4:  # the rates are learned: from here on the hot experts stay
                warm = _reads(runtime, tmp_path)
            out = model(token, past_key_values=cache, use_cache=True)
            cache, token = out.past_key_values, out.logits[:, -1:].argmax(-1)
            tokens.append(token)
    assert torch.equal(torch.cat([ids, *tokens], dim=1), ref_tokens)
    reads = _reads(runtime, tmp_path)
    assert all(reads.get(u, 0) == warm.get(u, 0) for u in hot), (warm, reads)
    cold_reads = sum(reads.get(u.index, 0) - warm.get(u.index, 0) for u in units if u.expert)
    assert cold_reads > 0, "the other experts' places cycle"
    stats = _check_budget_kept(model, budget)
    layers = stats["experts"]["layers"]
    assert [layer["name"] for layer in layers] == [
        f"model.layers.{i}.mlp.experts" for i in range(LAYERS)
    ]
    for layer in layers:
        rates = layer["use_rates"]
        assert len(rates) == EXPERTS and layer["resident_experts"] == 0
        assert rates[HOT] > 0.5 and rates[HOT] == max(rates), rates
        # The prompt acquires each expert it hits once, a decode step its k.
        assert 13 * TOP_K + TOP_K <= layer["acquires"] <= 13 * TOP_K + EXPERTS
        assert layer["stall_seconds"] >= 0.0
        assert 0.0 <= layer["hit_rate"] <= 1.0
    assert stats["experts"]["stall_seconds"] == pytest.approx(
        sum(layer["stall_seconds"] for layer in layers)
    )
    model.cleanup_tensorstream()


def test_moe_shared_experts_are_resident_before_experts(tmp_path):
    """Qwen2-MoE's shared expert runs on every token: at a budget that holds every non-expert
    unit, the shared experts are resident and no routed expert is (the arena caches those)."""
    reference = _build("qwen2_moe")
    ids = _ids()
    with torch.no_grad():
        ref_tokens = reference.generate(ids, max_new_tokens=6, do_sample=False, pad_token_id=0)
    budget = int(_total(reference) * 0.45)
    model = _offload("qwen2_moe", _base(tmp_path), budget)
    runtime = model.tensorstream
    resident = runtime._engine.plan["resident"]
    # The units holding the shared experts' weights (a decoder layer's unit at the blocks
    # tier, the shared expert's own modules at finer ones).
    shared = [u for u in runtime._blocks if any(".shared_expert." in n for n, _ in u.params)]
    assert len({n for u in shared for n, _ in u.params if "shared_expert." in n}) >= LAYERS
    assert all(resident[u.index] for u in shared), [u.name for u in shared]
    assert not any(resident[u.index] for u in runtime._blocks if u.expert is not None)
    assert not all(resident), "the budget does not hold everything"
    with torch.no_grad():
        tokens = model.generate(ids, max_new_tokens=6, do_sample=False, pad_token_id=0)
    assert torch.equal(tokens, ref_tokens)
    _check_budget_kept(model, budget)
    model.cleanup_tensorstream()


def test_moe_store_holds_one_tensor_per_expert(tmp_path):
    model = _offload("gpt_oss", _base(tmp_path), int(_total(_build("gpt_oss")) * 0.30))
    store = ts._core.Store(str(model.tensorstream.store_path))
    names = {t["name"]: t for t in store.tensors}
    for e in range(EXPERTS):
        for attr, shape in (
            ("gate_up_proj", [64, 128]),
            ("gate_up_proj_bias", [128]),
            ("down_proj", [64, 64]),
            ("down_proj_bias", [64]),
        ):
            t = names[f"model.layers.1.mlp.experts.{attr}.{e}"]
            assert list(t["shape"]) == shape
    assert "model.layers.1.mlp.experts.gate_up_proj" not in names
    # The routers are resident (the next layer's routing is predicted from them).
    assert "model.layers.1.mlp.router.weight" in names
    units = {u.name for u in model.tensorstream._blocks}
    assert not any("router" in n for n in units)
    model.cleanup_tensorstream()


def test_dense_model_has_no_experts(tmp_path):
    torch.manual_seed(0)
    model = T.LlamaForCausalLM(
        T.LlamaConfig(
            hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, vocab_size=VOCAB,
        )
    ).eval()  # fmt: skip
    offload(model, _base(tmp_path))
    assert "experts" not in model.tensorstream.statistics()
    assert model.tensorstream.predict_experts is False
    with pytest.raises(ValueError, match="no streamed experts"):
        model.tensorstream.predict_experts = True
    model.cleanup_tensorstream()


@pytest.mark.parametrize("arch", ("mixtral", "gpt_oss"))
def test_moe_from_pretrained_fused_checkpoint(tmp_path, arch):
    """A checkpoint holding the fused [E, ...] expert tensors (the model's own parameter
    names, as gpt-oss checkpoints store theirs): from_pretrained converts it into a store of
    per-expert slices and streams the routed experts, bitwise."""
    from safetensors.torch import save_file

    reference = _build(arch)
    path = tmp_path / "ckpt"
    path.mkdir()
    reference.config.save_pretrained(path)
    state = {k: v.contiguous() for k, v in reference.state_dict().items()}
    state.pop("lm_head.weight", None) if reference.config.tie_word_embeddings else None
    save_file(state, str(path / "model.safetensors"))
    ids = _ids()
    with torch.no_grad():
        ref_logits = reference(ids).logits
        ref_tokens = reference.generate(ids, max_new_tokens=5, do_sample=False, pad_token_id=0)
    budget = int(_total(reference) * 0.30)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        model = ts.from_pretrained(
            path,
            ts.Config(storage_path=tmp_path / "s", vram_budget_gb=f"{budget}B"),
            experts_implementation="eager",
        )
    assert model.config._experts_implementation == "eager"
    with torch.no_grad():
        logits = model(ids).logits
        tokens = model.generate(ids, max_new_tokens=5, do_sample=False, pad_token_id=0)
    assert torch.equal(logits, ref_logits)
    assert torch.equal(tokens, ref_tokens)
    stats = _check_budget_kept(model, budget)
    assert stats["experts"]["units"] == LAYERS * EXPERTS
    assert stats["store"].endswith(".tstore")
    model.cleanup_tensorstream()


# One expert's down projection in each per-expert (Hub) layout, by architecture.
_DOWN = {
    "mixtral": "model.layers.{l}.block_sparse_moe.experts.{e}.w2.weight",
    "qwen2_moe": "model.layers.{l}.mlp.experts.{e}.down_proj.weight",
    "qwen3_moe": "model.layers.{l}.mlp.experts.{e}.down_proj.weight",
}
_GATE = {
    "mixtral": "model.layers.{l}.block_sparse_moe.experts.{e}.w1.weight",
    "qwen2_moe": "model.layers.{l}.mlp.experts.{e}.gate_proj.weight",
    "qwen3_moe": "model.layers.{l}.mlp.experts.{e}.gate_proj.weight",
}


def _checkpoint_names(path) -> set[str]:
    from safetensors import safe_open

    names: set[str] = set()
    for file in path.glob("*.safetensors"):
        with safe_open(str(file), "pt") as f:
            names.update(f.keys())
    return names


@pytest.mark.parametrize("arch", ("mixtral", "qwen2_moe", "qwen3_moe"))
def test_moe_from_pretrained_per_expert_checkpoint(tmp_path, arch):
    """save_pretrained writes the experts one tensor per expert and projection (the Hub's
    layout; Mixtral's under block_sparse_moe, its router renamed too): from_pretrained maps
    them as transformers' own from_pretrained does (whose logits are the reference's), writes
    each expert's slices from them and streams the routed experts, bitwise."""
    reference = _build(arch)
    path = tmp_path / "ckpt"
    # Qwen2-MoE's checkpoint in several shards with an index.
    reference.save_pretrained(path, **({"max_shard_size": "100KB"} if arch == "qwen2_moe" else {}))
    names = _checkpoint_names(path)
    assert _DOWN[arch].format(l=2, e=7) in names and _GATE[arch].format(l=0, e=3) in names
    assert not any(n.endswith(("experts.gate_up_proj", "experts.down_proj")) for n in names)
    if arch == "qwen2_moe":
        assert (path / "model.safetensors.index.json").is_file()
    if arch == "mixtral":
        assert "model.layers.0.block_sparse_moe.gate.weight" in names
    ids = _ids()
    with torch.no_grad():
        ref_logits = reference(ids).logits
        ref_tokens = reference.generate(ids, max_new_tokens=5, do_sample=False, pad_token_id=0)
        loaded = T.AutoModelForCausalLM.from_pretrained(path, experts_implementation="eager")
        assert torch.equal(loaded.eval()(ids).logits, ref_logits), "transformers' own load"
    del loaded
    budget = int(_total(reference) * 0.30)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        model = ts.from_pretrained(
            path,
            Config(storage_path=tmp_path / "s", vram_budget_gb=f"{budget}B"),
            experts_implementation="eager",
        )
    with torch.no_grad():
        logits = model(ids).logits
        tokens = model.generate(ids, max_new_tokens=5, do_sample=False, pad_token_id=0)
    assert torch.equal(logits, ref_logits), f"{arch}: logits differ"
    assert torch.equal(tokens, ref_tokens), f"{arch}: tokens differ"
    stats = _check_budget_kept(model, budget)
    assert stats["experts"]["units"] == LAYERS * EXPERTS
    # The store holds each expert's slices, made of its per-expert checkpoint tensors.
    store = ts._core.Store(str(model.tensorstream.store_path))
    shapes = {t["name"]: list(t["shape"]) for t in store.tensors}
    inter = 128 if arch == "mixtral" else 64
    assert shapes["model.layers.1.mlp.experts.gate_up_proj.5"] == [2 * inter, 64]
    assert shapes["model.layers.1.mlp.experts.down_proj.5"] == [64, inter]
    model.cleanup_tensorstream()


def _rewrite(path, drop=None, replace=None) -> None:
    """Rewrites every safetensors file of ``path`` without tensor ``drop`` and with
    ``replace``'s tensors (name -> tensor) in place of theirs."""
    from safetensors.torch import load_file, save_file

    for file in path.glob("*.safetensors"):
        tensors = load_file(str(file))
        tensors.pop(drop, None)
        for name, t in (replace or {}).items():
            if name in tensors:
                tensors[name] = t
        save_file(tensors, str(file), metadata={"format": "pt"})


@pytest.mark.parametrize("arch", ("mixtral", "qwen3_moe"))
def test_moe_from_pretrained_per_expert_tensor_missing(tmp_path, arch):
    reference = _build(arch)
    path = tmp_path / "ckpt"
    reference.save_pretrained(path)
    missing = _DOWN[arch].format(l=1, e=3)
    _rewrite(path, drop=missing)
    assert missing not in _checkpoint_names(path)
    with pytest.raises(ValueError, match=re.escape(missing)) as info:
        ts.from_pretrained(path, Config(storage_path=tmp_path / "s"))
    assert str(path) in str(info.value) and "expert 3" in str(info.value)


def test_moe_from_pretrained_per_expert_tensor_of_wrong_shape(tmp_path):
    reference = _build("mixtral")
    path = tmp_path / "ckpt"
    reference.save_pretrained(path)
    name = _GATE["mixtral"].format(l=2, e=5)
    _rewrite(path, replace={name: torch.zeros(128, 63)})
    with pytest.raises(ValueError, match=re.escape(name)) as info:
        ts.from_pretrained(path, Config(storage_path=tmp_path / "s"))
    assert "(128, 63)" in str(info.value) and "(128, 64)" in str(info.value)


def test_bench_moe_smoke(tmp_path):
    """bench/bench_moe.py --smoke runs end to end; streamed tokens equal the in-memory ones,
    and the GPU variant dry-runs without a GPU."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parents[2] / "bench" / "bench_moe.py"
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    out = tmp_path / "moe.json"
    cmd = [sys.executable, str(script), "--smoke", "--models", "mixtral", "--systems",
           "memory,experts+predict,experts", "--workdir", str(tmp_path / "w"),
           "--json-out", str(out)]  # fmt: skip
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path)
    assert p.returncode == 0, p.stdout + p.stderr
    rows = json.loads(out.read_text())["models"]["mixtral"]["results"]
    assert [r["system"] for r in rows] == ["memory", "experts+predict", "experts"]
    for r in rows[1:]:
        assert r["tokens_equal_memory"] is True
        assert r["bytes_per_token"] > 0 and r["tok_per_s"] > 0
    assert rows[1]["prediction_recall"] is not None and rows[2]["prediction_recall"] is None
    if not torch.cuda.is_available():
        p = subprocess.run([*cmd[:3], "--device", "cuda"], capture_output=True, text=True,
                           timeout=120, env=env, cwd=tmp_path)  # fmt: skip
        assert p.returncode == 0 and "dry run" in p.stdout, p.stdout + p.stderr
