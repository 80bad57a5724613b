"""Run reports: ``report.json`` (machine-readable), ``report.md`` (for people) and PNG plots."""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Iterable

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from .engine.metrics import read_metrics  # noqa: E402


def _jsonable(obj):
    if isinstance(obj, float) and not math.isfinite(obj):
        return str(obj)
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if hasattr(obj, "item") and callable(obj.item):
        return obj.item()
    return obj


def write_report(output_dir: str | Path, report: dict, title: str, lines: Iterable[str] = ()) -> None:
    """``report.json`` plus a ``report.md`` that starts with ``lines`` and lists every scalar."""
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "report.json").write_text(json.dumps(_jsonable(report), indent=2) + "\n")
    md = [f"# {title}", "", *lines, "", "| key | value |", "|---|---|"]
    for key, value in report.items():
        if isinstance(value, (int, float, str, bool)):
            md.append(f"| {key} | {value:.4g} |" if isinstance(value, float) else f"| {key} | {value} |")
    (out / "report.md").write_text("\n".join(md) + "\n")


def plot_metrics(output_dir: str | Path, keys: Iterable[str], filename: str = "loss.png",
                 title: str = "", logy: bool = False) -> Path | None:
    """Plot metrics.jsonl columns against step; returns the PNG path (None if nothing to plot)."""
    rows = read_metrics(output_dir)
    fig, ax = plt.subplots(figsize=(6, 4))
    plotted = False
    for key in keys:
        pts = [(r["step"], r[key]) for r in rows if isinstance(r.get(key), (int, float))]
        if pts:
            ax.plot(*zip(*pts), label=key, marker="o" if len(pts) < 30 else None, markersize=3)
            plotted = True
    if not plotted:
        plt.close(fig)
        return None
    ax.set_xlabel("step")
    ax.set_title(title)
    if logy:
        ax.set_yscale("log")
    ax.grid(alpha=0.3)
    ax.legend()
    path = Path(output_dir) / filename
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
