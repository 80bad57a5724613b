"""Small-scale proxies for large-scale Transformer training instabilities (Wortsman et al. 2023).

The method is a sweep of ordinary pretraining runs (``athanor.methods.pretrain``) over
interventions × model widths (× depths) × log-spaced learning rates, and the analysis of their
final losses and instability probes.

Interventions (each a switch of the pretrain model/optimizer; ``VARIANTS`` maps a name to its
config overrides, ``a+b`` combines them):

- qk-layernorm (Dehghani et al. 2023): ``z = LN(q)·LN(k)ᵀ/√d_h`` — LayerNorm on each head's q and
  k before the attention logits, which otherwise grow without bound at high LR;
- z-loss (Chowdhery et al. 2022): ``ℒ += w · log²Z``, ``Z = Σ_j exp(y_j)``, w = 1e-4, keeps the
  output log Z near 0; without it and without weight decay log Z drifts late in long runs;
- warm-up length; AdamW epsilon (the update ``m/(√v + ε)`` collapses once the gradient RMS
  falls to ε, as it does with width);
- independent weight decay: ``θ ← θ − λ · s_t · θ`` with s_t the schedule multiplier,
  not multiplied by the peak LR η (AdamW's default decays by η·s_t·λ);
- µParam (Yang et al. 2022, the paper's simple form): hidden matrices initialised N(0, 1/fan_in) and trained at
  LR · base_width / width, readout scaled by base_width / width (``athanor.models.gpt``);
- no biases, pre-LN (the base model).

Analysis: for a (variant, model) the paper's LR sensitivity over the LR grid is

    LRsens = E_η [ min(ℓ(η), ℓ0) − min_η ℓ(η) ],

ℓ(η) the final eval loss at LR η and ℓ0 the loss at initialisation (a diverged run counts as
ℓ0). Scaling: at a fixed LR, a probe such as the max attention logit is fitted as
``log v = a + b · log width`` over the small widths and extrapolated to the width at which it
would cross a threshold — predicting an instability before training the model that shows it.
"""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

import numpy as np

from ..config import ConfigError, choice, positive
from ..engine.metrics import read_metrics

# Config overrides (dotted keys of the pretrain config) per intervention. The base run is the
# paper's setting with every fix off: pre-LN, no biases, no qk-layernorm, no z-loss, standard
# parameterization. "mup" takes its base width from the sweep (resolved in ``variant_overrides``).
VARIANTS: dict[str, dict[str, Any]] = {
    "baseline": {},
    "qk_layernorm": {"model.qk_layernorm": True},
    "z_loss": {"model.z_loss_weight": 1e-4},
    "mup": {"model.mup_base_width": "sweep"},
    "no_warmup": {"optim.warmup_steps": 0},
    "long_warmup": {"optim.warmup_steps": "x4"},  # four times the base warm-up
    "independent_wd": {"optim.independent_weight_decay": True, "optim.weight_decay": 1e-4},
    "no_wd": {"optim.weight_decay": 0.0},
    "eps_1e-15": {"optim.eps": 1e-15},
    "bias": {"model.bias": True},
}


