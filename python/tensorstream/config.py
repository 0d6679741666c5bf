"""``Config``: every user-facing setting of TensorStream, validated, with its defaults.

This module is pure Python and does not import torch at import time. torch is imported only
where a torch object must be examined or queried: a ``torch.dtype`` / ``torch.device`` given by
the caller (checked only when torch is already imported, which it must be for the caller to
hold one), ``Config.torch_dtype``, and the CUDA queries behind an automatic VRAM budget.

Sizes
-----
Every size may be given as a number or as a string (see :func:`parse_size`):

* a number given for a field named ``*_gb`` is in GB, decimal (``vram_budget_gb=4.0`` is
  4,000,000,000 bytes); a number for any other size (``min_layer_size``) is in bytes;
* a string carries its own unit: ``B``; ``KB``, ``MB``, ``GB``, ``TB`` (powers of 10^3);
  ``KiB``, ``MiB``, ``GiB``, ``TiB`` (powers of 2^10); case-insensitive, optional space,
  decimals allowed: ``"7.8GB"``, ``"512MiB"``, ``"1 GiB"``. A string holding a bare number is
  read like the number itself (``"4"`` for ``vram_budget_gb`` is 4 GB);
* results are rounded to the nearest byte; negative sizes are refused.

Defaults and precedence
-----------------------
The defaults, and the ranges and values the validators accept, are not written here: they come
from the engine's one settings table (``include/tensorstream/settings.hpp``, read through
``_core.settings()``), which also generates docs/runtime-settings.md (``tensorstream settings
--markdown``). For every field: an explicit argument (or assignment) > the environment > the
default.
Only two fields read the environment, and an empty variable counts as unset:

* ``storage_path``: ``None`` (the default) means ``$TENSORSTREAM_STORAGE_PATH`` if set, else
  the per-user cache directory ``$XDG_CACHE_HOME/tensorstream`` (``~/.cache/tensorstream`` when
  ``XDG_CACHE_HOME`` is unset). The path is stored absolute (``~`` expanded); constructing a
  Config never creates it (``create_default_config`` does).
* ``vram_budget_gb``: ``None`` (the default) means ``$TENSORSTREAM_VRAM_BUDGET`` if set (a size
  string such as ``"6GB"``, or a bare number in GB), else *automatic*: the budget is decided
  from the device's free memory when the engine starts (see :func:`default_vram_budget`).

The environment is read when the value is set (construction, assignment of ``None``,
``replace``, ``from_dict``), not later; a malformed variable raises ``ValueError`` naming it.

Errors
------
A value of the wrong type raises ``TypeError``, a value of the right type outside the allowed
range or set raises ``ValueError``; both messages name the field, show the bad value and say
what is accepted. An assignment that fails leaves the field unchanged.
"""

from __future__ import annotations

import contextlib
import inspect
import json
import math
import numbers
import os
import re
import sys
import tempfile
from collections.abc import Mapping
from decimal import ROUND_HALF_UP, Decimal
from enum import Enum
from typing import TYPE_CHECKING, Any, Callable, Union

from . import _core

if TYPE_CHECKING:
    import torch

__all__ = [
    "ENV_STORAGE_PATH",
    "ENV_VRAM_BUDGET",
    "BackendType",
    "Config",
    "MemoryPressureMode",
    "PrefetchStrategy",
    "create_default_config",
    "default_storage_path",
    "default_vram_budget",
    "parse_size",
]

PathLike = Union[str, "os.PathLike[str]"]
SizeLike = Union[int, float, str]

# The settings table of the engine, one dict per setting, by name (see _core.settings()).
_SETTINGS: dict[str, dict[str, Any]] = {row["name"]: row for row in _core.settings()}

ENV_STORAGE_PATH: str = _SETTINGS["storage_path"]["env"]
ENV_VRAM_BUDGET: str = _SETTINGS["vram_budget_gb"]["env"]

GB = 10**9
MiB = 1 << 20
_MAX_BYTES = (1 << 63) - 1

# ---- enums ---------------------------------------------------------------------------------


class _ParsableEnum(Enum):
    """An enum of lower-case string values that also parses names and values from strings,
    case-insensitively ("IO_URING", "io_uring", "io-uring" all give the same member)."""

    @classmethod
    def _missing_(cls, value: object) -> Any:
        if isinstance(value, str):
            key = value.strip().lower().replace("-", "_")
            for member in cls:
                if member.value == key:
                    return member
        return None

    @classmethod
    def parse(cls, value: object, field: str | None = None) -> Any:
        """The member that ``value`` (a member, or its name or value as a string) designates.

        Raises TypeError for a value that is neither, ValueError for an unknown string; the
        message names ``field`` (default: the enum's name) and lists the accepted values.
        """
        if isinstance(value, cls):
            return value
        label = field or cls.__name__
        if isinstance(value, str):
            try:
                return cls(value)
            except ValueError:
                raise ValueError(
                    f"{label}: {value!r} is not valid; expected {cls._accepted()}"
                ) from None
        raise TypeError(
            f"{label}: expected {cls._accepted()}; got {type(value).__name__} {value!r}"
        )

    @classmethod
    def _accepted(cls) -> str:
        members = ", ".join(f"{cls.__name__}.{m.name}" for m in cls)
        values = ", ".join(repr(m.value) for m in cls)
        return f"one of {members} or the strings {values} (case-insensitive)"


