"""``from_pretrained(path, config)``: stream a Hugging Face checkpoint in place, never holding
the whole model in CPU RAM.

1. The model is built from ``path/config.json`` on the meta device (no weights allocated).
2. Blocks are found as :func:`tensorstream.offload` finds them; each block's parameters are
   streamed by the engine straight from the ``.safetensors`` files (no store is written) --
   unless ``Config.dtype`` asks for another floating-point dtype than the checkpoint's: the
   streamed tensors are then converted one at a time into a store in ``storage_path`` (kept
   and reused while the checkpoint's files are unchanged), which the engine streams.
3. Everything else (norms, tied weights, persistent buffers) is read from the checkpoint one
   tensor at a time and placed on the device; non-persistent buffers (rotary ``inv_freq``)
   are recomputed by building a fresh copy of the small module that owns them.
4. The hooks and the runtime handle are those of :func:`tensorstream.offload`.

The command ``tensorstream run MODEL_DIR ...`` loads a model this way and decodes greedily.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from . import _core
from ._dtypes import dtype_to_name
from ._store import store_writer
from .offload import (
    _ATTRIBUTE,
    OffloadedModel,
    _Block,
    _install_runtime,
    _named_block_params,
    _placeholder,
    _refuse_unimplemented,
    _shared_parameters,
    _start_engine,
    _TensorSlot,
    _trim_host_heap,
    _usable_storage,
    find_blocks,
)

logger = logging.getLogger("tensorstream")

__all__ = ["from_pretrained", "main"]


def _checkpoint_files(root: Path) -> list[Path]:
    index = root / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text()).get("weight_map", {})
        names = sorted(set(weight_map.values()))
        missing = [n for n in names if not (root / n).is_file()]
        if missing:
            raise FileNotFoundError(
                f"tensorstream: checkpoint '{root}' lists shard '{missing[0]}' in "
                f"{index.name}, but the file does not exist"
            )
        return [root / n for n in names]
    return sorted(root.glob("*.safetensors"))


class _Checkpoint:
    """Where each tensor of a safetensors checkpoint lives; reads one tensor at a time."""

    def __init__(self, root: Path, files: list[Path], prefix: str) -> None:
        from safetensors import safe_open  # noqa: PLC0415

        self.root = root
        self.prefix = prefix
        self.file_of: dict[str, Path] = {}
        for file in files:
            with safe_open(str(file), framework="pt") as f:
                for key in f.keys():  # noqa: SIM118 - safe_open is not a mapping
                    self.file_of[key] = file

    def resolve(self, name: str) -> str | None:
        """The checkpoint's name of the model's tensor ``name`` (some checkpoints save the
        base model without its prefix, or the other way round)."""
        if name in self.file_of:
            return name
        if self.prefix:
            if name.startswith(self.prefix + "."):
                bare = name[len(self.prefix) + 1 :]
                if bare in self.file_of:
                    return bare
            prefixed = f"{self.prefix}.{name}"
            if prefixed in self.file_of:
                return prefixed
        return None

    def load(self, key: str) -> torch.Tensor:
        from safetensors import safe_open  # noqa: PLC0415

        with safe_open(str(self.file_of[key]), framework="pt") as f:
            return f.get_tensor(key)

    def needs_conversion(self, keys: Any, dtype: torch.dtype) -> bool:
        """Whether any of ``keys`` is a floating-point tensor stored in another dtype than
        ``dtype`` (read from the files' headers, no data)."""
        from safetensors import safe_open  # noqa: PLC0415

        by_file: dict[Path, list[str]] = {}
        for key in keys:
            by_file.setdefault(self.file_of[key], []).append(key)
        for file, names in by_file.items():
            with safe_open(str(file), framework="pt") as f:
                for key in names:
                    stored = _SAFETENSORS_DTYPES.get(f.get_slice(key).get_dtype())
                    if stored is not None and stored.is_floating_point and stored != dtype:
                        return True
        return False


# safetensors dtype codes of the floating-point dtypes (others never need conversion).
_SAFETENSORS_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
}