@dataclass
class SweepConfig:
    variants: list[str] = field(default_factory=lambda: ["baseline", "qk_layernorm"])  # VARIANTS, or a+b
    widths: list[int] = field(default_factory=lambda: [32, 64, 128])  # model.d_model
    depths: list[int] = field(default_factory=lambda: [2])  # model.n_layers
    pair_depths: bool = False  # true: widths[i] goes with depths[i] (a model family), not the product
    lrs: list[float] = field(default_factory=lambda: [1e-3, 3e-3, 1e-2, 3e-2, 1e-1, 3e-1, 1.0])
    head_dim: int = 32  # heads = width // head_dim
    mup_base_width: int = 0  # µParam's base width (0: the smallest width)
    custom_variants: dict[str, dict[str, Any]] = field(default_factory=dict)  # name -> {dotted key: value}
    executor: str = "local"  # local (worker processes) | inline (this process) | any athanor.sweep.EXECUTORS
    workers: int = 2  # local worker processes
    threads_per_worker: int = 1  # torch threads per worker
    devices: list[str] = field(default_factory=list)  # CUDA devices, one per worker in turn ([] = inherit)
    keep_checkpoints: bool = False  # false: delete a finished point's checkpoints (its model/ stays)

    def validate(self) -> None:
        from ..sweep import EXECUTORS

        for name in ("variants", "widths", "depths", "lrs"):
            if not getattr(self, name):
                raise ConfigError(f"sweep.{name} is empty")
        known = [*VARIANTS, *self.custom_variants]
        for part in (p for v in self.variants for p in v.split("+")):
            choice(part, known, "sweep.variants entry")
        if self.pair_depths and len(self.depths) != len(self.widths):
            raise ConfigError("sweep.pair_depths needs as many depths as widths")
        choice(self.executor, list(EXECUTORS), "sweep.executor")
        for w in [*self.widths, *self.depths, *self.lrs, self.head_dim, self.workers, self.threads_per_worker]:
            positive(w, "sweep.widths/depths/lrs/head_dim/workers/threads_per_worker")
        for w in self.widths:
            if w > self.head_dim and w % self.head_dim:
                raise ConfigError(f"sweep.widths: {w} is not a multiple of sweep.head_dim={self.head_dim}")


@dataclass
class AnalysisConfig:
    high_lr: float = 0.3  # LR of the attention-logit-vs-step plot (the grid LR nearest to it)
    extrapolate_lr: float = 0.01  # fixed LR at which probes are fitted against width
    attn_logit_threshold: float = 1e3  # max attention logit taken as the onset of instability
    log_z_threshold: float = 20.0  # max log Z taken as the onset of output-logit divergence
    predict_widths: list[int] = field(default_factory=lambda: [1024, 4096])


@dataclass
class LogZDemoConfig:
    """Long runs at the smallest width without weight decay: does log Z drift without z-loss?"""
    enabled: bool = True
    # 0, the paper's 1e-4, and 1e-2: our batches hold 1k tokens, the paper's 131k, so z-loss's
    # steady pull on log Z competes with far noisier gradients here (see the report)
    z_loss_weights: list[float] = field(default_factory=lambda: [0.0, 1e-4, 1e-2])
    steps: int = 2000
    lr: float = 0.3
    schedule: str = "constant"  # no decay: the drift has the whole run at full LR
    qk_layernorm: bool = True  # keeps the attention-logit instability out of the picture
    width: int = 0  # 0: the sweep's smallest width

    def validate(self) -> None:
        positive(self.steps, "logz_demo.steps")
        positive(self.lr, "logz_demo.lr")
        choice(self.schedule, ("constant", "cosine", "linear"), "logz_demo.schedule")


def variant_overrides(name: str, base: dict, mup_base_width: int, custom: dict | None = None) -> dict[str, Any]:
    """The dotted overrides of variant ``name`` (``a+b`` merges a's and b's), resolved against the
    base config dict ``base`` (for relative values) and the sweep's µParam base width."""
    registry = {**VARIANTS, **(custom or {})}
    out: dict[str, Any] = {}
    for part in name.split("+"):
        if part not in registry:
            raise ConfigError(f"unknown variant {part!r}; known: {', '.join(registry)}")
        for key, value in registry[part].items():
            if value == "sweep":
                value = mup_base_width
            elif isinstance(value, str) and value.startswith("x"):  # multiple of the base value
                value = int(float(value[1:]) * get_dotted(base, key))
            out[key] = value
    return out


def get_dotted(tree: dict, key: str) -> Any:
    for part in key.split("."):
        tree = tree[part]
    return tree


def set_dotted(tree: dict, key: str, value: Any) -> None:
    *parents, leaf = key.split(".")
    for part in parents:
        tree = tree.get(part) if isinstance(tree, dict) else None
    if not isinstance(tree, dict) or leaf not in tree:
        raise ConfigError(f"unknown config key {key!r} in a variant's overrides")
    tree[leaf] = value


def point_config(base: dict, overrides: dict[str, Any]) -> dict:
    """A copy of the base pretrain config (a nested dict) with dotted ``overrides`` applied."""
    cfg = copy.deepcopy(base)
    for key, value in overrides.items():
        set_dotted(cfg, key, value)
    return cfg


