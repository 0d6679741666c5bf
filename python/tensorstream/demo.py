"""``tensorstream demo``: the end-to-end path on a small Llama-style model.

Builds a randomly initialised Llama-style model with transformers (seeded, so the run is
reproducible), saves it as a sharded safetensors checkpoint, converts it with the native
converter, inspects and verifies the store, loads it back and compares every tensor bit for
bit with the model's state dict. Exit code 0 only if everything matched.
"""

from __future__ import annotations

import argparse
import math
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

MATCH_LINE = "MATCH: all {n} tensors are bitwise identical to the model's state dict"

_VOCAB = 8000
# Enough layers that each is a small part of the model: streaming then works under a budget
# of a quarter of the model (two slots of one layer plus the small resident parts).
_LAYERS = 12
_BUDGET_FRACTION = 4  # the streamed run's budget: model bytes / 4


def _hidden_size_for(size_mb: float) -> int:
    """Hidden size (a multiple of 32) that makes the float32 model about ``size_mb`` MB.

    Parameters: untied embeddings and head (2·V·h) + per layer 4·h² (attention) + 3·h·(8h/3)
    (MLP) ≈ 12·h², so bytes ≈ 4·(2·V·h + 12·L·h²).
    """
    target = size_mb * 1e6 / 4
    a, b = 12 * _LAYERS, 2 * _VOCAB
    h = (-b + math.sqrt(b * b + 4 * a * target)) / (2 * a)
    return max(64, int(round(h / 32)) * 32)


