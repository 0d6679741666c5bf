"""save_to_ts / load_from_ts / read_ts_header round trips, bit for bit."""

from __future__ import annotations

import os

import pytest
import torch

import tensorstream as ts
from tensorstream import _core
from tensorstream._dtypes import NAME_TO_TORCH, STORE_DTYPE_NAMES, supported_dtypes

SHAPES = {
    "scalar": (),
    "empty": (0,),
    "empty_3d": (3, 0, 5),
    "one": (1,),
    "odd": (13,),
    "odd_257": (257,),
    "four_d": (2, 3, 5, 7),
}


def random_tensor(dtype: torch.dtype, shape: tuple[int, ...], seed: int = 0) -> torch.Tensor:
    """Random contents covering every bit pattern (NaNs included) of ``dtype``."""
    gen = torch.Generator().manual_seed(seed)
    if dtype == torch.bool:
        return torch.randint(0, 2, shape, generator=gen).to(torch.bool)
    itemsize = torch.empty((), dtype=dtype).element_size()
    numel = 1
    for d in shape:
        numel *= d
    raw = torch.randint(0, 256, (numel * itemsize,), dtype=torch.uint8, generator=gen)
    return raw.view(dtype).reshape(shape)


def test_engine_knows_every_torch_dtype() -> None:
    engine = set(_core.dtype_names())
    assert set(STORE_DTYPE_NAMES) == engine
    for name, dtype in NAME_TO_TORCH.items():
        assert _core.dtype_size(name) == torch.empty((), dtype=dtype).element_size()


@pytest.mark.parametrize("dtype", supported_dtypes(), ids=lambda d: str(d).split(".")[-1])
def test_roundtrip_every_dtype_and_shape(tmp_path, dtype, bitwise_equal) -> None:
    tensors = {
        f"{label}.{i}": random_tensor(dtype, shape, seed=i)
        for i, (label, shape) in enumerate(SHAPES.items())
    }
    summary = ts.save_to_ts(tensors, tmp_path / "x.tstore")
    assert summary["tensors"] == len(tensors)
    loaded = ts.load_from_ts(tmp_path / "x.tstore")
    assert set(loaded) == set(tensors)
    for name, expected in tensors.items():
        bitwise_equal(loaded[name], expected, name)


def test_mixed_dtypes_in_one_block(tmp_path, bitwise_equal) -> None:
    tensors = {
        f"model.layers.0.{str(dtype).split('.')[-1]}": random_tensor(dtype, (3, 5), seed=i)
        for i, dtype in enumerate(supported_dtypes())
    }
    ts.save_to_ts(tensors, tmp_path / "mixed.tstore")
    header = ts.read_ts_header(tmp_path / "mixed.tstore")
    assert [b["name"] for b in header["blocks"]] == ["model.layers.0"]
    loaded = ts.load_from_ts(tmp_path / "mixed.tstore")
    for name, expected in tensors.items():
        bitwise_equal(loaded[name], expected, name)
        assert header["tensors"][name]["dtype"] == str(expected.dtype).split(".")[-1]


def test_non_contiguous_inputs(tmp_path, bitwise_equal) -> None:
    base = torch.randn(6, 8)
    tensors = {
        "transposed": base.t(),
        "strided": base[::2, 1::3],
        "expanded": torch.randn(1, 5).expand(4, 5),
        "narrowed": base.narrow(1, 3, 4),
        "conj": torch.randn(4, 3, dtype=torch.complex64).conj(),
        "requires_grad": torch.randn(3, requires_grad=True),
        "parameter": torch.nn.Parameter(torch.randn(2, 2)),
    }
    ts.save_to_ts(tensors, tmp_path / "nc.tstore")
    loaded = ts.load_from_ts(tmp_path / "nc.tstore")
    for name, expected in tensors.items():
        # Values (with conj resolved), not the memory layout, are what a store keeps.
        bitwise_equal(loaded[name], expected.detach().resolve_conj().contiguous(), name)
        assert loaded[name].is_contiguous()
        assert not loaded[name].requires_grad


def _encoder() -> torch.nn.Module:
    torch.manual_seed(0)
    layer = torch.nn.TransformerEncoderLayer(d_model=32, nhead=4, dim_feedforward=64)
    return torch.nn.TransformerEncoder(layer, num_layers=3, enable_nested_tensor=False)


