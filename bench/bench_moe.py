#!/usr/bin/env python3
"""Decode throughput of mixture-of-experts models: only the routed experts stream.

For a Mixtral-style and a Qwen3-MoE-style model (random weights from configs, no downloads),
in one process, one after another, on the same prompt:

  experts+predict   tensorstream, each expert a unit, the next layer's experts prefetched
                    from its router (the default)
  experts           the same without the prediction (misses load on demand)
  experts-order-cache  the same, experts planned and cached like units used on every pass
                    (no learned use rates: resident experts picked by the plan, released
                    ones ranked by the order of the first pass; _experts.every_pass_rates)
  whole-layer       tensorstream with MoE layers streamed like any other (every expert of a
                    layer read each pass; _experts.whole_layers)
  accelerate-disk   transformers/accelerate disk offload: from_pretrained(device_map="auto",
                    max_memory={"cpu": budget}, offload_folder=...)
  memory            the model in memory

Each streamed system runs under ``--budget-fraction`` of the model's bytes. Reported per
system: decode tokens/s (a greedy loop with the KV cache, after a prompt and one warm-up
step), bytes brought to the device per decode token (engine statistics), the expert hit
rate and the prediction recall, and whether its tokens equal the in-memory model's. The
store lives in ``--workdir``. ``--backend pread`` (the default): the engine's reads are
O_DIRECT, every fill comes from the device — the case of a model larger than RAM — and
accelerate's offloaded files are dropped from the page cache before its timed run (it may
cache what it reads during the run: in its favour). ``--backend auto``: the store is read in
place from the page cache (what is measured is the streaming path, not the disk).

    .venv/bin/python bench/bench_moe.py                       # CPU, both models, 1.3 GB
    .venv/bin/python bench/bench_moe.py --size 445mb          # smaller, minutes
    .venv/bin/python bench/bench_moe.py --smoke               # tiny, seconds
    .venv/bin/python bench/bench_moe.py --device cuda         # GPU; dry-run without one

With ``--device cuda`` and no GPU, the plan is printed and nothing runs (exit 0).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import shutil
import sys
import tempfile
import time
import warnings
from datetime import datetime, timezone
from pathlib import Path

SYSTEMS = (
    "experts+predict",
    "experts",
    "experts-order-cache",
    "whole-layer",
    "accelerate-disk",
    "memory",
)
SIZES = ("1.3gb", "445mb")


def _models(smoke: bool, size: str = "1.3gb") -> dict[str, tuple[str, dict]]:
    if smoke:
        common = dict(
            hidden_size=64, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
            vocab_size=256, max_position_embeddings=256,
        )  # fmt: skip
        return {
            "mixtral": (
                "Mixtral",
                dict(common, intermediate_size=128, num_local_experts=8, num_experts_per_tok=2),
            ),  # fmt: skip
            "qwen3_moe": (
                "Qwen3Moe",
                dict(
                    common,
                    intermediate_size=128,
                    head_dim=16,
                    moe_intermediate_size=64,
                    num_experts=16,
                    num_experts_per_tok=4,
                ),
            ),  # fmt: skip
        }
    # 1.3gb: hidden 1024, experts of 1536 (Mixtral) / 384 (Qwen3-MoE) rows, 1.34 GB fp32 each;
    # 445mb: hidden 512, experts of 1024 / 256 rows.
    hidden, inter, moe_inter = (1024, 1536, 384) if size == "1.3gb" else (512, 1024, 256)
    common = dict(hidden_size=hidden, num_hidden_layers=8, num_attention_heads=8,
                  num_key_value_heads=4, vocab_size=4096, max_position_embeddings=512)  # fmt: skip
    return {
        "mixtral": (
            "Mixtral",
            dict(common, intermediate_size=inter, num_local_experts=8, num_experts_per_tok=2),
        ),  # fmt: skip
        "qwen3_moe": (
            "Qwen3Moe",
            dict(
                common,
                intermediate_size=inter,
                head_dim=hidden // 8,
                moe_intermediate_size=moe_inter,
                num_experts=32,
                num_experts_per_tok=4,
            ),
        ),  # fmt: skip
    }


def _build(kind: str, cfg: dict):
    import torch
    import transformers as T

    torch.manual_seed(0)
    config = getattr(T, f"{kind}Config")(**cfg)
    config._experts_implementation = "eager"
    return getattr(T, f"{kind}ForCausalLM")(config).eval()


def _decode(model, ids, steps: int, device):
    """(tokens, seconds of ``steps`` decode steps after the prompt and one warm-up step)."""
    import torch

    with torch.no_grad():
        out = model(ids.to(device), use_cache=True)
        cache, token = out.past_key_values, out.logits[:, -1:].argmax(-1)
        tokens = [token]
        out = model(token, past_key_values=cache, use_cache=True)  # warm-up step
        cache, token = out.past_key_values, out.logits[:, -1:].argmax(-1)
        tokens.append(token)
        start = time.perf_counter()
        for _ in range(steps):
            out = model(token, past_key_values=cache, use_cache=True)
            cache, token = out.past_key_values, out.logits[:, -1:].argmax(-1)
            tokens.append(token)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        seconds = time.perf_counter() - start
    return torch.cat(tokens, dim=1).cpu(), seconds


def _drop_page_cache(root: Path) -> None:
    """Asks the kernel to drop the cached pages of every file under ``root``."""
    for path in root.rglob("*"):
        if path.is_file():
            fd = os.open(path, os.O_RDONLY)
            try:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)


def _run_system(system, kind, cfg, ids, steps, budget, workdir: Path, device, backend="auto"):
    import torch

    import tensorstream as ts
    from tensorstream import _experts

    res = {"system": system}
    if system == "memory":
        model = _build(kind, cfg).to(device)
    elif system == "accelerate-disk":
        import transformers as T

        ckpt = workdir / f"{kind}-ckpt"
        if not ckpt.exists():
            _build(kind, cfg).save_pretrained(ckpt)
        offload_dir = workdir / f"{kind}-accelerate"
        shutil.rmtree(offload_dir, ignore_errors=True)
        memory = {"cpu": budget} if device.type == "cpu" else {0: budget, "cpu": budget}
        model = T.AutoModelForCausalLM.from_pretrained(
            ckpt, device_map="auto", max_memory=memory, offload_folder=str(offload_dir),
            experts_implementation="eager",
        ).eval()  # fmt: skip
    else:
        model = _build(kind, cfg)
        config = ts.Config(
            storage_path=workdir / "stores", vram_budget_gb=f"{budget}B", device=str(device),
            backend=backend,
        )  # fmt: skip
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            try:
                if system == "whole-layer":
                    with _experts.whole_layers():
                        ts.offload(model, config)
                elif system == "experts-order-cache":
                    with _experts.every_pass_rates():
                        ts.offload(model, config)
                else:
                    ts.offload(model, config)
            except ts.BudgetTooSmallError as e:
                res["refused"] = f"minimum budget {e.minimum_budget} bytes"
                return res, None
        if system in ("experts", "experts-order-cache"):
            model.tensorstream.predict_experts = False
    runtime = getattr(model, "tensorstream", None)
    before = 0
    _decode(model, ids, 1, device)  # a first pass: prefetch order and rates warm
    if backend == "pread" and system == "accelerate-disk":
        # Its weights come from the offload folder through the page cache: cold as ours are.
        _drop_page_cache(workdir / f"{kind}-accelerate")
        _drop_page_cache(workdir / f"{kind}-ckpt")
    if runtime is not None:
        before = runtime._engine.stats()["bytes_to_device"]
    tokens, seconds = _decode(model, ids, steps, device)
    res["tok_per_s"] = steps / seconds
    if runtime is not None:
        stats = runtime.statistics()
        # Bytes of the timed run (prompt, warm-up and steps) per token generated.
        res["bytes_per_token"] = (stats["bytes_to_device"] - before) / (steps + 2)
        res["unit_tier"] = stats["unit_tier"]
        res["units"] = stats["units"]
        res["peak_bytes"] = (
            stats["device_bytes_peak"] + stats["resident_param_bytes"] + stats["placeholder_bytes"]
        )
        if "experts" in stats:
            e = stats["experts"]
            res["expert_hit_rate"] = e["hit_rate"]
            res["expert_stall_seconds"] = e["stall_seconds"]
            res["resident_experts"] = sum(x["resident_experts"] for x in e["layers"])
            res["prediction_recall"] = e["prediction_recall"] if e["prediction"] else None
        model.cleanup_tensorstream()
    del model
    gc.collect()
    torch.cuda.empty_cache() if device.type == "cuda" else None
    return res, tokens


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--smoke", action="store_true", help="tiny models, a few steps")
    ap.add_argument("--size", choices=SIZES, default=SIZES[0], help="model size (fp32)")
    ap.add_argument("--device", default="cpu", help="cpu or cuda (dry-run without a GPU)")
    ap.add_argument("--budget-fraction", type=float, default=0.20)
    ap.add_argument("--steps", type=int, default=None, help="timed decode steps")
    ap.add_argument("--prompt", type=int, default=16, help="prompt tokens")
    ap.add_argument("--models", default="mixtral,qwen3_moe")
    ap.add_argument("--systems", default=",".join(SYSTEMS))
    ap.add_argument(
        "--backend",
        choices=("auto", "pread"),
        default="pread",
        help="pread: O_DIRECT reads, every fill from the device (a model larger than RAM; "
        "accelerate's files are dropped from the page cache before its timed run); auto: "
        "the store read in place from the page cache",
    )
    ap.add_argument("--workdir", default=None)
    ap.add_argument("--json-out", default=None)
    args = ap.parse_args(argv)

    import torch

    device = torch.device(args.device)
    systems = [s for s in args.systems.split(",") if s]
    unknown = set(systems) - set(SYSTEMS)
    if unknown:
        ap.error(f"unknown systems {sorted(unknown)}; choose from {', '.join(SYSTEMS)}")
    models = {
        k: v for k, v in _models(args.smoke, args.size).items() if k in args.models.split(",")
    }
    steps = args.steps if args.steps is not None else (4 if args.smoke else 16)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("dry run: no GPU here; would run on", device)
        for name, (kind, cfg) in models.items():
            print(f"  {name} ({kind}): {cfg}")
        print(f"  systems {systems}, budget {args.budget_fraction:.0%}, {steps} steps")
        return 0
    workdir = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="bench-moe-"))
    workdir.mkdir(parents=True, exist_ok=True)
    report = {
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": f"{platform.machine()} {platform.processor() or ''} "
        f"cpus={torch.get_num_threads()} torch={torch.__version__}",
        "device": str(device),
        "budget_fraction": args.budget_fraction,
        "backend": args.backend,
        "steps": steps,
        "models": {},
    }
    for name, (kind, cfg) in models.items():
        probe = _build(kind, cfg)
        total = sum(p.numel() * p.element_size() for p in probe.parameters())
        del probe
        budget = int(total * args.budget_fraction)
        ids = torch.randint(
            2, cfg["vocab_size"], (1, args.prompt), generator=torch.Generator().manual_seed(1)
        )
        rows, reference = [], None
        order = (
            ["memory", *[s for s in systems if s != "memory"]] if "memory" in systems else systems
        )
        for system in order:
            try:
                res, tokens = _run_system(
                    system, kind, cfg, ids, steps, budget, workdir, device, args.backend
                )
            except Exception as e:  # a baseline that cannot run here is reported, not fatal
                res, tokens = {"system": system, "error": f"{type(e).__name__}: {e}"[:300]}, None
            if system == "memory":
                reference = tokens
            if tokens is not None and reference is not None:
                res["tokens_equal_memory"] = bool(torch.equal(tokens, reference))
            rows.append(res)
            print(f"{name} {json.dumps(res)}", flush=True)
        base = next(
            (r for r in rows if r["system"] == "experts+predict" and "tok_per_s" in r), None
        )
        for r in rows:
            if base is not None and "tok_per_s" in r:
                r["speed_vs_experts_predict"] = r["tok_per_s"] / base["tok_per_s"]
        report["models"][name] = {"kind": kind, "config": cfg, "bytes": total,
                                  "budget": budget, "results": rows}  # fmt: skip
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