def heads_for(width: int, head_dim: int) -> int:
    """Heads grow with width at a fixed head dimension (as in the paper's model family)."""
    return max(1, width // head_dim)


def step_cost(width: int, depth: int) -> float:
    """Relative seconds per step on a CPU core (measured: width 32/64/128 ≈ 0.6/1/2.7 × width 64)."""
    return depth * (1 + (width / 64) ** 2)


def grid_points(base: dict, sweep: SweepConfig, demo: LogZDemoConfig, root: str) -> list[dict]:
    """One dict per run: name (its folder under ``root``), axes, relative cost and full pretrain
    config (``base``, the nested pretrain config dict, with the point's overrides)."""
    models = list(zip(sweep.widths, sweep.depths)) if sweep.pair_depths else \
        [(w, d) for w in sweep.widths for d in sweep.depths]
    mup_base = sweep.mup_base_width or min(sweep.widths)
    steps = base["run"]["max_steps"]
    points = []
    for variant in sweep.variants:
        extra = variant_overrides(variant, base, mup_base, sweep.custom_variants)
        for (width, depth), lr in ((m, lr) for m in models for lr in sweep.lrs):
            points.append(dict(name=f"{variant}/w{width}_L{depth}/lr{lr:.0e}", variant=variant, width=width,
                               depth=depth, lr=lr, cost=steps * step_cost(width, depth),
                               z_loss_weight=extra.get("model.z_loss_weight", base["model"]["z_loss_weight"]),
                               overrides={**extra, "optim.lr": lr}))
    if demo.enabled:  # long runs, constant LR, no weight decay: the output-logit (log Z) drift
        width, depth = demo.width or min(sweep.widths), min(sweep.depths)
        for weight in demo.z_loss_weights:
            points.append(dict(name=f"logz_demo/z{weight:g}", variant=f"logz_demo_z{weight:g}", width=width,
                               depth=depth, lr=demo.lr, cost=demo.steps * step_cost(width, depth), z_loss_weight=weight,
                               overrides={"model.qk_layernorm": demo.qk_layernorm, "model.z_loss_weight": weight,
                                          "optim.lr": demo.lr, "optim.schedule": demo.schedule,
                                          "optim.weight_decay": 0.0, "run.max_steps": demo.steps,
                                          "run.save_every": 500, "run.eval_every": 500}))
    for p in points:
        p["config"] = point_config(base, {"model.d_model": p["width"], "model.n_layers": p["depth"],
                                          "model.n_heads": heads_for(p["width"], sweep.head_dim),
                                          **p.pop("overrides"), "run.progress": False,
                                          "run.output_dir": str(Path(root) / p["name"])})
    return points


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


def sensitivity_tables(runs: list[dict]) -> tuple[dict, dict]:
    """``lr_sensitivity[variant][model]`` and ``optimal_lr[variant][model]`` (model = width, or
    width×depth when the sweep has several depths)."""
    groups = group_runs(runs)
    several_depths = len({d for _, _, d in groups}) > 1
    sens: dict[str, dict[str, float]] = {}
    best: dict[str, dict[str, dict]] = {}
    for (variant, width, depth), group in sorted(groups.items(), key=lambda kv: (kv[0][0], kv[0][1], kv[0][2])):
        key = model_key(width, depth, several_depths)
        initial = float(np.mean([r["initial_eval_loss"] for r in group]))
        losses = [r["final_eval_loss"] for r in group]
        sens.setdefault(variant, {})[key] = lr_sensitivity(losses, initial)
        finite = [r for r in group if math.isfinite(r["final_eval_loss"])]
        top = min(finite, key=lambda r: r["final_eval_loss"]) if finite else None
        best.setdefault(variant, {})[key] = {"lr": top["lr"] if top else None,
                                             "loss": top["final_eval_loss"] if top else math.inf,
                                             "initial_loss": initial}
    return sens, best


# ---------------------------------------------------------------------------- scaling extrapolation
def fit_power_law(widths: list[float], values: list[float]) -> tuple[float, float]:
    """Least squares ``log v = a + b log w``; returns (a, b)."""
    if len(widths) < 2:
        raise ValueError("a trend needs at least two widths")
    b, a = np.polyfit(np.log(widths), np.log(values), 1)
    return float(a), float(b)


MIN_GROWTH_EXPONENT = 0.05  # flatter trends count as "not growing" (their crossing is meaningless)


def crossing_width(a: float, b: float, threshold: float) -> float | None:
    """The width at which ``exp(a) · w^b`` reaches ``threshold`` (None if the trend does not grow)."""
    if b < MIN_GROWTH_EXPONENT:
        return None
    return float(math.exp((math.log(threshold) - a) / b))


def extrapolate(runs: list[dict], variant: str, lr: float, probe: str, threshold: float,
                predict_widths: Iterable[int] = ()) -> dict | None:
    """Fit ``probe`` against width at LR ``lr`` over all but the widest width (held out to check
    the prediction, when there are three or more) and extrapolate."""
    points = sorted((r["width"], r[probe]) for r in runs
                    if r["variant"] == variant and math.isclose(r["lr"], lr, rel_tol=1e-9))
    usable = [(w, v) for w, v in points if math.isfinite(v) and v > 0]
    if len(usable) < 2:
        return None
    fit_on = usable[:-1] if len(usable) >= 3 else usable
    a, b = fit_power_law([w for w, _ in fit_on], [v for _, v in fit_on])
    out = {"variant": variant, "lr": lr, "probe": probe, "fit_widths": [w for w, _ in fit_on],
           "observed": {str(w): v for w, v in points}, "exponent": b, "log_prefactor": a, "threshold": threshold,
           "predicted_crossing_width": crossing_width(a, b, threshold),
           "predicted": {str(w): math.exp(a) * w**b for w in predict_widths}}
    if len(usable) >= 3:
        w_out, v_out = usable[-1]
        out["held_out"] = {"width": w_out, "observed": v_out, "predicted": math.exp(a) * w_out**b}
    return out


# ---------------------------------------------------------------------------- plots
def plot_lr_curves(runs: list[dict], path: str | Path) -> Path:
    """Final eval loss against LR, one line per variant, one panel per model size."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = group_runs(runs)
    models = sorted({(w, d) for _, w, d in groups})
    fig, axes = plt.subplots(1, len(models), figsize=(4.2 * len(models), 3.6), squeeze=False, sharey=True)
    for ax, (width, depth) in zip(axes[0], models):
        for (variant, w, d), group in sorted(groups.items()):
            if (w, d) != (width, depth):
                continue
            initial = float(np.mean([r["initial_eval_loss"] for r in group]))
            lrs = [r["lr"] for r in group]
            losses = [min(r["final_eval_loss"], initial) if math.isfinite(r["final_eval_loss"]) else initial
                      for r in group]
            line, = ax.plot(lrs, losses, marker="o", label=variant)
            diverged = [(r["lr"], l) for r, l in zip(group, losses) if r["diverged"]]
            if diverged:
                ax.scatter(*zip(*diverged), marker="x", s=60, color=line.get_color(), zorder=3)
        ax.set_xscale("log")
        ax.set_title(f"width {width}, {depth} layers")
        ax.set_xlabel("learning rate")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("final eval loss (capped at init; x = diverged)")
    axes[0][-1].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)


def plot_series(curves: dict[str, tuple[list, list]], path: str | Path, title: str, ylabel: str,
                logy: bool = False, hline: float | None = None) -> Path:
    """Probe-against-step curves (label -> (steps, values))."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for label, (steps, values) in curves.items():
        ax.plot(steps, values, label=label)
    if hline is not None:
        ax.axhline(hline, color="gray", lw=0.8, ls="--")
    if logy:
        ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)