@pytest.mark.parametrize("as_module", [False, True], ids=["state_dict", "module"])
def test_module_state_dict(tmp_path, as_module, bitwise_equal) -> None:
    model = _encoder()
    state = model.state_dict()
    summary = ts.save_to_ts(model if as_module else state, tmp_path)
    assert summary["path"] == str(tmp_path / "model.tstore")
    assert summary["tensors"] == len(state)
    header = ts.read_ts_header(tmp_path)
    blocks = [b["name"] for b in header["blocks"]]
    assert blocks == ["layers.0", "layers.1", "layers.2"]
    loaded = ts.load_from_ts(tmp_path)
    assert set(loaded) == set(state)
    for name, expected in state.items():
        bitwise_equal(loaded[name], expected, name)
    # A model built from the loaded weights computes exactly the same thing.
    clone = _encoder()
    for p in clone.parameters():
        torch.nn.init.zeros_(p)
    clone.load_state_dict(loaded)
    x = torch.randn(5, 2, 32)
    model.eval()
    clone.eval()
    assert torch.equal(model(x), clone(x))


def test_alignment(tmp_path) -> None:
    tensors = {
        f"blk.{b}.t{i}": torch.randn(n)
        for b in range(3)
        for i, n in enumerate((1, 7, 65, 300, 0, 1025))
    }
    tensors["scalar"] = torch.tensor(1, dtype=torch.int8)
    ts.save_to_ts(tensors, tmp_path / "a.tstore")
    header = ts.read_ts_header(tmp_path / "a.tstore")
    assert header["block_alignment"] == 4096
    assert header["tensor_alignment"] == 256
    assert len(header["blocks"]) == 4
    for block in header["blocks"]:
        assert block["offset"] % 4096 == 0, block
    for name, info in header["tensors"].items():
        assert info["offset"] % 256 == 0, name
        block = header["blocks"][info["block_index"]]
        assert info["block"] == block["name"]
        assert info["offset"] == block["offset"] + info["offset_in_block"]
        assert info["offset_in_block"] + info["nbytes"] <= block["size"]
        assert name in block["tensors"]
    # Tensors lie where the header says: read them back from the raw file.
    raw = (tmp_path / "a.tstore").read_bytes()
    assert len(raw) == header["file_size"]
    for name, expected in tensors.items():
        info = header["tensors"][name]
        chunk = raw[info["offset"] : info["offset"] + info["nbytes"]]
        assert chunk == expected.numpy().tobytes(), name


def test_single_tensor(tmp_path, bitwise_equal) -> None:
    t = torch.arange(10, dtype=torch.float64).reshape(2, 5)
    summary = ts.save_to_ts(t, tmp_path / "one.tstore")
    assert summary["tensors"] == 1 and summary["blocks"] == 1
    loaded = ts.load_from_ts(tmp_path / "one.tstore")
    assert list(loaded) == ["tensor"]
    bitwise_equal(loaded["tensor"], t)


def test_loaded_tensors_outlive_the_file(tmp_path, bitwise_equal) -> None:
    tensors = {"a.0.w": torch.randn(64, 64), "a.0.b": torch.randn(64), "c": torch.randn(3)}
    path = tmp_path / "gone.tstore"
    ts.save_to_ts(tensors, path)
    loaded = ts.load_from_ts(path, device="cpu")
    os.remove(path)
    assert not path.exists()
    for name, expected in tensors.items():
        bitwise_equal(loaded[name].clone(), expected, name)
    loaded["c"].add_(1)  # writable, and independent of any other load
    assert torch.equal(loaded["c"], tensors["c"] + 1)


def test_tensors_view_one_buffer_per_block(tmp_path) -> None:
    tensors = {"m.0.a": torch.randn(10), "m.0.b": torch.randn(20), "m.1.a": torch.randn(5)}
    ts.save_to_ts(tensors, tmp_path / "v.tstore")
    loaded = ts.load_from_ts(tmp_path / "v.tstore")

    def storage(t: torch.Tensor) -> int:
        return t.untyped_storage().data_ptr()

    assert storage(loaded["m.0.a"]) == storage(loaded["m.0.b"])
    assert storage(loaded["m.0.a"]) != storage(loaded["m.1.a"])


def test_store_order_and_header(tmp_path) -> None:
    names = ["model.layers.10.w", "model.layers.2.w", "model.embed.weight", "model.layers.2.b"]
    ts.save_to_ts({n: torch.zeros(2) for n in names}, tmp_path / "o.tstore", metadata={"k": [1]})
    header = ts.read_ts_header(tmp_path / "o.tstore")
    assert [b["name"] for b in header["blocks"]] == [
        "model.embed",
        "model.layers.2",
        "model.layers.10",
    ]
    assert list(ts.load_from_ts(tmp_path / "o.tstore")) == list(header["tensors"])
    assert header["version"] == "1.0"
    assert header["metadata"]["format"] == "tensorstream"
    assert header["metadata"]["metadata"] == {"k": [1]}
    assert header["path"] == str(tmp_path / "o.tstore")


