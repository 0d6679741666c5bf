"""``tensorstream run MODEL_DIR ...``: stream a Hugging Face checkpoint with
:func:`tensorstream.from_pretrained` and decode greedily."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

import torch

from . import _core
from .pretrained import from_pretrained

__all__ = ["main"]


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
