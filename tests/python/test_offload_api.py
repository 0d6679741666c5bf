"""The public surface around offload(): estimate_model_memory, the memory-pressure callback,
optimize_memory_usage, defragment_storage, dtype normalisation and .to() after offload."""

from __future__ import annotations

import os

import pytest

import tensorstream as ts
from tensorstream import load_from_ts
from tensorstream._store import store_writer
from tensorstream.config import Config

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

MIN_LAYER = 1 << 14


def tiny_llama(seed: int = 0, layers: int = 4):
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=512,
        max_position_embeddings=128,
    )
    return transformers.LlamaForCausalLM(cfg).eval()


def ids(shape=(2, 7), seed=1):
    return torch.randint(0, 512, shape, generator=torch.Generator().manual_seed(seed))


def tight_config(tmp_path, model, **fields) -> Config:
    config = Config(storage_path=tmp_path, min_layer_size=MIN_LAYER, **fields)
    estimate = ts.estimate_model_memory(model, config)
    return config.replace(vram_budget_gb=f"{estimate['minimum_budget']}B")


def test_package_exports_the_promised_functions():
    for name in (
        "offload",
        "get_model_statistics",
        "estimate_model_memory",
        "set_memory_pressure_callback",
        "optimize_memory_usage",
        "defragment_storage",
        "cleanup_orphaned_files",
        "verify_storage_integrity",
        "save_to_ts",
        "read_ts_header",
        "create_default_config",
    ):
        assert callable(getattr(ts, name)), name
        assert name in ts.__all__, name
    # `import tensorstream.offload` binds the submodule over the function: still callable.
    import tensorstream.offload  # noqa: F401

    assert callable(ts.offload)


def test_estimate_matches_what_offload_does(tmp_path):
    model = tiny_llama()
    config = Config(storage_path=tmp_path, min_layer_size=MIN_LAYER, vram_budget_gb="64MiB")
    estimate = ts.estimate_model_memory(model, config)
    total = sum(p.numel() * p.element_size() for p in model.parameters())
    assert estimate["total_parameter_bytes"] == total
    assert estimate["resident_bytes"] + estimate["streamed_bytes"] == total
    assert len(estimate["block_bytes"]) == 6  # embeddings, 4 layers, lm_head
    assert estimate["largest_block_bytes"] == max(estimate["block_bytes"].values())
    assert estimate["minimum_budget"] < estimate["all_resident_budget"]
    assert estimate["suggested_budget"] == estimate["all_resident_budget"]  # 64 MiB holds it
    # The minimum works, and one byte less is refused with exactly that figure.
    events: list[dict] = []
    ts.set_memory_pressure_callback(events.append)
    try:
        with pytest.raises(ts.BudgetTooSmallError) as info:
            ts.offload(
                tiny_llama(), config.replace(vram_budget_gb=f"{estimate['minimum_budget'] - 1}B")
            )
    finally:
        ts.set_memory_pressure_callback(None)
    assert info.value.minimum_budget == estimate["minimum_budget"]
    assert [e["kind"] for e in events] == ["budget_too_small"]
    assert events[0]["minimum_budget"] == estimate["minimum_budget"]
    ts.offload(model, config.replace(vram_budget_gb=f"{estimate['minimum_budget']}B"))
    stats = ts.get_model_statistics(model)
    # The estimate at that budget describes the units offload chose there.
    at_minimum = ts.estimate_model_memory(
        tiny_llama(), config.replace(vram_budget_gb=f"{estimate['minimum_budget']}B")
    )
    assert stats["unit_tier"] == at_minimum["tier"]
    assert stats["resident_param_bytes"] == at_minimum["resident_bytes"]
    assert stats["units"] == len(at_minimum["block_bytes"])
    assert stats["budget"] == estimate["minimum_budget"]
    # At 64 MiB everything fits: whole blocks, the embeddings and 4 layers and lm_head.
    assert estimate["tier"] == "blocks"
    # dtype halves the estimate of floating-point weights.
    half = ts.estimate_model_memory(tiny_llama(), config.replace(dtype="bfloat16"))
    assert half["total_parameter_bytes"] == total // 2


