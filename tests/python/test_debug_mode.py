"""``Config.debug_mode``: the ``tensorstream`` logger logs each acquire (ready or stalled) and
release of a streamed block with its time, and the engine checks its invariants after every
call. Off, nothing is logged and nothing is checked."""

from __future__ import annotations

import logging
import re

import pytest

import tensorstream as ts
from tensorstream.offload import offload

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

LOGGER = logging.getLogger("tensorstream")


@pytest.fixture(autouse=True)
def restore_logger():
    """debug_mode changes the package logger: give it back as it was."""
    handlers, level = list(LOGGER.handlers), LOGGER.level
    yield
    LOGGER.handlers[:] = handlers
    LOGGER.setLevel(level)


def tiny_llama():
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=256,
        max_position_embeddings=64,
    )
    return transformers.LlamaForCausalLM(cfg).eval()


def streamed(tmp_path, *, debug: bool):
    """A tiny model offloaded so that most layers stream (no prefetch: every streamed
    acquire of a block not present waits for its fill)."""
    model = tiny_llama()
    layer = sum(p.numel() * 4 for p in model.model.layers[0].parameters())
    config = ts.Config(
        storage_path=tmp_path,
        vram_budget_gb=(2.5 * layer + 64 * 1024) / 1e9,
        min_layer_size=1 << 12,
        prefetch_strategy="none",
        debug_mode=debug,
    )
    offload(model, config)
    return model


def run_once(model) -> None:
    with torch.no_grad():
        model(torch.randint(0, 256, (1, 6), generator=torch.Generator().manual_seed(1)))


ACQUIRE = re.compile(
    r"^acquire (?P<name>\S+) \(block (?P<index>\d+)\)(?P<resident> \(resident\))?: "
    r"(?:ready in (?P<ready>[\d.]+) ms|stalled (?P<stalled>[\d.]+) ms waiting for its fill)$"
)
RELEASE = re.compile(r"^release (?P<name>\S+) \(block (?P<index>\d+)\): held (?P<held>[\d.]+) ms$")


def test_debug_mode_logs_every_acquire_stall_and_release(tmp_path, caplog) -> None:
    model = streamed(tmp_path, debug=True)
    runtime = model.tensorstream
    assert LOGGER.level == logging.DEBUG
    # A table streamed by rows (the embedding) reads rows, not its unit: no acquire, unless
    # the plan keeps it resident (then its whole view is acquired).
    acquired = [b for b in runtime._blocks if not b.rows or runtime.unit_resident(b.index)]
    names = {b.name for b in acquired}
    caplog.clear()
    with caplog.at_level(logging.DEBUG, logger="tensorstream"):
        run_once(model)
    messages = [r.getMessage() for r in caplog.records if r.name == "tensorstream"]
    acquires = [m for m in map(ACQUIRE.match, messages) if m]
    releases = [m for m in map(RELEASE.match, messages) if m]
    stats = runtime.statistics()
    # One line per acquire and per release the engine saw, naming real blocks.
    assert len(acquires) == stats["acquires"] == len(acquired)
    assert len(releases) == len(acquires)
    assert {m["name"] for m in acquires} == names
    assert {m["name"] for m in releases} == names
    for m in acquires:
        assert runtime._blocks[int(m["index"])].name == m["name"]
    # Stalls are the engine's misses: with no prefetch, streamed blocks wait for their fill.
    stalls = [m for m in acquires if m["stalled"]]
    assert len(stalls) == stats["device_misses"] > 0
    assert all(float(m["stalled"]) > 0 for m in stalls)
    assert stats["layers_offloaded"] > 0


def test_debug_mode_checks_the_engine_after_every_call(tmp_path) -> None:
    model = streamed(tmp_path, debug=True)
    runtime = model.tensorstream
    assert runtime.options["check_invariants"] is True
    run_once(model)
    run_once(model)
    stats = runtime.statistics()
    # Every acquire and every release was followed by a check (the hooks never prefetch).
    assert stats["invariant_checks"] == 2 * stats["acquires"] > 0
    # A restart keeps the checks on.
    runtime.replan(runtime.budget)
    run_once(model)
    assert runtime.statistics()["invariant_checks"] == 2 * runtime.statistics()["acquires"] > 0


def test_without_debug_mode_nothing_is_logged_or_checked(tmp_path, caplog) -> None:
    model = streamed(tmp_path, debug=False)
    runtime = model.tensorstream
    assert "check_invariants" not in runtime.options
    with caplog.at_level(logging.DEBUG, logger="tensorstream"):
        run_once(model)
    messages = [r.getMessage() for r in caplog.records if r.name == "tensorstream"]
    assert not [m for m in messages if ACQUIRE.match(m) or RELEASE.match(m)]
    assert runtime.statistics()["invariant_checks"] == 0


def test_debug_mode_adds_a_stderr_handler_only_when_there_is_none(tmp_path, capfd) -> None:
    LOGGER.handlers[:] = [h for h in LOGGER.handlers if isinstance(h, logging.NullHandler)]
    model = streamed(tmp_path / "a", debug=True)
    own = [h for h in LOGGER.handlers if not isinstance(h, logging.NullHandler)]
    assert len(own) == 1 and isinstance(own[0], logging.StreamHandler)
    capfd.readouterr()
    run_once(model)
    err = capfd.readouterr().err
    assert re.search(r"tensorstream DEBUG: acquire model\.layers\.\d+ \(block \d+\)", err), err
    # An application's own handler is kept, and no second one is added.
    model2 = streamed(tmp_path / "b", debug=True)
    assert [h for h in LOGGER.handlers if not isinstance(h, logging.NullHandler)] == own
    model2.cleanup_tensorstream()
    model.cleanup_tensorstream()
