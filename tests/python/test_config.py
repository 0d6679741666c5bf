"""ts.Config: defaults, validation, sizes, enums, environment, round trips and files."""

from __future__ import annotations

import copy
import json
import os
import pickle
import subprocess
import sys
from pathlib import Path
from typing import Callable

import pytest
import torch

import tensorstream as ts
from tensorstream import config as config_module
from tensorstream.config import ENV_STORAGE_PATH, ENV_VRAM_BUDGET

GB = 10**9


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """No TensorStream variables; HOME and XDG_CACHE_HOME point into tmp_path."""
    monkeypatch.delenv(ENV_STORAGE_PATH, raising=False)
    monkeypatch.delenv(ENV_VRAM_BUDGET, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    return tmp_path


def total_ram_bytes() -> int:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no MemTotal in /proc/meminfo")


# ---- defaults ------------------------------------------------------------------------------

EXPECTED_DEFAULTS = {
    "vram_budget_gb": None,
    "ram_cache_gb": 0.0,
    "backend": ts.BackendType.AUTO,
    "prefetch_strategy": ts.PrefetchStrategy.ADAPTIVE,
    "prefetch_depth": None,
    "cache_policy": "auto",
    "compression_enabled": False,
    "compression_level": 3,
    "num_io_threads": 4,
    "memory_pressure_mode": ts.MemoryPressureMode.BALANCED,
    "verify_checksums": False,
    "min_layer_size": 1 << 20,
    "dtype": None,
    "device": None,
    "debug_mode": False,
}


def test_fields_are_those_of_the_product_spec() -> None:
    assert ts.Config.fields() == ("storage_path", *EXPECTED_DEFAULTS)


@pytest.mark.parametrize("field", list(EXPECTED_DEFAULTS))
def test_default(field: str) -> None:
    value = getattr(ts.Config(), field)
    assert value == EXPECTED_DEFAULTS[field]
    assert type(value) is type(EXPECTED_DEFAULTS[field])


def test_default_storage_path_is_the_user_cache_dir(
    clean_env: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert ts.Config().storage_path == str(clean_env / "xdg" / "tensorstream")
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert ts.Config().storage_path == str(clean_env / "home" / ".cache" / "tensorstream")
    assert not (clean_env / "home").exists(), "constructing a Config must not create dirs"


def test_default_sizes_in_bytes() -> None:
    config = ts.Config()
    assert config.vram_budget_bytes is None
    assert config.ram_cache_bytes == 0


def test_product_example_is_accepted(tmp_path: Path) -> None:
    config = ts.Config(
        storage_path=str(tmp_path),
        vram_budget_gb=4.0,
        ram_cache_gb=16.0,
        backend=ts.BackendType.AUTO,
        prefetch_strategy=ts.PrefetchStrategy.ADAPTIVE,
        prefetch_depth=None,
        cache_policy="auto",
        compression_enabled=False,
        compression_level=3,
        num_io_threads=4,
        memory_pressure_mode=ts.MemoryPressureMode.BALANCED,
        verify_checksums=False,
        min_layer_size=1 << 20,
        dtype=None,
        device=None,
        debug_mode=False,
    )
    assert config.vram_budget_bytes == 4 * GB
    assert config.ram_cache_bytes == 16 * GB
    assert config.storage_path == str(tmp_path)


# ---- validation ----------------------------------------------------------------------------

BAD_VALUES = [
    ("storage_path", 42, TypeError, "42"),
    ("storage_path", "", ValueError, "''"),
    ("vram_budget_gb", 0, ValueError, "0"),
    ("vram_budget_gb", "0GB", ValueError, "'0GB'"),
    ("vram_budget_gb", -1.0, ValueError, "-1.0"),
    ("vram_budget_gb", "lots", ValueError, "'lots'"),
    ("vram_budget_gb", float("nan"), ValueError, "nan"),
    ("vram_budget_gb", True, TypeError, "True"),
    ("vram_budget_gb", [4], TypeError, "[4]"),
    ("ram_cache_gb", "-2GB", ValueError, "'-2GB'"),
    ("ram_cache_gb", "16 bananas", ValueError, "'16 bananas'"),
    ("backend", "fast", ValueError, "'fast'"),
    ("backend", 3, TypeError, "3"),
    ("backend", ts.PrefetchStrategy.NONE, TypeError, "PrefetchStrategy.NONE"),
    ("prefetch_strategy", "sometimes", ValueError, "'sometimes'"),
    ("prefetch_depth", 0, ValueError, "0"),
    ("prefetch_depth", 65, ValueError, "65"),
    ("prefetch_depth", 2.0, TypeError, "2.0"),
    ("prefetch_depth", "2", TypeError, "'2'"),
    ("cache_policy", "mru", ValueError, "'mru'"),
    ("cache_policy", None, TypeError, "None"),
    ("compression_enabled", "yes", TypeError, "'yes'"),
    ("compression_enabled", 1, TypeError, "1"),
    ("compression_level", 0, ValueError, "0"),
    ("compression_level", 10, ValueError, "10"),
    ("compression_level", True, TypeError, "True"),
    ("num_io_threads", 0, ValueError, "0"),
    ("num_io_threads", 65, ValueError, "65"),
    ("num_io_threads", None, TypeError, "None"),
    ("memory_pressure_mode", "relaxed", ValueError, "'relaxed'"),
    ("verify_checksums", None, TypeError, "None"),
    ("min_layer_size", -1, ValueError, "-1"),
    ("min_layer_size", "1 MiBB", ValueError, "'1 MiBB'"),
    ("dtype", "float32", ValueError, "'float32'"),
    ("dtype", torch.int8, ValueError, "torch.int8"),
    ("dtype", torch.float32, ValueError, "torch.float32"),
    ("dtype", 16, TypeError, "16"),
    ("device", "gpu", ValueError, "'gpu'"),
    ("device", "cuda:-1", ValueError, "'cuda:-1'"),
    ("device", "cpu:1", ValueError, "'cpu:1'"),
    ("device", torch.device("meta"), ValueError, "meta"),
    ("device", 0, TypeError, "0"),
    ("debug_mode", "false", TypeError, "'false'"),
]


@pytest.mark.parametrize(
    ("field", "value", "error", "shown"),
    BAD_VALUES,
    ids=[f"{f}={v!r}" for f, v, _, _ in BAD_VALUES],
)
def test_bad_value_on_construction(field: str, value: object, error: type, shown: str) -> None:
    with pytest.raises(error) as info:
        ts.Config(**{field: value})
    message = str(info.value)
    assert message.startswith(f"{field}:"), message
    assert shown in message, message
    assert "expected" in message, message


@pytest.mark.parametrize(
    ("field", "value", "error", "shown"),
    BAD_VALUES,
    ids=[f"{f}={v!r}" for f, v, _, _ in BAD_VALUES],
)
def test_bad_value_on_assignment_leaves_field_unchanged(
    field: str, value: object, error: type, shown: str
) -> None:
    config = ts.Config()
    before = config.to_dict()
    with pytest.raises(error, match=f"^{field}:"):
        setattr(config, field, value)
    assert config.to_dict() == before


def test_allowed_ranges_are_named() -> None:
    with pytest.raises(ValueError, match=r"compression_level: 10 .* from 1 to 9"):
        ts.Config(compression_level=10)
    with pytest.raises(ValueError, match=r"'lru', 'lfu', 'fifo'"):
        ts.Config(cache_policy="mru")
    with pytest.raises(ValueError, match=r"BackendType\.IO_URING.*'io_uring'"):
        ts.Config(backend="fast")


def test_assignment_validates_and_normalises() -> None:
    config = ts.Config()
    config.vram_budget_gb = "6GB"
    config.backend = "mmap"
    config.cache_policy = "LFU"
    config.dtype = "bf16"
    config.device = "CUDA:1"
    config.min_layer_size = "64KiB"
    assert config.vram_budget_bytes == 6 * GB
    assert config.vram_budget_gb == 6.0
    assert config.backend is ts.BackendType.MMAP
    assert config.cache_policy == "lfu"
    assert config.dtype == "bfloat16"
    assert config.device == "cuda:1"
    assert config.min_layer_size == 64 * 1024


def test_unknown_and_read_only_attributes() -> None:
    config = ts.Config()
    with pytest.raises(AttributeError):
        config.vram_budget = 4  # type: ignore[attr-defined]
    with pytest.raises(AttributeError):
        config.vram_budget_bytes = 4  # type: ignore[misc]
    with pytest.raises(TypeError):
        ts.Config(vram_budget=4)  # type: ignore[call-arg]


# ---- sizes ---------------------------------------------------------------------------------

SIZES = [
    ("7.8GB", 7_800_000_000),
    ("512MiB", 512 * 2**20),
    ("1 GiB", 2**30),
    ("1gib", 2**30),
    ("1.5 kib", 1536),
    ("2TB", 2 * 10**12),
    ("1 tib", 2**40),
    ("10 kB", 10_000),
    ("3MB", 3_000_000),
    ("100B", 100),
    (" 42 b ", 42),
    (".5KiB", 512),
    ("0", 0),
    ("1024", 1024),
    (1024, 1024),
    (0, 0),
    (4096.0, 4096),
]


@pytest.mark.parametrize(("text", "expected"), SIZES)
def test_parse_size(text: object, expected: int) -> None:
    assert ts.parse_size(text) == expected


@pytest.mark.parametrize(
    ("value", "expected"),
    [(4.0, 4 * GB), (4, 4 * GB), (0.5, 500_000_000), ("4", 4 * GB), ("7.8", 7_800_000_000)],
)
def test_bare_numbers_for_gb_fields_are_gb(value: object, expected: int) -> None:
    assert ts.parse_size(value, number_unit=GB) == expected
    assert ts.Config(vram_budget_gb=value).vram_budget_bytes == expected
    assert ts.Config(ram_cache_gb=value).ram_cache_bytes == expected


def test_strings_carry_their_own_unit_in_gb_fields() -> None:
    assert ts.Config(vram_budget_gb="512MiB").vram_budget_bytes == 512 * 2**20
    assert ts.Config(ram_cache_gb="100 B").ram_cache_bytes == 100
    assert ts.Config(min_layer_size=4096).min_layer_size == 4096  # bytes, not GB


@pytest.mark.parametrize(
    ("text", "error", "fragment"),
    [
        ("12 parsecs", ValueError, "unknown unit 'parsecs'"),
        ("-1GB", ValueError, "negative"),
        ("", ValueError, "invalid size ''"),
        ("   ", ValueError, "invalid size"),
        ("GB", ValueError, "invalid size 'GB'"),
        ("1.2.3MB", ValueError, "invalid size"),
        ("1e9", ValueError, "invalid size '1e9'"),
        ("1 G B", ValueError, "invalid size"),
        (-5, ValueError, "negative"),
        (float("inf"), ValueError, "not finite"),
        ("99999999999TiB", ValueError, "maximum"),
        (None, TypeError, "NoneType"),
        (True, TypeError, "bool"),
        (b"1GB", TypeError, "bytes"),
    ],
)
def test_parse_size_refuses(text: object, error: type, fragment: str) -> None:
    with pytest.raises(error) as info:
        ts.parse_size(text, field="ram_cache_gb")
    message = str(info.value)
    assert message.startswith("ram_cache_gb:"), message
    assert fragment in message, message
    if error is ValueError and "maximum" not in message:
        assert "'7.8GB', '512MiB'" in message and "KiB" in message, message


def test_size_round_trips_through_gb_float() -> None:
    for nbytes in (1, 999, 2**30 + 1, 7_812_345_679, 3 * 2**40 + 12345, 2**50 - 1):
        config = ts.Config(vram_budget_gb=f"{nbytes}B")
        assert ts.Config(vram_budget_gb=config.vram_budget_gb).vram_budget_bytes == nbytes


# ---- enums ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("enum", "text", "member"),
    [
        (ts.BackendType, "auto", ts.BackendType.AUTO),
        (ts.BackendType, "GPUDIRECT", ts.BackendType.GPUDIRECT),
        (ts.BackendType, "Cuda", ts.BackendType.CUDA),
        (ts.BackendType, "mmap", ts.BackendType.MMAP),
        (ts.BackendType, "IO_URING", ts.BackendType.IO_URING),
        (ts.BackendType, "io-uring", ts.BackendType.IO_URING),
        (ts.BackendType, " pread ", ts.BackendType.PREAD),
        (ts.PrefetchStrategy, "None", ts.PrefetchStrategy.NONE),
        (ts.PrefetchStrategy, "next_layer", ts.PrefetchStrategy.NEXT_LAYER),
        (ts.PrefetchStrategy, "ADAPTIVE", ts.PrefetchStrategy.ADAPTIVE),
        (ts.MemoryPressureMode, "conservative", ts.MemoryPressureMode.CONSERVATIVE),
        (ts.MemoryPressureMode, "Balanced", ts.MemoryPressureMode.BALANCED),
        (ts.MemoryPressureMode, "AGGRESSIVE", ts.MemoryPressureMode.AGGRESSIVE),
    ],
)
def test_enums_parse_case_insensitively(enum: type, text: str, member: object) -> None:
    assert enum(text) is member
    assert enum.parse(text) is member
    assert enum.parse(member) is member


def test_enum_values_are_strings() -> None:
    for enum in (ts.BackendType, ts.PrefetchStrategy, ts.MemoryPressureMode):
        for member in enum:
            assert member.value == member.name.lower()
    assert [m.name for m in ts.BackendType] == [
        "AUTO",
        "GPUDIRECT",
        "CUDA",
        "MMAP",
        "IO_URING",
        "PREAD",
    ]
    with pytest.raises(ValueError):
        ts.BackendType("nvme")


def test_config_stores_enums_as_enums() -> None:
    config = ts.Config(
        backend="io_uring", prefetch_strategy="none", memory_pressure_mode="Aggressive"
    )
    assert config.backend is ts.BackendType.IO_URING
    assert config.prefetch_strategy is ts.PrefetchStrategy.NONE
    assert config.memory_pressure_mode is ts.MemoryPressureMode.AGGRESSIVE


# ---- environment ---------------------------------------------------------------------------


def test_env_storage_path(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv(ENV_STORAGE_PATH, str(tmp_path / "store"))
    assert ts.Config().storage_path == str(tmp_path / "store")
    assert ts.Config(storage_path=None).storage_path == str(tmp_path / "store")


@pytest.mark.parametrize(
    ("env", "expected"), [("6GB", 6 * GB), ("6", 6 * GB), ("1.5", 1_500_000_000), ("512MiB", 2**29)]
)
def test_env_vram_budget(monkeypatch: pytest.MonkeyPatch, env: str, expected: int) -> None:
    monkeypatch.setenv(ENV_VRAM_BUDGET, env)
    assert ts.Config().vram_budget_bytes == expected


def test_empty_env_counts_as_unset(monkeypatch: pytest.MonkeyPatch, clean_env: Path) -> None:
    monkeypatch.setenv(ENV_VRAM_BUDGET, "")
    monkeypatch.setenv(ENV_STORAGE_PATH, "")
    config = ts.Config()
    assert config.vram_budget_bytes is None
    assert config.storage_path == str(clean_env / "xdg" / "tensorstream")


@pytest.mark.parametrize("env", ["lots", "-4GB", "0", "4 parsecs"])
def test_bad_env_vram_budget_names_the_variable(monkeypatch: pytest.MonkeyPatch, env: str) -> None:
    monkeypatch.setenv(ENV_VRAM_BUDGET, env)
    with pytest.raises(ValueError, match=f"environment variable {ENV_VRAM_BUDGET}") as info:
        ts.Config()
    assert repr(env) in str(info.value)
    # An explicit argument does not read the variable, so it is not an error then.
    assert ts.Config(vram_budget_gb=2).vram_budget_bytes == 2 * GB


def test_explicit_argument_beats_environment(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv(ENV_VRAM_BUDGET, "6GB")
    monkeypatch.setenv(ENV_STORAGE_PATH, str(tmp_path / "env"))
    config = ts.Config(str(tmp_path / "arg"), vram_budget_gb=2.0)
    assert config.vram_budget_bytes == 2 * GB
    assert config.storage_path == str(tmp_path / "arg")
    # None means "not given": the environment supplies the value, at assignment too.
    config.vram_budget_gb = None
    assert config.vram_budget_bytes == 6 * GB


def test_environment_is_read_when_the_value_is_set(monkeypatch: pytest.MonkeyPatch) -> None:
    config = ts.Config()
    monkeypatch.setenv(ENV_VRAM_BUDGET, "6GB")
    assert config.vram_budget_bytes is None
    assert ts.Config().vram_budget_bytes == 6 * GB


def test_from_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv(ENV_VRAM_BUDGET, "6GB")
    assert ts.Config.from_env() == ts.Config()
    assert ts.Config.from_env().vram_budget_bytes == 6 * GB
    environ = {ENV_STORAGE_PATH: str(tmp_path / "s"), ENV_VRAM_BUDGET: "3GiB"}
    config = ts.Config.from_env(environ, num_io_threads=8)
    assert config.storage_path == str(tmp_path / "s")
    assert config.vram_budget_bytes == 3 * 2**30
    assert config.num_io_threads == 8
    assert ts.Config.from_env({}).vram_budget_bytes is None  # os.environ is not consulted
    assert ts.Config.from_env(environ, vram_budget_gb=1).vram_budget_bytes == GB
    with pytest.raises(ValueError, match=ENV_VRAM_BUDGET):
        ts.Config.from_env({ENV_VRAM_BUDGET: "many"})
    with pytest.raises(TypeError, match="bogus"):
        ts.Config.from_env(bogus=1)


def test_storage_path_is_absolute_and_expanded(
    monkeypatch: pytest.MonkeyPatch, clean_env: Path
) -> None:
    monkeypatch.chdir(clean_env)
    assert ts.Config("rel/dir").storage_path == str(clean_env / "rel" / "dir")
    assert ts.Config("~/ts").storage_path == str(clean_env / "home" / "ts")
    assert ts.Config(Path("p")).storage_path == str(clean_env / "p")


# ---- dtype and device ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "name", "torch_dtype"),
    [
        (torch.float16, "float16", torch.float16),
        (torch.half, "float16", torch.float16),
        (torch.bfloat16, "bfloat16", torch.bfloat16),
        ("float16", "float16", torch.float16),
        ("fp16", "float16", torch.float16),
        ("BF16", "bfloat16", torch.bfloat16),
        ("bfloat16", "bfloat16", torch.bfloat16),
        ("torch.bfloat16", "bfloat16", torch.bfloat16),
        (None, None, None),
    ],
)
def test_dtype_accepted(value: object, name: str | None, torch_dtype: object) -> None:
    config = ts.Config(dtype=value)
    assert config.dtype == name
    assert config.torch_dtype is torch_dtype


def test_dtype_equality_across_spellings() -> None:
    assert ts.Config(dtype=torch.bfloat16) == ts.Config(dtype="bf16")
    assert ts.Config(dtype=torch.float16) != ts.Config(dtype="bf16")


@pytest.mark.parametrize("dtype", [torch.int8, torch.float32, torch.float64, torch.uint8])
def test_dtype_refused(dtype: torch.dtype) -> None:
    with pytest.raises(ValueError, match=rf"^dtype: {dtype} is not supported.*torch\.bfloat16"):
        ts.Config(dtype=dtype)


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("cpu", "cpu"),
        ("cuda", "cuda"),
        ("cuda:0", "cuda:0"),
        ("cuda:3", "cuda:3"),
        (" CUDA:1 ", "cuda:1"),
        ("cpu:0", "cpu"),
        (torch.device("cpu"), "cpu"),
        (torch.device("cuda", 2), "cuda:2"),
        (torch.device("cuda"), "cuda"),
        (None, None),
    ],
)
def test_device_accepted(value: object, expected: str | None) -> None:
    assert ts.Config(device=value).device == expected


