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
  not multiplied by the peak LR η (AdamW's default, LR-coupled, decays by η·s_t·λ). The base run
  decays independently by 1e-4 (the paper's setting); ``coupled_wd`` is AdamW's coupled decay with
  λ = 0.1, equal to the base at η = 1e-3 (η·λ = 1e-4) and stronger/weaker above/below it;
- µParam (Yang et al. 2022, the paper's simple form): hidden matrices initialised N(0, 1/fan_in) and trained at
  LR · base_width / width, readout scaled by base_width / width (``athanor.models.gpt``);
- no biases, pre-LN (the base model; ``bias`` and ``post_ln`` switch them).

Analysis: for a (variant, model) the paper's LR sensitivity over the LR grid is

    LRsens = E_η [ min(ℓ(η), ℓ0) − min_η ℓ(η) ],

ℓ(η) the final eval loss at LR η and ℓ0 the loss at initialisation (a diverged run counts as
ℓ0). Scaling: at a fixed LR, a probe such as the max attention logit is fitted as
``log v = a + b · log width`` over the small widths and extrapolated to the width at which it
would cross a threshold — predicting an instability before training the model that shows it.
"""
from __future__ import annotations

import copy
import importlib
import math
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

import numpy as np

from ..config import ConfigError, OptimConfig, RunConfig, TrainConfig, choice, load_config, positive, to_dict
from ..data import TextDataConfig
from ..engine.metrics import read_metrics
from ..runner import Paper, StageContext
from ..sweep import Job, make_executor, sweep_stage
from ..parts.gpt import GPTModelConfig, ProbeConfig

# The paper every sweep point runs, named as a sweep job names it (``Job.paper``): stability sweeps
# that paper's runs and reads its config class from it, so no paper imports another.
POINT_PAPER = "athanor.methods.pretrain"

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
    "independent_wd": {"optim.independent_weight_decay": True, "optim.weight_decay": 1e-4},  # = the base run
    "coupled_wd": {"optim.independent_weight_decay": False, "optim.weight_decay": 0.1},  # η·λ = 1e-4 at η = 1e-3
    "no_wd": {"optim.weight_decay": 0.0},
    "eps_1e-15": {"optim.eps": 1e-15},
    "bias": {"model.bias": True},
    "post_ln": {"model.pre_ln": False},
}


DEFAULT_VARIANTS = ["baseline", "qk_layernorm", "z_loss", "coupled_wd", "no_warmup", "long_warmup", "mup", "eps_1e-15"]


@dataclass
class SweepConfig:
    # The LR-sensitivity table: every variant over every LR and seed at ``table_width``; the
    # ``width_variants`` also at every width (at ``width_lrs``), for the probe-vs-width fit.
    variants: list[str] = field(default_factory=lambda: list(DEFAULT_VARIANTS))  # VARIANTS, or a+b
    widths: list[int] = field(default_factory=lambda: [32, 64, 96, 128])  # model.d_model
    depths: list[int] = field(default_factory=lambda: [2])  # model.n_layers
    pair_depths: bool = False  # true: widths[i] goes with depths[i] (a model family), not the product
    lrs: list[float] = field(default_factory=lambda: [1e-3, 1e-2, 1e-1, 3e-1, 1.0])
    seeds: list[int] = field(default_factory=lambda: [0, 1])  # run.seed (init and data order) of every point
    table_width: int = 64  # width of the variants not in width_variants (0: every variant at every width)
    width_variants: list[str] = field(default_factory=lambda: ["baseline", "qk_layernorm"])  # those in variants: every width
    width_lrs: list[float] = field(default_factory=lambda: [1e-2, 3e-1])  # their LRs off table_width ([]: lrs;
    # table_width 0: lrs everywhere)
    head_dim: int = 32  # heads = width // head_dim
    mup_base_width: int = 0  # µParam's base width (0: the smallest width)
    custom_variants: dict[str, dict[str, Any]] = field(default_factory=dict)  # name -> {dotted key: value}
    executor: str = "local"  # local (worker processes) | inline (this process) | slurm (a job array) | ...
    workers: int = 2  # local worker processes (each with engine.cpu_threads torch threads)
    devices: list[str] = field(default_factory=list)  # CUDA devices, one per worker in turn ([] = inherit)
    keep_checkpoints: bool = False  # false: delete a finished point's checkpoints (its model/ stays)

    def validate(self) -> None:
        from ..cluster import register_sweep_executor
        from ..sweep import EXECUTORS

        register_sweep_executor()  # --sweep.executor slurm: the sweep as one SLURM job array
        for name in ("variants", "widths", "depths", "lrs", "seeds"):
            if not getattr(self, name):
                raise ConfigError(f"sweep.{name} is empty")
        if len(set(self.seeds)) != len(self.seeds):
            raise ConfigError(f"sweep.seeds has repeats: {self.seeds}")
        known = [*VARIANTS, *self.custom_variants]
        for part in (p for v in self.variants for p in v.split("+")):
            choice(part, known, "sweep.variants entry")
        if self.pair_depths and len(self.depths) != len(self.widths):
            raise ConfigError("sweep.pair_depths needs as many depths as widths")
        choice(self.executor, list(EXECUTORS), "sweep.executor")
        for w in [*self.widths, *self.depths, *self.lrs, self.head_dim, self.workers]:
            positive(w, "sweep.widths/depths/lrs/head_dim/workers")
        for w in self.widths:
            if w > self.head_dim and w % self.head_dim:
                raise ConfigError(f"sweep.widths: {w} is not a multiple of sweep.head_dim={self.head_dim}")
        if self.table_width and self.table_width not in self.widths:
            raise ConfigError(f"sweep.table_width={self.table_width} is not one of sweep.widths {self.widths}")
        for lr in self.width_lrs:
            positive(lr, "sweep.width_lrs")


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
    # LR 1 with an untied output layer. Without z-loss log Z drifted once at 10k steps (5.5 -> 8.5) and
    # not in the next 10k-step default run (+0.43 over the second half); z-loss 1e-2 had brought it to
    # ~0.5 by step 5000 there. 5000 steps keep the whole default within 15 minutes on 2 cores (the
    # 10k-step demo was 28% of the sweep's time); 2000-4000 steps at LR 0.3 showed no drift either.
    steps: int = 5000
    lr: float = 1.0
    schedule: str = "constant"  # no decay: the drift has the whole run at full LR
    qk_layernorm: bool = True  # keeps the attention-logit instability out of the picture
    tie_embeddings: bool = False  # an untied output layer, as in the paper's models
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
    several_seeds = len(sweep.seeds) > 1
    for variant in sweep.variants:
        extra = variant_overrides(variant, base, mup_base, sweep.custom_variants)
        every_width = not sweep.table_width or variant in sweep.width_variants
        for (width, depth) in models:
            if not every_width and width != sweep.table_width:
                continue
            full = not sweep.table_width or width == sweep.table_width or not sweep.width_lrs
            lrs = sweep.lrs if full else sweep.width_lrs
            for lr, seed in ((lr, seed) for lr in lrs for seed in sweep.seeds):
                suffix = f"/s{seed}" if several_seeds else ""
                points.append(dict(name=f"{variant}/w{width}_L{depth}/lr{lr:.0e}{suffix}", variant=variant,
                                   width=width, depth=depth, lr=lr, seed=seed, cost=steps * step_cost(width, depth),
                                   z_loss_weight=extra.get("model.z_loss_weight", base["model"]["z_loss_weight"]),
                                   overrides={**extra, "optim.lr": lr, "run.seed": seed}))
    if demo.enabled:  # long runs, constant LR, no weight decay: the output-logit (log Z) drift
        width, depth = demo.width or min(sweep.widths), min(sweep.depths)
        for weight in demo.z_loss_weights:
            points.append(dict(name=f"logz_demo/z{weight:g}", variant=f"logz_demo_z{weight:g}", width=width,
                               depth=depth, lr=demo.lr, seed=base["run"]["seed"], cost=demo.steps * step_cost(width, depth), z_loss_weight=weight,
                               overrides={"model.qk_layernorm": demo.qk_layernorm, "model.z_loss_weight": weight,
                                          "model.tie_embeddings": demo.tie_embeddings,
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


# ---------------------------------------------------------------------------- the paper
@dataclass
class StabilityConfig(TrainConfig):
    # run/optim/engine/model/data: the base pretrain config of every point (the paper's defaults,
    # with every fix off); run.output_dir holds the sweep, one folder per point.
    run: RunConfig = field(default_factory=lambda: RunConfig(output_dir="outputs/stability", max_steps=400,
                                                             log_every=10, keep_last=1, progress=False))
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(
        betas=(0.9, 0.95), eps=1e-8, weight_decay=1e-4, independent_weight_decay=True, warmup_steps=20,
        schedule="cosine", min_lr_ratio=0.01, grad_clip=1.0))
    model: GPTModelConfig = field(default_factory=lambda: GPTModelConfig(bias=False, qk_layernorm=False))
    data: TextDataConfig = field(default_factory=lambda: TextDataConfig(block_size=64, batch_size=16,
                                                                        eval_batches=16))
    sweep: SweepConfig = field(default_factory=SweepConfig)
    analysis: AnalysisConfig = field(default_factory=AnalysisConfig)
    logz_demo: LogZDemoConfig = field(default_factory=LogZDemoConfig)
    probes: ProbeConfig = field(default_factory=lambda: ProbeConfig(every=10))  # the probes' extremes need them often


def sweep_points(cfg: StabilityConfig) -> list[dict]:
    base = {k: v for k, v in to_dict(cfg).items() if k in ("run", "optim", "engine", "model", "data", "probes")}
    return grid_points(base, cfg.sweep, cfg.logz_demo, cfg.run.output_dir)


def point_config_class() -> type:
    """The config class of ``POINT_PAPER`` (``PretrainConfig``), from its ``PAPER``."""
    return importlib.import_module(POINT_PAPER).PAPER.config


def check_points(cfg: StabilityConfig, points: list[dict]) -> None:
    """Before compute: every point must be a valid ``PretrainConfig`` (a bad override exits 2), and
    a point's folder run with other settings is refused."""
    from omegaconf import OmegaConf

    with tempfile.TemporaryDirectory() as tmp:
        for i, point in enumerate(points):
            path = Path(tmp) / f"{i}.yaml"
            path.write_text(OmegaConf.to_yaml(point["config"]))
            try:
                load_config(point_config_class(), ["--config", str(path)])
            except ConfigError as e:
                raise ConfigError(f"sweep point {point['name']}: {e}") from None
    for point in points:
        point_file = Path(cfg.run.output_dir) / point["name"] / "point.yaml"
        if point_file.exists() and point_file.read_text() != OmegaConf.to_yaml(point["config"]):
            raise ConfigError(f"{point_file.parent} was run with other settings; choose another --run.output_dir")


def make_jobs(cfg: StabilityConfig, points: list[dict]) -> list[Job]:
    """Every point is one ``athanor.methods.pretrain`` run: its config is written into its folder
    (``point.yaml``) and the job runs the pretrain paper with ``--config point.yaml``."""
    from omegaconf import OmegaConf

    check_points(cfg, points)
    jobs = []
    for point in points:
        point_file = Path(cfg.run.output_dir) / point["name"] / "point.yaml"
        point_file.parent.mkdir(parents=True, exist_ok=True)
        point_file.write_text(OmegaConf.to_yaml(point["config"]))
        jobs.append(Job(point["name"], cfg.run.output_dir, "", ["--config", str(point_file)], point["cost"],
                        paper=POINT_PAPER))
    return jobs


def describe(cfg: StabilityConfig) -> str:
    o, m, d = cfg.optim, cfg.model, cfg.data
    return (f"Base run: {'pre' if m.pre_ln else 'post'}-LN GPT, bias={m.bias}, tied embeddings={m.tie_embeddings}, "
            f"head dim {cfg.sweep.head_dim}, {cfg.run.max_steps} steps of {d.batch_size}×{d.block_size} tokens "
            f"({d.source}, {d.tokenizer}); AdamW β={tuple(o.betas)}, ε={o.eps:g}, clip {o.grad_clip:g}, weight decay "
            f"{o.weight_decay:g} ({'independent' if o.independent_weight_decay else 'LR-coupled'}), warm-up "
            f"{o.warmup_steps}, {o.schedule} to {o.min_lr_ratio:g}× peak; z-loss {m.z_loss_weight:g}, "
            f"qk-layernorm {m.qk_layernorm}, µParam base width {m.mup_base_width or 'off'}.")


def worker_threads(cfg: StabilityConfig) -> int:
    """Torch threads per sweep worker: the one ``engine.cpu_threads`` setting every recipe uses (the
    points' own runs get it too); 0 (torch's default) shares this machine's cores among the workers."""
    return cfg.engine.cpu_threads or max(1, (os.cpu_count() or 1) // cfg.sweep.workers)


def _executor(cfg: StabilityConfig):
    return make_executor(cfg.sweep.executor, workers=cfg.sweep.workers, threads_per_worker=worker_threads(cfg),
                         devices=cfg.sweep.devices)


def _drop_checkpoints(ctx: StageContext, jobs: list[Job]) -> None:
    if not ctx.cfg.sweep.keep_checkpoints:  # finished points are skipped from now on: checkpoints are dead weight
        for job in jobs:
            shutil.rmtree(job.output_dir / "checkpoints", ignore_errors=True)


def report(ctx: StageContext, results: dict) -> dict:
    from .stability_report import write_stability_report

    cfg, finished = ctx.cfg, results["sweep"]["jobs"]
    runs = [{**{k: p[k] for k in ("name", "variant", "width", "depth", "lr", "seed", "z_loss_weight")},
             **summarize_run(ctx.root / p["name"], finished[p["name"]])} for p in sweep_points(cfg)]
    # The independent-decay row (the baseline's runs) only where the sweep makes the comparison.
    compares_decay = any(v in cfg.sweep.variants for v in ("coupled_wd", "independent_wd"))
    base_is_independent_wd = compares_decay and cfg.optim.independent_weight_decay and cfg.optim.weight_decay == \
        VARIANTS["independent_wd"]["optim.weight_decay"]
    return write_stability_report(ctx.root, runs, cfg.analysis, cfg.logz_demo, describe(cfg),
                                  baseline_alias="independent_wd" if base_is_independent_wd else None)


PAPER = Paper(
    name="stability",
    config=StabilityConfig,
    check=lambda cfg: check_points(cfg, sweep_points(cfg)),
    stages=lambda cfg: [sweep_stage("sweep", lambda ctx: make_jobs(ctx.cfg, sweep_points(ctx.cfg)), _executor,
                                    desc="sweep", after=_drop_checkpoints)],
    report=report,
)