def test_fingerprint_depends_on_content_only(tmp_path) -> None:
    tensors = {"x.0.a": torch.randn(4, 4), "y": torch.arange(3)}
    first = ts.save_to_ts(tensors, tmp_path / "1.tstore")
    second = ts.save_to_ts(dict(reversed(list(tensors.items()))), tmp_path / "2.tstore")
    assert first["fingerprint"] == second["fingerprint"]
    assert ts.read_ts_header(tmp_path / "1.tstore")["fingerprint"] == first["fingerprint"]
    # Recomputed from the tensors in memory, without a store.
    entries = [
        (n, str(t.dtype).split(".")[-1], list(t.shape), _core.checksum64(t.numpy().tobytes()))
        for n, t in tensors.items()
    ]
    assert _core.fingerprint(entries) == first["fingerprint"]
    tensors["y"] = torch.arange(3) + 1
    assert ts.save_to_ts(tensors, tmp_path / "3.tstore")["fingerprint"] != first["fingerprint"]


def test_overwrite_replaces_store(tmp_path, bitwise_equal) -> None:
    path = tmp_path / "w.tstore"
    ts.save_to_ts({"a": torch.ones(3)}, path)
    ts.save_to_ts({"b": torch.zeros(2, dtype=torch.int32)}, path)
    loaded = ts.load_from_ts(path)
    assert list(loaded) == ["b"]
    bitwise_equal(loaded["b"], torch.zeros(2, dtype=torch.int32))
    assert sorted(os.listdir(tmp_path)) == ["w.tstore"]


def test_load_without_verify_and_empty_store(tmp_path) -> None:
    ts.save_to_ts({}, tmp_path / "empty.tstore")
    assert ts.load_from_ts(tmp_path / "empty.tstore") == {}
    assert ts.verify_storage_integrity(tmp_path / "empty.tstore").ok
    ts.save_to_ts({"a": torch.ones(5)}, tmp_path / "a.tstore")
    assert torch.equal(ts.load_from_ts(tmp_path / "a.tstore", verify=False)["a"], torch.ones(5))


def test_verify_report_of_intact_store(tmp_path) -> None:
    tensors = {"l.0.w": torch.randn(100), "l.1.w": torch.randn(100)}
    ts.save_to_ts(tensors, tmp_path / "ok.tstore")
    report = ts.verify_storage_integrity(tmp_path / "ok.tstore")
    assert report and report.ok
    assert report.blocks_checked == 2
    assert report.bytes_checked >= 800
    assert report.problems == []


def test_core_store_object(tmp_path) -> None:
    ts.save_to_ts({"l.0.w": torch.randn(10), "l.1.w": torch.randn(3)}, tmp_path / "s.tstore")
    store = _core.Store(str(tmp_path / "s.tstore"))
    assert store.find_block("l.1") == 1
    assert store.find_tensor("l.0.w") == 0
    assert store.find_block("nope") is None
    assert store.max_block_size == 40
    assert [t["name"] for t in store.block_tensors(1)] == ["l.1.w"]
    assert "2 blocks" in repr(store)
    buf = torch.empty(40, dtype=torch.uint8)
    store.read_block_into(0, buf.data_ptr(), 40, True)
    with pytest.raises(ValueError, match="40 bytes"):
        store.read_block_into(0, buf.data_ptr(), 39, True)
    with pytest.raises(IndexError):
        store.read_block_into(5, buf.data_ptr(), 40, True)


def test_store_writer_context_manager(tmp_path, bitwise_equal) -> None:
    from tensorstream._store import store_writer

    big = torch.randn(1000)
    with store_writer(tmp_path, durable=False) as writer:
        writer.begin_block("big")
        # A tensor streamed in pieces.
        writer.begin_tensor("big.w", "float32", [1000])
        writer.append(big.data_ptr(), 1600)
        writer.append(big.data_ptr() + 1600, 2400)
        writer.end_tensor()
        writer.end_block()
        summary = writer.commit()
    assert summary["tensor_count"] == 1
    bitwise_equal(ts.load_from_ts(tmp_path)["big.w"], big)

    with pytest.raises(KeyError):
        with store_writer(tmp_path / "other.tstore") as writer:
            writer.begin_block("b")
            raise KeyError("stop")
    with store_writer(tmp_path / "uncommitted.tstore") as writer:
        writer.begin_block("b")
        writer.end_block()
    assert sorted(os.listdir(tmp_path)) == ["model.tstore"]
