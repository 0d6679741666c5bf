"""The settings table read from Python: ``_core.settings()``, the options dict of
``_core.Engine`` applied by it, ``Config``'s defaults and ranges taken from it, the generated
docs/runtime-settings.md, and the statistics dict built from the one description of
``EngineStats``."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

import tensorstream as ts
from tensorstream import _core
from tensorstream import config as config_module
from tensorstream.config import GB

torch = pytest.importorskip("torch")

PAGE = Path(__file__).resolve().parents[2] / "docs" / "runtime-settings.md"
TABLE = {row["name"]: row for row in _core.settings()}
OPTIONS = [row for row in _core.settings() if row["engine_option"]]
# Config fields with no row (every field has one).
NOT_IN_TABLE: set[str] = set()


@pytest.fixture
def store(tmp_path):
    torch.manual_seed(0)
    state = {f"layers.{i}.weight": torch.randn(64, 96) for i in range(4)}
    path = tmp_path / "model.tstore"
    ts.save_to_ts(state, path)
    return path


# ---- the table ---------------------------------------------------------------------------


def test_rows_are_complete_and_unique() -> None:
    rows = _core.settings()
    assert len(rows) == len(TABLE), "names must be unique"
    keys = {
        "name", "scope", "kind", "unit", "optional", "default", "default_text", "min", "max",
        "clamped", "choices", "env", "config_field", "config_note", "meaning", "engine_option",
    }  # fmt: skip
    for row in rows:
        assert set(row) == keys, row["name"]
        assert row["scope"] in ("engine", "io", "python", "environment")
        assert row["kind"] in ("bool", "integer", "choice", "text", "path")
        assert row["meaning"] and row["default_text"]
        assert row["engine_option"] == (row["scope"] in ("engine", "io"))
        if row["kind"] == "choice":
            assert row["choices"], row["name"]
            assert row["default"] is None or row["default"] in row["choices"], row["name"]
        if row["default"] is None:
            assert row["optional"] or row["scope"] == "environment" or row["name"] == "device"
    assert {o["name"] for o in _core.structural_options()} == {
        "device_memory",
        "env",
        "groups",
        "unit_needs",
        "unit_partial",
        "unit_use_rate",
        "memory_stream",
    }
    assert not {o["name"] for o in _core.structural_options()} & set(TABLE)


def test_every_config_field_has_its_row() -> None:
    fields = set(ts.Config.fields())
    mapped = {row["config_field"] for row in TABLE.values() if row["config_field"]}
    assert mapped <= fields, "a row names a Config field that does not exist"
    assert fields - mapped == NOT_IN_TABLE
    for row in TABLE.values():
        if row["scope"] == "python":
            assert row["config_field"] == row["name"]


def test_environment_variables_are_the_tables() -> None:
    assert ts.config.ENV_STORAGE_PATH == TABLE["storage_path"]["env"] == "TENSORSTREAM_STORAGE_PATH"
    assert ts.config.ENV_VRAM_BUDGET == TABLE["vram_budget_gb"]["env"] == "TENSORSTREAM_VRAM_BUDGET"
    for name in ("TENSORSTREAM_CUDA_LIBRARY", "TENSORSTREAM_CUFILE_LIBRARY"):
        assert TABLE[name]["scope"] == "environment"
        assert TABLE[name]["env"] == name


# ---- Config reads the table --------------------------------------------------------------


def test_config_defaults_are_the_tables() -> None:
    c = ts.Config()
    assert c.ram_cache_bytes == TABLE["ram_cache_bytes"]["default"]
    assert c.prefetch_strategy.value == TABLE["prefetch"]["default"]
    assert c.prefetch_depth == TABLE["prefetch_depth"]["default"]
    assert c.cache_policy == TABLE["cache_policy"]["default"]
    assert c.num_io_threads == TABLE["num_threads"]["default"]
    assert c.verify_checksums == TABLE["verify_checksums"]["default"]
    assert c.memory_pressure_mode.value == TABLE["memory_pressure_mode"]["default"]
    assert c.min_layer_size == TABLE["min_layer_size"]["default"]
    assert c.dtype == TABLE["dtype"]["default"]
    assert c.debug_mode == TABLE["debug_mode"]["default"]
    options = ts.Config(vram_budget_gb=1).engine_options()
    assert options["backend"] == TABLE["backend"]["default"]
    assert options["gds"] == TABLE["gds"]["default"]
    assert options["device"] == TABLE["device"]["default"]
    assert options["slots"] == TABLE["slots"]["default"]
    assert ts.Config(ram_cache_gb=1.5).engine_options(device="cpu")["ram_cache_bytes"] == 1.5 * GB


@pytest.mark.parametrize(("field", "setting"), [("num_io_threads", "num_threads"),
                                                ("prefetch_depth", "prefetch_depth")])  # fmt: skip
def test_config_ranges_are_the_tables(field: str, setting: str) -> None:
    low, high = TABLE[setting]["min"], TABLE[setting]["max"]
    assert getattr(ts.Config(**{field: low}), field) == low
    assert getattr(ts.Config(**{field: high}), field) == high
    for bad in (low - 1, high + 1):
        with pytest.raises(ValueError, match=rf"{field}: {bad} is out of range; expected an int "
                                             rf"from {low} to {high}"):  # fmt: skip
            ts.Config(**{field: bad})


def test_config_values_are_the_tables_choices() -> None:
    assert [m.value for m in ts.PrefetchStrategy] == TABLE["prefetch"]["choices"]
    assert [m.value for m in ts.MemoryPressureMode] == TABLE["memory_pressure_mode"]["choices"]
    assert set(config_module._CACHE_POLICIES) == set(TABLE["cache_policy"]["choices"])
    assert set(config_module._DTYPE_ALIASES.values()) == set(TABLE["dtype"]["choices"])
    assert set(config_module._ENGINE_BACKEND.values()) <= set(TABLE["backend"]["choices"])
    assert set(config_module._ENGINE_GDS.values()) <= set(TABLE["gds"]["choices"])
    for policy in TABLE["cache_policy"]["choices"]:
        assert ts.Config(cache_policy=policy.upper()).cache_policy == policy


def test_engine_options_keys_are_rows() -> None:
    for backend in ts.BackendType:
        options = ts.Config(vram_budget_gb=1, backend=backend).engine_options()
        assert all(TABLE[key]["engine_option"] for key in options), options


# ---- the options dict of _core.Engine ------------------------------------------------------


def test_every_option_row_is_accepted_with_its_default(store) -> None:
    options = {row["name"]: row["default"] for row in OPTIONS}
    options["device_budget"] = 1 << 30
    engine = _core.Engine(str(store), options)
    try:
        assert engine.stats()["device_budget"] == 1 << 30
    finally:
        engine.close()


def test_unknown_option_lists_the_known_ones(store) -> None:
    with pytest.raises(ValueError) as info:
        _core.Engine(str(store), {"device_budget": 1 << 20, "slot": 3})
    message = str(info.value)
    assert "unknown engine option 'slot'" in message
    assert "known options: " + ", ".join(row["name"] for row in OPTIONS) in message
    # Python-only settings are not engine options.
    with pytest.raises(ValueError, match="unknown engine option 'debug_mode'"):
        _core.Engine(str(store), {"device_budget": 1 << 20, "debug_mode": True})


@pytest.mark.parametrize(
    ("key", "value", "error", "shown"),
    [
        ("slots", "4", TypeError, "engine option 'slots': expected an int; got str '4'"),
        ("slots", 2.0, TypeError, "engine option 'slots': expected an int; got float 2.0"),
        ("slots", True, TypeError, "engine option 'slots': expected an int; got bool True"),
        ("slots", None, TypeError, "engine option 'slots': expected an int; got NoneType None"),
        ("prefetch_depth", "2", TypeError, "'prefetch_depth': expected an int or None; got str"),
        ("verify_checksums", 1, TypeError, "'verify_checksums': expected True or False; got int 1"),
        ("backend", 3, TypeError, "engine option 'backend': expected a str; got int 3"),
        ("device_budget", -1, ValueError, "option 'device_budget': -1 is not a non-negative"),
        ("slots", 0, ValueError, "engine option 'slots': 0 is below the minimum of 1"),
        ("prefetch_depth", 65, ValueError, "'prefetch_depth': 65 is above the maximum of 64"),
        ("wait_timeout_ms", 0, ValueError, "'wait_timeout_ms': 0 is below the minimum of 1"),
        ("gds", "maybe", ValueError, "engine option 'gds': gds mode 'maybe' is not one of"),
        ("cache_policy", "mru", ValueError, "engine option 'cache_policy'"),
    ],
)
def test_bad_option_values_name_the_key(store, key, value, error, shown) -> None:
    with pytest.raises(error) as info:
        _core.Engine(str(store), {"device_budget": 1 << 20, key: value})
    assert shown in str(info.value)


def test_options_reach_the_engine(store) -> None:
    engine = _core.Engine(
        str(store),
        {"device_budget": 1 << 20, "slots": 3, "prefetch_depth": None, "num_threads": 200,
         "wait_timeout_ms": 5000, "backend": "pread", "check_invariants": True},
    )  # fmt: skip
    try:
        plan = engine.plan  # everything may fit: then nothing streams
        assert plan["arena_bytes"] == 0 or plan["arena_bytes"] >= 3 * plan["largest_need"]
        engine.acquire(1)
        engine.release(1)
        stats = engine.stats()
        assert stats["backend"] == "pread"
        assert stats["invariant_checks"] == 2
    finally:
        engine.close()


# ---- the statistics dict -----------------------------------------------------------------

STATS_KEYS = {
    "acquires", "device_hits", "device_misses", "bytes_from_storage", "bytes_from_ram_tier",
    "bytes_to_device", "fills", "prefetches_issued", "prefetches_used", "prefetches_wasted",
    "prefetches_cancelled", "failures", "stall_seconds", "io_seconds", "fill_seconds",
    "storage_gbps", "device_bytes_in_use", "device_bytes_peak", "device_budget",
    "prefetch_depth", "order_learned", "block_load_seconds", "backend", "in_place",
    "backend_note", "gds_mode", "gds_files", "gds_bytes", "gds_reason", "gds",
    "bytes_from_page_cache", "ram_tier", "io", "invariant_checks", "arena_bytes",
    "arena_bytes_in_use", "arena_bytes_peak", "overlap", "row_reads", "rows_read",
    "bytes_of_rows",
}  # fmt: skip
RAM_TIER_KEYS = {"capacity", "bytes_in_use", "peak_bytes_in_use", "entries", "hits", "misses",
                 "evictions", "rejections", "hit_rate"}  # fmt: skip
IO_KEYS = {"bytes_read", "requests", "reads_direct", "reads_buffered", "busy_seconds"}


def test_statistics_dict_has_every_key_and_type(store) -> None:
    engine = _core.Engine(str(store), {"device_budget": 1 << 20, "backend": "pread",
                                       "ram_cache_bytes": 1 << 20})  # fmt: skip
    try:
        engine.acquire(0)
        engine.release(0)
        stats = engine.stats()
    finally:
        engine.close()
    assert STATS_KEYS <= set(stats)
    assert RAM_TIER_KEYS <= set(stats["ram_tier"])
    assert IO_KEYS <= set(stats["io"])
    assert isinstance(stats["acquires"], int) and stats["acquires"] == 1
    assert isinstance(stats["stall_seconds"], float)
    assert isinstance(stats["in_place"], bool)
    assert stats["gds_mode"] == "auto"
    assert isinstance(stats["block_load_seconds"], list) and len(stats["block_load_seconds"]) == 4
    assert isinstance(stats["ram_tier"]["hit_rate"], float)
    # The tier never takes more than every block once: this store is smaller than 1 MiB.
    assert 0 < stats["ram_tier"]["capacity"] < 1 << 20
    assert stats["ram_tier"]["capacity"] % 4096 == 0
    assert stats["io"]["bytes_read"] >= stats["bytes_from_storage"] > 0
    files = stats["io"]["files"]
    assert [Path(f["path"]) for f in files] == [store]
    assert set(files[0]) == {"id", "path", "size", "direct", "direct_note"}
    assert stats["invariant_checks"] == 0


def test_ram_tier_capacity_is_the_request_when_the_store_is_larger(store) -> None:
    engine = _core.Engine(str(store), {"device_budget": 1 << 20, "backend": "pread",
                                       "ram_cache_bytes": 1 << 14})  # fmt: skip
    try:
        assert engine.stats()["ram_tier"]["capacity"] == 1 << 14
    finally:
        engine.close()


# ---- the generated documentation ---------------------------------------------------------


def _generated_part(text: str) -> str:
    match = re.search(r"<!-- BEGIN GENERATED[^\n]*-->\n(.*)<!-- END GENERATED -->", text, re.S)
    assert match, "docs/runtime-settings.md has lost its GENERATED markers"
    return match[1]


def test_docs_page_is_the_commands_output(capfd) -> None:
    assert _core.cli_run(["settings", "--markdown"], False) == 0
    printed = capfd.readouterr().out
    assert _generated_part(PAGE.read_text(encoding="utf-8")) == printed
    for row in _core.settings():
        assert f"| `{row['name']}` |" in printed
    for key in STATS_KEYS:
        assert f"| `{key}` |" in printed


def test_python_entry_point_checks_the_page(run_cli, tmp_path) -> None:
    result = run_cli("settings", "--check", PAGE)
    assert result.returncode == 0, result.stderr
    drifted = tmp_path / "page.md"
    page = PAGE.read_text(encoding="utf-8")
    drifted.write_text(page.replace("| `slots` | 2 |", "| `slots` | 7 |"), encoding="utf-8")
    result = run_cli("settings", "--check", drifted)
    assert result.returncode == 1
    assert "the generated part differs" in result.stderr
    listing = run_cli("settings")
    assert listing.returncode == 0
    assert "num_threads" in listing.stdout and "TENSORSTREAM_VRAM_BUDGET" in listing.stdout