def plot_scaling(fits: list[dict], path: str | Path) -> Path | None:
    """Observed probe against width with the fitted power law, extended to the predicted widths."""
    fits = [f for f in fits if f]
    if not fits:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(fits), figsize=(5 * len(fits), 3.8), squeeze=False)
    for ax, fit in zip(axes[0], fits):
        observed = {int(w): v for w, v in fit["observed"].items() if math.isfinite(v) and v > 0}
        ax.scatter(list(observed), list(observed.values()), label="observed", zorder=3)
        ws, a = fit["fit_widths"], fit["log_prefactor"]
        span = sorted(set(list(observed) + [int(w) for w in fit["predicted"]]))
        grid = np.geomspace(min(span), max(span), 50)
        ax.plot(grid, np.exp(a) * grid ** fit["exponent"], ls="--", label=f"fit on {ws}: ∝ w^{fit['exponent']:.2f}")
        ax.axhline(fit["threshold"], color="gray", lw=0.8, ls=":", label=f"threshold {fit['threshold']:g}")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("width")
        ax.set_title(f"{fit['probe']} at LR {fit['lr']:g} ({fit['variant']})")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)


# ---------------------------------------------------------------------------- the report
def _fmt(value) -> str:
    if value is None:
        return "–"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, (int, float)):
        return f"{value:.3g}" if math.isfinite(value) else str(value)
    return str(value)


