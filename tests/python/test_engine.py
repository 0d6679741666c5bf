"""The engine binding: blocks streamed into caller-provided (torch) memory, bitwise."""

from __future__ import annotations

import json
import threading

import pytest
from engine_helpers import TorchMemory

import tensorstream as ts
from tensorstream import _core

torch = pytest.importorskip("torch")


@pytest.fixture
def layered_store(tmp_path):
    torch.manual_seed(0)
    state = {f"layers.{i}.weight": torch.randn(64, 96 + 8 * i) for i in range(8)}
    state.update({f"layers.{i}.bias": torch.randn(64) for i in range(8)})
    path = tmp_path / "model.tstore"
    ts.save_to_ts(state, path)
    return path, state


def tensors_of_block(header: dict, block: int, raw: torch.Tensor) -> dict[str, torch.Tensor]:
    out = {}
    for name in header["blocks"][block]["tensors"]:
        t = header["tensors"][name]
        start = t["offset_in_block"]
        out[name] = (
            raw[start : start + t["nbytes"]].view(getattr(torch, t["dtype"])).view(t["shape"])
        )
    return out


@pytest.mark.parametrize("backend", ["pread", "auto"])
@pytest.mark.parametrize("prefetch", ["none", "next_layer", "adaptive"])
@pytest.mark.parametrize("ram_cache", [0, 64 << 10])
def test_blocks_arrive_bitwise_in_torch_memory(layered_store, prefetch, ram_cache, backend):
    path, state = layered_store
    header = ts.read_ts_header(path)
    sizes = [b["size"] for b in header["blocks"]]
    memory = TorchMemory()
    budget = _core.minimum_budget(sizes, 2) + max(sizes)
    engine = _core.Engine(
        str(path),
        {
            "device": "cpu",
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
    # auto on the CPU reads a small store in place, through the page cache, unless a RAM
    # tier is configured; pread copies into the provided memory.
    assert engine.stats()["in_place"] == (backend == "auto" and ram_cache == 0)
    assert engine.plan["device_bytes"] <= budget
    for _ in range(3):
        for block in range(engine.block_count):
            address, size, _resident = engine.acquire(block)
            for name, tensor in tensors_of_block(header, block, memory.view(address, size)).items():
                assert torch.equal(tensor, state[name]), name
            engine.release(block)
    stats = engine.stats()
    assert stats["device_bytes_peak"] <= budget
    assert stats["ram_tier"]["peak_bytes_in_use"] <= ram_cache
    assert stats["acquires"] == 3 * engine.block_count
    json.loads(engine.trace_json())
    engine.close()
    assert engine.closed and not memory.buffers, "close() gives every buffer back"
    with pytest.raises(ts.TensorStreamError, match="closed"):
        engine.acquire(0)


def test_budget_too_small_names_the_minimum(layered_store):
    path, _ = layered_store
    with pytest.raises(ts.BudgetTooSmallError) as info:
        _core.Engine(str(path), {"device_budget": 1000})
    assert info.value.minimum_budget > 1000
    assert str(info.value.minimum_budget) in str(info.value)
    assert isinstance(info.value, ValueError)


def test_unknown_option_is_refused(layered_store):
    path, _ = layered_store
    with pytest.raises(ValueError, match="unknown engine option 'device_budgett'"):
        _core.Engine(str(path), {"device_budgett": 1 << 20})
    with pytest.raises(ValueError, match="prefetch strategy 'sometimes'"):
        _core.Engine(str(path), {"device_budget": 1 << 20, "prefetch": "sometimes"})


def test_threads_share_one_engine(layered_store):
    path, state = layered_store
    header = ts.read_ts_header(path)
    memory = TorchMemory()
    sizes = [b["size"] for b in header["blocks"]]
    engine = _core.Engine(
        str(path),
        {"device_budget": _core.minimum_budget(sizes, 6), "slots": 6},
        memory.allocate,
        memory.release,
    )
    memory.attach(engine)
    errors: list[str] = []

    def worker(seed: int) -> None:
        for i in range(200):
            block = (seed * 7 + i) % engine.block_count
            address, size, _ = engine.acquire(block)
            for name, tensor in tensors_of_block(header, block, memory.view(address, size)).items():
                if not torch.equal(tensor, state[name]):
                    errors.append(name)
            engine.release(block)

    threads = [threading.Thread(target=worker, args=(s,)) for s in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    engine.close()
