"""offload(): a streamed model computes exactly what the in-memory model computes, within
its budget; stores are reused by fingerprint; misuse fails clearly. CPU device."""

from __future__ import annotations

import copy
import threading

import pytest

import tensorstream as ts
from tensorstream.config import Config
from tensorstream.offload import get_model_statistics, offload

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")


def tiny_llama(seed: int = 0):
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=6,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=1000,
        max_position_embeddings=256,
    )
    return transformers.LlamaForCausalLM(cfg).eval()


def tiny_gpt2(seed: int = 0):
    torch.manual_seed(seed)
    cfg = transformers.GPT2Config(n_embd=128, n_layer=5, n_head=4, vocab_size=1000, n_positions=128)
    return transformers.GPT2LMHeadModel(cfg).eval()


def param_bytes(model) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())


def reference(model, ids):
    with torch.no_grad():
        return model(ids).logits.clone(), model.generate(ids, max_new_tokens=8, do_sample=False)


@pytest.mark.parametrize("make_model", [tiny_llama, tiny_gpt2], ids=["llama", "gpt2"])
@pytest.mark.parametrize(
    "prefetch,ram_cache_gb,policy",
    [
        ("none", 0, "auto"),
        ("next_layer", 0, "auto"),
        ("adaptive", 0, "auto"),
        ("adaptive", 0.002, "auto"),
        ("adaptive", 0.002, "lru"),
        ("next_layer", 0.002, "lfu"),
        ("adaptive", 0.002, "fifo"),
    ],
)
def test_streamed_outputs_equal_in_memory(tmp_path, make_model, prefetch, ram_cache_gb, policy):
    model = make_model()
    ids = torch.randint(0, 1000, (2, 10), generator=torch.Generator().manual_seed(1))
    ref_logits, ref_tokens = reference(model, ids)
    # Tied embeddings stay resident, then room for two and a half layers: most layers must
    # stream (whether the arena is planned for one layer, without prefetching, or two).
    layers = model.model.layers if hasattr(model, "model") else model.transformer.h
    tied = model.lm_head.weight.numel() * 4 if model.config.tie_word_embeddings else 0
    budget = tied + 2.5 * param_bytes(layers[0]) + 64 * 1024
    config = Config(
        storage_path=tmp_path,
        vram_budget_gb=budget / 1e9,
        min_layer_size=1 << 16,
        prefetch_strategy=prefetch,
        ram_cache_gb=ram_cache_gb,
        cache_policy=policy,
        verify_checksums=True,
    )
    offload(model, config)
    with torch.no_grad():
        logits = model(ids).logits
        tokens = model.generate(ids, max_new_tokens=8, do_sample=False)
    assert torch.equal(logits, ref_logits), "logits differ bitwise"
    assert torch.equal(tokens, ref_tokens), "greedy tokens differ"
    stats = get_model_statistics(model)
    assert stats["layers_offloaded"] >= 4, "the budget must force most layers to stream"
    assert stats["device_bytes_peak"] + stats["resident_param_bytes"] <= int(budget)
    assert stats["ram_tier"]["peak_bytes_in_use"] <= int(ram_cache_gb * 1e9)
    model.cleanup_tensorstream()


def test_budget_below_minimum_names_the_figure(tmp_path):
    model = tiny_llama()
    with pytest.raises(ts.BudgetTooSmallError) as info:
        offload(
            model,
            Config(storage_path=tmp_path, vram_budget_gb=200_000 / 1e9, min_layer_size=1 << 16),
        )
    assert info.value.minimum_budget > 200_000
    assert f"{info.value.minimum_budget:,}" in str(info.value)
    # The figure works.
    offload(
        tiny_llama(),
        Config(
            storage_path=tmp_path,
            vram_budget_gb=info.value.minimum_budget / 1e9,
            min_layer_size=1 << 16,
        ),
    )