def test_memory_pressure_callback_and_optimize_memory_usage(tmp_path):
    model = tiny_llama()
    reference = tiny_llama()
    x = ids()
    with torch.no_grad():
        expected = reference(x).logits
    estimate = ts.estimate_model_memory(model, Config(min_layer_size=MIN_LAYER))
    budget = estimate["all_resident_budget"]
    config = Config(storage_path=tmp_path, min_layer_size=MIN_LAYER, vram_budget_gb=f"{budget}B")
    ts.offload(model, config)
    assert ts.get_model_statistics(model)["layers_offloaded"] == 0
    store = model.tensorstream.store_path
    mtime = store.stat().st_mtime_ns

    events: list[dict] = []
    assert ts.set_memory_pressure_callback(events.append) is None
    try:
        # Half the budget: the engine re-plans on the same store, most blocks now stream.
        stats = ts.optimize_memory_usage(model, 0.5)
        assert stats["budget"] == int(budget * 0.5)
        # The engine gets what the resident parameters and the shared placeholders leave.
        assert stats["device_budget"] == (
            int(budget * 0.5) - stats["resident_param_bytes"] - stats["placeholder_bytes"]
        )
        assert stats["placeholder_bytes"] == 4  # one float32 zero
        assert stats["layers_offloaded"] >= 3
        assert store.stat().st_mtime_ns == mtime, "the store was rewritten"
        with torch.no_grad():
            assert torch.equal(model(x).logits, expected)
        assert ts.get_model_statistics(model)["device_bytes_peak"] <= stats["device_budget"]
        assert not events

        # Far too small: refused, the callback hears of it first, the model keeps working.
        with pytest.raises(ts.BudgetTooSmallError) as info:
            ts.optimize_memory_usage(model, 0.01)
        assert len(events) == 1
        event = events[0]
        assert event["kind"] == "budget_too_small"
        assert event["device"] == "cpu"
        assert event["budget"] == int(int(budget * 0.5) * 0.01)
        assert event["minimum_budget"] == info.value.minimum_budget > event["budget"]
        assert event["error"] is info.value
        assert ts.get_model_statistics(model)["budget"] == int(budget * 0.5)
        with torch.no_grad():
            assert torch.equal(model(x).logits, expected)

        # Torch running out of memory inside a streamed block, every time: the BALANCED
        # default demotes once (3/4 of the budget), retries, then lets the error through;
        # the callback hears of both, with what was done.
        def fail(module, args):
            raise torch.OutOfMemoryError("simulated out of memory")

        handle = model.model.layers[2].mlp.register_forward_pre_hook(fail)
        with pytest.raises(torch.OutOfMemoryError), torch.no_grad():
            model(x)
        handle.remove()
        assert [e["kind"] for e in events] == ["budget_too_small", "out_of_memory"] * 1 + [
            "out_of_memory"
        ]
        assert events[1]["block"] == "model.layers.2"
        assert events[1]["action"] == "demoted"
        assert events[1]["new_budget"] == int(budget * 0.5 * 0.75)
        assert events[2]["action"].startswith("raised: no retry left")
        with torch.no_grad():
            assert torch.equal(model(x).logits, expected)

        # A callback that raises is logged, not propagated in place of the real error.
        ts.set_memory_pressure_callback(lambda event: 1 / 0)
        with pytest.raises(ts.BudgetTooSmallError):
            ts.optimize_memory_usage(model, 0.01)
    finally:
        ts.set_memory_pressure_callback(None)
    with pytest.raises(ValueError, match="target_utilization"):
        ts.optimize_memory_usage(model, 0)
    with pytest.raises(TypeError):
        ts.set_memory_pressure_callback(42)
    model.cleanup_tensorstream()


