"""Every failure reaches the caller as a precise exception naming the file, block or key."""

from __future__ import annotations

import errno
import os
import re

import pytest
import torch

import tensorstream as ts
from tensorstream import _core


def layered_store(path):
    tensors = {f"model.layers.{i}.w": torch.randn(256) for i in range(3)}
    tensors["model.embed.weight"] = torch.randn(64, 8)
    ts.save_to_ts(tensors, path)
    return tensors


# ---- exception classes ---------------------------------------------------------------------


def test_exception_hierarchy() -> None:
    assert issubclass(ts.TensorStreamError, RuntimeError)
    assert issubclass(ts.FormatError, ts.TensorStreamError)
    assert issubclass(ts.ChecksumError, ts.FormatError)
    assert issubclass(ts.StoreIOError, ts.TensorStreamError)
    assert issubclass(ts.CudaError, ts.TensorStreamError)
    assert issubclass(ts.OperationCancelled, ts.TensorStreamError)
    assert ts.ChecksumError.__module__ == "tensorstream"
    assert ts.ChecksumError is _core.ChecksumError


# ---- writing -------------------------------------------------------------------------------


def test_nonexistent_directory(tmp_path) -> None:
    target = tmp_path / "missing" / "x.tstore"
    with pytest.raises(FileNotFoundError, match="missing"):
        ts.save_to_ts({"a": torch.ones(1)}, target)
    assert not (tmp_path / "missing").exists()


def test_parent_is_a_file(tmp_path) -> None:
    (tmp_path / "file").write_text("x")
    with pytest.raises(NotADirectoryError, match="file"):
        ts.save_to_ts({"a": torch.ones(1)}, tmp_path / "file" / "x.tstore")


def test_unwritable_directory(tmp_path) -> None:
    if os.geteuid() != 0:
        locked = tmp_path / "locked"
        locked.mkdir()
        locked.chmod(0o500)
        try:
            with pytest.raises(ts.StoreIOError, match="locked") as info:
                ts.save_to_ts({"a": torch.ones(1)}, locked / "x.tstore")
            assert info.value.errno == errno.EACCES
        finally:
            locked.chmod(0o700)
    else:
        # root ignores permission bits; /proc refuses new files to everyone.
        if not os.path.isdir("/proc/self"):
            pytest.skip("needs /proc")
        with pytest.raises(ts.StoreIOError, match="ts-test.tstore") as info:
            ts.save_to_ts({"a": torch.ones(1)}, "/proc/ts-test.tstore")
        assert info.value.errno in (errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOENT)


def test_store_io_error_carries_errno(tmp_path) -> None:
    with pytest.raises(ts.StoreIOError, match="nope") as info:
        _core.Store(str(tmp_path / "nope.tstore"))
    assert info.value.errno == errno.ENOENT


def _unstorable_dtype_tensor() -> torch.Tensor:
    if hasattr(torch, "bits8"):
        return torch.empty(4, dtype=torch.bits8)
    return torch.quantize_per_tensor(torch.ones(4), 0.1, 0, torch.quint8)


@pytest.mark.parametrize(
    "make, exc, pattern",
    [
        (lambda: {"weights": 3}, TypeError, "'weights'.*int"),
        (lambda: {"w": [1, 2]}, TypeError, "'w'.*list"),
        (lambda: {7: torch.ones(1)}, TypeError, "7"),
        (lambda: {"": torch.ones(1)}, ValueError, "empty"),
        (lambda: {"q": _unstorable_dtype_tensor()}, ValueError, "'q'"),
        (lambda: {"sp": torch.eye(3).to_sparse()}, ValueError, "'sp'.*sparse"),
        (lambda: {"m": torch.empty(3, device="meta")}, ValueError, "'m'.*meta"),
        (lambda: [torch.ones(1)], TypeError, "list"),
        (lambda: "text", TypeError, "str"),
    ],
    ids=[
        "int",
        "list",
        "non_str_key",
        "empty_name",
        "dtype",
        "sparse",
        "meta",
        "list_in",
        "str_in",
    ],
)
def test_unsupported_values(tmp_path, make, exc, pattern) -> None:
    with pytest.raises(exc, match=pattern):
        ts.save_to_ts(make(), tmp_path / "bad.tstore")
    assert os.listdir(tmp_path) == []


def test_unsupported_dtype_message_names_tensor_and_dtype(tmp_path) -> None:
    bad = _unstorable_dtype_tensor()
    name = str(bad.dtype).split(".")[-1]
    with pytest.raises(ValueError, match=rf"tensor 'model\.q'.*{name}"):
        ts.save_to_ts({"model.ok": torch.ones(1), "model.q": bad}, tmp_path / "bad.tstore")
    assert os.listdir(tmp_path) == []


