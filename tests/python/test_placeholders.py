"""Placeholders of streamed parameters: one zero per (dtype, device), shared by every streamed
parameter of that dtype and expanded to its shape, never a new allocation per post-hook; the
runtime counts them in its budget (resident + placeholders + engine <= budget). CPU device."""

from __future__ import annotations

import pytest

import tensorstream as ts
from tensorstream._torch_memory import placeholder, placeholder_bytes
from tensorstream.config import Config

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
nn = torch.nn


def _tiny_llama():
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=500,
        max_position_embeddings=64,
    )
    return transformers.LlamaForCausalLM(cfg).eval()


class _MixedLayer(nn.Module):
    """A float32 linear map and a bfloat16 scale: a block with two dtypes."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(96, 96)
        self.scale = nn.Parameter(torch.rand(96).to(torch.bfloat16))

    def forward(self, x):
        return self.linear(x) * self.scale.float()


class _Mixed(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(3)
        self.layers = nn.ModuleList(_MixedLayer() for _ in range(5))

    def forward(self, x):
        for layer in self.layers:
            x = layer(x)
        return x


def _streamed(model) -> list[torch.Tensor]:
    runtime = model.tensorstream
    return [slot.param for block in runtime._blocks for slot in block.slots]


def _storages(params) -> set[int]:
    return {p.untyped_storage().data_ptr() for p in params}


def test_placeholder_is_a_shared_zero_expanded_to_the_shape():
    a = placeholder(torch.float32, torch.Size([3, 4]), torch.device("cpu"))
    b = placeholder(torch.float32, (7,), "cpu")
    c = placeholder(torch.bfloat16, (3, 4), torch.device("cpu"))
    scalar = placeholder(torch.int64, (), torch.device("cpu"))
    assert a.shape == (3, 4) and a.dtype == torch.float32 and a.device.type == "cpu"
    assert a.stride() == (0, 0) and b.stride() == (0,)
    assert b.shape == (7,) and c.dtype == torch.bfloat16
    assert scalar.shape == () and scalar.dtype == torch.int64
    # One element of memory, the same one for every placeholder of a dtype and device.
    assert a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr()
    assert a.untyped_storage().nbytes() == a.element_size()
    assert c.untyped_storage().data_ptr() != a.untyped_storage().data_ptr()
    assert c.untyped_storage().nbytes() == 2
    assert torch.count_nonzero(a) == 0 and torch.count_nonzero(c) == 0
    # A placeholder of several elements cannot be written through (all share one element).
    with pytest.raises(RuntimeError):
        a.add_(1)
    # Made inside inference mode, still usable (and shared) outside it.
    with torch.inference_mode():
        inner = placeholder(torch.float16, (2, 2), "cpu")
    outer = placeholder(torch.float16, (5,), "cpu")
    assert not outer.is_inference()
    assert inner.untyped_storage().data_ptr() == outer.untyped_storage().data_ptr()
    assert (outer + 1).sum().item() == 5


def test_placeholder_bytes_count_one_element_per_dtype():
    assert placeholder_bytes([torch.float32], "cpu") == 4
    assert placeholder_bytes([torch.float32, torch.float32, torch.bfloat16], "cpu") == 6
    assert placeholder_bytes([], "cpu") == 0
    # torch's CUDA caching allocator takes 512 bytes for any small tensor (nothing is made).
    assert placeholder_bytes([torch.float32, torch.bfloat16], "cuda:0") == 1024
    assert placeholder_bytes([torch.complex128], torch.device("cuda", 1)) == 512


def test_streamed_parameters_share_one_placeholder_across_blocks_and_forwards(tmp_path):
    model = _tiny_llama()
    ids = torch.randint(1, 500, (1, 7), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = model(ids).logits.clone()
    ts.offload(model, Config(storage_path=tmp_path, vram_budget_gb=0.002, min_layer_size=1 << 14))
    try:
        params = _streamed(model)
        assert len(params) > 10
        shapes = [(p.shape, p.dtype) for p in params]
        storages = _storages(params)
        assert len(storages) == 1, "every streamed float32 parameter shares one zero"
        (shared,) = storages
        for p in params:
            assert all(stride == 0 for stride in p.stride())
            assert p.untyped_storage().nbytes() == p.element_size()
        for _ in range(3):
            with torch.no_grad():
                assert torch.equal(model(ids).logits, expected)
            # The post-hooks put back views of the same zero: nothing new was allocated.
            assert _storages(params) == {shared}
            assert [(p.shape, p.dtype) for p in params] == shapes
            assert all(all(s == 0 for s in p.stride()) for p in params)
        with torch.inference_mode():
            assert torch.equal(model(ids).logits, expected)
        assert _storages(params) == {shared}
    finally:
        model.cleanup_tensorstream()


def test_budget_counts_the_shared_placeholders(tmp_path):
    model = _Mixed()
    x = torch.randn(2, 96)
    with torch.no_grad():
        expected = model(x)
    config = Config(storage_path=tmp_path, min_layer_size=1 << 10)
    estimate = ts.estimate_model_memory(model, config)
    assert estimate["placeholder_bytes"] == 4 + 2  # float32 and bfloat16, one element each
    budget = estimate["minimum_budget"]
    # One byte less is refused, and the error names the same minimum.
    with pytest.raises(ts.BudgetTooSmallError) as info:
        ts.offload(_Mixed(), config.replace(vram_budget_gb=f"{budget - 1}B"))
    assert info.value.minimum_budget == budget
    assert "placeholders" in str(info.value)

    ts.offload(model, config.replace(vram_budget_gb=f"{budget}B"))
    try:
        params = _streamed(model)
        assert len(_storages(params)) == 2  # one zero per dtype
        with torch.no_grad():
            assert torch.equal(model(x), expected)
            assert torch.equal(model(x), expected)
        assert len(_storages(params)) == 2
        stats = ts.get_model_statistics(model)
        assert stats["layers_offloaded"] >= 3
        assert stats["placeholder_bytes"] == 6
        assert stats["vram_in_use"] == (
            stats["device_bytes_in_use"] + stats["resident_param_bytes"] + 6
        )
        # resident + placeholders + engine <= budget, and the engine got exactly the rest.
        assert stats["vram_in_use"] <= stats["budget"] == budget
        assert stats["device_budget"] == budget - stats["resident_param_bytes"] - 6
        assert stats["device_bytes_peak"] <= stats["device_budget"]
        # A re-plan keeps the accounting.
        model.tensorstream.replan(budget + 4096)
        stats = ts.get_model_statistics(model)
        assert stats["device_budget"] == budget + 4096 - stats["resident_param_bytes"] - 6
        assert stats["vram_in_use"] <= stats["budget"]
    finally:
        model.cleanup_tensorstream()