def test_import_does_not_import_torch() -> None:
    code = (
        "import sys, tensorstream as ts\n"
        "c = ts.Config(dtype='bf16', device='cuda:0', vram_budget_gb='1GB')\n"
        "assert c.dtype == 'bfloat16' and c.device == 'cuda:0'\n"
        "assert 'torch' not in sys.modules, 'torch was imported'\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr


# ---- dict, repr, equality, copies ----------------------------------------------------------


def full_config(tmp_path: Path) -> ts.Config:
    return ts.Config(
        str(tmp_path / "store"),
        vram_budget_gb="7.8GB",
        ram_cache_gb="512MiB",
        backend="io_uring",
        prefetch_strategy=ts.PrefetchStrategy.NEXT_LAYER,
        prefetch_depth=3,
        cache_policy="lfu",
        compression_enabled=True,
        compression_level=7,
        num_io_threads=16,
        memory_pressure_mode="aggressive",
        verify_checksums=True,
        min_layer_size="64KiB",
        dtype=torch.bfloat16,
        device="cuda:1",
        debug_mode=True,
    )


def test_to_dict_is_json_friendly(tmp_path: Path) -> None:
    data = full_config(tmp_path).to_dict()
    assert data == {
        "storage_path": str(tmp_path / "store"),
        "vram_budget_gb": 7.8,
        "ram_cache_gb": 0.536870912,
        "backend": "io_uring",
        "prefetch_strategy": "next_layer",
        "prefetch_depth": 3,
        "cache_policy": "lfu",
        "compression_enabled": True,
        "compression_level": 7,
        "num_io_threads": 16,
        "memory_pressure_mode": "aggressive",
        "verify_checksums": True,
        "min_layer_size": 65536,
        "dtype": "bfloat16",
        "device": "cuda:1",
        "debug_mode": True,
    }
    assert json.loads(json.dumps(data)) == data


@pytest.mark.parametrize("make", [full_config, lambda _: ts.Config()])
def test_dict_round_trip(tmp_path: Path, make: Callable[[Path], ts.Config]) -> None:
    config = make(tmp_path)
    again = ts.Config.from_dict(json.loads(json.dumps(config.to_dict())))
    assert again == config
    assert again.vram_budget_bytes == config.vram_budget_bytes
    assert again.ram_cache_bytes == config.ram_cache_bytes


def test_from_dict_refuses_unknown_keys_and_bad_values() -> None:
    with pytest.raises(ValueError, match="unknown field.*vram_budget"):
        ts.Config.from_dict({"vram_budget": 4})
    with pytest.raises(ValueError, match="^compression_level: 12"):
        ts.Config.from_dict({"compression_level": 12})
    with pytest.raises(TypeError):
        ts.Config.from_dict([("debug_mode", True)])  # type: ignore[arg-type]
    assert ts.Config.from_dict({"debug_mode": True}) == ts.Config(debug_mode=True)


def test_repr_round_trips(tmp_path: Path) -> None:
    config = full_config(tmp_path)
    text = repr(config)
    assert text.startswith("Config(storage_path=")
    assert "backend='io_uring'" in text and "vram_budget_gb=7.8" in text
    assert eval(text, {"Config": ts.Config}) == config


def test_equality_and_hash(tmp_path: Path) -> None:
    assert ts.Config() == ts.Config()
    assert ts.Config(vram_budget_gb=4) == ts.Config(vram_budget_gb="4GB")
    assert ts.Config(vram_budget_gb=4) != ts.Config(vram_budget_gb="4GiB")
    assert ts.Config() != ts.Config(debug_mode=True)
    assert ts.Config() != "Config()"
    with pytest.raises(TypeError):
        hash(ts.Config())


def test_copies_are_independent(tmp_path: Path) -> None:
    config = full_config(tmp_path)
    for other in (copy.copy(config), copy.deepcopy(config), pickle.loads(pickle.dumps(config))):
        assert other == config
        other.num_io_threads = 1
        assert config.num_io_threads == 16


def test_replace(tmp_path: Path) -> None:
    config = full_config(tmp_path)
    changed = config.replace(num_io_threads=2, backend="pread", vram_budget_gb="1GiB")
    assert changed.num_io_threads == 2
    assert changed.backend is ts.BackendType.PREAD
    assert changed.vram_budget_bytes == 2**30
    assert config.num_io_threads == 16 and config.backend is ts.BackendType.IO_URING
    assert changed.replace(num_io_threads=16, backend="io_uring", vram_budget_gb=7.8) == config
    assert config.replace() == config and config.replace() is not config
    with pytest.raises(ValueError, match="^num_io_threads: 0"):
        config.replace(num_io_threads=0)
    with pytest.raises(TypeError, match="threads"):
        config.replace(threads=2)


# ---- files ---------------------------------------------------------------------------------


def test_save_load_round_trip(tmp_path: Path) -> None:
    config = full_config(tmp_path)
    path = tmp_path / "config.json"
    config.save(path)
    assert ts.Config.load(path) == config
    assert ts.Config.load(str(path)) == config
    document = json.loads(path.read_text())
    assert document["format"] == "tensorstream-config" and document["version"] == 1
    assert document["config"] == config.to_dict()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json"]
    assert (path.stat().st_mode & 0o777) == 0o644


def test_save_replaces_and_keeps_mode(tmp_path: Path) -> None:
    path = tmp_path / "config.json"
    ts.Config(debug_mode=True).save(path)
    path.chmod(0o600)
    ts.Config(num_io_threads=9).save(path)
    assert ts.Config.load(path) == ts.Config(num_io_threads=9)
    assert (path.stat().st_mode & 0o777) == 0o600
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json"]


@pytest.mark.parametrize("failing", ["replace", "fsync"])
def test_failed_save_keeps_old_file_and_leaves_no_temp(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, failing: str
) -> None:
    path = tmp_path / "config.json"
    old = ts.Config(num_io_threads=5)
    old.save(path)
    before = path.read_bytes()

    def boom(*args: object) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(config_module.os, failing, boom)
    with pytest.raises(OSError, match="No space left"):
        ts.Config(num_io_threads=6).save(path)
    monkeypatch.undo()
    assert path.read_bytes() == before
    assert ts.Config.load(path) == old
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json"]


def test_save_into_missing_directory_fails_cleanly(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        ts.Config().save(tmp_path / "missing" / "config.json")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("{not json", "invalid JSON"),
        ("[1, 2]", "not a TensorStream config file"),
        ('{"format": "other", "version": 1, "config": {}}', "not a TensorStream config file"),
        ('{"format": "tensorstream-config", "version": 99, "config": {}}', "newer"),
        ('{"format": "tensorstream-config", "version": "1", "config": {}}', "version"),
        ('{"format": "tensorstream-config", "version": 1, "config": []}', "JSON object"),
        ('{"format": "tensorstream-config", "version": 1, "config": {"x": 1}}', "unknown"),
        (
            '{"format": "tensorstream-config", "version": 1, "config": {"num_io_threads": 0}}',
            "num_io_threads: 0",
        ),
    ],
)
def test_load_refuses_bad_files(tmp_path: Path, text: str, fragment: str) -> None:
    path = tmp_path / "bad.json"
    path.write_text(text)
    with pytest.raises(ValueError) as info:
        ts.Config.load(path)
    assert str(path) in str(info.value)
    assert fragment in str(info.value)