def test_store_is_reused_and_rewritten_when_weights_change(tmp_path):
    config = Config(storage_path=tmp_path, vram_budget_gb=0.002, min_layer_size=1 << 16)
    first = offload(tiny_llama(seed=0), config)
    store = first.tensorstream.store_path
    mtime = store.stat().st_mtime_ns
    second = offload(tiny_llama(seed=0), config)
    assert second.tensorstream.store_path == store
    assert store.stat().st_mtime_ns == mtime, "the same weights were written again"
    changed = tiny_llama(seed=0)
    with torch.no_grad():
        changed.model.layers[3].mlp.up_proj.weight[0, 0] += 1
    third = offload(changed, config)
    assert third.tensorstream.store_path != store
    assert len(list(tmp_path.glob("*.tstore"))) == 2


def test_host_copies_of_streamed_weights_are_dropped(tmp_path):
    model = tiny_llama()
    layer = model.model.layers[2].mlp.down_proj.weight
    offload(model, Config(storage_path=tmp_path, vram_budget_gb=0.002, min_layer_size=1 << 16))
    # A placeholder: the right shape and dtype, one element of memory.
    assert layer.shape == (128, 256) and layer.dtype == torch.float32
    assert layer.untyped_storage().nbytes() == layer.element_size()


def test_tied_weights_stay_tied(tmp_path):
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=4,
        num_attention_heads=4,
        vocab_size=1000,
        tie_word_embeddings=True,
    )
    model = transformers.LlamaForCausalLM(cfg).eval()
    assert model.lm_head.weight is model.model.embed_tokens.weight
    ids = torch.randint(0, 1000, (1, 8))
    ref_logits, ref_tokens = reference(model, ids)
    offload(model, Config(storage_path=tmp_path, vram_budget_gb=0.002, min_layer_size=1 << 16))
    assert model.lm_head.weight is model.model.embed_tokens.weight
    with torch.no_grad():
        assert torch.equal(model(ids).logits, ref_logits)
        assert torch.equal(model.generate(ids, max_new_tokens=8, do_sample=False), ref_tokens)


def test_misuse_is_refused_clearly(tmp_path):
    model = tiny_llama()
    ids = torch.randint(0, 1000, (1, 5))
    offload(model, Config(storage_path=tmp_path, vram_budget_gb=0.002, min_layer_size=1 << 16))
    with pytest.raises(RuntimeError, match="already offloaded"):
        offload(model, Config(storage_path=tmp_path, vram_budget_gb=0.002))
    model.train()
    with pytest.raises(RuntimeError, match="inference mode only"):
        model(ids)
    model.eval()
    model.cleanup_tensorstream()
    model.cleanup_tensorstream()  # idempotent
    with pytest.raises(RuntimeError, match="closed"):
        model(ids)
    with pytest.raises(RuntimeError, match="closed"):
        get_model_statistics(model)


def test_unwritable_storage_path_is_named(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    with pytest.raises(OSError, match="file"):
        offload(
            tiny_llama(),
            Config(storage_path=blocker / "store", vram_budget_gb=0.002, min_layer_size=1 << 16),
        )


def test_threads_calling_one_model_get_reference_results(tmp_path):
    model = tiny_llama()
    inputs = [
        torch.randint(0, 1000, (1, 6 + i), generator=torch.Generator().manual_seed(i))
        for i in range(4)
    ]
    reference_model = copy.deepcopy(model)
    with torch.no_grad():
        expected = [reference_model(x).logits for x in inputs]
    offload(
        model,
        Config(
            storage_path=tmp_path, vram_budget_gb=0.003, min_layer_size=1 << 16, prefetch_depth=3
        ),
    )
    failures: list[str] = []

    def worker(i: int) -> None:
        with torch.no_grad():
            for _ in range(5):
                if not torch.equal(model(inputs[i]).logits, expected[i]):
                    failures.append(f"thread {i}")

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not failures
