"""Memory behaviour of offload() on the CPU device: the host copies of streamed weights are
released, and a long run of generate() calls leaks neither memory, file descriptors nor
threads; cleanup_tensorstream() returns the engine's threads and files."""

from __future__ import annotations

import gc
import os
import threading
import time

import pytest

import tensorstream as ts
from tensorstream.config import Config

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

pytestmark = pytest.mark.skipif(
    not os.path.exists("/proc/self/statm"), reason="needs Linux /proc for RSS, fds and threads"
)

MiB = 1 << 20


def rss_bytes() -> int:
    gc.collect()
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def os_threads() -> int:
    return len(os.listdir("/proc/self/task"))


def test_offload_releases_host_copies_of_streamed_weights(tmp_path):
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(
        hidden_size=768,
        intermediate_size=2048,
        num_hidden_layers=7,
        num_attention_heads=12,
        num_key_value_heads=12,
        vocab_size=1000,
        max_position_embeddings=64,
    )
    model = transformers.LlamaForCausalLM(cfg).eval()
    config = Config(storage_path=tmp_path, prefetch_strategy="none", ram_cache_gb=0)
    estimate = ts.estimate_model_memory(model, config)
    assert estimate["streamed_bytes"] > 180 * MiB
    config = config.replace(vram_budget_gb=f"{estimate['minimum_budget']}B")
    before = rss_bytes()
    ts.offload(model, config)
    after = rss_bytes()
    # The engine's own memory (the streaming slots, from torch) is new and legitimately held.
    engine_bytes = sum(t.numel() for t in model.tensorstream._memory._buffers.values())
    released = before - after + engine_bytes
    assert released >= 0.6 * estimate["streamed_bytes"], (
        f"RSS {before / MiB:.0f} -> {after / MiB:.0f} MiB with {engine_bytes / MiB:.0f} MiB of "
        f"slots: only {released / MiB:.0f} of {estimate['streamed_bytes'] / MiB:.0f} MiB "
        "of streamed weights were released"
    )
    assert before - after >= 0.6 * (estimate["streamed_bytes"] - engine_bytes)
    ids = torch.randint(0, 1000, (1, 4), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert model(ids).logits.shape == (1, 4, 1000)
    model.cleanup_tensorstream()


def _settle(measure, target: int, seconds: float = 3.0) -> int:
    """``measure()`` once it equals ``target`` (threads end asynchronously), else its value."""
    deadline = time.monotonic() + seconds
    value = measure()
    while value != target and time.monotonic() < deadline:
        time.sleep(0.02)
        value = measure()
    return value


def test_soak_generate_leaks_nothing_and_cleanup_returns_resources(tmp_path):
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=512,
        max_position_embeddings=128,
    )
    model = transformers.LlamaForCausalLM(cfg).eval()
    ids = torch.randint(0, 512, (1, 5), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = model.generate(ids, max_new_tokens=3, do_sample=False)  # warms torch up
    base_fds, base_threads, base_py_threads = open_fds(), os_threads(), threading.active_count()

    config = Config(
        storage_path=tmp_path,
        min_layer_size=1 << 14,
        prefetch_strategy="adaptive",
        ram_cache_gb=0.001,
    )
    estimate = ts.estimate_model_memory(model, config)
    ts.offload(model, config.replace(vram_budget_gb=f"{estimate['minimum_budget']}B"))
    with torch.no_grad():
        for _ in range(10):  # warm-up: allocator pools, prefetch measurements
            model.generate(ids, max_new_tokens=3, do_sample=False)
    rss, fds, threads = rss_bytes(), open_fds(), os_threads()
    py_threads = threading.active_count()
    with torch.no_grad():
        for _ in range(100):
            out = model.generate(ids, max_new_tokens=3, do_sample=False)
            assert torch.equal(out, expected)
    assert ts.get_model_statistics(model)["layers_offloaded"] >= 4
    assert abs(rss_bytes() - rss) <= 4 * MiB, "RSS grew over 100 generate() calls"
    assert open_fds() == fds, "file descriptors leaked"
    assert os_threads() == threads, "OS threads leaked"
    assert threading.active_count() == py_threads, "Python threads leaked"

    model.cleanup_tensorstream()
    assert _settle(os_threads, base_threads) == base_threads, "engine threads outlive cleanup"
    assert _settle(open_fds, base_fds) == base_fds, "the store stays open after cleanup"
    assert threading.active_count() == base_py_threads
