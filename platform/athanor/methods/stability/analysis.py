"""The analysis of a finished sweep: each run's summary (final loss, the probes' extremes), LR
sensitivity per seed and its tables, and the probe-vs-width power-law fits with their extrapolation
(formulas in ``athanor.methods.stability.method``'s docstring)."""
from __future__ import annotations

import math
from pathlib import Path
from typing import Iterable

import numpy as np

from ...engine.metrics import read_metrics


# ---------------------------------------------------------------------------- per-run summary
def _finite_values(rows: list[dict], key: str) -> tuple[list[int], list[float], bool]:
    """Steps and values of ``key``; the flag says whether a non-finite value was logged."""
    steps, values, bad = [], [], False
    for row in rows:
        if key not in row:
            continue
        value = row[key]
        value = float(value) if not isinstance(value, str) else float(value.replace("Infinity", "inf"))
        if math.isfinite(value):
            steps.append(row["step"])
            values.append(value)
        else:
            bad = True
    return steps, values, bad


def series(run_dir: str | Path, key: str) -> tuple[list[int], list[float]]:
    """``key`` against step from a run's metrics.jsonl (finite values only)."""
    steps, values, _ = _finite_values(read_metrics(run_dir), key)
    return steps, values


def summarize_run(run_dir: str | Path, result: dict) -> dict:
    """Final/initial eval loss and the probes' extremes over training for one finished run.
    A probe that went non-finite is reported as inf."""
    rows = read_metrics(run_dir)
    out = {"final_eval_loss": float(result["final_eval_loss"]), "initial_eval_loss": float(result["initial_eval_loss"])}
    for key, name, reduce in (("max_attn_logit", "max_attn_logit", max), ("log_z_max", "max_log_z", max),
                              ("log_z_mean", "final_log_z_mean", None), ("attn_entropy", "min_attn_entropy", min),
                              ("act_rms", "max_act_rms", max), ("grad_rms", "final_grad_rms", None)):
        _, values, bad = _finite_values(rows, key)
        if reduce is None:
            out[name] = values[-1] if values and not bad else (math.inf if bad else math.nan)
        else:
            out[name] = math.inf if bad else (reduce(values) if values else math.nan)
    final = out["final_eval_loss"]
    out["diverged"] = bool(not math.isfinite(final) or final > out["initial_eval_loss"])
    return out


# ---------------------------------------------------------------------------- LR sensitivity
def lr_sensitivity(losses: Iterable[float], initial_loss: float) -> float:
    """LRsens = E_η[min(ℓ(η), ℓ0) − min_η ℓ(η)]; a non-finite ℓ(η) counts as ℓ0."""
    capped = [min(l, initial_loss) if math.isfinite(l) else initial_loss for l in losses]
    best = min(capped)
    return float(np.mean([l - best for l in capped]))


def model_key(width: int, depth: int, several_depths: bool) -> str:
    return f"{width}xL{depth}" if several_depths else str(width)


def group_runs(runs: list[dict]) -> dict[tuple[str, int, int], list[dict]]:
    """Runs grouped by (variant, width, depth), each group sorted by LR."""
    groups: dict[tuple[str, int, int], list[dict]] = {}
    for run in runs:
        groups.setdefault((run["variant"], run["width"], run["depth"]), []).append(run)
    return {k: sorted(v, key=lambda r: r["lr"]) for k, v in groups.items()}


def by_seed(group: list[dict]) -> dict[int, list[dict]]:
    """A (variant, model) group's runs per training seed (runs without a seed count as seed 0)."""
    out: dict[int, list[dict]] = {}
    for r in group:
        out.setdefault(r.get("seed", 0), []).append(r)
    return dict(sorted(out.items()))


def seed_sensitivity(runs: list[dict], lrs: Iterable[float] | None = None) -> dict[str, dict[str, dict]]:
    """``[variant][model]`` -> LR sensitivity per training seed (each over that seed's LR curve),
    their mean, sd and range. Only groups whose every seed covers the LR grid ``lrs`` (default: every
    LR in ``runs``) get one: LRsens over a partial grid is not comparable."""
    grid = sorted(set(lrs) if lrs is not None else {r["lr"] for r in runs})
    groups = group_runs(runs)
    several_depths = len({d for _, _, d in groups}) > 1
    out: dict[str, dict[str, dict]] = {}
    for (variant, width, depth), group in sorted(groups.items()):
        seeds = by_seed(group)
        if any(sorted({r["lr"] for r in rs}) != grid for rs in seeds.values()):
            continue
        initial = float(np.mean([r["initial_eval_loss"] for r in group]))
        values = [lr_sensitivity([r["final_eval_loss"] for r in rs], initial) for rs in seeds.values()]
        out.setdefault(variant, {})[model_key(width, depth, several_depths)] = {
            "seeds": list(seeds), "per_seed": values, "mean": float(np.mean(values)),
            "sd": float(np.std(values, ddof=1)) if len(values) > 1 else None,
            "min": min(values), "max": max(values)}
    return out


