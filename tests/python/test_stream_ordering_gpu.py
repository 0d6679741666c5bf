"""Stream ordering of the engine on a CUDA device (skipped without one).

The C++ GPU tests synchronise the host after every block, so they never see what only the
device orders: here the host never waits for the device while it streams. Each consumer
acquires a block on its own CUDA stream, keeps that stream busy (``torch.cuda._sleep``)
before and after a kernel that reads every byte of the block (``bitwise_not`` into a result
tensor), and releases it at once on the host; the engine refills the slot for the next
block meanwhile. Only at the end does the host synchronise and compare every result with the
store's bytes. What is checked:

* a consumer's stream waits for the block's copy (*ready*): a read right after acquire, while
  the copy waits behind a sleeping consumer of the slot's previous block, sees the new bytes;
* a slot's next fill waits for the consumer's release (*done*): a read behind a long sleep
  still sees its block, though the host released it long before;
* both with more blocks than slots, over several passes, with and without a RAM tier (whose
  entries are ranges of one pinned region, copied from asynchronously);
* two threads on two streams holding the same block: each stream sees the ready bytes; and
  the block's next fill waits for *every* holder's release -- which the engine does not do
  yet (it waits for the last release recorded), so that part is expected to fail.
"""

from __future__ import annotations

import random
import threading

import pytest

import tensorstream as ts
from tensorstream import _core
from tensorstream._torch_memory import TorchMemory

torch = pytest.importorskip("torch")

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device visible to torch"),
]

DEVICE = torch.device("cuda", 0)
BLOCK_ELEMENTS = 1 << 20  # 4 MiB of float32 per block
SHORT = 2_000_000  # GPU clock cycles: about 1 ms, several times a block's copy
LONG = 100_000_000  # about 50 ms


@pytest.fixture
def store(tmp_path):
    """A store of 8 blocks of 4 MiB of random bytes and each block's bytes on the device."""
    if not _core.cuda_driver_status()["available"]:
        pytest.skip(_core.cuda_driver_status()["reason"])
    generator = torch.Generator().manual_seed(5)
    state = {
        f"layers.{i}.weight": torch.randint(
            -(2**31), 2**31 - 1, (BLOCK_ELEMENTS,), dtype=torch.int32, generator=generator
        ).view(torch.float32)
        for i in range(8)
    }
    path = tmp_path / "model.tstore"
    ts.save_to_ts(state, path)
    reader = _core.Store(str(path))
    expected = []
    for index, block in enumerate(reader.blocks):
        raw = torch.empty(block["raw_size"], dtype=torch.uint8)
        reader.read_block_into(index, raw.data_ptr(), block["raw_size"])
        expected.append(raw.to(DEVICE))
    return path, expected


def _engine(path, memory: TorchMemory, **options):
    sizes = [b["raw_size"] for b in _core.Store(str(path)).blocks]
    slots = options.pop("slots", 2)
    settings = {
        "device": "cuda:0",
        "device_budget": _core.minimum_budget(sizes, slots),
        "slots": slots,
        "prefetch": "next_layer",
        "gds": "off",
        **options,
    }
    engine = _core.Engine(str(path), settings, memory.allocate, memory.release)
    assert not any(engine.plan["resident"]), "every block must stream through the slots"
    return engine


def _read(memory: TorchMemory, address: int, size: int, out: torch.Tensor) -> None:
    """A kernel reading every byte of the block (on the current stream)."""
    torch.bitwise_not(memory.view(address, size), out=out)


def _check(results, expected, label) -> None:
    torch.cuda.synchronize()
    wrong = [key for key, got in results.items() if not torch.equal(got, ~expected[key[-1]])]
    assert not wrong, f"{label}: consumers read other bytes than their block's: {wrong}"


@pytest.mark.parametrize(
    "slots,ram_cache,policy",
    [(2, 0, "auto"), (3, 0, "auto"), (2, 3 * 4 << 20, "lru"), (2, 3 * 4 << 20, "auto")],
    ids=["2 slots", "3 slots", "2 slots + lru tier", "2 slots + auto tier"],
)
def test_one_stream_sees_each_block_and_fills_wait_for_its_release(store, slots, ram_cache, policy):
    path, expected = store
    memory = TorchMemory(DEVICE)
    engine = _engine(path, memory, slots=slots, ram_cache_bytes=ram_cache, cache_policy=policy)
    passes = 4
    results = _results(expected, [(p, b) for p in range(passes) for b in range(len(expected))])
    stream = torch.cuda.Stream(DEVICE)
    rng = random.Random(11)
    try:
        for p in range(passes):
            for b in range(len(expected)):
                address, size, _ = engine.acquire(b, stream.cuda_stream)
                with torch.cuda.stream(stream):
                    # No sleep before the read: it must wait for the copy (ready). A sleep
                    # before it: the slot's next fill must wait for the read (done). A sleep
                    # after it delays "done", and with it the next fill of the slot.
                    if rng.random() < 0.5:
                        torch.cuda._sleep(rng.choice((SHORT, 4 * SHORT)))
                    _read(memory, address, size, results[(p, b)])
                    if rng.random() < 0.3:
                        torch.cuda._sleep(SHORT)
                engine.release(b, stream.cuda_stream)
        _check(results, expected, f"{slots} slots, tier {ram_cache} {policy}")
        stats = engine.stats()
        assert stats["failures"] == 0
        assert stats["acquires"] == passes * len(expected)
        if ram_cache and policy == "auto":
            assert stats["ram_tier"]["hits"] > 0
    finally:
        engine.close()