def nearest(values: Iterable[float], target: float) -> float:
    return min(values, key=lambda v: abs(math.log(v) - math.log(target)))


def compare_to_baseline(grid: list[dict], variant: str, sens: dict, top_lrs: list[float]) -> dict:
    """At the widest model: ``variant`` vs baseline max attention logit at the highest LRs, and
    LR sensitivity at every model size."""
    widest = max(r["width"] for r in grid)
    depth = min(r["depth"] for r in grid if r["width"] == widest)
    at = {(r["variant"], r["lr"]): r for r in grid if r["width"] == widest and r["depth"] == depth}
    logits = {str(lr): {"baseline": at[("baseline", lr)]["max_attn_logit"], variant: at[(variant, lr)]["max_attn_logit"]}
              for lr in top_lrs if ("baseline", lr) in at and (variant, lr) in at}
    return {"width": widest, "depth": depth, "max_attn_logit_at_high_lr": logits,
            "lower_max_attn_logit_at_all_high_lrs": bool(logits) and all(v[variant] < v["baseline"]
                                                                           for v in logits.values()),
            "lr_sensitivity": {m: {"baseline": sens["baseline"][m], variant: sens[variant][m]}
                               for m in sens["baseline"] if m in sens.get(variant, {})}}


def logz_summary(run_dir: Path, run: dict) -> dict:
    """The log Z trajectory of a long demo run: start, end, extremes and the late-run slope."""
    steps, values = series(run_dir, "log_z_mean")
    if not steps:
        return {"name": run["name"], "final_eval_loss": run["final_eval_loss"], "log_z_first": None}
    half = len(steps) // 2
    slope = float(np.polyfit(steps[half:], values[half:], 1)[0] * 1000) if len(steps) - half >= 2 else math.nan
    return {"name": run["name"], "z_loss_weight": run.get("z_loss_weight"), "steps": steps[-1],
            "final_eval_loss": run["final_eval_loss"], "log_z_first": values[0], "log_z_final": values[-1],
            "log_z_min": min(values), "log_z_max": max(values), "drift": values[-1] - values[0],
            "late_slope_per_1k_steps": slope}


