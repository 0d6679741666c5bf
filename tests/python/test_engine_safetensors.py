"""The engine streaming Hugging Face safetensors checkpoints in place, bitwise."""

from __future__ import annotations

import pytest
from engine_helpers import TorchMemory

import tensorstream as ts
from tensorstream import _core

torch = pytest.importorskip("torch")
st_torch = pytest.importorskip("safetensors.torch")


def load_checkpoint(path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for file in sorted(path.glob("*.safetensors")) if path.is_dir() else [path]:
        out.update(st_torch.load_file(file))
    return out


def minimum_budget(path, slots: int = 2, groups=None) -> int:
    with pytest.raises(ts.BudgetTooSmallError) as info:
        _core.Engine.from_safetensors(
            str(path), {"device_budget": 1, "slots": slots}, groups=groups
        )
    return info.value.minimum_budget


def stream_and_compare(engine, memory: TorchMemory, expected: dict[str, torch.Tensor], passes=2):
    seen: set[str] = set()
    for _ in range(passes):
        for block in range(engine.block_count):
            address, size, _resident = engine.acquire(block)
            raw = memory.view(address, size)
            for t in engine.tensors(block):
                want = expected[t["name"]]
                got_bytes = raw[t["offset"] : t["offset"] + t["nbytes"]]
                assert t["nbytes"] == want.numel() * want.element_size(), t["name"]
                assert torch.equal(got_bytes, want.contiguous().reshape(-1).view(torch.uint8)), t[
                    "name"
                ]
                typed = got_bytes.view(getattr(torch, t["dtype"])).view(t["shape"])
                assert typed.dtype == want.dtype and typed.shape == want.shape, t["name"]
                seen.add(t["name"])
            engine.release(block)
    return seen


@pytest.fixture(scope="module")
def llama_checkpoint(tmp_path_factory):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=96,
        hidden_size=48,
        intermediate_size=80,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        tie_word_embeddings=False,
    )
    model = transformers.LlamaForCausalLM(config)
    path = tmp_path_factory.mktemp("llama")
    model.save_pretrained(path, max_shard_size="60KB")
    assert (path / "model.safetensors.index.json").exists(), "the checkpoint must be sharded"
    assert len(list(path.glob("*.safetensors"))) >= 3
    return path


@pytest.mark.parametrize("backend", ["pread", "auto"])
@pytest.mark.parametrize("prefetch", ["none", "next_layer", "adaptive"])
@pytest.mark.parametrize("ram_cache", [0, 256 << 10])
def test_sharded_llama_streams_bitwise(llama_checkpoint, prefetch, ram_cache, backend):
    expected = load_checkpoint(llama_checkpoint)
    memory = TorchMemory()
    budget = minimum_budget(llama_checkpoint, 2) + (32 << 10)
    engine = _core.Engine.from_safetensors(
        str(llama_checkpoint),
        {
            "device_budget": budget,
            "ram_cache_bytes": ram_cache,
            "prefetch": prefetch,
            "verify_checksums": True,
            "backend": backend,
        },
        memory.allocate,
        memory.release,
    )
    memory.attach(engine)
    assert engine.stats()["in_place"] == (backend == "auto" and ram_cache == 0)
    names = [engine.block_name(b) for b in range(engine.block_count)]
    assert names[0] == "model.embed_tokens" and names[1] == "model.layers.0"
    assert names[-1] == "lm_head"
    assert engine.plan["arena_bytes"] > 0, "the budget must force streaming"
    assert stream_and_compare(engine, memory, expected) == set(expected)
    stats = engine.stats()
    assert stats["device_bytes_peak"] <= budget
    assert stats["ram_tier"]["peak_bytes_in_use"] <= ram_cache
    assert stats["failures"] == 0
    engine.close()
    assert engine.closed and not memory.buffers


def test_single_file_odd_dtypes_and_caller_groups(tmp_path):
    torch.manual_seed(1)
    state = {
        "a.weight": torch.randn(7, 13),
        "a.bias": torch.randn(7).to(torch.bfloat16),
        "b.table": torch.randint(-(2**40), 2**40, (5, 3), dtype=torch.int64),
        "b.mask": torch.rand(11) > 0.5,
        "b.half": torch.randn(3, 5).to(torch.float16),
        "c.scalar": torch.tensor(3.5),
    }
    path = tmp_path / "model.safetensors"
    st_torch.save_file(state, path)
    groups = {"second": ["b.mask", "a.bias", "c.scalar"], "first": ["b.table", "a.weight"]}
    memory = TorchMemory()
    engine = _core.Engine.from_safetensors(
        str(path),
        {"device_budget": minimum_budget(path, 2, groups), "prefetch": "next_layer"},
        memory.allocate,
        memory.release,
        groups=groups,
    )
    memory.attach(engine)
    assert [engine.block_name(b) for b in range(engine.block_count)] == ["second", "first"]
    assert [t["name"] for t in engine.tensors(1)] == ["b.table", "a.weight"]
    assert engine.tensors(1)[0]["dtype"] == "int64"
    assert stream_and_compare(engine, memory, st_torch.load_file(path)) == {
        n for tensors in groups.values() for n in tensors
    }
    engine.close()


def test_store_engine_reports_placements(tmp_path):
    state = {f"layers.{i}.weight": torch.randn(4, 5 + i) for i in range(3)}
    path = tmp_path / "model.tstore"
    ts.save_to_ts(state, path)
    engine = _core.Engine(str(path), {"device_budget": 1 << 20})
    header = ts.read_ts_header(path)
    for block in range(engine.block_count):
        for t in engine.tensors(block):
            assert t["offset"] == header["tensors"][t["name"]]["offset_in_block"]
            assert t["dtype"] == "float32"
    engine.close()


def test_bad_input_is_refused(tmp_path):
    st_torch.save_file({"x.w": torch.zeros(3)}, tmp_path / "model.safetensors")
    with pytest.raises(ValueError, match="nope"):
        _core.Engine.from_safetensors(
            str(tmp_path), {"device_budget": 1 << 20}, groups=[("x", ["x.w", "nope"])]
        )
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ts.TensorStreamError, match="empty"):
        _core.Engine.from_safetensors(str(empty), {"device_budget": 1 << 20})