class BackendType(_ParsableEnum):
    """How the engine reads the store.

    AUTO and CUDA let the engine choose: io_uring where the kernel allows it, else pread,
    and on a CUDA device GPUDirect Storage (cuFile, straight into GPU memory) for every file
    where it works with the nvidia-fs kernel module, the host path elsewhere, with the reason
    in the statistics (``gds_reason``). GPUDIRECT insists on GPUDirect Storage: starting the
    engine fails, saying why, when it cannot be used (a CPU device, a RAM tier,
    ``verify_checksums``, or a file cuFile cannot register). MMAP, IO_URING and PREAD read
    through host memory only (GPUDirect Storage off).
    """

    AUTO = "auto"
    GPUDIRECT = "gpudirect"
    CUDA = "cuda"
    MMAP = "mmap"
    IO_URING = "io_uring"
    PREAD = "pread"


class PrefetchStrategy(_ParsableEnum):
    """Which blocks are read ahead: none, the next in store order (cyclic), or along the
    order learned on the first pass (ADAPTIVE)."""

    NONE = "none"
    NEXT_LAYER = "next_layer"
    ADAPTIVE = "adaptive"


class MemoryPressureMode(_ParsableEnum):
    """How much headroom the automatic budget leaves, and what a streamed model does when
    torch runs out of memory during its forward: CONSERVATIVE (60% of free GPU memory / 1/8
    of available RAM; shrink the weight budget to half and retry, up to twice), BALANCED
    (80% / 1/4; shrink to three quarters, retry once), AGGRESSIVE (90% / 1/2; never demote,
    the error reaches the caller). See docs/runtime-settings.md."""

    CONSERVATIVE = "conservative"
    BALANCED = "balanced"
    AGGRESSIVE = "aggressive"


# Engine names of the backends (EngineOptions.backend accepts "auto", "pread", "io_uring",
# "mmap"). GPUDirect Storage is the engine's separate `gds` option (see _ENGINE_GDS); the
# backend reads what GDS does not, so GPUDIRECT/CUDA map to "auto".
_ENGINE_BACKEND = {
    BackendType.AUTO: "auto",
    BackendType.GPUDIRECT: "auto",
    BackendType.CUDA: "auto",
    BackendType.MMAP: "mmap",
    BackendType.IO_URING: "io_uring",
    BackendType.PREAD: "pread",
}

# EngineOptions.gds: "on" insists on GPUDirect Storage, "auto" uses it where it works, "off"
# never loads cuFile.
_ENGINE_GDS = {
    BackendType.AUTO: "auto",
    BackendType.GPUDIRECT: "on",
    BackendType.CUDA: "auto",
    BackendType.MMAP: "off",
    BackendType.IO_URING: "off",
    BackendType.PREAD: "off",
}

# ---- sizes ---------------------------------------------------------------------------------

_SIZE_UNITS = {
    "b": 1,
    "kb": 10**3,
    "mb": 10**6,
    "gb": 10**9,
    "tb": 10**12,
    "kib": 1 << 10,
    "mib": 1 << 20,
    "gib": 1 << 30,
    "tib": 1 << 40,
}
_SIZE_RE = re.compile(r"^\s*(?P<num>[+-]?(?:\d+(?:\.\d*)?|\.\d+))\s*(?P<unit>[A-Za-z]*)\s*$")


def _size_forms(number_unit: int) -> str:
    number = {1: "bytes", GB: "GB (10^9 bytes)"}.get(number_unit, f"units of {number_unit} bytes")
    return (
        f"expected a non-negative number of {number}, or a string with a unit such as "
        "'7.8GB', '512MiB' or '1 GiB' (units, case-insensitive: B; KB, MB, GB, TB = 10^3, "
        "10^6, 10^9, 10^12 bytes; KiB, MiB, GiB, TiB = 2^10, 2^20, 2^30, 2^40 bytes)"
    )


def parse_size(value: SizeLike, *, field: str = "size", number_unit: int = 1) -> int:
    """A size in bytes from a number or a string such as ``"7.8GB"`` or ``"512MiB"``.

    Args:
        value: an int or float, in units of ``number_unit``; or a string: a number followed by
            an optional unit (B; KB, MB, GB, TB: powers of 1000; KiB, MiB, GiB, TiB: powers of
            1024; case-insensitive, space allowed). A string without a unit is read like a
            number (in units of ``number_unit``).
        field: the name used in error messages (a Config field or an environment variable).
        number_unit: bytes per unit of a bare number: 1 (bytes, the default) or ``10**9`` for
            fields given in GB.

    Returns:
        The size in bytes, rounded to the nearest byte.

    Raises:
        TypeError: ``value`` is not a number or a string (``bool`` is refused too).
        ValueError: a malformed string, an unknown unit, a negative, infinite or NaN size, or
            one above 2^63 - 1 bytes; the message names ``field`` and the accepted forms.

    >>> parse_size("7.8GB"), parse_size("512MiB"), parse_size(4.0, number_unit=10**9)
    (7800000000, 536870912, 4000000000)
    """
    if isinstance(value, bool) or not isinstance(value, (numbers.Real, str)):
        raise TypeError(
            f"{field}: {_size_forms(number_unit)}; got {type(value).__name__} {value!r}"
        )
    if isinstance(value, numbers.Integral):
        amount = Decimal(int(value)) * number_unit
    elif isinstance(value, numbers.Real):
        as_float = float(value)
        if not math.isfinite(as_float):
            raise ValueError(f"{field}: size {value!r} is not finite; {_size_forms(number_unit)}")
        amount = Decimal(as_float) * number_unit
    else:
        match = _SIZE_RE.match(value)
        if match is None:
            raise ValueError(f"{field}: invalid size {value!r}; {_size_forms(number_unit)}")
        unit = match["unit"].lower()
        scale = _SIZE_UNITS.get(unit) if unit else number_unit
        if scale is None:
            raise ValueError(
                f"{field}: unknown unit {match['unit']!r} in size {value!r}; "
                f"{_size_forms(number_unit)}"
            )
        amount = Decimal(match["num"]) * scale
    if amount < 0:
        raise ValueError(f"{field}: size {value!r} is negative; {_size_forms(number_unit)}")
    if amount > _MAX_BYTES:
        raise ValueError(f"{field}: size {value!r} exceeds the maximum of 2^63 - 1 bytes")
    return int(amount.quantize(Decimal(1), rounding=ROUND_HALF_UP))


