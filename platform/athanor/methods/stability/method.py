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

This module builds the sweep: the grid of points, each one pretrain config, and its jobs (stability
has no ``Method`` of its own: every point is the pretrain paper's ``Pretrain``). ``analysis``:

Analysis: for a (variant, model) the paper's LR sensitivity over the LR grid is

    LRsens = E_η [ min(ℓ(η), ℓ0) − min_η ℓ(η) ],

ℓ(η) the final eval loss at LR η and ℓ0 the loss at initialisation (a diverged run counts as
ℓ0). Scaling: at a fixed LR, a probe such as the max attention logit is fitted as
``log v = a + b · log width`` over the small widths and extrapolated to the width at which it
would cross a threshold — predicting an instability before training the model that shows it.
"""
from __future__ import annotations

import copy
import tempfile
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from ...config import ConfigError, load_config, to_dict
from ...parts.gpt import PretrainConfig
from ...sweep import Job
from .config import VARIANTS, LogZDemoConfig, StabilityConfig, SweepConfig

# The paper every sweep point runs, named as a sweep job names it (``Job.paper``: the module a
# ``python -m athanor.runner`` command line runs); its config class, which checks the points, is the
# floor's ``PretrainConfig``, so no paper imports another.
POINT_PAPER = "athanor.methods.pretrain"


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


def sweep_points(cfg: StabilityConfig) -> list[dict]:
    base = {k: v for k, v in to_dict(cfg).items() if k in ("run", "optim", "engine", "model", "data", "probes")}
    return grid_points(base, cfg.sweep, cfg.logz_demo, cfg.run.output_dir)


def check_points(cfg: StabilityConfig, points: list[dict]) -> None:
    """Before compute: every point must be a valid ``PretrainConfig`` (a bad override exits 2), and
    a point's folder run with other settings is refused."""
    with tempfile.TemporaryDirectory() as tmp:
        for i, point in enumerate(points):
            path = Path(tmp) / f"{i}.yaml"
            path.write_text(OmegaConf.to_yaml(point["config"]))
            try:
                load_config(PretrainConfig, ["--config", str(path)])
            except ConfigError as e:
                raise ConfigError(f"sweep point {point['name']}: {e}") from None
    for point in points:
        point_file = Path(cfg.run.output_dir) / point["name"] / "point.yaml"
        if point_file.exists() and point_file.read_text() != OmegaConf.to_yaml(point["config"]):
            raise ConfigError(f"{point_file.parent} was run with other settings; choose another --run.output_dir")


def make_jobs(cfg: StabilityConfig, points: list[dict]) -> list[Job]:
    """Every point is one ``athanor.methods.pretrain`` run: its config is written into its folder
    (``point.yaml``) and the job runs the pretrain paper with ``--config point.yaml``."""
    check_points(cfg, points)
    jobs = []
    for point in points:
        point_file = Path(cfg.run.output_dir) / point["name"] / "point.yaml"
        point_file.parent.mkdir(parents=True, exist_ok=True)
        point_file.write_text(OmegaConf.to_yaml(point["config"]))
        jobs.append(Job(point["name"], cfg.run.output_dir, "", ["--config", str(point_file)], point["cost"],
                        paper=POINT_PAPER))
    return jobs