class _OutOfMemoryOnce:
    """A forward pre-hook standing in for a transient device out-of-memory error (an
    activation that did not fit): raises torch.OutOfMemoryError on the `at`-th call only."""

    def __init__(self, at: int) -> None:
        self.calls = 0
        self.at = at

    def __call__(self, module, args):
        self.calls += 1
        if self.calls == self.at:
            raise torch.OutOfMemoryError("simulated out of memory")


@pytest.mark.parametrize(
    "mode, fraction",
    [("conservative", 0.5), ("balanced", 0.75), ("aggressive", None)],
)
def test_out_of_memory_in_generate_follows_the_pressure_mode(tmp_path, mode, fraction):
    reference = tiny_llama(layers=6)
    model = tiny_llama(layers=6)
    prompt = ids((1, 5), seed=3)
    greedy = dict(
        max_new_tokens=6, do_sample=False, return_dict_in_generate=True, output_logits=True
    )
    with torch.no_grad():
        expected = reference.generate(prompt, **greedy)
    config = Config(storage_path=tmp_path, min_layer_size=MIN_LAYER, memory_pressure_mode=mode)
    budget = ts.estimate_model_memory(model, config)["all_resident_budget"]
    ts.offload(model, config.replace(vram_budget_gb=f"{budget}B"))
    assert ts.get_model_statistics(model)["layers_offloaded"] == 0
    # The error strikes in the 5th layer of the 3rd decode step: the layers before it have
    # already appended to the KV cache, which a retry must first cut back.
    hook = model.model.layers[4].mlp.register_forward_pre_hook(_OutOfMemoryOnce(at=4))
    events: list[dict] = []
    ts.set_memory_pressure_callback(events.append)
    try:
        with torch.no_grad():
            if fraction is None:
                with pytest.raises(torch.OutOfMemoryError):
                    model.generate(prompt, **greedy)
            else:
                got = model.generate(prompt, **greedy)
                assert torch.equal(got.sequences, expected.sequences)
                # Bitwise logits of every step: a retry that left the cache with a duplicated
                # token would change them even where the greedy tokens survive.
                for step, (a, b) in enumerate(zip(got.logits, expected.logits)):
                    assert torch.equal(a, b), f"step {step}"
    finally:
        ts.set_memory_pressure_callback(None)
        hook.remove()
    assert len(events) == 1
    event = events[0]
    assert event["kind"] == "out_of_memory" and event["block"] == "model.layers.4"
    assert event["budget"] == budget
    stats = ts.get_model_statistics(model)
    if fraction is None:
        assert event["action"].startswith("raised: memory_pressure_mode aggressive")
        assert event["new_budget"] is None and stats["budget"] == budget
        assert stats["layers_offloaded"] == 0
    else:
        assert event["action"] == "demoted"
        assert event["new_budget"] == stats["budget"] == int(budget * fraction)
        assert stats["layers_offloaded"] > 0, "resident blocks were demoted to streamed"
        assert stats["device_bytes_peak"] <= stats["device_budget"]
    with torch.no_grad():  # the model keeps working under its (new) budget
        again = model.generate(prompt, **greedy)
    assert torch.equal(again.sequences, expected.sequences)
    model.cleanup_tensorstream()
    assert "forward" not in model.__dict__, "cleanup restores the model's own forward"