# ---- machine queries -----------------------------------------------------------------------


def _meminfo() -> dict[str, int]:
    """/proc/meminfo in bytes (empty where it cannot be read)."""
    values: dict[str, int] = {}
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                key, _, rest = line.partition(":")
                parts = rest.split()
                if parts and parts[0].isdigit():
                    scale = 1024 if len(parts) > 1 and parts[1] == "kB" else 1
                    values[key.strip()] = int(parts[0]) * scale
    except OSError:
        pass
    return values


def _available_ram_bytes() -> int:
    """RAM available to new allocations without swapping (MemAvailable on Linux)."""
    info = _meminfo()
    if "MemAvailable" in info:
        return info["MemAvailable"]
    if "MemFree" in info:  # kernels before 3.14
        return info["MemFree"] + info.get("Cached", 0) + info.get("Buffers", 0)
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError) as e:
        raise RuntimeError(f"cannot determine the available RAM of this machine: {e}") from e


def _cuda_available() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return bool(torch.cuda.is_available())


def _round_down_mib(n: int) -> int:
    return max(MiB, n // MiB * MiB)


# Share of the free device memory (CUDA) / available RAM (CPU) that the automatic budget
# takes, per MemoryPressureMode: the rest is headroom for activations and the KV cache.
_BUDGET_SHARE = {
    MemoryPressureMode.CONSERVATIVE: (0.6, 1 / 8),
    MemoryPressureMode.BALANCED: (0.8, 1 / 4),
    MemoryPressureMode.AGGRESSIVE: (0.9, 1 / 2),
}


def default_vram_budget(
    device: str | None = None, mode: MemoryPressureMode | str = MemoryPressureMode.BALANCED
) -> int:
    """The automatic weight budget in bytes for ``device``, used when ``vram_budget_gb`` is
    unset (None and no ``TENSORSTREAM_VRAM_BUDGET``). The share taken depends on the memory
    pressure ``mode`` (CONSERVATIVE / BALANCED / AGGRESSIVE):

    * ``"cuda"`` / ``"cuda:N"`` (or ``None`` when CUDA is available): 60% / 80% / 90% of the
      device's free memory (``torch.cuda.mem_get_info``), leaving room for activations and
      the KV cache;
    * ``"cpu"`` (or ``None`` without CUDA): 1/8 / 1/4 / 1/2 of the available RAM
      (MemAvailable).

    Rounded down to a whole MiB (at least 1 MiB). Raises RuntimeError for a CUDA device when
    CUDA is not available.
    """
    gpu_share, cpu_share = _BUDGET_SHARE[MemoryPressureMode.parse(mode)]
    text = _check_device(device, os.environ) if device is not None else None
    if text is None:
        text = "cuda" if _cuda_available() else "cpu"
    if text == "cpu":
        return _round_down_mib(int(_available_ram_bytes() * cpu_share))
    if not _cuda_available():
        raise RuntimeError(f"device {text!r}: CUDA is not available on this machine")
    import torch

    index = int(text.partition(":")[2] or 0)
    free, _total = torch.cuda.mem_get_info(index)
    return _round_down_mib(int(free * gpu_share))


def default_storage_path(environ: Mapping[str, str] | None = None) -> str:
    """``$TENSORSTREAM_STORAGE_PATH`` if set and non-empty, else the per-user cache directory
    ``$XDG_CACHE_HOME/tensorstream`` (``~/.cache/tensorstream``); absolute, ``~`` expanded."""
    environ = os.environ if environ is None else environ
    env = environ.get(ENV_STORAGE_PATH, "")
    if env.strip():
        return os.path.abspath(os.path.expanduser(env))
    xdg = environ.get("XDG_CACHE_HOME", "")
    base = xdg if os.path.isabs(xdg) else os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.abspath(os.path.join(base, "tensorstream"))


# ---- field validators ----------------------------------------------------------------------
# Each takes (value, environ) and returns the normalised value that Config stores, or raises
# TypeError / ValueError naming the field.

_CACHE_POLICIES = tuple(_SETTINGS["cache_policy"]["choices"])
_DTYPE_ALIASES = {
    "float16": "float16",
    "fp16": "float16",
    "half": "float16",
    "bfloat16": "bfloat16",
    "bf16": "bfloat16",
}
_DTYPE_ACCEPTED = (
    "expected None, torch.float16, torch.bfloat16 or one of the strings 'float16', 'bfloat16', "
    "'fp16', 'bf16' (None keeps each weight's dtype)"
)
_DEVICE_RE = re.compile(r"^(cpu|cuda)(?::(\d+))?$")
_DEVICE_ACCEPTED = "expected None, 'cpu', 'cuda', 'cuda:N' (N >= 0) or a torch.device of those"


def _check_bool(field: str) -> Callable[[object, Mapping[str, str]], bool]:
    def check(value: object, environ: Mapping[str, str]) -> bool:
        if not isinstance(value, bool):
            raise TypeError(
                f"{field}: expected True or False; got {type(value).__name__} {value!r}"
            )
        return value

    return check


def _check_int(
    field: str, low: int, high: int, *, optional: bool = False
) -> Callable[[object, Mapping[str, str]], int | None]:
    accepted = f"an int from {low} to {high}" + (" or None" if optional else "")

    def check(value: object, environ: Mapping[str, str]) -> int | None:
        if value is None and optional:
            return None
        if isinstance(value, bool) or not isinstance(value, numbers.Integral):
            raise TypeError(f"{field}: expected {accepted}; got {type(value).__name__} {value!r}")
        number = int(value)
        if not low <= number <= high:
            raise ValueError(f"{field}: {number} is out of range; expected {accepted}")
        return number

    return check


def _check_int_setting(
    field: str, setting: str
) -> Callable[[object, Mapping[str, str]], int | None]:
    """``_check_int`` with the range (and whether None is accepted) of the table's row
    ``setting``."""
    row = _SETTINGS[setting]
    return _check_int(field, row["min"], row["max"], optional=row["optional"])


def _check_enum(
    field: str, enum: type[_ParsableEnum]
) -> Callable[[object, Mapping[str, str]], Any]:
    def check(value: object, environ: Mapping[str, str]) -> Any:
        return enum.parse(value, field)

    return check


def _check_storage_path(value: object, environ: Mapping[str, str]) -> str:
    if value is None:
        return default_storage_path(environ)
    if not isinstance(value, (str, os.PathLike)):
        raise TypeError(
            f"storage_path: expected a path (str or os.PathLike) or None; "
            f"got {type(value).__name__} {value!r}"
        )
    path = os.fspath(value)
    if not isinstance(path, str):
        raise TypeError(f"storage_path: expected a str path, got {type(path).__name__} {path!r}")
    if not path.strip() or "\0" in path:
        raise ValueError(
            f"storage_path: {path!r} is not a usable path; expected a directory path, or None "
            f"for ${ENV_STORAGE_PATH} / ~/.cache/tensorstream"
        )
    return os.path.abspath(os.path.expanduser(path))


def _positive_budget(nbytes: int, field: str, shown: object) -> int:
    if nbytes == 0:
        raise ValueError(
            f"{field}: {shown!r} is a zero budget; expected a size greater than 0, or None to "
            "size the budget from the device's free memory"
        )
    return nbytes


def _check_vram_budget(value: object, environ: Mapping[str, str]) -> int | None:
    if value is None:
        env = environ.get(ENV_VRAM_BUDGET, "")
        if not env.strip():
            return None
        field = f"environment variable {ENV_VRAM_BUDGET}"
        return _positive_budget(parse_size(env, field=field, number_unit=GB), field, env)
    nbytes = parse_size(value, field="vram_budget_gb", number_unit=GB)  # type: ignore[arg-type]
    return _positive_budget(nbytes, "vram_budget_gb", value)


def _check_ram_cache(value: object, environ: Mapping[str, str]) -> int:
    if value is None:
        return 0
    return parse_size(value, field="ram_cache_gb", number_unit=GB)  # type: ignore[arg-type]


def _check_min_layer_size(value: object, environ: Mapping[str, str]) -> int:
    return parse_size(value, field="min_layer_size")  # type: ignore[arg-type]


def _check_cache_policy(value: object, environ: Mapping[str, str]) -> str:
    accepted = "one of " + ", ".join(repr(p) for p in _CACHE_POLICIES) + " (case-insensitive)"
    if not isinstance(value, str):
        raise TypeError(f"cache_policy: expected {accepted}; got {type(value).__name__} {value!r}")
    policy = value.strip().lower()
    if policy not in _CACHE_POLICIES:
        raise ValueError(f"cache_policy: {value!r} is not valid; expected {accepted}")
    return policy


def _check_dtype(value: object, environ: Mapping[str, str]) -> str | None:
    if value is None:
        return None
    if isinstance(value, str):
        key = value.strip().lower()
        key = key[len("torch.") :] if key.startswith("torch.") else key
        name = _DTYPE_ALIASES.get(key)
        if name is None:
            raise ValueError(f"dtype: {value!r} is not supported; {_DTYPE_ACCEPTED}")
        return name
    # A torch.dtype can only exist once torch is imported: no need to import it here.
    torch_module = sys.modules.get("torch")
    if torch_module is not None and isinstance(value, torch_module.dtype):
        name = str(value).rpartition(".")[2]
        if name not in ("float16", "bfloat16"):
            raise ValueError(f"dtype: {value} is not supported; {_DTYPE_ACCEPTED}")
        return name
    raise TypeError(f"dtype: {_DTYPE_ACCEPTED}; got {type(value).__name__} {value!r}")


def _check_device(value: object, environ: Mapping[str, str]) -> str | None:
    if value is None:
        return None
    torch_module = sys.modules.get("torch")
    if torch_module is not None and isinstance(value, torch_module.device):
        text = str(value)
    elif isinstance(value, str):
        text = value.strip().lower()
    else:
        raise TypeError(f"device: {_DEVICE_ACCEPTED}; got {type(value).__name__} {value!r}")
    match = _DEVICE_RE.match(text)
    if match is None or (match[1] == "cpu" and match[2] not in (None, "0")):
        raise ValueError(f"device: {value!r} is not supported; {_DEVICE_ACCEPTED}")
    if match[1] == "cpu" or match[2] is None:
        return match[1]
    return f"cuda:{int(match[2])}"


_VALIDATORS: dict[str, Callable[[object, Mapping[str, str]], Any]] = {
    "storage_path": _check_storage_path,
    "vram_budget_gb": _check_vram_budget,
    "ram_cache_gb": _check_ram_cache,
    "backend": _check_enum("backend", BackendType),
    "prefetch_strategy": _check_enum("prefetch_strategy", PrefetchStrategy),
    "prefetch_depth": _check_int_setting("prefetch_depth", "prefetch_depth"),
    "cache_policy": _check_cache_policy,
    "compression_enabled": _check_bool("compression_enabled"),
    "compression_level": _check_int_setting("compression_level", "compression_level"),
    "num_io_threads": _check_int_setting("num_io_threads", "num_threads"),
    "memory_pressure_mode": _check_enum("memory_pressure_mode", MemoryPressureMode),
    "verify_checksums": _check_bool("verify_checksums"),
    "min_layer_size": _check_min_layer_size,
    "dtype": _check_dtype,
    "device": _check_device,
    "debug_mode": _check_bool("debug_mode"),
}
_SIZE_FIELDS_GB = ("vram_budget_gb", "ram_cache_gb")


def _field(name: str, doc: str) -> property:
    validate = _VALIDATORS[name]

    if name in _SIZE_FIELDS_GB:

        def fget(self: Config) -> Any:
            nbytes = self._values[name]
            return None if nbytes is None else nbytes / GB

    else:

        def fget(self: Config) -> Any:
            return self._values[name]

    def fset(self: Config, value: Any) -> None:
        self._values[name] = validate(value, os.environ)

    return property(fget, fset, doc=doc)


# ---- defaults, from the settings table -----------------------------------------------------


def _backend_default() -> BackendType:
    """The BackendType that gives the engine's default ``backend`` and ``gds``."""
    engine = (_SETTINGS["backend"]["default"], _SETTINGS["gds"]["default"])
    return next(m for m in BackendType if (_ENGINE_BACKEND[m], _ENGINE_GDS[m]) == engine)


# The default of each field that the table gives (storage_path, vram_budget_gb and device are
# None, "decide later": the environment, the free memory, the model's device).
_TABLE_DEFAULTS: dict[str, Any] = {
    "ram_cache_gb": _SETTINGS["ram_cache_bytes"]["default"] / GB,
    "backend": _backend_default(),
    "prefetch_strategy": PrefetchStrategy(_SETTINGS["prefetch"]["default"]),
    "prefetch_depth": _SETTINGS["prefetch_depth"]["default"],
    "cache_policy": _SETTINGS["cache_policy"]["default"],
    "compression_enabled": _SETTINGS["compression_enabled"]["default"],
    "compression_level": _SETTINGS["compression_level"]["default"],
    "num_io_threads": _SETTINGS["num_threads"]["default"],
    "memory_pressure_mode": MemoryPressureMode(_SETTINGS["memory_pressure_mode"]["default"]),
    "verify_checksums": _SETTINGS["verify_checksums"]["default"],
    "min_layer_size": _SETTINGS["min_layer_size"]["default"],
    "dtype": _SETTINGS["dtype"]["default"],
    "debug_mode": _SETTINGS["debug_mode"]["default"],
}


def _range(setting: str) -> str:
    row = _SETTINGS[setting]
    return f"{row['min']}..{row['max']}"


# ---- Config --------------------------------------------------------------------------------

_FILE_FORMAT = "tensorstream-config"
_FILE_VERSION = 1


class Config:
    """Every setting of TensorStream, validated on construction and on each assignment.

    Fields (defaults in the signature, taken from the settings table; ``tensorstream settings``
    prints them, docs/runtime-settings.md explains each; sizes as documented in this module):

    * ``storage_path`` -- where stores live. None: ``$TENSORSTREAM_STORAGE_PATH``, else
      ``~/.cache/tensorstream``. Stored as an absolute str.
    * ``vram_budget_gb`` -- hard cap on weight bytes held on the compute device (on
      ``device="cpu"``: weight bytes held in RAM at once); GB or a size string. None:
      ``$TENSORSTREAM_VRAM_BUDGET``, else automatic (:func:`default_vram_budget` at engine
      start). Must be > 0. Reads back as float GB; ``vram_budget_bytes`` gives the int.
    * ``ram_cache_gb`` -- pinned-RAM tier between disk and device, GB or a size string; 0 (also
      for None): no tier. ``ram_cache_bytes`` gives the int.
    * ``backend`` -- :class:`BackendType` (or its name as a string).
    * ``prefetch_strategy`` -- :class:`PrefetchStrategy`.
    * ``prefetch_depth`` -- layers read ahead (range: the table's ``prefetch_depth``); None:
      chosen from measured I/O vs compute.
    * ``cache_policy`` -- RAM-tier eviction: "auto" (cyclic-aware), "lru", "lfu", "fifo".
    * ``compression_enabled``, ``compression_level`` (range: the table's
      ``compression_level``) -- write the stores losslessly compressed at that level
      (``offload``: ``<fingerprint>.z<level>.tstore``; ``from_pretrained``: a converted,
      compressed store instead of the checkpoint in place); the engine decodes each unit on
      its fill path.
    * ``num_io_threads`` -- I/O worker threads (range: the table's ``num_threads``).
    * ``memory_pressure_mode`` -- :class:`MemoryPressureMode`.
    * ``verify_checksums`` -- verify every read against the store's checksums.
    * ``min_layer_size`` -- modules smaller than this many bytes stay resident; bytes or a size
      string.
    * ``dtype`` -- None (keep), torch.float16 / torch.bfloat16 or "float16", "bfloat16",
      "fp16", "bf16". Reads back as the canonical name ("float16" / "bfloat16");
      ``torch_dtype`` gives the torch.dtype.
    * ``device`` -- None (where the model is moved with ``.to()``), "cpu", "cuda", "cuda:N" or
      a torch.device. Reads back as a str.
    * ``debug_mode`` -- True: the ``tensorstream`` logger logs every acquire (ready or
      stalled, with its time) and release of a streamed block at DEBUG, with a stderr handler
      if it has none, and the engine checks its invariants after every call
      (``check_invariants``), raising TensorStreamError naming the broken one.

    Equality compares the normalised values (``Config(dtype=torch.bfloat16) ==
    Config(dtype="bf16")``). Not thread-safe for concurrent assignment; not hashable (mutable).
    """

    __slots__ = ("_values",)
    __hash__ = None  # type: ignore[assignment]  # mutable

    def __init__(
        self,
        storage_path: PathLike | None = None,
        *,
        vram_budget_gb: SizeLike | None = None,
        ram_cache_gb: SizeLike = _TABLE_DEFAULTS["ram_cache_gb"],
        backend: BackendType | str = _TABLE_DEFAULTS["backend"],
        prefetch_strategy: PrefetchStrategy | str = _TABLE_DEFAULTS["prefetch_strategy"],
        prefetch_depth: int | None = _TABLE_DEFAULTS["prefetch_depth"],
        cache_policy: str = _TABLE_DEFAULTS["cache_policy"],
        compression_enabled: bool = _TABLE_DEFAULTS["compression_enabled"],
        compression_level: int = _TABLE_DEFAULTS["compression_level"],
        num_io_threads: int = _TABLE_DEFAULTS["num_io_threads"],
        memory_pressure_mode: MemoryPressureMode | str = _TABLE_DEFAULTS["memory_pressure_mode"],
        verify_checksums: bool = _TABLE_DEFAULTS["verify_checksums"],
        min_layer_size: SizeLike = _TABLE_DEFAULTS["min_layer_size"],
        dtype: torch.dtype | str | None = _TABLE_DEFAULTS["dtype"],
        device: torch.device | str | None = None,
        debug_mode: bool = _TABLE_DEFAULTS["debug_mode"],
    ) -> None:
        self._values: dict[str, Any] = {}
        self._assign(
            {
                "storage_path": storage_path,
                "vram_budget_gb": vram_budget_gb,
                "ram_cache_gb": ram_cache_gb,
                "backend": backend,
                "prefetch_strategy": prefetch_strategy,
                "prefetch_depth": prefetch_depth,
                "cache_policy": cache_policy,
                "compression_enabled": compression_enabled,
                "compression_level": compression_level,
                "num_io_threads": num_io_threads,
                "memory_pressure_mode": memory_pressure_mode,
                "verify_checksums": verify_checksums,
                "min_layer_size": min_layer_size,
                "dtype": dtype,
                "device": device,
                "debug_mode": debug_mode,
            },
            os.environ,
        )

    def _assign(self, values: Mapping[str, Any], environ: Mapping[str, str]) -> None:
        # Validate everything first so that a failure leaves the Config unchanged.
        normalised = {name: _VALIDATORS[name](value, environ) for name, value in values.items()}
        self._values.update(normalised)

    # ---- fields (properties validate on assignment) ----------------------------------------

    storage_path = _field("storage_path", "Where stores live (absolute path).")
    vram_budget_gb = _field(
        "vram_budget_gb", "Weight budget on the compute device in GB (None: automatic)."
    )
    ram_cache_gb = _field("ram_cache_gb", "Pinned-RAM tier in GB (0: none).")
    backend = _field("backend", "I/O backend (BackendType).")
    prefetch_strategy = _field("prefetch_strategy", "Read-ahead strategy (PrefetchStrategy).")
    prefetch_depth = _field(
        "prefetch_depth", f"Layers read ahead, {_range('prefetch_depth')} (None: measured)."
    )
    cache_policy = _field("cache_policy", "RAM-tier eviction: auto, lru, lfu or fifo.")
    compression_enabled = _field("compression_enabled", "Lossless store compression.")
    compression_level = _field(
        "compression_level", f"Compression level, {_range('compression_level')}."
    )
    num_io_threads = _field("num_io_threads", f"I/O worker threads, {_range('num_threads')}.")
    memory_pressure_mode = _field("memory_pressure_mode", "MemoryPressureMode.")
    verify_checksums = _field("verify_checksums", "Verify every read against its checksum.")
    min_layer_size = _field("min_layer_size", "Modules below this many bytes stay resident.")
    dtype = _field("dtype", "'float16', 'bfloat16' or None (keep the weights' dtype).")
    device = _field("device", "'cpu', 'cuda', 'cuda:N' or None (where the model is moved).")
    debug_mode = _field(
        "debug_mode", "Log acquires and releases at DEBUG; check the engine's invariants."
    )

    @property
    def vram_budget_bytes(self) -> int | None:
        """The weight budget in bytes; None when automatic."""
        return self._values["vram_budget_gb"]

    @property
    def ram_cache_bytes(self) -> int:
        """The pinned-RAM tier in bytes (0: none)."""
        return self._values["ram_cache_gb"]

    @property
    def torch_dtype(self) -> torch.dtype | None:
        """``dtype`` as a torch.dtype (imports torch), or None."""
        name = self._values["dtype"]
        if name is None:
            return None
        import torch

        return getattr(torch, name)

    # ---- construction helpers ---------------------------------------------------------------

    @classmethod
    def fields(cls) -> tuple[str, ...]:
        """The field names, in the order of the constructor."""
        return tuple(_DEFAULTS)

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, **overrides: Any) -> Config:
        """A Config from the environment (``os.environ``, or ``environ`` when given):
        ``TENSORSTREAM_STORAGE_PATH`` and ``TENSORSTREAM_VRAM_BUDGET`` supply ``storage_path``
        and ``vram_budget_gb`` unless ``overrides`` give them; every other field takes its
        default or its override. ``Config(**overrides)`` is the same with ``os.environ``."""
        unknown = sorted(set(overrides) - set(_DEFAULTS))
        if unknown:
            raise TypeError(f"Config.from_env: unknown field(s) {', '.join(unknown)}")
        config = cls.__new__(cls)
        config._values = {}
        config._assign({**_DEFAULTS, **overrides}, os.environ if environ is None else environ)
        return config

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Config:
        """A Config from a mapping of field names (as written by :meth:`to_dict`); missing
        fields take their defaults (environment included); unknown keys raise ValueError."""
        if not isinstance(data, Mapping):
            raise TypeError(f"Config.from_dict: expected a mapping, got {type(data).__name__}")
        unknown = sorted(str(key) for key in data if key not in _DEFAULTS)
        if unknown:
            raise ValueError(
                f"Config.from_dict: unknown field(s) {', '.join(unknown)}; "
                f"known fields: {', '.join(_DEFAULTS)}"
            )
        return cls(**data)

    def to_dict(self) -> dict[str, Any]:
        """The fields as JSON-friendly values: enums as their string values, sizes as in the
        constructor (``*_gb`` as float GB, ``min_layer_size`` as int bytes), dtype and device
        as strings or None. ``Config.from_dict(c.to_dict()) == c``."""
        result: dict[str, Any] = {}
        for name in _DEFAULTS:
            value = getattr(self, name)
            result[name] = value.value if isinstance(value, Enum) else value
        return result

    def replace(self, **changes: Any) -> Config:
        """A validated copy with ``changes`` applied (this Config is unchanged)."""
        unknown = sorted(set(changes) - set(_DEFAULTS))
        if unknown:
            raise TypeError(f"Config.replace: unknown field(s) {', '.join(unknown)}")
        copy = _rebuild(type(self), self._values)
        copy._assign(changes, os.environ)
        return copy

    # ---- files -------------------------------------------------------------------------------

    def save(self, path: PathLike) -> None:
        """Writes this Config as JSON to ``path``, crash-safely: the text goes to a temporary
        file in the same directory, is fsynced, then renamed over ``path`` (os.replace). A
        failure leaves any previous file intact and no temporary file behind."""
        text = json.dumps(
            {"format": _FILE_FORMAT, "version": _FILE_VERSION, "config": self.to_dict()},
            indent=2,
        )
        _atomic_write_text(os.fspath(path), text + "\n")

    @classmethod
    def load(cls, path: PathLike) -> Config:
        """Reads a file written by :meth:`save`. Raises FileNotFoundError / OSError for an
        unreadable file, ValueError (naming the file) for one that is not a valid config."""
        path = os.fspath(path)
        with open(path, encoding="utf-8") as f:
            text = f.read()
        try:
            document = json.loads(text)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: not a TensorStream config file (invalid JSON: {e})") from e
        if not isinstance(document, dict) or document.get("format") != _FILE_FORMAT:
            raise ValueError(
                f"{path}: not a TensorStream config file (expected a JSON object with "
                f'"format": "{_FILE_FORMAT}")'
            )
        version = document.get("version")
        if not isinstance(version, int) or isinstance(version, bool) or version < 1:
            raise ValueError(f"{path}: invalid config file version {version!r}")
        if version > _FILE_VERSION:
            raise ValueError(
                f"{path}: config file version {version} is newer than this tensorstream reads "
                f"({_FILE_VERSION}); upgrade tensorstream"
            )
        body = document.get("config")
        if not isinstance(body, dict):
            raise ValueError(f'{path}: the "config" entry must be a JSON object')
        try:
            return cls.from_dict(body)
        except (TypeError, ValueError) as e:
            raise type(e)(f"{path}: {e}") from e

    # ---- the engine ---------------------------------------------------------------------------

    def engine_options(self, *, device: torch.device | str | None = None) -> dict[str, Any]:
        """The engine's options (names of ``EngineOptions`` / ``IoOptions``, see
        docs/runtime-settings.md) as a plain dict, every value concrete:

        * ``device``: this Config's device, else ``device`` (where the model lives), else "cpu";
        * ``device_budget``: ``vram_budget_bytes``, or when automatic
          :func:`default_vram_budget` for that device (queried now: call this at engine start);
        * ``ram_cache_bytes``, ``cache_policy``, ``verify_checksums``;
        * ``backend``: "auto", "pread", "io_uring" or "mmap"; GPUDIRECT and CUDA map to "auto"
          (the backend reads whatever GPUDirect Storage does not);
        * ``gds``: GPUDirect Storage, "on" for GPUDIRECT (the engine fails to start, saying
          why, where it cannot be used), "auto" for AUTO and CUDA (used per file where it
          works), "off" for MMAP, IO_URING and PREAD;
        * ``prefetch``: "none", "next_layer" or "adaptive"; ``prefetch_depth``: int or None
          (engine measures);
        * ``slots``: the streaming arena the plan aims for, in largest streamed units: 1 +
          prefetch depth (depth None counts as 1), at least 2; 1 with PrefetchStrategy.NONE;
        * ``num_threads``: ``num_io_threads``.

        The engine applies each key by its row of the settings table (``_core.settings()``);
        the runtime adds ``check_invariants`` for ``debug_mode``
        (:func:`tensorstream.runtime.engine_options`).
        """
        target = self.device or _check_device(device, os.environ) or _SETTINGS["device"]["default"]
        budget = self.vram_budget_bytes
        if budget is None:
            budget = default_vram_budget(target, self.memory_pressure_mode)
        strategy: PrefetchStrategy = self.prefetch_strategy
        depth: int | None = self.prefetch_depth
        # Nothing loads ahead without prefetching: an arena of one unit, the rest resident.
        least = _SETTINGS["slots"]["min"]
        slots = least if strategy is PrefetchStrategy.NONE else max(2, 1 + (depth or 1))
        return {
            "device": target,
            "device_budget": budget,
            "ram_cache_bytes": self.ram_cache_bytes,
            "cache_policy": self.cache_policy,
            "backend": _ENGINE_BACKEND[self.backend],
            "gds": _ENGINE_GDS[self.backend],
            "prefetch": strategy.value,
            "prefetch_depth": depth,
            "slots": slots,
            "verify_checksums": self.verify_checksums,
            "num_threads": self.num_io_threads,
        }

    # ---- object protocol ------------------------------------------------------------------

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Config):
            return NotImplemented
        return self._values == other._values

    def __repr__(self) -> str:
        fields = ", ".join(f"{name}={value!r}" for name, value in self.to_dict().items())
        return f"{type(self).__name__}({fields})"

    def __reduce__(self) -> tuple[Any, ...]:
        return (_rebuild, (type(self), dict(self._values)))


