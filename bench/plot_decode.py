#!/usr/bin/env python3
"""Plots decode time per token against the weight budget, one line per system, from the JSON
results of several ``bench_decode.py`` runs (typically the same model at several
``--budget-fraction`` values):

    python bench/plot_decode.py bench/results/decode_*_sweep_*.json --out docs/img/decode.png

Each input file contributes one point per system it ran: x = the run's budget as a share of
the model's parameter bytes, y = median seconds per decode step at batch 1. Systems that do
not depend on the budget (``memory``) are drawn as a horizontal line at their median over all
files. Runs of different models, dtypes or machines are refused: the points would not be
comparable. Needs matplotlib (``pip install matplotlib``).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path
from typing import Any

# Systems whose time does not depend on the weight budget.
FLAT = {"memory"}


def load_points(paths: list[Path]) -> tuple[dict[str, list[tuple[float, float]]], dict[str, Any]]:
    """{system: [(budget fraction, s per step at batch 1), ...]} and the common context."""
    points: dict[str, list[tuple[float, float]]] = {}
    context: dict[str, Any] | None = None
    dates: list[str] = []
    for path in paths:
        data = json.loads(path.read_text())
        ctx = {
            "preset": data["model"]["preset"],
            "dtype": data["model"]["dtype"],
            "cpus": data["machine"].get("cpus"),
            "host": data["machine"].get("host"),
            "cpu": data["machine"].get("cpu"),
            "prompt_len": data["prompt_len"],
        }
        if context is None:
            context = ctx
        elif ctx != context:
            raise SystemExit(f"plot_decode: {path} is another model or machine: {ctx} vs {context}")
        dates.append(str(data.get("date_utc", ""))[:10])
        fraction = data["budget_bytes"] / data["model"]["param_bytes"]
        for system, summary in data["summary"].items():
            s = summary.get("s_per_step_b1")
            if s:
                points.setdefault(system, []).append((fraction, s))
    if context is None:
        raise SystemExit("plot_decode: no input")
    context["dates"] = ", ".join(sorted(set(dates)))
    return points, context


def plot(points: dict[str, list[tuple[float, float]]], context: dict[str, Any], out: Path) -> None:
    import matplotlib  # noqa: PLC0415

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=120)
    xs = sorted({x for pts in points.values() for x, _ in pts})
    for system in sorted(points):
        pts = sorted(points[system])
        if system in FLAT:
            y = statistics.median(s for _, s in pts)
            ax.axhline(y * 1e3, linestyle="--", color="grey", label=f"{system} (no budget)")
            continue
        ax.plot([x * 100 for x, _ in pts], [s * 1e3 for _, s in pts], marker="o", label=system)
    ax.set_xlabel("weight budget (% of the model's parameter bytes)")
    ax.set_ylabel("ms per token (decode, batch 1)")
    ax.set_xticks([x * 100 for x in xs])
    ax.set_ylim(bottom=0)
    ax.grid(True, alpha=0.3)
    ax.set_title(
        f"{context['preset']} {context['dtype']}, prompt {context['prompt_len']}, "
        f"{context['cpus']} x {context['cpu']} ({context['host']}), {context['dates']}",
        fontsize=9,
    )
    ax.legend(fontsize=8)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("results", nargs="+", type=Path, help="bench_decode.py JSON files")
    ap.add_argument("--out", type=Path, required=True, help="PNG to write")
    args = ap.parse_args(argv)
    points, context = load_points(args.results)
    plot(points, context, args.out)
    for system in sorted(points):
        row = ", ".join(f"{x:.0%}: {s * 1e3:.0f} ms" for x, s in sorted(points[system]))
        print(f"{system}: {row}")
    print(f"plot: {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