def _converted_store(
    storage: Path,
    files: list[Path],
    checkpoint: _Checkpoint,
    groups: dict[str, list[str]],
    dtype: torch.dtype,
) -> Path:
    """A store of ``groups`` read from the checkpoint with floating-point tensors converted to
    ``dtype``, one tensor in memory at a time. Its name hashes the checkpoint files' identity
    (path, size, modification time, inode), the groups and the dtype, so it is reused until
    any of them changes; the write is crash-safe (a store is complete or absent)."""
    identity = []
    for file in files:
        st = file.stat()
        identity.append([str(file.resolve()), st.st_size, st.st_mtime_ns, st.st_ino])
    key = json.dumps({"files": identity, "groups": groups, "dtype": str(dtype)}, sort_keys=True)
    digest = hashlib.sha256(key.encode()).hexdigest()[:32]
    path = storage / f"pretrained-{digest}.tstore"
    if path.exists():
        try:
            _core.Store(str(path))
            logger.info("tensorstream: reusing converted store %s", path)
            return path
        except _core.TensorStreamError:
            logger.warning("tensorstream: converted store %s is unreadable; rewriting", path)
    logger.info("tensorstream: converting the streamed tensors to %s into %s", dtype, path)
    with store_writer(path) as writer:
        for name, keys in groups.items():
            writer.begin_block(name)
            for k in keys:
                t = checkpoint.load(k)
                if t.is_floating_point() and t.dtype != dtype:
                    t = t.to(dtype)
                t = t.contiguous()
                writer.add_tensor(
                    k,
                    dtype_to_name(t.dtype, k),
                    list(t.shape),
                    t.data_ptr(),
                    t.numel() * t.element_size(),
                )
                del t
            writer.end_block()
        writer.commit()
    return path


class _CheckpointSource(type(Path())):  # type: ignore[misc]
    """The checkpoint directory a runtime streams from; carries how to open its engine, so
    that :func:`tensorstream.optimize_memory_usage` can restart it (see ``_start_engine``)."""

    open_engine: Any = None
    streaming_minimum: Any = None


def _missing(root: Path, name: str, what: str = "parameter") -> ValueError:
    return ValueError(
        f"tensorstream: checkpoint '{root}' does not hold the model's {what} '{name}' "
        "(its safetensors files have no tensor of that name)"
    )


def _build_meta_model(root: Path, kwargs: dict[str, Any]) -> nn.Module:
    import transformers  # noqa: PLC0415

    hf_config = transformers.AutoConfig.from_pretrained(str(root))
    with torch.device("meta"):
        try:
            model = transformers.AutoModelForCausalLM.from_config(hf_config, **kwargs)
        except ValueError:
            model = transformers.AutoModel.from_config(hf_config, **kwargs)
    if (root / "generation_config.json").is_file() and hasattr(model, "generation_config"):
        try:
            model.generation_config = transformers.GenerationConfig.from_pretrained(str(root))
        except (OSError, ValueError):
            pass
    return model


def _replace_parameters(model: nn.Module, new: dict[int, nn.Parameter]) -> None:
    """Puts ``new[id(old)]`` wherever ``old`` is registered (keeps tied parameters tied)."""
    for module in model.modules():
        for pname, p in list(module._parameters.items()):
            if p is not None and id(p) in new:
                module._parameters[pname] = new[id(p)]


def _fresh_buffers(module: nn.Module, model: nn.Module) -> dict[str, torch.Tensor]:
    """The buffers of a freshly built copy of ``module`` (on the CPU), for buffers that are
    not saved in checkpoints (rotary ``inv_freq``)."""
    config = getattr(module, "config", None) or getattr(model, "config", None)
    attempts = [
        lambda: type(module)(config=config),
        lambda: type(module)(config),
    ]
    errors = []
    for attempt in attempts:
        try:
            with torch.device("cpu"):
                fresh = attempt()
        except Exception as e:  # noqa: BLE001 - try the next way of building it
            errors.append(e)
            continue
        return dict(fresh.named_buffers(recurse=False))
    raise ValueError(
        f"tensorstream: cannot rebuild the buffers of {type(module).__name__} (not in the "
        f"checkpoint): {errors[-1] if errors else 'unknown'}"
    )