def _rebuild(cls: type[Config], values: Mapping[str, Any]) -> Config:
    """A Config holding ``values`` (already normalised): for copy, pickle and replace."""
    config = cls.__new__(cls)
    config._values = dict(values)
    return config


# The constructor's defaults, by field (those the settings table gives come from _TABLE_DEFAULTS).
_DEFAULTS: dict[str, Any] = {
    name: parameter.default
    for name, parameter in inspect.signature(Config.__init__).parameters.items()
    if name != "self"
}
assert tuple(_DEFAULTS) == tuple(_VALIDATORS), "Config fields and validators disagree"


def _atomic_write_text(path: str, text: str) -> None:
    """Replaces ``path`` with ``text`` via a temporary file in the same directory + fsync +
    os.replace; the file keeps the mode of the one it replaces (0644 for a new file)."""
    directory = os.path.dirname(os.path.abspath(path))
    try:
        mode = os.stat(path).st_mode & 0o7777
    except FileNotFoundError:
        mode = 0o644
    fd, temp = tempfile.mkstemp(dir=directory, prefix=f".{os.path.basename(path)}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fchmod(f.fileno(), mode)
            os.fsync(f.fileno())
        os.replace(temp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(temp)
        raise
    # Make the rename itself durable; not every file system lets a directory be fsynced.
    with contextlib.suppress(OSError):
        dir_fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)


def create_default_config(path: PathLike | None = None, **overrides: Any) -> Config:
    """A Config with defaults chosen for this machine, its storage directory created.

    Args:
        path: the storage directory (created with its parents if missing). None: the default
            location (``$TENSORSTREAM_STORAGE_PATH``, else ``~/.cache/tensorstream``).
        **overrides: any other Config field; given fields are used as they are.

    Rules for the fields not given (and, for the VRAM budget, not set in the environment):

    * ``vram_budget_gb``: ``$TENSORSTREAM_VRAM_BUDGET`` if set; else on a CUDA device (the
      ``device`` override, or any CUDA device when ``device`` is None and CUDA is available)
      80% of its free memory; else a quarter of the available RAM (MemAvailable);
    * ``ram_cache_gb``: a quarter of the available RAM when the weights go to a CUDA device
      (the pinned tier feeds DMA), an eighth on a CPU-only setup (the budget already sits in
      RAM);

    both rounded down to a whole MiB. Other fields keep the Config defaults.

    Raises TypeError / ValueError for a bad override (before anything is created),
    ``OSError`` if the directory cannot be created (e.g. ``path`` is a file).
    """
    if "storage_path" in overrides:
        raise TypeError("create_default_config: give the storage directory as `path`")
    config = Config(path, **overrides)
    device = config.device
    on_cuda = device.startswith("cuda") if device is not None else _cuda_available()
    if "vram_budget_gb" not in overrides and config.vram_budget_bytes is None:
        config.vram_budget_gb = f"{default_vram_budget(device)}B"
    if "ram_cache_gb" not in overrides:
        share = 4 if on_cuda else 8
        config.ram_cache_gb = f"{_round_down_mib(_available_ram_bytes() // share)}B"
    os.makedirs(config.storage_path, exist_ok=True)
    return config
