"""_core.SafetensorsCheckpoint: the C++ checkpoint reader as Python sees it (the reader
from_pretrained uses for shard discovery, names, dtypes and tensor bytes)."""

from __future__ import annotations

import json
import os
import struct
import threading

import pytest

import tensorstream as ts
from tensorstream import _core

torch = pytest.importorskip("torch")
st_torch = pytest.importorskip("safetensors.torch")


def _state(seed: int = 0) -> dict[str, torch.Tensor]:
    torch.manual_seed(seed)
    return {
        "model.layers.0.w": torch.randn(7, 13),
        "model.layers.0.b": torch.randn(7).to(torch.bfloat16),
        "model.layers.1.table": torch.randint(-(2**40), 2**40, (5, 3), dtype=torch.int64),
        "model.layers.1.mask": torch.rand(11) > 0.5,
        "model.half": torch.randn(3, 5).to(torch.float16),
        "model.scalar": torch.tensor(3.5),
        "model.empty": torch.zeros(0, 4),
    }


def _sharded(tmp_path, state):
    """Writes ``state`` as three shards plus an index; returns {name: shard file name}."""
    names = sorted(state)
    shard_of = {}
    for i in range(3):
        shard = f"model-{i + 1:05d}-of-00003.safetensors"
        part = {n: state[n] for n in names[i::3]}
        st_torch.save_file(part, tmp_path / shard)
        shard_of.update(dict.fromkeys(part, shard))
    index = {"metadata": {"total_size": 0}, "weight_map": shard_of}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    return shard_of


def _header(path) -> tuple[int, dict]:
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        return n, json.loads(f.read(n))


def _read(reader, name: str) -> torch.Tensor:
    entry = reader.find(name)
    out = torch.empty(entry["shape"], dtype=getattr(torch, entry["dtype"]))
    reader.read_into(name, out.data_ptr(), entry["nbytes"])
    return out


@pytest.mark.parametrize("open_with", ["directory", "index"])
def test_sharded_checkpoint_entries_and_bytes(tmp_path, open_with):
    state = _state()
    shard_of = _sharded(tmp_path, state)
    path = tmp_path if open_with == "directory" else tmp_path / "model.safetensors.index.json"
    reader = _core.SafetensorsCheckpoint(str(path))

    files = [os.path.basename(f) for f in reader.files]
    assert files == sorted(set(shard_of.values()))
    assert len(reader) == len(state)
    assert reader.total_bytes == sum(t.numel() * t.element_size() for t in state.values())
    # Entries in file order, then offset order; offsets absolute, as the header says.
    order = [(e["file"], e["offset"]) for e in reader.entries]
    assert order == sorted(order)
    for entry in reader.entries:
        name = entry["name"]
        tensor = state[name]
        assert files[entry["file"]] == shard_of[name]
        assert entry["dtype"] == str(tensor.dtype).removeprefix("torch.")
        assert entry["shape"] == list(tensor.shape)
        assert entry["nbytes"] == tensor.numel() * tensor.element_size()
        n, header = _header(reader.files[entry["file"]])
        assert entry["offset"] == 8 + n + header[name]["data_offsets"][0]
        assert reader.find(name) == entry
        assert name in reader
        got = _read(reader, name)
        assert got.dtype == tensor.dtype and got.shape == tensor.shape
        assert torch.equal(
            got.reshape(-1).view(torch.uint8), tensor.contiguous().reshape(-1).view(torch.uint8)
        ), name
    assert reader.find("model.nope") is None
    assert "model.nope" not in reader


def test_read_into_checks_its_arguments(tmp_path):
    st_torch.save_file({"x": torch.arange(6, dtype=torch.float32)}, tmp_path / "one.safetensors")
    reader = _core.SafetensorsCheckpoint(str(tmp_path / "one.safetensors"))
    out = torch.empty(6)
    with pytest.raises(ValueError, match="'x'.*holds 20 bytes but the tensor has 24"):
        reader.read_into("x", out.data_ptr(), 20)
    with pytest.raises(ValueError, match="no tensor 'y'"):
        reader.read_into("y", out.data_ptr(), 24)
    with pytest.raises(ValueError, match="null pointer"):
        reader.read_into("x", 0, 24)
    reader.read_into("x", out.data_ptr(), 24)
    assert torch.equal(out, torch.arange(6, dtype=torch.float32))


def test_reads_from_several_threads(tmp_path):
    torch.manual_seed(3)
    state = {f"layers.{i}.w": torch.randn(256, 64) for i in range(16)}
    st_torch.save_file(state, tmp_path / "model.safetensors")
    reader = _core.SafetensorsCheckpoint(str(tmp_path))
    errors: list[BaseException] = []

    def work(names):
        try:
            for _ in range(20):
                for name in names:
                    assert torch.equal(_read(reader, name), state[name]), name
        except BaseException as e:  # noqa: BLE001 - reported by the main thread
            errors.append(e)

    names = sorted(state)
    threads = [threading.Thread(target=work, args=(names[i::4],)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors


def test_bad_checkpoints_name_the_file(tmp_path):
    state = _state()
    _sharded(tmp_path, state)
    shard = tmp_path / "model-00002-of-00003.safetensors"
    good = shard.read_bytes()

    # A corrupt header: the JSON no longer parses.
    n = struct.unpack("<Q", good[:8])[0]
    shard.write_bytes(good[:8] + b"{" + b"x" * (n - 1) + good[8 + n :])
    with pytest.raises(ts.FormatError, match=f"{shard}: .*JSON"):
        _core.SafetensorsCheckpoint(str(tmp_path))

    # A tensor whose bytes run past the end of the file.
    shard.write_bytes(good[:-4])
    with pytest.raises(ts.FormatError, match=f"{shard}: file truncated: tensor '.*' ends at"):
        _core.SafetensorsCheckpoint(str(tmp_path))

    # A shard listed in the index that is not there.
    shard.unlink()
    with pytest.raises(ts.StoreIOError) as info:
        _core.SafetensorsCheckpoint(str(tmp_path))
    assert info.value.errno == 2
    message = str(info.value)
    assert "model.safetensors.index.json: shard 'model-00002-of-00003.safetensors'" in message
    assert str(shard) in message