def from_pretrained(path: str | os.PathLike[str], config: Any = None, **kwargs: Any) -> nn.Module:
    """Builds the Hugging Face model of the checkpoint directory ``path`` (``config.json`` and
    ``*.safetensors``) and streams its large layers straight from the checkpoint's files under
    ``config``'s budgets. The weights are never all held in CPU RAM; no store is written.
    ``kwargs`` go to ``AutoModelForCausalLM.from_config``. Returns the model, whose
    ``forward``/``generate`` work unchanged; ``model.tensorstream`` is its runtime handle."""
    from .config import Config  # noqa: PLC0415

    config = config if config is not None else Config()
    _refuse_unimplemented(config)
    root = Path(path)
    if not root.is_dir():
        raise FileNotFoundError(f"tensorstream: '{root}' is not a checkpoint directory")
    if not (root / "config.json").is_file():
        raise FileNotFoundError(f"tensorstream: '{root}' has no config.json")
    files = _checkpoint_files(root)
    if not files:
        raise FileNotFoundError(f"tensorstream: '{root}' holds no .safetensors file")
    device = torch.device(config.device) if config.device is not None else torch.device("cpu")
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"tensorstream: device '{device}' is not supported (cpu or cuda)")

    model = _build_meta_model(root, kwargs)
    model.eval()
    checkpoint = _Checkpoint(root, files, getattr(model, "base_model_prefix", "") or "")

    # Blocks and the checkpoint tensors each streams.
    shared = _shared_parameters(model)
    found = list(_named_block_params(model, find_blocks(model, config.min_layer_size), shared))
    if not found:
        raise ValueError(
            "tensorstream: no module is large enough to stream (min_layer_size="
            f"{config.min_layer_size} bytes); nothing to offload"
        )
    groups: dict[str, list[str]] = {}
    key_of: dict[int, str] = {}
    for _, name, _, params in found:
        names = []
        for qname, p in params:
            key = checkpoint.resolve(qname)
            if key is None:
                raise _missing(root, qname)
            key_of[id(p)] = key
            names.append(key)
        groups[name] = names
    streamed_ids = set(key_of)

    # Resident parameters: read one tensor at a time and placed on the device.
    aliases: dict[int, list[str]] = {}
    originals: dict[int, nn.Parameter] = {}
    for qname, p in model.named_parameters(remove_duplicate=False):
        aliases.setdefault(id(p), []).append(qname)
        originals[id(p)] = p
    new: dict[int, nn.Parameter] = {}
    resident_bytes = 0
    for pid, names in aliases.items():
        if pid in streamed_ids:
            continue
        key = next((k for k in map(checkpoint.resolve, names) if k is not None), None)
        if key is None:
            raise _missing(root, names[0])
        tensor = checkpoint.load(key)
        if tuple(tensor.shape) != tuple(originals[pid].shape):
            raise ValueError(
                f"tensorstream: checkpoint '{root}' holds '{key}' with shape "
                f"{tuple(tensor.shape)}, the model expects {tuple(originals[pid].shape)}"
            )
        if config.torch_dtype is not None and tensor.is_floating_point():
            tensor = tensor.to(config.torch_dtype)
        tensor = tensor.to(device)
        resident_bytes += tensor.numel() * tensor.element_size()
        new[pid] = nn.Parameter(tensor, requires_grad=False)

    # The engine, streaming the groups straight from the checkpoint's files -- or from a
    # store of them in Config.dtype when the checkpoint holds another floating-point dtype.
    target = "cpu" if device.type == "cpu" else f"cuda:{device.index or 0}"
    options = dict(config.engine_options(device=target))
    options["device"] = target
    budget = options["device_budget"]
    store: Path | None = None
    if config.torch_dtype is not None and checkpoint.needs_conversion(
        (k for keys in groups.values() for k in keys), config.torch_dtype
    ):
        store = _converted_store(
            _usable_storage(config), files, checkpoint, groups, config.torch_dtype
        )

    def open_engine(opts: dict[str, Any], allocate: Any, release: Any) -> Any:
        return _core.Engine.from_safetensors(str(root), opts, allocate, release, groups)

    def streaming_minimum(opts: dict[str, Any]) -> int:
        probe = dict(opts, device_budget=1)
        try:
            _core.Engine.from_safetensors(str(root), probe, None, None, groups).close()
        except _core.BudgetTooSmallError as e:
            return int(e.minimum_budget)
        return 1

    if store is not None:
        source: Path = store
    else:
        source = _CheckpointSource(root)
        source.open_engine = open_engine
        source.streaming_minimum = streaming_minimum
    engine, memory = _start_engine(source, options, budget, resident_bytes, device)
    try:
        blocks: list[_Block] = []
        for index, (_, name, module, params) in enumerate(found):
            if engine.block_name(index) != name:
                raise RuntimeError(
                    f"tensorstream: engine block {index} is '{engine.block_name(index)}', "
                    f"expected '{name}'"
                )
            placements = {t["name"]: t for t in engine.tensors(index)}
            block = _Block(index=index, name=name, module=module, params=[])
            for qname, p in params:
                info = placements[key_of[id(p)]]
                dtype = getattr(torch, info["dtype"])
                shape = torch.Size(info["shape"])
                if shape != p.shape:
                    raise ValueError(
                        f"tensorstream: checkpoint '{root}' holds '{info['name']}' with shape "
                        f"{tuple(shape)}, the model expects {tuple(p.shape)}"
                    )
                param = nn.Parameter(_placeholder(dtype, shape, device), requires_grad=False)
                new[id(p)] = param
                block.params.append((qname, param))
                block.slots.append(_TensorSlot(param, info["offset"], info["nbytes"], dtype, shape))
            blocks.append(block)
        _replace_parameters(model, new)
        _load_buffers(model, checkpoint, device)
    except BaseException:
        engine.close()
        raise

    runtime = OffloadedModel(
        model, engine, blocks, memory, source, device, resident_bytes, options, budget
    )
    runtime.pressure_mode = config.memory_pressure_mode.value
    runtime.config = config
    _install_runtime(model, runtime)
    _trim_host_heap()
    assert getattr(model, _ATTRIBUTE) is runtime
    return model


