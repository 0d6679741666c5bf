"""CUDA discovery: one build works with and without a GPU."""

from __future__ import annotations

import pytest
import torch

from tensorstream import _core


def test_driver_status_never_raises() -> None:
    status = _core.cuda_driver_status()
    assert set(status) >= {
        "available",
        "driver_version",
        "device_count",
        "device0_name",
        "reason",
        "compiled_with_cuda",
        "library",
        "entry_points",
        "disabled",
    }
    assert isinstance(status["disabled"], list)
    if status["available"]:
        assert status["reason"] == ""
        assert status["device_count"] >= 1
        assert status["entry_points"] in ("cuGetProcAddress_v2", "cuGetProcAddress", "dlsym")
    else:
        assert isinstance(status["reason"], str) and status["reason"]
        assert status["device_count"] == 0 or status["driver_version"] >= 0
    cufile = _core.cufile_status()
    assert isinstance(cufile["library_loaded"], bool)
    assert cufile["library_loaded"] or cufile["reason"]


@pytest.mark.gpu
def test_driver_found_when_torch_sees_a_gpu() -> None:
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device visible to torch")
    status = _core.cuda_driver_status()
    assert status["compiled_with_cuda"], "this build has no CUDA code paths"
    assert status["available"], status["reason"]
    assert status["device_count"] >= 1
    assert status["driver_version"] > 0
    assert status["device0_name"]


@pytest.mark.gpu
def test_load_to_cuda(tmp_path) -> None:
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device visible to torch")
    import tensorstream as ts

    tensors = {"l.0.w": torch.randn(33, 7), "l.0.b": torch.arange(5), "x": torch.tensor(2.5)}
    ts.save_to_ts(tensors, tmp_path / "g.tstore")
    loaded = ts.load_from_ts(tmp_path / "g.tstore", device="cuda")
    for name, expected in tensors.items():
        assert loaded[name].device.type == "cuda"
        assert torch.equal(loaded[name].cpu(), expected)
    ts.save_to_ts(loaded, tmp_path / "back.tstore")
    again = ts.load_from_ts(tmp_path / "back.tstore")
    for name, expected in tensors.items():
        assert torch.equal(again[name], expected)
