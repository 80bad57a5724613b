"""Tune the baselines' learning rate and steps per request on the dev world (``data.dev_seed``),
never on a report's world:

    python -m athanor.methods.o3.tofu_tune --run.output_dir DIR [--section.key value ...]

The dev world's base LM and retain-only model are trained as in the recipe; every grid point runs
the baseline over the sequential requests and is scored by TOFU's forget quality and model
utility after the last request. Per method the chosen point is the one with the highest forget
quality among those keeping model utility >= ``KEEP`` x the retain-only model's (else the highest
model utility). DIR/report.json and report.md list the grid; the chosen values are copied into
``baselines.BaselineConfig``'s defaults by hand.
"""
from __future__ import annotations

import dataclasses

from ...report import write_report
from ...runner import Paper, Stage, StageContext, run
from .baselines import METHODS
from .config import O3Config
from .stages import train_base
from .tofu_report import summarize
from .tofu_stages import baseline_request, score_plain, train_retain_only

GRID_LR = (3e-4, 1e-3, 3e-3)
GRID_STEPS = (20,)  # steps and lr both scale the update: one steps value keeps the grid inside minutes
KEEP = 0.9


def point(method: str, lr: float, steps: int) -> str:
    return f"{method}_lr{lr:g}_s{steps}"


def with_point(ctx: StageContext, method: str, lr: float, steps: int) -> StageContext:
    b = dataclasses.replace(ctx.cfg.baselines, **{f"{method}_lr": lr, f"{method}_steps": steps})
    return dataclasses.replace(ctx, cfg=dataclasses.replace(ctx.cfg, baselines=b))


def dev_config(cfg: O3Config) -> O3Config:
    return dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, seed=cfg.data.dev_seed))


def dev(ctx: StageContext) -> StageContext:
    return dataclasses.replace(ctx, cfg=dev_config(ctx.cfg))


def tune_stages(cfg: O3Config) -> list[Stage]:
    T = cfg.data.requests
    out = [Stage("base", lambda ctx: train_base(dataclasses.replace(ctx, cfg=dev_config(ctx.cfg)))),
           Stage("tofu_retain_only", lambda ctx: train_retain_only(dataclasses.replace(ctx, cfg=dev_config(ctx.cfg))),
                 needs=("base",)),
           Stage("tofu_retain_only_eval", lambda ctx: {"tofu": score_plain(
               dev_config(ctx.cfg), ctx.results["tofu_retain_only"]["model_dir"], T)}, needs=("tofu_retain_only",))]
    for m in METHODS:
        for lr in GRID_LR:
            for steps in GRID_STEPS:
                name = point(m, lr, steps)
                out += [Stage(f"{name}_{t}", lambda ctx, m=m, lr=lr, steps=steps, t=t, name=name: baseline_request(
                    dev(with_point(ctx, m, lr, steps)), m, t, prefix=f"{name}_"), needs=("base",)) for t in range(1, T + 1)]
    return out


def tune_report(ctx: StageContext, results: dict) -> dict:
    T = ctx.cfg.data.requests
    reference = results["tofu_retain_only_eval"]["tofu"]
    ref_mu = summarize(reference, reference, T)["model_utility"]
    grid, chosen = [], {}
    for m in METHODS:
        rows = []
        for lr in GRID_LR:
            for steps in GRID_STEPS:
                final = summarize(results[f"{point(m, lr, steps)}_{T}"]["tofu"], reference, T)
                rows.append({"method": m, "lr": lr, "steps": steps, "forget_quality": final["forget_quality"],
                             "model_utility": final["model_utility"], "truth_ratio": final["truth_ratio"]})
        keep = [r for r in rows if (r["model_utility"] or 0) >= KEEP * ref_mu]
        best = (max(keep, key=lambda r: r["forget_quality"] or 0) if keep
                else max(rows, key=lambda r: r["model_utility"] or 0))
        chosen[m] = {"lr": best["lr"], "steps": best["steps"], "kept_utility": bool(keep)}
        grid += rows
    out = {"dev_seed": ctx.cfg.data.dev_seed, "retain_only_model_utility": ref_mu, "keep": KEEP, "grid": grid,
           "chosen": chosen}
    lines = [f"Dev world: data seed {ctx.cfg.data.dev_seed}; retain-only model utility {ref_mu:.3f}; chosen per "
             f"method: highest forget quality with model utility >= {KEEP} x retain-only's.", "",
             "| method | lr | steps | forget_quality | model_utility | truth_ratio |", "|---|---|---|---|---|---|"]
    lines += [f"| {r['method']} | {r['lr']:g} | {r['steps']} | {r['forget_quality']:.3g} | {r['model_utility']:.3g} | "
              f"{r['truth_ratio']:.3g} |" for r in grid]
    lines += ["", "Chosen: " + ", ".join(f"{m} lr {c['lr']:g} steps {c['steps']}" for m, c in chosen.items())]
    write_report(ctx.root, out, "O3 baselines tuned on the dev world", lines)
    return out


TUNE = Paper(name="O3 baseline tuning", config=O3Config, stages=tune_stages, report=tune_report)

if __name__ == "__main__":
    run(TUNE)