@pytest.mark.parametrize("keyword", ["cache", "past_key_values"])
def test_a_retried_forward_sees_its_cache_as_before_the_failed_attempt(tmp_path, keyword):
    # The cache arrives under either keyword (transformers renamed past_key_values to cache);
    # wherever it comes from, the retry must find it exactly as the failed attempt did.
    reference, model = tiny_llama(), tiny_llama()
    prompt, step = ids((1, 6), seed=4), ids((1, 1), seed=5)
    with torch.no_grad():
        ref_cache = transformers.DynamicCache()
        reference(prompt, use_cache=True, **{keyword: ref_cache})
        expected = reference(step, use_cache=True, **{keyword: ref_cache}).logits
    config = Config(storage_path=tmp_path, min_layer_size=MIN_LAYER)
    budget = ts.estimate_model_memory(model, config)["all_resident_budget"]
    ts.offload(model, config.replace(vram_budget_gb=f"{budget}B"))
    cache = transformers.DynamicCache()
    with torch.no_grad():
        model(prompt, use_cache=True, **{keyword: cache})
    hook = model.model.layers[2].mlp.register_forward_pre_hook(_OutOfMemoryOnce(at=1))
    try:
        with torch.no_grad():
            got = model(step, use_cache=True, **{keyword: cache}).logits
    finally:
        hook.remove()
    assert torch.equal(got, expected)
    assert cache.get_seq_length() == 7, "one token appended, not one per attempt"
    assert ts.get_model_statistics(model)["budget"] < budget, "the retry ran demoted"
    model.cleanup_tensorstream()


def test_out_of_memory_with_an_unrestorable_cache_is_not_retried(tmp_path):
    model = tiny_llama()
    config = Config(storage_path=tmp_path, min_layer_size=MIN_LAYER)
    budget = ts.estimate_model_memory(model, config)["all_resident_budget"]
    ts.offload(model, config.replace(vram_budget_gb=f"{budget}B"))

    from transformers.cache_utils import DynamicLayer

    class OtherLayer(DynamicLayer):  # a cache layer kind the runtime does not know
        pass

    cache = transformers.DynamicCache()
    with torch.no_grad():
        model(ids(), past_key_values=cache, use_cache=True)
    for layer in cache.layers:
        layer.__class__ = OtherLayer

    def fail(module, args):
        raise torch.OutOfMemoryError("simulated out of memory")

    handle = model.model.layers[1].mlp.register_forward_pre_hook(fail)
    events: list[dict] = []
    ts.set_memory_pressure_callback(events.append)
    try:
        with pytest.raises(torch.OutOfMemoryError), torch.no_grad():
            model(ids((2, 1)), past_key_values=cache, use_cache=True)
    finally:
        ts.set_memory_pressure_callback(None)
        handle.remove()
    assert [e["action"] for e in events] == [
        "raised: the forward's KV cache was partly updated and cannot be restored"
    ]
    assert ts.get_model_statistics(model)["budget"] == budget
    model.cleanup_tensorstream()


def test_automatic_budget_leaves_the_headroom_of_the_mode():
    from tensorstream.config import default_vram_budget

    shares = {
        mode: default_vram_budget("cpu", mode)
        for mode in ("conservative", "balanced", "aggressive")
    }
    assert shares["conservative"] < shares["balanced"] < shares["aggressive"]
    # The same available memory, read three times: about 1/8, 1/4, 1/2 of it.
    assert shares["aggressive"] / shares["conservative"] == pytest.approx(4, rel=0.1)


def test_defragment_storage_rewrites_stores_with_the_same_content(tmp_path):
    model = tiny_llama()
    ts.offload(model, tight_config(tmp_path, model))
    store = model.tensorstream.store_path
    before = ts.read_ts_header(store)
    # Re-lay the store out loosely (64 KiB block alignment): compaction brings it back.
    loose = load_from_ts(store)
    with store_writer(store, block_alignment=1 << 16) as writer:
        for block in before["blocks"]:
            writer.begin_block(block["name"])
            for name, info in before["tensors"].items():
                if info["block"] == block["name"]:
                    t = loose[name]
                    writer.add_tensor(
                        name, info["dtype"], info["shape"], t.data_ptr(), info["nbytes"]
                    )
            writer.end_block()
        writer.commit()
    assert ts.read_ts_header(store)["fingerprint"] == before["fingerprint"]
    size = store.stat().st_size
    assert size > before["file_size"]
    orphan = tmp_path / ".model.tstore.tmp.999999999"
    orphan.write_bytes(b"partial")
    x = ids()
    with torch.no_grad():
        expected = model(x).logits
    report = ts.defragment_storage(tmp_path)
    assert report["bytes_before"] == size
    assert report["bytes_after"] < size
    assert [s["path"] for s in report["stores"]] == [str(store)]
    after = ts.read_ts_header(store)
    assert after["fingerprint"] == before["fingerprint"]
    assert ts.verify_storage_integrity(store)
    assert not [p for p in os.listdir(tmp_path) if "defrag" in p]
    # The open runtime keeps working; a fresh offload reuses the rewritten store.
    with torch.no_grad():
        assert torch.equal(model(x).logits, expected)
    again = tiny_llama()
    ts.offload(again, tight_config(tmp_path, again))
    assert again.tensorstream.store_path == store
    with torch.no_grad():
        assert torch.equal(again(x).logits, expected)
    with pytest.raises(FileNotFoundError):
        ts.defragment_storage(tmp_path / "missing")


