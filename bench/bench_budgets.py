#!/usr/bin/env python3
"""Decode at several budgets, TensorStream against accelerate's disk offload in the same run:
runs bench/bench_decode.py once per budget fraction (each system in a fresh subprocess, so its
peak RSS -- VmHWM -- is its own) and prints one table of tokens/s and peak RSS with ratios.

    python bench/bench_budgets.py --preset 1gb-fp32 --fractions 0.10,0.25,0.35,0.50 \
        --new-tokens 8 --json-out bench/results/budgets.json

A fraction below the model's physical minimum (the largest single tensor that must be present
at once, plus what stays resident) is run at that minimum and says so: TensorStream refuses a
smaller budget with BudgetTooSmallError, accelerate is given the same budget.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _minimum_budget(preset: str, dtype: str | None) -> tuple[int, int]:
    """The smallest whole budget offload() accepts for the preset's model (estimate on the
    meta device: nothing is allocated), and the model's parameter bytes."""
    code = f"""
import sys, torch, transformers
sys.path.insert(0, {str(ROOT / "bench")!r})
import bench_decode as b
p = b.PRESETS[{preset!r}]
dtype = {dtype!r} or p["dtype"]
config = transformers.LlamaConfig(hidden_size=p["hidden"], intermediate_size=p["intermediate"],
    num_hidden_layers=p["layers"], num_attention_heads=p["heads"],
    num_key_value_heads=p["kv_heads"], vocab_size=p["vocab"], tie_word_embeddings=False)
with torch.device("meta"):
    model = transformers.LlamaForCausalLM(config).to(getattr(torch, dtype))
import tensorstream as ts
e = ts.estimate_model_memory(model, ts.Config(device="cpu"))
print(e["minimum_budget"], e["total_parameter_bytes"])
"""
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True)
    minimum, total = out.stdout.strip().splitlines()[-1].split()
    return int(minimum), int(total)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", default="1gb-fp32")
    ap.add_argument("--dtype", default=None)
    ap.add_argument("--fractions", default="0.10,0.25,0.35,0.50")
    ap.add_argument("--systems", default="memory,tensorstream-fp,tensorstream,accelerate-disk")
    ap.add_argument("--new-tokens", type=int, default=8)
    ap.add_argument("--prompt-len", type=int, default=None)
    ap.add_argument("--repeat", type=int, default=1)
    ap.add_argument("--workdir", default=None)
    ap.add_argument("--json-out", default=None)
    args = ap.parse_args()

    minimum, param_bytes = _minimum_budget(args.preset, args.dtype)
    workdir = args.workdir or tempfile.mkdtemp(prefix="ts-budgets-")
    rows = []
    for fraction in (float(f) for f in args.fractions.split(",")):
        out = Path(workdir) / f"decode_{fraction:.2f}.json"
        cmd = [sys.executable, str(ROOT / "bench/bench_decode.py"), "--preset", args.preset,
               "--systems", args.systems, "--new-tokens", str(args.new_tokens),
               "--repeat", str(args.repeat), "--bandwidth-repeat", "0",
               "--workdir", workdir, "--json-out", str(out)]  # fmt: skip
        if args.dtype:
            cmd += ["--dtype", args.dtype]
        if args.prompt_len:
            cmd += ["--prompt-len", str(args.prompt_len)]
        if fraction * param_bytes < minimum:
            cmd += ["--budget-gb", f"{(minimum + 1) / 1e9:.9f}"]  # +1: float rounding
            note = f"{fraction:.0%} is below the minimum: run at the minimum"
        else:
            cmd += ["--budget-fraction", str(fraction)]
            note = ""
        print("+", " ".join(cmd), flush=True)
        done = subprocess.run(cmd, check=False)
        if not out.exists():
            rows.append({"fraction": fraction, "error": f"exit {done.returncode}"})
            continue
        result = json.loads(out.read_text())
        rows.append({"fraction": fraction, "budget_bytes": result["budget_bytes"], "note": note,
                     "summary": result["summary"], "date_utc": result["date_utc"],
                     "machine": result["machine"], "loadavg": [result["loadavg_start"],
                     result["loadavg_end"]]})  # fmt: skip

    print()
    print(f"model {args.preset}: {param_bytes / 1e9:.2f} GB, minimum budget {minimum / 1e6:.0f} MB")
    print("| budget | system | tok/s | x accelerate | peak RSS MB (run / total) | "
          "RSS x accelerate (total) | tokens match | note |")  # fmt: skip
    print("|" + "---|" * 8)
    for row in rows:
        if "error" in row:
            print(f"| {row['fraction']:.0%} | {row['error']} |")
            continue
        acc = row["summary"].get("accelerate-disk", {})
        a1, ra = acc.get("decode_tok_s_b1"), acc.get("peak_rss_total_mb")
        budget = f"{row['fraction']:.0%} ({row['budget_bytes'] / 1e6:.0f} MB)"
        for system, sm in row["summary"].items():
            if "note" in sm:
                print(f"| {budget} | {system} | {sm['note'][:80]} |")
                continue
            t1, r1, rr = (
                sm.get("decode_tok_s_b1"),
                sm.get("peak_rss_total_mb"),
                sm.get("peak_rss_run_mb"),
            )
            speed = f"{t1 / a1:.2f}" if t1 and a1 else "-"
            rss = f"{r1 / ra:.2f}" if r1 and ra else "-"
            print(f"| {budget} | {system} | {t1 and f'{t1:.2f}'} | {speed} | "
                  f"{rr and f'{rr:.0f}'} / {r1 and f'{r1:.0f}'} | {rss} | "
                  f"{sm.get('tokens_match')} | {row['note']} |")  # fmt: skip
    if args.json_out:
        Path(args.json_out).parent.mkdir(parents=True, exist_ok=True)
        now = dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
        record = {"benchmark": "bench_budgets", "date_utc": now, "command": " ".join(sys.argv),
                  "preset": args.preset, "minimum_budget": minimum, "param_bytes": param_bytes,
                  "rows": rows}  # fmt: skip
        Path(args.json_out).write_text(json.dumps(record, indent=1))
    return 0 if all("error" not in r for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