def _load_buffers(model: nn.Module, checkpoint: _Checkpoint, device: torch.device) -> None:
    """Buffers saved in the checkpoint are read from it; the others (non-persistent, such as
    rotary ``inv_freq``) are rebuilt by constructing a fresh copy of the module owning them."""
    done: dict[int, torch.Tensor] = {}
    for module_name, module in model.named_modules(remove_duplicate=False):
        fresh: dict[str, torch.Tensor] | None = None
        for bname, buffer in list(module._buffers.items()):
            if buffer is None:
                continue
            if id(buffer) in done:
                module._buffers[bname] = done[id(buffer)]
                continue
            qname = f"{module_name}.{bname}" if module_name else bname
            key = checkpoint.resolve(qname)
            if key is not None:
                value = checkpoint.load(key)
            elif buffer.device.type == "meta":
                if fresh is None:
                    fresh = _fresh_buffers(module, model)
                if bname not in fresh or fresh[bname].shape != buffer.shape:
                    raise _missing(checkpoint.root, qname, "buffer")
                value = fresh[bname]
            else:
                value = buffer
            value = value.to(device)
            done[id(buffer)] = value
            module._buffers[bname] = value


# ---- tensorstream run --------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> int:
    """``tensorstream run MODEL_DIR ...``: load with :func:`from_pretrained`, decode greedily,
    print the text (or token ids without a tokenizer) and the statistics."""
    from .config import Config  # noqa: PLC0415

    parser = argparse.ArgumentParser(
        prog="tensorstream run",
        description="Stream a Hugging Face checkpoint directory and generate greedily.",
    )
    parser.add_argument("model", help="checkpoint directory (config.json + *.safetensors)")
    prompt = parser.add_mutually_exclusive_group(required=True)
    prompt.add_argument("--prompt", help="prompt text (needs a tokenizer in MODEL)")
    prompt.add_argument("--prompt-ids", help="prompt token ids, comma-separated: 1,2,3")
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--vram-budget", required=True, help="weight budget, e.g. 4GB, 512MiB")
    parser.add_argument("--device", default=None, help="cpu or cuda:N (default: cpu)")
    parser.add_argument("--ram-cache", default="0", help="pinned-RAM tier size (default 0)")
    parser.add_argument("--storage-path", default=None, help="storage directory")
    args = parser.parse_args(list(argv) if argv is not None else None)

    tokenizer = None
    if (Path(args.model) / "tokenizer_config.json").is_file() or (
        Path(args.model) / "tokenizer.json"
    ).is_file():
        import transformers  # noqa: PLC0415

        tokenizer = transformers.AutoTokenizer.from_pretrained(args.model)
    if args.prompt is not None and tokenizer is None:
        print(
            f"tensorstream run: '{args.model}' has no tokenizer; give --prompt-ids",
            file=sys.stderr,
        )
        return 2
    try:
        if args.prompt_ids is not None:
            ids = [int(x) for x in args.prompt_ids.replace(" ", "").split(",") if x]
            if not ids:
                raise ValueError("--prompt-ids is empty")
        else:
            ids = tokenizer(args.prompt)["input_ids"]
        config = Config(
            device=args.device,
            vram_budget_gb=args.vram_budget,
            ram_cache_gb=args.ram_cache,
            storage_path=args.storage_path,
        )
    except (ValueError, TypeError) as e:
        print(f"tensorstream run: {e}", file=sys.stderr)
        return 2
    try:
        model = from_pretrained(args.model, config)
    except (OSError, ValueError, _core.TensorStreamError) as e:
        print(f"tensorstream run: {e}", file=sys.stderr)
        return 1
    try:
        runtime = model.tensorstream
        input_ids = torch.tensor([ids], dtype=torch.long, device=runtime.device)
        with torch.no_grad():
            out = model.generate(
                input_ids,
                attention_mask=torch.ones_like(input_ids),
                max_new_tokens=args.max_new_tokens,
                do_sample=False,
            )
        new_ids = out[0, input_ids.shape[1] :].tolist()
        if tokenizer is not None:
            print(tokenizer.decode(out[0].tolist(), skip_special_tokens=True))
        else:
            print("generated token ids: " + ",".join(str(t) for t in new_ids))
        print("statistics:")
        runtime.print_statistics()
    finally:
        model.cleanup_tensorstream()
    return 0
