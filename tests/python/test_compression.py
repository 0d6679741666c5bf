"""Lossless store compression from Python: save_to_ts / load_from_ts round trips, the ratio
on a bf16 Llama built from a transformers config, header and integrity tools, defragment
keeping the compression, conversion, the CLI, and the default open refusing compressed stores
(the engine decodes them)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import assert_bitwise_equal, flip_byte
from engine_helpers import TorchMemory

import tensorstream as ts
from tensorstream import _core

torch = pytest.importorskip("torch")

needs_zstd = pytest.mark.skipif(
    not _core.compression_info()["available"], reason=_core.compression_info()["codec"]
)


def _llama_bf16(layers: int = 2) -> torch.nn.Module:
    transformers = pytest.importorskip("transformers")
    config = transformers.LlamaConfig(
        hidden_size=256,
        intermediate_size=704,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=4,
        vocab_size=2048,
        initializer_range=0.02,  # weights ~ N(0, 0.02), as transformers initialises them
    )
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(config).to(torch.bfloat16).eval()


@needs_zstd
def test_bf16_llama_compresses_at_least_1_35x_and_loads_bitwise(tmp_path: Path) -> None:
    model = _llama_bf16()
    state = model.state_dict()
    plain = ts.save_to_ts(model, tmp_path / "plain.tstore")
    packed = ts.save_to_ts(model, tmp_path / "packed.tstore", compression=3)
    assert packed["fingerprint"] == plain["fingerprint"]
    header = ts.read_ts_header(tmp_path / "packed.tstore")
    c = header["compression"]
    assert header["version"] == "1.1"
    assert c["raw_size"] == sum(b["size"] for b in header["blocks"])
    ratio = c["raw_size"] / c["stored_size"]
    assert ratio >= 1.35, header["compression"]
    assert c["ratio"] == pytest.approx(ratio)
    # Whole file, metadata and alignment included: still far smaller than the raw store.
    assert plain["file_size"] / packed["file_size"] >= 1.3
    assert packed["raw_size"] == plain["raw_size"]
    assert c["level"] == 3
    assert all(b["codec"] == "chunked" for b in header["blocks"] if b["size"] > 1 << 16)

    loaded = ts.load_from_ts(tmp_path / "packed.tstore")
    assert loaded.keys() == state.keys()
    for name, tensor in state.items():
        assert_bitwise_equal(loaded[name], tensor, name)
    report = ts.verify_storage_integrity(tmp_path / "packed.tstore")
    assert report.ok, report.problems


@needs_zstd
@pytest.mark.parametrize(
    "dtype",
    [
        torch.float32,
        torch.float16,
        torch.bfloat16,
        torch.float64,
        torch.int8,
        torch.uint8,
        torch.int32,
        torch.int64,
        torch.bool,
        torch.complex64,
        torch.float8_e4m3fn,
        torch.float8_e5m2,
    ],
)
def test_every_dtype_round_trips_bitwise(tmp_path: Path, dtype: torch.dtype) -> None:
    torch.manual_seed(1)
    base = torch.randn(300_000) * 0.02
    if dtype.is_complex:
        tensor = torch.complex(base, base.flip(0)).to(dtype)
    elif dtype == torch.bool:
        tensor = base > 0.01
    elif dtype.is_floating_point:
        tensor = base.to(dtype)
    else:
        tensor = (base * 300).round().to(dtype)
    state = {
        "layers.0.w": tensor,
        "layers.0.small": tensor[:7].clone(),
        "layers.1.w": torch.zeros_like(tensor),
    }
    for level in (1, 9):
        path = tmp_path / f"{level}.tstore"
        ts.save_to_ts(state, path, compression=level)
        loaded = ts.load_from_ts(path)
        for name, t in state.items():
            assert_bitwise_equal(loaded[name], t, name)


@needs_zstd
def test_header_reports_codecs_chunks_and_mixed_blocks(tmp_path: Path) -> None:
    torch.manual_seed(2)
    state = {
        "layers.0.w": (torch.randn(400_000) * 0.02).to(torch.bfloat16),
        "layers.0.noise": torch.randint(0, 256, (300_000,), dtype=torch.uint8),
        "layers.1.noise": torch.randint(0, 256, (100_000,), dtype=torch.uint8),
    }
    path = tmp_path / "m.tstore"
    ts.save_to_ts(state, path, compression=True)
    header = ts.read_ts_header(path)
    mixed, noise = header["blocks"]
    assert mixed["codec"] == "chunked" and mixed["chunks"] >= 2
    assert mixed["stored_size"] < mixed["size"]
    assert noise["codec"] == "none" and noise["chunks"] == 0
    assert noise["stored_size"] == noise["size"]
    assert header["tensors"]["layers.0.w"]["offset"] is None
    assert header["tensors"]["layers.1.noise"]["offset"] == noise["offset"]
    store = _core.Store(str(path), decode_compressed=True)
    chunks = _core.block_chunks(store, 0)
    assert {c["codec"] for c in chunks} == {"raw", "planes+zstd"}
    assert all(c["raw_size"] <= _core.compression_info()["chunk_size"] for c in chunks)
    # One tensor alone, through only its chunks.
    index = store.find_tensor("layers.0.w")
    out = torch.empty(800_000, dtype=torch.uint8)
    _core.read_tensor_into(store, index, out.data_ptr(), out.numel(), True)
    assert torch.equal(out.view(torch.bfloat16), state["layers.0.w"])


@needs_zstd
def test_damaged_chunk_is_reported_by_name(tmp_path: Path) -> None:
    torch.manual_seed(3)
    state = {f"layers.{i}.w": (torch.randn(600_000) * 0.02).to(torch.float16) for i in range(2)}
    path = tmp_path / "m.tstore"
    ts.save_to_ts(state, path, compression=2)
    store = _core.Store(str(path), decode_compressed=True)
    block = store.blocks[1]
    chunk = _core.block_chunks(store, 1)[1]
    assert chunk["codec"] == "planes+zstd"
    del store
    flip_byte(path, block["offset"] + chunk["stored_offset"] + chunk["stored_size"] // 2)
    report = ts.verify_storage_integrity(path)
    assert not report.ok
    assert len(report.problems) == 1
    assert "block 1 'layers.1'" in report.problems[0]
    assert "chunk 1" in report.problems[0]
    with pytest.raises(_core.ChecksumError, match=r"layers\.1.*chunk 1"):
        ts.load_from_ts(path)


@needs_zstd
def test_defragment_keeps_compression_and_level(tmp_path: Path) -> None:
    model = _llama_bf16(layers=1)
    path = tmp_path / "m.tstore"
    ts.save_to_ts(model, path, compression=2)
    before = ts.read_ts_header(path)
    result = ts.defragment_storage(path)
    after = ts.read_ts_header(path)
    assert after["fingerprint"] == before["fingerprint"]
    assert after["compression"]["level"] == 2
    assert after["compression"]["stored_size"] == before["compression"]["stored_size"]
    assert result["bytes_after"] == path.stat().st_size
    loaded = ts.load_from_ts(path)
    for name, tensor in model.state_dict().items():
        assert_bitwise_equal(loaded[name], tensor, name)


def test_compression_argument_is_validated(tmp_path: Path) -> None:
    t = {"w": torch.zeros(10)}
    with pytest.raises(ValueError, match="compression level 10"):
        ts.save_to_ts(t, tmp_path / "a.tstore", compression=10)
    with pytest.raises(TypeError, match="compression must be"):
        ts.save_to_ts(t, tmp_path / "a.tstore", compression="fast")
    with pytest.raises(ValueError, match="compression level -1"):
        ts.save_to_ts(t, tmp_path / "a.tstore", compression=-1)
    assert not (tmp_path / "a.tstore").exists()
    # None, False and 0 mean no compression: a 1.0 store.
    for off in (None, False, 0):
        ts.save_to_ts(t, tmp_path / "b.tstore", compression=off)
        assert ts.read_ts_header(tmp_path / "b.tstore")["version"] == "1.0"


@pytest.mark.skipif(_core.compression_info()["available"], reason="this build has zstd")
def test_without_zstd_compression_is_refused(tmp_path: Path) -> None:
    with pytest.raises(_core.TensorStreamError, match="compiled without zstd"):
        ts.save_to_ts({"w": torch.zeros(10)}, tmp_path / "a.tstore", compression=3)
    assert not (tmp_path / "a.tstore").exists()


@needs_zstd
def test_default_open_refuses_a_compressed_store_the_engine_decodes_it(
    tmp_path: Path,
) -> None:
    torch.manual_seed(4)
    state = {
        "embed.weight": torch.randint(0, 256, (100_000,), dtype=torch.uint8),  # stays raw
        "layers.0.w": (torch.randn(100_000) * 0.02).to(torch.bfloat16),
        "layers.1.w": (torch.randn(100_000) * 0.02).to(torch.bfloat16),
    }
    path = tmp_path / "m.tstore"
    ts.save_to_ts(state, path, compression=1)
    with pytest.raises(_core.FormatError, match=r"m\.tstore.*block 'layers\.0'.*compressed"):
        _core.Store(str(path))  # opened for raw reading
    # The engine streams it, decoding: the same bytes as the uncompressed store.
    ts.save_to_ts(state, tmp_path / "plain.tstore")
    memory = TorchMemory()
    options = {"device": "cpu", "device_budget": 64 << 20, "backend": "pread"}
    engines = [
        _core.Engine(str(p), options, memory.allocate, memory.release)
        for p in (tmp_path / "plain.tstore", path)
    ]
    for block in range(3):
        views = []
        for engine in engines:
            address, size, _ = engine.acquire(block)
            views.append(memory.view(address, size).clone())
            engine.release(block)
        assert torch.equal(views[0], views[1]), block
    stats = engines[1].stats()
    assert stats["compressed_units"] == 2
    assert stats["bytes_decoded"] > stats["bytes_read_compressed"] > 0
    assert engines[0].stats()["compressed_units"] == 0
    for engine in engines:
        engine.close()


@needs_zstd
def test_convert_checkpoint_and_the_cli_compress(tmp_path: Path, run_cli) -> None:
    model = _llama_bf16(layers=1)
    checkpoint = tmp_path / "hf"
    model.save_pretrained(checkpoint)
    summary = ts.convert_checkpoint(checkpoint, tmp_path / "a.tstore", compression=1)
    plain = ts.convert_checkpoint(checkpoint, tmp_path / "b.tstore")
    assert summary["fingerprint"] == plain["fingerprint"]
    assert plain["file_size"] / summary["file_size"] >= 1.3

    r = run_cli("convert", "--compress=4", checkpoint, tmp_path / "c.tstore")
    assert r.returncode == 0, r.stderr
    assert "level 4" in r.stdout and "x smaller than" in r.stdout
    r = run_cli("inspect", "--json", tmp_path / "c.tstore")
    assert r.returncode == 0, r.stderr
    info = json.loads(r.stdout)
    assert info["version"] == "1.1"
    assert info["ratio"] >= 1.3
    assert info["compressed_blocks"] >= 1
    layer = next(b for b in info["blocks"] if b["name"] == "model.layers.0")
    assert layer["codec"] == "chunked" and layer["level"] == 4
    assert layer["ratio"] == pytest.approx(layer["size"] / layer["stored_size"], rel=1e-4)
    r = run_cli("inspect", tmp_path / "c.tstore")
    assert "compression  " in r.stdout and "chunks" in r.stdout
    r = run_cli("verify", tmp_path / "c.tstore")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "stored and decoded checksums" in r.stdout
    r = run_cli("convert", "--compress=12", checkpoint, tmp_path / "d.tstore")
    assert r.returncode == 2
    assert "--compress" in r.stderr