def test_dtype_bfloat16_equals_model_to_bfloat16(tmp_path):
    model = tiny_llama()
    reference = tiny_llama().to(torch.bfloat16)
    x = ids()
    with torch.no_grad():
        ref_logits = reference(x).logits
        ref_tokens = reference.generate(x, max_new_tokens=6, do_sample=False)
    config = tight_config(tmp_path, model, dtype="bfloat16")
    ts.offload(model, config)
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())
    tensors = ts.read_ts_header(model.tensorstream.store_path)["tensors"]
    assert {t["dtype"] for t in tensors.values()} == {"bfloat16"}
    with torch.no_grad():
        logits = model(x).logits
        tokens = model.generate(x, max_new_tokens=6, do_sample=False)
    assert logits.dtype == torch.bfloat16
    assert torch.equal(logits, ref_logits)
    assert torch.equal(tokens, ref_tokens)
    assert ts.get_model_statistics(model)["layers_offloaded"] >= 4


def test_to_cpu_after_offload_keeps_streaming_and_other_devices_are_refused(tmp_path):
    model = tiny_llama()
    x = ids()
    with torch.no_grad():
        expected = model(x).logits
    ts.offload(model, tight_config(tmp_path, model))
    streamed = model.model.layers[1].mlp.up_proj.weight
    assert model.to("cpu") is model
    model.to(torch.device("cpu"))
    # Still a placeholder (no host copy came back) and still streamed.
    assert streamed.untyped_storage().nbytes() == streamed.element_size()
    with torch.no_grad():
        assert torch.equal(model(x).logits, expected)
    # Inputs on another device: a clear error naming both devices.
    with pytest.raises(RuntimeError, match=r"streams its weights to cpu.*inputs on meta"):
        with torch.no_grad():
            model.model.layers[0](torch.empty(1, 7, 64, device="meta"))
    with torch.no_grad():
        assert torch.equal(model(x).logits, expected)
    # Moving or converting the offloaded model is refused before anything is touched.
    with pytest.raises(RuntimeError, match="offloaded to cpu"):
        model.to("meta")
    with pytest.raises(RuntimeError, match="cannot be moved or converted"):
        model.half()
    with pytest.raises(RuntimeError, match="offloaded to cpu"):
        model.model.layers[0].to("meta")
    assert model.model.norm.weight.device.type == "cpu"
    assert model.model.layers[0].mlp.up_proj.weight.dtype == torch.float32
    with torch.no_grad():
        assert torch.equal(model(x).logits, expected)
    model.cleanup_tensorstream()
    model.to("meta")  # a closed runtime no longer guards the model


@pytest.mark.skipif(not ts._core.compression_info()["available"], reason="built without zstd")
def test_compression_writes_a_compressed_store(tmp_path):
    # tests/python/test_offload_compression.py covers it in depth.
    model = tiny_llama()
    ts.offload(model, Config(storage_path=tmp_path, compression_enabled=True))
    stores = list(tmp_path.glob("*.tstore"))
    assert [p.name.endswith(".z3.tstore") for p in stores] == [True], stores
    assert ts.read_ts_header(stores[0])["version"] == "1.1"
    model.cleanup_tensorstream()
