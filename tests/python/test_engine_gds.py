"""GPUDirect Storage from Python: the engine's ``gds`` option, its statistics, and the Config
backends that choose it. Without a GPU these check the real refusals and fallback reasons."""

from __future__ import annotations

import pytest

import tensorstream as ts
from tensorstream import _core
from tensorstream.config import Config

torch = pytest.importorskip("torch")
nn = torch.nn


@pytest.fixture
def small_store(tmp_path):
    torch.manual_seed(0)
    state = {f"layers.{i}.weight": torch.randn(32, 48) for i in range(4)}
    path = tmp_path / "model.tstore"
    ts.save_to_ts(state, path)
    sizes = [b["size"] for b in ts.read_ts_header(path)["blocks"]]
    return path, _core.minimum_budget(sizes, 2)


def test_engine_gds_on_with_a_cpu_device_is_a_value_error(small_store):
    path, budget = small_store
    with pytest.raises(ValueError, match=r"gds=on needs a CUDA device.*'cpu'"):
        _core.Engine(str(path), {"device": "cpu", "device_budget": budget, "gds": "on"})


def test_engine_gds_rejects_an_unknown_mode(small_store):
    path, budget = small_store
    with pytest.raises(ValueError, match="gds mode 'yes'"):
        _core.Engine(str(path), {"device": "cpu", "device_budget": budget, "gds": "yes"})


@pytest.mark.parametrize("mode", ["auto", "off"])
def test_engine_gds_statistics_say_why_the_cpu_does_not_use_it(small_store, mode):
    path, budget = small_store
    engine = _core.Engine(str(path), {"device": "cpu", "device_budget": budget, "gds": mode})
    try:
        engine.acquire(0)
        engine.release(0)
        stats = engine.stats()
    finally:
        engine.close()
    assert stats["gds_mode"] == mode
    assert stats["gds_files"] == 0
    assert stats["gds_bytes"] == 0
    assert "device 'cpu'" in stats["gds_reason"]
    assert stats["gds"] == [{"path": str(path), "used": False, "reason": stats["gds_reason"]}]


def test_cufile_status_reports_each_stage():
    status = _core.cufile_status()
    assert set(status) >= {
        "compiled",
        "library_loaded",
        "library",
        "version",
        "driver_opened",
        "nvidia_fs",
        "reason",
    }
    assert status["driver_opened"] == (status["reason"] == "")
    if not _core.cuda_driver_status()["available"]:
        assert not status["driver_opened"]
        assert status["reason"]


class _Layers(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(64, 64) for _ in range(4))

    def forward(self, x):
        for layer in self.layers:
            x = layer(x)
        return x


def test_engine_gds_config_gpudirect_reaches_the_engine(tmp_path):
    """GPUDIRECT insists on GPUDirect Storage: on the CPU, offload() fails saying so."""
    config = Config(storage_path=tmp_path, backend="gpudirect", min_layer_size=1 << 10)
    with pytest.raises(ValueError, match="gds=on"):
        ts.offload(_Layers(), config)


def test_engine_gds_statistics_reach_get_model_statistics(tmp_path):
    torch.manual_seed(1)
    model = _Layers()
    x = torch.randn(2, 64)
    expected = model(x)
    config = Config(storage_path=tmp_path, backend="pread", min_layer_size=1 << 10)
    ts.offload(model, config)
    try:
        assert torch.equal(model(x), expected)
        stats = ts.get_model_statistics(model)
        assert stats["gds_mode"] == "off"  # PREAD: GPUDirect Storage off
        assert stats["gds_files"] == 0 and stats["gds_bytes"] == 0
        assert "device 'cpu'" in stats["gds_reason"]
    finally:
        model.cleanup_tensorstream()


@pytest.mark.gpu
@pytest.mark.parametrize("mode", ["on", "auto", "off"])
def test_engine_gds_streams_bitwise_into_torch_cuda_memory(tmp_path, mode):
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device visible to torch")
    torch.manual_seed(2)
    state = {f"layers.{i}.weight": torch.randn(256, 1000 + 3 * i) for i in range(4)}
    path = tmp_path / "model.tstore"
    ts.save_to_ts(state, path)
    header = ts.read_ts_header(path)
    sizes = [b["size"] for b in header["blocks"]]
    buffers: dict[int, torch.Tensor] = {}

    def allocate(nbytes: int) -> int:
        tensor = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
        buffers[tensor.data_ptr()] = tensor
        return tensor.data_ptr()

    def release(address: int, nbytes: int) -> None:
        del buffers[address]

    options = {"device": "cuda:0", "device_budget": _core.minimum_budget(sizes, 2), "gds": mode}
    try:
        engine = _core.Engine(str(path), options, allocate, release)
    except (ts.CudaError, ts.StoreIOError) as e:
        assert mode == "on", f"gds={mode} must fall back instead of failing: {e}"
        assert "gds=on" in str(e)
        pytest.skip(f"GPUDirect Storage not usable here: {e}")
    stream = torch.cuda.current_stream()
    for block in range(engine.block_count):
        address, size, _resident = engine.acquire(block, stream.cuda_stream)
        base = next(b for b in buffers if b <= address < b + buffers[b].numel())
        raw = buffers[base][address - base : address - base + size].cpu()  # on `stream`
        engine.release(block, stream.cuda_stream)
        for name in header["blocks"][block]["tensors"]:
            t = header["tensors"][name]
            got = raw[t["offset_in_block"] : t["offset_in_block"] + t["nbytes"]]
            assert torch.equal(got.view(torch.float32).view(t["shape"]), state[name]), name
    stats = engine.stats()
    engine.close()
    assert stats["failures"] == 0
    assert stats["gds_mode"] == mode
    if mode == "on":
        assert stats["gds_files"] == 1 and stats["gds_bytes"] > 0
    elif mode == "off":
        assert stats["gds_files"] == 0 and stats["gds_reason"] == "gds is off"
    else:
        assert (stats["gds_files"] == 1) == (stats["gds_reason"] == "")