def sensitivity_tables(runs: list[dict]) -> tuple[dict, dict]:
    """``lr_sensitivity[variant][model]`` (the mean over training seeds of each seed's LRsens) and
    ``optimal_lr[variant][model]`` (the LR of the lowest seed-mean final loss; model = width, or
    width×depth when the sweep has several depths)."""
    groups = group_runs(runs)
    several_depths = len({d for _, _, d in groups}) > 1
    sens: dict[str, dict[str, float]] = {}
    best: dict[str, dict[str, dict]] = {}
    for (variant, width, depth), group in sorted(groups.items(), key=lambda kv: (kv[0][0], kv[0][1], kv[0][2])):
        key = model_key(width, depth, several_depths)
        initial = float(np.mean([r["initial_eval_loss"] for r in group]))
        seeds = by_seed(group)
        sens.setdefault(variant, {})[key] = float(np.mean(
            [lr_sensitivity([r["final_eval_loss"] for r in rs], initial) for rs in seeds.values()]))
        per_lr: dict[float, list[float]] = {}
        for r in group:
            per_lr.setdefault(r["lr"], []).append(r["final_eval_loss"])
        finite = {lr: float(np.mean(ls)) for lr, ls in per_lr.items() if all(math.isfinite(l) for l in ls)}
        top = min(finite, key=finite.get) if finite else None
        best.setdefault(variant, {})[key] = {"lr": top, "loss": finite[top] if finite else math.inf,
                                             "initial_loss": initial}
    return sens, best


# ---------------------------------------------------------------------------- scaling extrapolation
def fit_power_law(widths: list[float], values: list[float]) -> tuple[float, float]:
    """Least squares ``log v = a + b log w``; returns (a, b)."""
    if len(set(widths)) < 2:
        raise ValueError("a trend needs at least two widths")
    b, a = np.polyfit(np.log(widths), np.log(values), 1)
    return float(a), float(b)


def fit_uncertainty(widths: list[float], values: list[float], a: float, b: float) -> dict | None:
    """Standard errors of the OLS fit ``log v = a + b log w`` (residual variance / (n − 2); needs
    n ≥ 3 points): se(b)² = s²/Sxx, se(a)² = s²(1/n + x̄²/Sxx), cov(a, b) = −x̄ s²/Sxx."""
    x, y = np.log(widths), np.log(values)
    n = len(x)
    if n < 3 or len(set(widths)) < 2:
        return None
    s2 = float(np.sum((y - (a + b * x)) ** 2) / (n - 2))
    sxx, xbar = float(np.sum((x - x.mean()) ** 2)), float(x.mean())
    return {"points": n, "exponent_se": math.sqrt(s2 / sxx),
            "cov": [[s2 * (1 / n + xbar**2 / sxx), -xbar * s2 / sxx], [-xbar * s2 / sxx, s2 / sxx]]}


def crossing_interval(a: float, b: float, cov: list, threshold: float, draws: int = 4000) -> dict:
    """A 90% interval of the crossing width from (a, b) drawn from the fit's normal approximation
    (fixed RNG); ``never_fraction``: draws whose trend does not grow (no crossing at all)."""
    rng = np.random.default_rng(0)
    ab = rng.multivariate_normal([a, b], np.asarray(cov), size=draws)
    grows = ab[:, 1] >= MIN_GROWTH_EXPONENT
    widths = np.exp((math.log(threshold) - ab[grows, 0]) / ab[grows, 1])
    out = {"never_fraction": float(1 - grows.mean())}
    if grows.sum() >= draws // 10:
        out["p05"], out["p50"], out["p95"] = (float(v) for v in np.quantile(widths, [0.05, 0.5, 0.95]))
    return out


MIN_GROWTH_EXPONENT = 0.05  # flatter trends count as "not growing" (their crossing is meaningless)


def crossing_width(a: float, b: float, threshold: float) -> float | None:
    """The width at which ``exp(a) · w^b`` reaches ``threshold`` (None if the trend does not grow)."""
    if b < MIN_GROWTH_EXPONENT:
        return None
    return float(math.exp((math.log(threshold) - a) / b))


def extrapolate(runs: list[dict], variant: str, lr: float, probe: str, threshold: float,
                predict_widths: Iterable[int] = ()) -> dict | None:
    """Fit ``probe`` against width at LR ``lr`` over all but the widest width (held out to check
    the prediction, when there are three or more) and extrapolate. Every seed's run is one point of
    the fit; ``observed`` is the geometric mean over seeds per width. With ≥ 3 points the exponent
    gets a standard error and the crossing width a 90% interval (``fit_uncertainty``)."""
    points = sorted((r["width"], r[probe]) for r in runs
                    if r["variant"] == variant and math.isclose(r["lr"], lr, rel_tol=1e-9))
    usable = [(w, v) for w, v in points if math.isfinite(v) and v > 0]
    widths = sorted({w for w, _ in usable})
    if len(widths) < 2:
        return None
    fit_widths = widths[:-1] if len(widths) >= 3 else widths
    fit_on = [(w, v) for w, v in usable if w in fit_widths]
    a, b = fit_power_law([w for w, _ in fit_on], [v for _, v in fit_on])
    observed = {}
    for w in sorted({w for w, _ in points}):
        vs = [v for w2, v in points if w2 == w]
        observed[str(w)] = float(math.exp(np.mean(np.log(vs)))) if all(math.isfinite(v) and v > 0 for v in vs) \
            else (math.inf if any(v == math.inf for v in vs) else math.nan)
    out = {"variant": variant, "lr": lr, "probe": probe, "fit_widths": fit_widths, "fit_points": len(fit_on),
           "observed": observed, "observed_per_seed": {str(w): [v for w2, v in points if w2 == w] for w in observed},
           "exponent": b, "log_prefactor": a, "threshold": threshold,
           "predicted_crossing_width": crossing_width(a, b, threshold),
           "predicted": {str(w): math.exp(a) * w**b for w in predict_widths}}
    unc = fit_uncertainty([w for w, _ in fit_on], [v for _, v in fit_on], a, b)
    if unc:
        out["exponent_se"] = unc["exponent_se"]
        out["crossing_interval_90"] = crossing_interval(a, b, unc["cov"], threshold)
    if len(widths) >= 3:
        w_out = widths[-1]
        out["held_out"] = {"width": w_out, "observed": observed[str(w_out)], "predicted": math.exp(a) * w_out**b}
    return out