def build_model(size_mb: float) -> Any:
    import torch
    import transformers
    from transformers import LlamaConfig, LlamaForCausalLM

    transformers.utils.logging.disable_progress_bar()

    hidden = _hidden_size_for(size_mb)
    config = LlamaConfig(
        vocab_size=_VOCAB,
        hidden_size=hidden,
        intermediate_size=max(64, int(round(hidden * 8 / 3 / 64)) * 64),
        num_hidden_layers=_LAYERS,
        num_attention_heads=hidden // 32,
        num_key_value_heads=hidden // 32,
        max_position_embeddings=512,
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    return LlamaForCausalLM(config).eval()


def _bitwise_equal(a: Any, b: Any) -> bool:
    import torch

    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    a = a.detach().contiguous().reshape(-1).view(torch.uint8)
    b = b.detach().contiguous().reshape(-1).view(torch.uint8)
    return torch.equal(a, b)


class _Progress:
    """Convert progress: a bar on a terminal, quarter marks otherwise."""

    def __init__(self) -> None:
        self.tty = sys.stderr.isatty()
        self.next_mark = 25
        self.last = 0.0

    def __call__(self, done: int, total: int) -> bool:
        percent = 100 * done // total if total else 100
        if self.tty:
            now = time.monotonic()
            if done == total or now - self.last > 0.1:
                self.last = now
                filled = percent * 30 // 100
                sys.stderr.write(f"\r  convert [{'#' * filled}{' ' * (30 - filled)}] {percent:3d}%")
                if done == total:
                    sys.stderr.write("\n")
                sys.stderr.flush()
        elif percent >= self.next_mark:
            print(f"  convert {percent:3d}% ({done / 1e6:.1f}/{total / 1e6:.1f} MB)", flush=True)
            while self.next_mark <= percent:
                self.next_mark += 25
        return True


def run(size_mb: float, workdir: Path) -> int:
    import tensorstream as ts

    started = time.monotonic()
    model = build_model(size_mb)
    state = model.state_dict()
    n_params = sum(t.numel() for t in state.values())
    model_bytes = sum(t.numel() * t.element_size() for t in state.values())
    print(
        f"model: Llama-style, hidden {model.config.hidden_size}, {model.config.num_hidden_layers}"
        f" layers, vocab {model.config.vocab_size}: {n_params / 1e6:.1f} M parameters, "
        f"{model_bytes / 1e6:.1f} MB ({time.monotonic() - started:.1f} s to build)"
    )

    checkpoint = workdir / "checkpoint"
    shard_bytes = max(1 << 20, model_bytes // 4)
    model.save_pretrained(checkpoint, max_shard_size=shard_bytes)
    shards = sorted(p.name for p in checkpoint.glob("*.safetensors"))
    print(f"checkpoint: {len(shards)} safetensors shard(s) in {checkpoint}")

    store_dir = workdir / "store"
    store_dir.mkdir(exist_ok=True)
    summary = ts.convert_checkpoint(checkpoint, store_dir, progress=_Progress())
    convert_s = summary["seconds"]

    header = ts.read_ts_header(summary["path"])
    largest = max(header["blocks"], key=lambda b: b["size"])
    print(
        f"store: {summary['path']}: {len(header['blocks'])} blocks, {len(header['tensors'])} "
        f"tensors, largest block '{largest['name']}' ({largest['size'] / 1e6:.1f} MB), "
        f"fingerprint {header['fingerprint']}"
    )

    t0 = time.monotonic()
    report = ts.verify_storage_integrity(summary["path"])
    verify_s = time.monotonic() - t0
    for problem in report.problems:
        print(f"  problem: {problem}")

    t0 = time.monotonic()
    loaded = ts.load_from_ts(summary["path"])
    load_s = time.monotonic() - t0

    mismatched = [name for name, t in loaded.items() if not _bitwise_equal(t, state.get(name, t))]
    missing_in_store = sorted(set(state) - set(loaded))
    not_in_model = sorted(set(loaded) - set(state))
    stored_bytes = sum(t.numel() * t.element_size() for t in loaded.values())

    def rate(seconds: float) -> str:
        return f"{stored_bytes / seconds / 1e9:.2f} GB/s" if seconds > 0 else "-"

    rows = [
        ("tensors", f"{len(loaded)} (model: {len(state)})"),
        ("tensor bytes", f"{stored_bytes:,}"),
        ("store file", f"{summary['file_size']:,} bytes"),
        ("convert", f"{convert_s:.3f} s ({rate(convert_s)})"),
        ("verify", f"{'OK' if report.ok else 'FAILED'} ({verify_s:.3f} s, {rate(verify_s)})"),
        ("load", f"{load_s:.3f} s ({rate(load_s)})"),
    ]
    width = max(len(k) for k, _ in rows)
    print()
    for key, value in rows:
        print(f"  {key:<{width}}  {value}")
    print()

    streamed_ok = _streamed_generation(model, model_bytes, workdir)
    ok = report.ok and not mismatched and not missing_in_store and not not_in_model and streamed_ok
    for name in mismatched:
        print(f"MISMATCH: tensor '{name}' differs from the model")
    for name in missing_in_store:
        print(f"MISSING: model tensor '{name}' is not in the store")
    for name in not_in_model:
        print(f"EXTRA: store tensor '{name}' is not in the model")
    if ok:
        print(MATCH_LINE.format(n=len(loaded)))
    print(f"demo {'passed' if ok else 'FAILED'} in {time.monotonic() - started:.1f} s")
    return 0 if ok else 1


STREAMED_LINE = "STREAMED: greedy tokens identical under a budget of {budget} of {total} bytes"


def _streamed_generation(model: Any, model_bytes: int, workdir: Path) -> bool:
    """Greedy generation fully in memory, then streamed under a quarter of the model's size,
    on the GPU if there is one, else on the CPU: the tokens must be identical."""
    import torch

    import tensorstream as ts
    from tensorstream.offload import offload

    device = torch.device("cuda:0" if torch.cuda.is_available() else "cpu")
    print(f"generation device: {device}")
    prompt = torch.randint(
        0, model.config.vocab_size, (1, 16), generator=torch.Generator().manual_seed(0)
    ).to(device)
    model.to(device)
    with torch.no_grad():
        t0 = time.monotonic()
        expected = model.generate(prompt, max_new_tokens=16, do_sample=False)
        memory_s = time.monotonic() - t0
    budget = model_bytes // _BUDGET_FRACTION
    config = ts.Config(
        storage_path=workdir / "offload",
        vram_budget_gb=budget / 1e9,
        min_layer_size=1 << 20,
        device=str(device),
    )
    try:
        offload(model, config)
    except ts.BudgetTooSmallError as e:  # a tiny --size-mb: use the smallest budget that works
        budget = e.minimum_budget
        offload(model, config.replace(vram_budget_gb=budget / 1e9))
    with torch.no_grad():
        t0 = time.monotonic()
        tokens = model.generate(prompt, max_new_tokens=16, do_sample=False)
        streamed_s = time.monotonic() - t0
    print(f"generation: 16 tokens in memory {memory_s:.2f} s, streamed {streamed_s:.2f} s")
    model.tensorstream.print_statistics()
    model.cleanup_tensorstream()
    same = torch.equal(tokens, expected)
    if same:
        print(STREAMED_LINE.format(budget=f"{budget:,}", total=f"{model_bytes:,}"))
    else:
        print("MISMATCH: streamed generation differs from the in-memory model")
    return same


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="tensorstream demo",
        description="Convert, verify and reload a Llama-style model bit for bit, then "
        "generate with it streamed under a quarter of its size.",
    )
    parser.add_argument(
        "--size-mb", type=float, default=256.0, help="approximate model size (default 256)"
    )
    parser.add_argument(
        "--keep", type=Path, metavar="DIR", help="keep the checkpoint and store in DIR"
    )
    args = parser.parse_args(list(sys.argv[1:] if argv is None else argv))
    if args.size_mb <= 0:
        parser.error("--size-mb must be positive")
    try:
        import transformers  # noqa: F401
    except ImportError:
        print(
            "tensorstream demo needs transformers: pip install 'tensorstream[hf]'",
            file=sys.stderr,
        )
        return 1
    if args.keep is not None:
        args.keep.mkdir(parents=True, exist_ok=True)
        return run(args.size_mb, args.keep)
    with tempfile.TemporaryDirectory(prefix="tensorstream-demo-") as tmp:
        return run(args.size_mb, Path(tmp))


if __name__ == "__main__":
    sys.exit(main())
