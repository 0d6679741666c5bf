"""Streaming on a CUDA device (skipped without one): offload() and from_pretrained() in bf16
give bitwise the logits and the greedy tokens of the model held on the GPU, the weight
budget holds against torch's own allocator counters, and a model offloaded on the CPU can be
moved with .to("cuda")."""

from __future__ import annotations

import pytest

import tensorstream as ts
from tensorstream.config import Config

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device visible to torch"),
]

VOCAB = 512
MIN_LAYER = 1 << 14
DEVICE = "cuda:0"


def _decoder(model_class, config_class, **extra):
    """A 6-layer decoder of hidden size 128 (Llama-style configs)."""
    config = config_class(
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=6,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=VOCAB,
        max_position_embeddings=128,
        **extra,
    )
    return model_class(config)


def _llama():
    return _decoder(
        transformers.LlamaForCausalLM, transformers.LlamaConfig, tie_word_embeddings=False
    )


def _qwen2():
    return _decoder(transformers.Qwen2ForCausalLM, transformers.Qwen2Config)


def _gpt2():
    return transformers.GPT2LMHeadModel(
        transformers.GPT2Config(
            vocab_size=VOCAB,
            n_embd=128,
            n_layer=6,
            n_head=4,
            n_positions=128,
            bos_token_id=0,
            eos_token_id=0,
        )  # fmt: skip
    )


MODELS = {"llama": _llama, "gpt2": _gpt2, "qwen2": _qwen2}


def _build(make, seed: int = 0):
    torch.manual_seed(seed)
    return make().to(torch.bfloat16).eval()


def _ids(shape=(2, 9)):
    return torch.randint(1, VOCAB, shape, generator=torch.Generator().manual_seed(1)).to(DEVICE)


def _tight(tmp_path, model) -> Config:
    config = Config(storage_path=tmp_path, min_layer_size=MIN_LAYER, device=DEVICE)
    minimum = ts.estimate_model_memory(model, config)["minimum_budget"]
    return config.replace(vram_budget_gb=f"{minimum + (64 << 10)}B")


def _reference(make, x):
    model = _build(make).to(DEVICE)
    with torch.no_grad():
        logits = model(x).logits
        tokens = model.generate(x[:1], max_new_tokens=8, do_sample=False)
    del model
    torch.cuda.empty_cache()
    return logits, tokens


@pytest.mark.parametrize("arch", sorted(MODELS))
def test_offload_bf16_on_cuda_is_bitwise_and_keeps_the_budget(tmp_path, arch):
    x = _ids()
    expected_logits, expected_tokens = _reference(MODELS[arch], x)
    model = _build(MODELS[arch])
    config = _tight(tmp_path, model)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    ts.offload(model, config)
    weights = torch.cuda.memory_allocated() - before
    budget = config.vram_budget_bytes
    stats = ts.get_model_statistics(model)
    assert stats["layers_offloaded"] >= stats["blocks"] // 2
    # Every weight byte on the GPU was allocated through torch (slots included).
    assert weights <= budget, (weights, budget)
    # resident + placeholders (one shared bf16 zero: 512 bytes) + engine <= budget.
    assert stats["placeholder_bytes"] == 512
    assert stats["vram_in_use"] <= budget
    streamed = [s.param for b in model.tensorstream._blocks for s in b.slots]
    shared = {p.untyped_storage().data_ptr() for p in streamed}
    assert len(shared) == 1
    with torch.no_grad():
        assert torch.equal(model(x).logits, expected_logits)
        assert torch.equal(
            model.generate(x[:1], max_new_tokens=8, do_sample=False), expected_tokens
        )
    stats = ts.get_model_statistics(model)
    assert stats["device_bytes_peak"] <= stats["device_budget"]
    assert stats["bytes_to_device"] > 0
    # The post-hooks put back views of the same zero: no allocation per parameter and call.
    assert {p.untyped_storage().data_ptr() for p in streamed} == shared
    model.cleanup_tensorstream()


def test_from_pretrained_bf16_on_cuda_is_bitwise(tmp_path):
    x = _ids()
    expected_logits, expected_tokens = _reference(_llama, x)
    source = _build(_llama)
    path = tmp_path / "ckpt"
    source.save_pretrained(path, max_shard_size="200KB")
    config = _tight(tmp_path / "store", source)
    del source
    model = ts.from_pretrained(path, config)
    try:
        assert ts.get_model_statistics(model)["layers_offloaded"] >= 3
        with torch.no_grad():
            assert torch.equal(model(x).logits, expected_logits)
            got = model.generate(x[:1], max_new_tokens=8, do_sample=False)
        assert torch.equal(got, expected_tokens)
    finally:
        model.cleanup_tensorstream()


def test_to_cuda_after_a_cpu_offload_moves_the_runtime(tmp_path):
    x = _ids()
    expected_logits, _ = _reference(_llama, x)
    model = _build(_llama)
    cpu = _tight(tmp_path, model).replace(device=None)
    ts.offload(model, cpu)
    assert model.tensorstream.device.type == "cpu"
    assert model.to(DEVICE) is model
    stats = ts.get_model_statistics(model)
    assert stats["device"] == DEVICE
    assert model.model.norm.weight.device.type == "cuda"
    with torch.no_grad():
        assert torch.equal(model(x).logits, expected_logits)
    model.to("cpu")  # and back
    with torch.no_grad():
        assert model(x.cpu()).logits.device.type == "cpu"
    model.cleanup_tensorstream()


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_any_budget_on_cuda_is_bitwise(tmp_path, arch):
    """At 25% and 10% of the model and at the minimum the model streams on the GPU in units
    smaller than a layer (the embedding by rows: gathered into pinned memory, one copy), with
    bitwise outputs and the budget kept against torch's allocator."""
    import warnings

    x = _ids()
    expected_logits, expected_tokens = _reference(MODELS[arch], x)
    probe = _build(MODELS[arch])
    config = Config(storage_path=tmp_path, min_layer_size=MIN_LAYER, device=DEVICE)
    total = sum(p.numel() * p.element_size() for p in probe.parameters())
    minimum = ts.estimate_model_memory(probe, config)["minimum_budget"]
    del probe
    for budget in (int(total * 0.25), int(total * 0.10), minimum):
        if budget < minimum:
            with pytest.raises(ts.BudgetTooSmallError) as info:
                ts.offload(_build(MODELS[arch]), config.replace(vram_budget_gb=f"{budget}B"))
            assert info.value.minimum_budget == minimum
            continue
        model = _build(MODELS[arch])
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            ts.offload(model, config.replace(vram_budget_gb=f"{budget}B"))
        assert torch.cuda.memory_allocated() - before <= budget
        with torch.no_grad():
            assert torch.equal(model(x).logits, expected_logits)
            tokens = model.generate(x[:1], max_new_tokens=8, do_sample=False)
        assert torch.equal(tokens, expected_tokens)
        stats = ts.get_model_statistics(model)
        assert stats["vram_in_use"] <= budget
        assert stats["device_bytes_peak"] <= stats["device_budget"]
        if budget == minimum:
            assert stats["unit_tier"] != "blocks"
        model.cleanup_tensorstream()
