"""Streaming compressed stores from Python: ``offload()`` and ``from_pretrained()`` with
``Config(compression_enabled=True, compression_level=N)`` on real transformers Llamas built
from configs (no downloads), on the CPU. Bitwise the logits and greedy tokens of the
uncompressed path, the ratio of a bf16 store, the store's name and reuse, the engine's
statistics of what it decoded, and the refusals of bad levels."""

from __future__ import annotations

from pathlib import Path

import pytest

import tensorstream as ts
from tensorstream import _core

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

needs_zstd = pytest.mark.skipif(
    not _core.compression_info()["available"], reason=_core.compression_info()["codec"]
)


def llama(
    dtype: torch.dtype = torch.float32, seed: int = 0, layers: int = 4, hidden: int = 128
) -> torch.nn.Module:
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(
        hidden_size=hidden,
        intermediate_size=hidden * 11 // 4,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=512,
        max_position_embeddings=128,
        initializer_range=0.02,
    )
    return transformers.LlamaForCausalLM(cfg).to(dtype).eval()


def layer_bytes(model: torch.nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in model.model.layers[0].parameters())


def config_for(model: torch.nn.Module, storage: Path, **kwargs) -> ts.Config:
    # Room for two and a half layers: the layers stream.
    budget = 2.5 * layer_bytes(model) + 64 * 1024
    return ts.Config(
        storage_path=storage,
        vram_budget_gb=budget / 1e9,
        min_layer_size=1 << 30,  # only the decoder layers stream
        device="cpu",
        **kwargs,
    )