def test_load_missing_file(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        ts.Config.load(tmp_path / "nope.json")


# ---- engine options ------------------------------------------------------------------------


def test_engine_options(tmp_path: Path) -> None:
    options = full_config(tmp_path).engine_options()
    assert options == {
        "device": "cuda:1",
        "device_budget": 7_800_000_000,
        "ram_cache_bytes": 512 * 2**20,
        "cache_policy": "lfu",
        "backend": "io_uring",
        "gds": "off",
        "prefetch": "next_layer",
        "prefetch_depth": 3,
        "slots": 4,
        "verify_checksums": True,
        "num_threads": 16,
    }


@pytest.mark.parametrize(
    ("backend", "engine", "gds"),
    [
        ("auto", "auto", "auto"),
        ("gpudirect", "auto", "on"),
        ("cuda", "auto", "auto"),
        ("mmap", "mmap", "off"),
        ("io_uring", "io_uring", "off"),
        ("pread", "pread", "off"),
    ],
)
def test_engine_backend_names(backend: str, engine: str, gds: str) -> None:
    options = ts.Config(backend=backend, vram_budget_gb=1).engine_options()
    assert options["backend"] == engine
    assert options["gds"] == gds


@pytest.mark.parametrize(
    ("strategy", "depth", "slots"),
    [
        ("adaptive", None, 2),
        ("adaptive", 1, 2),
        ("adaptive", 2, 3),
        ("next_layer", 5, 6),
        # Nothing loads ahead: an arena of one unit, the rest of the budget resident.
        ("none", None, 1),
        ("none", 4, 1),
    ],
)
def test_engine_slots(strategy: str, depth: int | None, slots: int) -> None:
    config = ts.Config(prefetch_strategy=strategy, prefetch_depth=depth, vram_budget_gb=1)
    options = config.engine_options()
    assert options["slots"] == slots
    assert options["prefetch"] == strategy
    assert options["prefetch_depth"] == depth


def test_engine_options_resolve_device_and_automatic_budget() -> None:
    options = ts.Config().engine_options()
    assert options["device"] == "cpu"
    assert 0 < options["device_budget"] < total_ram_bytes()
    assert options["device_budget"] % (1 << 20) == 0
    assert ts.Config().engine_options(device="cpu")["device"] == "cpu"
    assert ts.Config().engine_options(device=torch.device("cpu"))["device"] == "cpu"
    # The Config's own device wins over the one passed in.
    assert (
        ts.Config(device="cuda:1", vram_budget_gb=1).engine_options(device="cpu")["device"]
        == "cuda:1"
    )


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only behaviour")
def test_automatic_cuda_budget_without_cuda_is_an_error() -> None:
    with pytest.raises(RuntimeError, match="CUDA is not available"):
        ts.Config(device="cuda").engine_options()


# ---- create_default_config -----------------------------------------------------------------


def test_create_default_config_on_this_machine(tmp_path: Path) -> None:
    path = tmp_path / "a" / "b" / "store"
    config = ts.create_default_config(path)
    assert path.is_dir()
    assert config.storage_path == str(path)
    total = total_ram_bytes()
    assert config.vram_budget_bytes is not None
    assert 0 < config.vram_budget_bytes < total
    assert 0 < config.ram_cache_bytes < total
    if not torch.cuda.is_available():
        assert config.vram_budget_bytes + config.ram_cache_bytes < total / 2
    assert config.vram_budget_bytes % (1 << 20) == 0
    assert config.ram_cache_bytes % (1 << 20) == 0
    # Everything else keeps the Config defaults.
    for field, default in EXPECTED_DEFAULTS.items():
        if field not in ("vram_budget_gb", "ram_cache_gb"):
            assert getattr(config, field) == default
    # An existing directory is fine.
    assert ts.create_default_config(path).storage_path == str(path)


def test_create_default_config_default_path(
    clean_env: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = ts.create_default_config()
    assert config.storage_path == str(clean_env / "xdg" / "tensorstream")
    assert Path(config.storage_path).is_dir()
    monkeypatch.setenv(ENV_STORAGE_PATH, str(clean_env / "from-env"))
    assert ts.create_default_config().storage_path == str(clean_env / "from-env")
    assert (clean_env / "from-env").is_dir()


def test_create_default_config_overrides_and_env(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = ts.create_default_config(
        tmp_path / "s", vram_budget_gb="2GB", ram_cache_gb=0, num_io_threads=8
    )
    assert config.vram_budget_bytes == 2 * GB
    assert config.ram_cache_bytes == 0
    assert config.num_io_threads == 8
    monkeypatch.setenv(ENV_VRAM_BUDGET, "3GB")
    assert ts.create_default_config(tmp_path / "s").vram_budget_bytes == 3 * GB


def test_create_default_config_validates_before_creating(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="^compression_level"):
        ts.create_default_config(tmp_path / "never", compression_level=0)
    with pytest.raises(TypeError, match="path"):
        ts.create_default_config(tmp_path / "never", storage_path=tmp_path)
    assert not (tmp_path / "never").exists()
    (tmp_path / "file").write_text("x")
    with pytest.raises(OSError):
        ts.create_default_config(tmp_path / "file")


def test_public_names() -> None:
    for name in (
        "Config",
        "BackendType",
        "PrefetchStrategy",
        "MemoryPressureMode",
        "create_default_config",
        "parse_size",
    ):
        assert name in ts.__all__
        assert getattr(ts, name) is getattr(config_module, name)
    assert os.fspath(ts.Config(Path("/x")).storage_path) == "/x"