def write_stability_report(root: str | Path, runs: list[dict], analysis: AnalysisConfig, demo: LogZDemoConfig,
                           setup: str = "") -> dict:
    """report.json, report.md and the PNGs for a finished sweep; returns the report. ``setup``
    describes the base run in one line for report.md."""
    from ..report import write_report

    root = Path(root)
    grid = [r for r in runs if not r["variant"].startswith("logz_demo")]
    demo_runs = [r for r in runs if r["variant"].startswith("logz_demo")]
    sens, best = sensitivity_tables(grid)
    lrs = sorted({r["lr"] for r in grid})
    top_lrs = lrs[-3:]
    widest = max(r["width"] for r in grid)
    depth_of_widest = min(r["depth"] for r in grid if r["width"] == widest)
    variants = list(dict.fromkeys(r["variant"] for r in grid))
    comparisons = {v: compare_to_baseline(grid, v, sens, top_lrs) for v in variants
                   if v != "baseline" and "baseline" in variants}

    # Probes against width at one LR (one depth per width: the family, or the smallest depth)
    per_width_depths = {w: {r["depth"] for r in grid if r["width"] == w} for w in {r["width"] for r in grid}}
    family = grid if all(len(d) == 1 for d in per_width_depths.values()) else \
        [r for r in grid if r["depth"] == min(r2["depth"] for r2 in grid)]
    fit_lr = nearest(lrs, analysis.extrapolate_lr)
    fits = [extrapolate(family, v, fit_lr, probe, threshold, analysis.predict_widths)
            for v in variants for probe, threshold in (("max_attn_logit", analysis.attn_logit_threshold),
                                                       ("max_log_z", analysis.log_z_threshold))]
    fits = [f for f in fits if f]

    plots = [plot_lr_curves(grid, root / "loss_vs_lr.png").name]
    high_lr = nearest(lrs, analysis.high_lr)
    curves = {f"{r['variant']} (LR {high_lr:g})": series(root / r["name"], "max_attn_logit") for r in grid
              if r["width"] == widest and r["depth"] == depth_of_widest and r["lr"] == high_lr}
    plots.append(plot_series(curves, root / "max_attn_logit_high_lr.png", f"max attention logit, width {widest}",
                             "max attention logit", logy=True).name)
    demo_summary = [logz_summary(root / r["name"], r) for r in demo_runs]
    if demo_runs:
        curves = {f"z-loss {r['name'].split('/z')[-1]}": series(root / r["name"], "log_z_mean") for r in demo_runs}
        plots.append(plot_series(curves, root / "log_z_demo.png",
                                 f"log Z, width {demo_runs[0]['width']}, LR {demo.lr:g} {demo.schedule}, no weight decay",
                                 "mean output log Z", hline=0.0).name)
    scaling_png = plot_scaling([f for f in fits if f["probe"] == "max_attn_logit"], root / "attn_logit_vs_width.png")
    if scaling_png:
        plots.append(scaling_png.name)

    report = {"n_runs": len(grid), "widest_width": widest, "highest_lrs": top_lrs,
              "runs": [{k: r[k] for k in ("variant", "width", "depth", "lr", "final_eval_loss", "max_attn_logit",
                                          "max_log_z", "diverged", "initial_eval_loss", "final_log_z_mean",
                                          "min_attn_entropy", "max_act_rms", "final_grad_rms", "z_loss_weight",
                                          "name")} for r in grid],
              "lr_sensitivity": sens, "optimal_lr": best, "comparisons": comparisons, "extrapolation": fits,
              "logz_demo": demo_summary, "plots": plots}
    if "qk_layernorm" in comparisons:
        c = comparisons["qk_layernorm"]
        key = next((m for m in c["lr_sensitivity"] if m.split("x")[0] == str(widest)), None)
        report["qk_layernorm_lowers_max_attn_logit_at_high_lrs"] = c["lower_max_attn_logit_at_all_high_lrs"]
        if key:
            report["qk_layernorm_lowers_lr_sensitivity_at_widest"] = \
                c["lr_sensitivity"][key]["qk_layernorm"] < c["lr_sensitivity"][key]["baseline"]
    write_report(root, report, "Small-scale proxies for training instabilities (Wortsman et al. 2023)",
                 ([setup, ""] if setup else []) + report_lines(report, analysis, demo))
    return report


