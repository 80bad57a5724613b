"""Speed-up at equal quality (the ILF paper's headline): how much more compute a baseline sampler
needs to reach the quality ILF@N reaches.

For a quality metric m (lower is better: FD to held-out images, paired MSE to the converged teacher)
and a baseline's curve of points (cost c_i, m_i) over its step counts, the baseline's cost at quality
q is where its curve, read from the cheapest point on, first reaches q — linear in cost between the
two neighbouring points, in log m for the MSE (it falls geometrically with steps), in m for FD:

    c(q) = c_a + (c_b − c_a) (g(m_a) − g(q)) / (g(m_a) − g(m_b)),   m_b <= q < m_a

    speed-up = c_baseline(q_ILF) / c_ILF

When the baseline's cheapest point is already as good as ILF, the speed-up is at most c_0 / c_ILF
(``bound: "at_most"``); when no point reaches ILF's quality, at least c_max / c_ILF
(``bound: "at_least"``). Cost is either counted block evaluations per sample or wall seconds per batch.
"""
from __future__ import annotations

import math
import statistics

LOG_METRICS = ("mse",)


def cost_at_quality(points: list[dict], quality: float, metric: str, cost: str) -> tuple[float, str | None]:
    """(cost, bound) of a baseline curve at ``quality`` (see the module docstring)."""
    pts = sorted(points, key=lambda p: p[cost])
    g = (lambda v: math.log(max(v, 1e-30))) if metric in LOG_METRICS else (lambda v: v)
    if pts[0][metric] <= quality:
        return pts[0][cost], "at_most"
    for a, b in zip(pts, pts[1:]):
        if b[metric] <= quality:
            t = (g(a[metric]) - g(quality)) / max(g(a[metric]) - g(b[metric]), 1e-30)
            return a[cost] + t * (b[cost] - a[cost]), None
    return pts[-1][cost], "at_least"


def speedup(point: dict, baseline: list[dict], metric: str, cost: str) -> dict:
    base_cost, bound = cost_at_quality(baseline, point[metric], metric, cost)
    return {"speedup": base_cost / point[cost], "bound": bound, "baseline_cost": base_cost, "cost": point[cost],
            "quality": point[metric]}


def spread(values: list[float]) -> dict:
    """Mean, sample sd, min and max over seeds."""
    return {"mean": statistics.fmean(values), "sd": statistics.stdev(values) if len(values) > 1 else 0.0,
            "min": min(values), "max": max(values), "n": len(values)}


def speedup_table(ilf_points: list[dict], baselines: dict[str, list[dict]], metrics: dict[str, str],
                  cost: str) -> dict:
    """Per metric: ILF@N's speed-up over each baseline family for every feedback seed's point, and
    over the strongest family (chosen per seed: the one needing the least cost at that quality)."""
    out = {}
    for label, metric in metrics.items():
        row = {}
        for name, curve in baselines.items():
            per = [speedup(p, curve, metric, cost) for p in ilf_points]
            row[name] = {"per_seed": per, **spread([s["speedup"] for s in per])}
        out[label] = row
    return out