def test_core_writer_checks_arguments(tmp_path) -> None:
    writer = _core.StoreWriter(str(tmp_path / "c.tstore"), durable=False)
    data = torch.ones(4)
    writer.begin_block("b")
    with pytest.raises(ValueError, match=r"tensor 'b\.x'.*'float12'"):
        writer.add_tensor("b.x", "float12", [4], data.data_ptr(), 16)
    with pytest.raises(ValueError, match=r"tensor 'b\.y'.*15 bytes"):
        writer.add_tensor("b.y", "float32", [4], data.data_ptr(), 15)
    with pytest.raises(ValueError, match=r"tensor 'b\.z'.*null"):
        writer.add_tensor("b.z", "float32", [4], 0, 16)
    with pytest.raises(ValueError, match="negative"):
        writer.add_tensor("b.n", "float32", [-1, 4], data.data_ptr(), 16)
    writer.add_tensor("b.ok", "float32", [4], data.data_ptr(), 16)
    with pytest.raises(ValueError, match="duplicate"):
        writer.add_tensor("b.ok", "float32", [4], data.data_ptr(), 16)
    writer.end_block()
    temp = writer.temp_path
    assert os.path.exists(temp)
    writer.abort()
    writer.abort()  # idempotent
    assert not os.path.exists(temp)
    assert os.listdir(tmp_path) == []


def test_cancelled_write_leaves_nothing_and_keeps_previous_store(tmp_path) -> None:
    path = tmp_path / "keep.tstore"
    ts.save_to_ts({"old": torch.arange(4)}, path)
    before = path.read_bytes()
    tensors = {f"l.{i}.w": torch.randn(100) for i in range(5)}
    calls = []

    def stop_at_third(done: int, total: int) -> bool:
        calls.append(done)
        return len(calls) < 3

    with pytest.raises(ts.OperationCancelled, match="keep.tstore"):
        ts.save_to_ts(tensors, path, progress=stop_at_third)
    assert sorted(os.listdir(tmp_path)) == ["keep.tstore"]
    assert path.read_bytes() == before
    assert list(ts.load_from_ts(path)) == ["old"]


# ---- reading damaged stores ------------------------------------------------------------------


def test_corrupt_byte_in_block(tmp_path, corrupt) -> None:
    path = tmp_path / "c.tstore"
    layered_store(path)
    header = ts.read_ts_header(path)
    victim = header["tensors"]["model.layers.1.w"]
    corrupt(path, victim["offset"] + 17)

    with pytest.raises(ts.ChecksumError, match=r"block 'model\.layers\.1'") as info:
        ts.load_from_ts(path)
    assert str(path) in str(info.value)

    report = ts.verify_storage_integrity(path)
    assert not report
    assert report.ok is False
    assert report.blocks_checked == len(header["blocks"])
    assert len(report.problems) == 1
    assert "model.layers.1" in report.problems[0]

    # Without verification the damaged bytes are returned as they are.
    loaded = ts.load_from_ts(path, verify=False)
    assert set(loaded) == set(header["tensors"])


def test_corrupt_metadata(tmp_path, corrupt) -> None:
    path = tmp_path / "m.tstore"
    layered_store(path)
    size = path.stat().st_size
    corrupt(path, size - 10)  # inside the metadata region at the end of the file
    with pytest.raises(ts.FormatError, match=re.escape(str(path))):
        ts.read_ts_header(path)
    report = ts.verify_storage_integrity(path)
    assert not report.ok
    assert str(path) in report.problems[0]


def test_truncated_file(tmp_path) -> None:
    path = tmp_path / "t.tstore"
    layered_store(path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ts.FormatError, match=re.escape(str(path))):
        ts.load_from_ts(path)
    with pytest.raises(ts.FormatError, match=re.escape(str(path))):
        ts.read_ts_header(path)
    report = ts.verify_storage_integrity(path)
    assert not report.ok
    assert str(path) in report.problems[0]


@pytest.mark.parametrize("size", [0, 100, 8192])
def test_garbage_file(tmp_path, size) -> None:
    path = tmp_path / "g.tstore"
    path.write_bytes(os.urandom(size))
    with pytest.raises(ts.FormatError, match=re.escape(str(path))) as info:
        ts.load_from_ts(path)
    if size >= 4096:
        assert "bad magic" in str(info.value)
    report = ts.verify_storage_integrity(path)
    assert not report.ok and report.problems


def test_missing_paths(tmp_path) -> None:
    missing = tmp_path / "none.tstore"
    for fn in (ts.load_from_ts, ts.read_ts_header, ts.verify_storage_integrity):
        with pytest.raises(FileNotFoundError, match="none.tstore"):
            fn(missing)
    # A directory without a store in it.
    with pytest.raises(FileNotFoundError, match="model.tstore"):
        ts.load_from_ts(tmp_path)


# ---- cleanup -------------------------------------------------------------------------------


def _dead_pid() -> int:
    pid = 2**22 + 12345  # above Linux's pid_max limit (2**22)
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)
    return pid


def test_cleanup_orphaned_files(tmp_path) -> None:
    dead = tmp_path / f".x.tstore.{_dead_pid()}.0.tstmp"
    live = tmp_path / f".x.tstore.{os.getpid()}.0.tstmp"
    unrelated = tmp_path / "x.tstmp"
    for p in (dead, live, unrelated):
        p.write_bytes(b"partial")
    removed = ts.cleanup_orphaned_files(tmp_path)
    assert removed == [str(dead)]
    assert not dead.exists()
    assert live.exists() and unrelated.exists()
    # A store path designates its directory.
    dead.write_bytes(b"partial")
    assert ts.cleanup_orphaned_files(tmp_path / "x.tstore") == [str(dead)]
    assert ts.cleanup_orphaned_files(tmp_path) == []


def test_cleanup_of_missing_directory(tmp_path) -> None:
    with pytest.raises(ts.StoreIOError, match="gone"):
        ts.cleanup_orphaned_files(tmp_path / "gone" / "x.tstore")