def report_lines(report: dict, analysis: AnalysisConfig, demo: LogZDemoConfig) -> list[str]:
    """The human part of report.md: what the numbers say, including what did not reproduce."""
    sens, best = report["lr_sensitivity"], report["optimal_lr"]
    models = list(next(iter(sens.values())))
    lines = [f"{report['n_runs']} sweep runs; final eval loss vs LR per variant: `loss_vs_lr.png` "
             f"(x = diverged: final loss non-finite or above the loss at initialisation).", "",
             "## LR sensitivity  E_η[min(ℓ(η), ℓ0) − min_η ℓ(η)]  (lower is more stable)", "",
             "| variant | " + " | ".join(f"model {m}" for m in models) + " |", "|---" * (len(models) + 1) + "|"]
    for variant, row in sens.items():
        cells = [f"{_fmt(row.get(m))} (best LR {_fmt(best[variant][m]['lr'])}, loss {_fmt(best[variant][m]['loss'])})"
                 for m in models]
        lines.append(f"| {variant} | " + " | ".join(cells) + " |")
    for variant, c in report["comparisons"].items():
        lines += ["", f"## {variant} vs baseline at the widest model (width {c['width']}, {c['depth']} layers)", ""]
        for lr, pair in c["max_attn_logit_at_high_lr"].items():
            lines.append(f"- LR {float(lr):g}: max attention logit {_fmt(pair['baseline'])} (baseline) vs "
                         f"{_fmt(pair[variant])} ({variant})")
        verdict = "lower at every one of the highest LRs" if c["lower_max_attn_logit_at_all_high_lrs"] \
            else "NOT lower at every one of the highest LRs"
        lines.append(f"- max attention logit with {variant}: {verdict}.")
        for m, pair in c["lr_sensitivity"].items():
            change = "lower" if pair[variant] < pair["baseline"] else "NOT lower"
            lines.append(f"- LR sensitivity, model {m}: {_fmt(pair['baseline'])} → {_fmt(pair[variant])} ({change}).")
    lines += ["", "## Probes against width at a fixed LR (fit over the smaller widths, extrapolated)", ""]
    for f in report["extrapolation"]:
        observed = ", ".join(f"w{w}: {_fmt(v)}" for w, v in f["observed"].items())
        cross = f["predicted_crossing_width"]
        text = (f"- {f['variant']}, {f['probe']} at LR {f['lr']:g}: {observed}; ∝ width^{f['exponent']:.2f} "
                f"(fit on {f['fit_widths']}); ")
        text += (f"crosses {f['threshold']:g} at width ≈ {_fmt(cross)}" if cross else
                 f"flat or falling (exponent < {MIN_GROWTH_EXPONENT}), so no crossing of {f['threshold']:g} is predicted")
        if "held_out" in f:
            h = f["held_out"]
            text += f"; held-out width {h['width']}: predicted {_fmt(h['predicted'])}, observed {_fmt(h['observed'])}"
        lines.append(text + ".")
    if report["logz_demo"]:
        lines += ["", f"## Output log Z without weight decay ({demo.steps} steps, LR {demo.lr:g} {demo.schedule}, "
                  f"qk-layernorm {demo.qk_layernorm}): `log_z_demo.png`", ""]
        for d in report["logz_demo"]:
            lines.append(f"- z-loss {_fmt(d.get('z_loss_weight'))}: mean log Z {_fmt(d.get('log_z_first'))} → "
                         f"{_fmt(d.get('log_z_final'))} (range {_fmt(d.get('log_z_min'))}…{_fmt(d.get('log_z_max'))}, "
                         f"late slope {_fmt(d.get('late_slope_per_1k_steps'))} per 1k steps), final eval loss "
                         f"{_fmt(d['final_eval_loss'])}.")
        lines += logz_verdict(report["logz_demo"])
    lines += ["", "## Runs", "", "| variant | width | depth | LR | final eval loss | max attn logit | max log Z | diverged |",
              "|---|---|---|---|---|---|---|---|"]
    for r in report["runs"]:
        lines.append(f"| {r['variant']} | {r['width']} | {r['depth']} | {r['lr']:g} | {_fmt(r['final_eval_loss'])} | "
                     f"{_fmt(r['max_attn_logit'])} | {_fmt(r['max_log_z'])} | {_fmt(r['diverged'])} |")
    return lines


def logz_verdict(demo: list[dict]) -> list[str]:
    """Plain statements of whether the paper's log Z effect showed in the demo runs."""
    without = [d for d in demo if not d.get("z_loss_weight") and d.get("log_z_final") is not None]
    with_z = [d for d in demo if d.get("z_loss_weight") and d.get("log_z_final") is not None]
    out = []
    for d in without:
        out.append(f"- Without z-loss log Z moved by {d['drift']:+.2f} over the run "
                   f"({'a drift' if abs(d['drift']) > 1.0 else 'no clear drift'}; the paper's divergence has log Z "
                   f"running far from 0 late in long runs).")
    for d in with_z:
        near = abs(d["log_z_final"]) < 1.0
        out.append(f"- With z-loss {d['z_loss_weight']:g} log Z ended at {d['log_z_final']:.2f}: "
                   f"{'near 0, as in the paper' if near else 'NOT near 0 — the paper effect did not reproduce here'}.")
    return out