def run(model: torch.nn.Module, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    with torch.no_grad():
        logits = model(ids).logits.clone()
        tokens = model.generate(ids, max_new_tokens=8, do_sample=False)
    return logits, tokens


@needs_zstd
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
@pytest.mark.parametrize("backend", ["auto", "pread"])
def test_offload_compressed_equals_uncompressed_bitwise(
    tmp_path: Path, dtype: torch.dtype, backend: str
) -> None:
    ids = torch.randint(0, 512, (2, 12), generator=torch.Generator().manual_seed(1))
    plain = llama(dtype)
    ts.offload(plain, config_for(plain, tmp_path / "plain", backend=backend))
    want_logits, want_tokens = run(plain, ids)
    plain_stats = ts.get_model_statistics(plain)
    plain.cleanup_tensorstream()

    model = llama(dtype)
    config = config_for(
        model, tmp_path / "packed", backend=backend, compression_enabled=True, compression_level=2
    )
    ts.offload(model, config)
    logits, tokens = run(model, ids)
    assert torch.equal(logits, want_logits), "logits differ bitwise"
    assert torch.equal(tokens, want_tokens), "greedy tokens differ"
    stats = ts.get_model_statistics(model)
    assert Path(stats["store"]).name.endswith(".z2.tstore")
    # The layers stream (as whole blocks or, at this budget, module by module); every unit
    # comes from a compressed block.
    assert stats["layers_offloaded"] >= 4
    assert stats["compressed_units"] == stats["units"]
    if backend == "pread":  # O_DIRECT: each fill reads the chunks and decodes them
        assert stats["bytes_decoded"] > stats["bytes_read_compressed"] > 0
        assert stats["decode_seconds"] > 0
        assert stats["decoded_copy_bytes"] == 0
        assert "hold compressed chunks" in stats["decode_note"], stats["decode_note"]
        assert not stats["in_place"]  # compressed units are decoded into their buffers
    else:  # the store fits in the page cache: decoded once, then read in place
        # Every block a unit reads (the layers; the rest stays resident), aligned per unit.
        header = ts.read_ts_header(stats["store"])
        raw = sum(b["size"] for b in header["blocks"] if b["name"] != "(rest)")
        assert raw <= stats["decoded_copy_bytes"] < raw + stats["units"] * 4096
        assert stats["bytes_decoded"] == 0
        assert "decoded copy" in stats["decode_note"], stats["decode_note"]
        assert stats["in_place"]
    assert stats["failures"] == 0
    assert plain_stats["compressed_units"] == 0 and plain_stats["decode_note"] == ""
    model.cleanup_tensorstream()


@needs_zstd
def test_bf16_store_written_by_offload_is_at_least_1_35x_smaller(tmp_path: Path) -> None:
    # Matrices of 0.5-1.4 MiB, as a layer's are (a tensor's last chunk and each frame's
    # tables weigh on the ratio of small tensors).
    model = llama(torch.bfloat16, layers=2, hidden=512)
    ts.offload(model, config_for(model, tmp_path, compression_enabled=True, compression_level=3))
    packed = Path(ts.get_model_statistics(model)["store"])
    model.cleanup_tensorstream()
    plain_model = llama(torch.bfloat16, layers=2, hidden=512)
    ts.offload(plain_model, config_for(plain_model, tmp_path))
    plain = Path(ts.get_model_statistics(plain_model)["store"])
    plain_model.cleanup_tensorstream()
    assert packed.parent == plain.parent and packed != plain
    assert packed.name == plain.name.replace(".tstore", ".z3.tstore")
    header = ts.read_ts_header(packed)
    c = header["compression"]
    assert c["level"] == 3
    assert c["raw_size"] / c["stored_size"] >= 1.35, c
    assert plain.stat().st_size / packed.stat().st_size >= 1.35
    assert ts.read_ts_header(plain)["fingerprint"] == header["fingerprint"]
    assert ts.verify_storage_integrity(packed).ok


@needs_zstd
def test_compressed_store_is_reused_and_levels_get_their_own(tmp_path: Path) -> None:
    model = llama()
    config = config_for(model, tmp_path, compression_enabled=True, compression_level=1)
    ts.offload(model, config)
    store = Path(ts.get_model_statistics(model)["store"])
    model.cleanup_tensorstream()
    mtime = store.stat().st_mtime_ns
    again = llama()
    ts.offload(again, config)
    assert Path(ts.get_model_statistics(again)["store"]) == store
    assert store.stat().st_mtime_ns == mtime, "the same weights were written again"
    again.cleanup_tensorstream()
    other = llama()
    ts.offload(other, config_for(other, tmp_path, compression_enabled=True, compression_level=4))
    assert Path(ts.get_model_statistics(other)["store"]).name.endswith(".z4.tstore")
    other.cleanup_tensorstream()
    assert len(list(tmp_path.glob("*.tstore"))) == 2


@needs_zstd
def test_from_pretrained_with_compression_streams_a_compressed_store(tmp_path: Path) -> None:
    model = llama(torch.bfloat16)
    checkpoint = tmp_path / "hf"
    model.save_pretrained(checkpoint)
    ids = torch.randint(0, 512, (1, 10), generator=torch.Generator().manual_seed(2))
    # Without compression the checkpoint streams in place, no store written beside it.
    plain = ts.from_pretrained(checkpoint, config_for(model, tmp_path / "plain"))
    want_logits, want_tokens = run(plain, ids)
    assert plain.tensorstream.statistics()["compressed_units"] == 0
    plain.cleanup_tensorstream()
    assert not list((tmp_path / "plain").glob("*.tstore"))

    config = config_for(model, tmp_path / "ts", compression_enabled=True, compression_level=1)
    streamed = ts.from_pretrained(checkpoint, config)
    logits, tokens = run(streamed, ids)
    assert torch.equal(logits, want_logits), "logits differ bitwise"
    assert torch.equal(tokens, want_tokens), "greedy tokens differ"
    stats = ts.get_model_statistics(streamed)
    store = Path(stats["store"])
    assert store.parent == tmp_path / "ts" and store.name.startswith("pretrained-")
    assert ts.read_ts_header(store)["compression"]["level"] == 1
    assert stats["compressed_units"] == stats["units"] > 0  # every unit, streamed or resident
    assert stats["decoded_copy_bytes"] > 0  # backend AUTO on the CPU, the store fits in RAM
    streamed.cleanup_tensorstream()
    # Reused by the next load with the same settings.
    again = ts.from_pretrained(checkpoint, config)
    assert Path(ts.get_model_statistics(again)["store"]) == store
    again.cleanup_tensorstream()
    assert len(list((tmp_path / "ts").glob("*.tstore"))) == 1


@pytest.mark.parametrize(
    "level,error,message",
    [
        (0, ValueError, r"compression_level: 0 is out of range; expected an int from 1 to 9"),
        (10, ValueError, r"compression_level: 10 is out of range; expected an int from 1 to 9"),
        (True, TypeError, r"compression_level: expected an int from 1 to 9; got bool True"),
        ("3", TypeError, r"compression_level: expected an int from 1 to 9; got str '3'"),
    ],
)
def test_bad_levels_are_refused_with_a_clear_error(
    tmp_path: Path, level: object, error: type, message: str
) -> None:
    with pytest.raises(error, match=message):
        ts.Config(storage_path=tmp_path, compression_enabled=True, compression_level=level)
    config = ts.Config(storage_path=tmp_path, compression_enabled=True)
    with pytest.raises(error, match=message):
        config.compression_level = level
    assert config.compression_level == 3  # unchanged, the table's default
    assert not list(tmp_path.glob("*.tstore"))


@pytest.mark.skipif(_core.compression_info()["available"], reason="this build has zstd")
def test_without_zstd_offload_refuses_compression_before_writing(tmp_path: Path) -> None:
    model = llama()
    with pytest.raises(_core.TensorStreamError, match="compiled without zstd"):
        ts.offload(model, config_for(model, tmp_path, compression_enabled=True))
    assert not list(tmp_path.glob("*.tstore")), "nothing was written"