def _results(expected, keys) -> dict:
    """A result tensor per (consumer, block) key, made before any other stream uses it."""
    out = {key: torch.empty_like(expected[key[-1]]) for key in keys}
    torch.cuda.synchronize()
    return out


def _hold_both_slots_busy(engine, memory, stream, results) -> None:
    """Blocks 0 and 1 take both slots; their consumer's stream sleeps long before reading,
    so each slot's next fill can only copy after that sleep."""
    views = [engine.acquire(b, stream.cuda_stream) for b in (0, 1)]
    with torch.cuda.stream(stream):
        torch.cuda._sleep(LONG)
        for b, (address, size, _) in zip((0, 1), views):
            _read(memory, address, size, results[("holder", b)])
    for b in (0, 1):
        engine.release(b, stream.cuda_stream)


def test_every_acquiring_stream_waits_for_the_ready_bytes(store):
    path, expected = store
    memory = TorchMemory(DEVICE)
    engine = _engine(path, memory, prefetch="none")
    results = _results(expected, [("holder", 0), ("holder", 1), ("a", 2), ("b", 2)])
    try:
        _hold_both_slots_busy(engine, memory, torch.cuda.Stream(DEVICE), results)
        # Block 2's copy now waits on the device behind the holder's sleep; two threads on
        # their own streams acquire it and read at once: each stream must wait for the copy.
        both_acquired = threading.Barrier(2)
        errors: list[BaseException] = []

        def consumer(name: str) -> None:
            try:
                stream = torch.cuda.Stream(DEVICE)
                address, size, _ = engine.acquire(2, stream.cuda_stream)
                both_acquired.wait(timeout=30)  # held by both at once
                with torch.cuda.stream(stream):
                    _read(memory, address, size, results[(name, 2)])
                engine.release(2, stream.cuda_stream)
            except BaseException as e:  # noqa: BLE001 - reported by the main thread
                errors.append(e)

        threads = [threading.Thread(target=consumer, args=(n,)) for n in ("a", "b")]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=60)
        assert not errors, errors
        _check(results, expected, "two streams on one block")
        assert engine.stats()["failures"] == 0
    finally:
        engine.close()


def test_next_fill_waits_for_every_holders_release(store):
    path, expected = store
    memory = TorchMemory(DEVICE)
    engine = _engine(path, memory, prefetch="none")
    results = _results(expected, [("a", 0), ("b", 0), ("main", 1), ("main", 2), ("main", 3)])
    try:
        acquired = [threading.Event(), threading.Event()]
        a_released = threading.Event()
        errors: list[BaseException] = []

        def slow_holder() -> None:  # reads block 0 after a long sleep on its stream
            try:
                stream = torch.cuda.Stream(DEVICE)
                address, size, _ = engine.acquire(0, stream.cuda_stream)
                acquired[0].set()
                assert acquired[1].wait(timeout=30)
                with torch.cuda.stream(stream):
                    torch.cuda._sleep(LONG)
                    _read(memory, address, size, results[("a", 0)])
                engine.release(0, stream.cuda_stream)
            except BaseException as e:  # noqa: BLE001 - reported by the main thread
                errors.append(e)
            finally:
                a_released.set()

        def quick_holder() -> None:  # reads block 0 at once and releases last on the host
            try:
                stream = torch.cuda.Stream(DEVICE)
                assert acquired[0].wait(timeout=30)
                address, size, _ = engine.acquire(0, stream.cuda_stream)
                acquired[1].set()
                assert a_released.wait(timeout=30)
                with torch.cuda.stream(stream):
                    _read(memory, address, size, results[("b", 0)])
                engine.release(0, stream.cuda_stream)
            except BaseException as e:  # noqa: BLE001 - reported by the main thread
                errors.append(e)

        threads = [threading.Thread(target=slow_holder), threading.Thread(target=quick_holder)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=60)
        assert not errors, errors
        # Both released on the host; the slow holder's stream is still asleep. Blocks 1-3
        # through two slots: block 0's slot is refilled while it sleeps.
        stream = torch.cuda.Stream(DEVICE)
        for b in (1, 2, 3):
            address, size, _ = engine.acquire(b, stream.cuda_stream)
            with torch.cuda.stream(stream):
                _read(memory, address, size, results[("main", b)])
            engine.release(b, stream.cuda_stream)
        _check(results, expected, "two holders of one block, then its slot refilled")
    finally:
        engine.close()
