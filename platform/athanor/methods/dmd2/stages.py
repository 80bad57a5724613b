"""DMD2's declared stages and ``PAPER``.

Stages (each one engine run in OUTPUT/<stage>, skipped when already finished): teacher (EDM,
diffusers DiT; ``athanor.parts.diffusion.teacher_stage``, shared with ILF) -> classifier (FD
features) -> dmd2 (the one-step generator) -> dmd2-<run> for each extra run of ``evaluation.runs``
(the 4-step generator, ablations) -> report: the sampler table, sample grids, FD curves, and the
one-step diffusers pipeline with its model card.
"""
from __future__ import annotations

import dataclasses

from ...parts.diffusion import teacher_stage
from ...parts.fd import load_evaluator, train_classifier
from ...runner import Paper, Stage, StageContext
from .config import DMD2RecipeConfig, all_runs, stage_name
from .method import VARIANTS, check_launch, images, run_dmd2
from .report import report


def check(cfg: DMD2RecipeConfig) -> None:
    """Before any compute: a launch DMD2 cannot run under (ZeRO-3), missing image data."""
    check_launch()
    images(cfg.data)


def dmd2_stage(run: str):
    def fn(ctx: StageContext) -> dict:
        cfg = ctx.cfg
        data = images(cfg.data)
        evaluator = load_evaluator(ctx.results["classifier"]["model"], data.held_out_images)
        method_cfg = dataclasses.replace(cfg.dmd2, **VARIANTS.get(run, {}))
        seed = int(run[len("seed"):]) if run.startswith("seed") else None
        return run_dmd2(ctx, method_cfg, cfg.teacher, ctx.results["teacher"]["pipeline"], data, evaluator, seed)
    return fn


def stages(cfg: DMD2RecipeConfig) -> list[Stage]:
    return [Stage("teacher", teacher_stage, describe="EDM teacher (diffusers DiT), shared with ILF"),
            Stage("classifier", lambda ctx: train_classifier(ctx.dir, ctx.cfg, ctx.cfg.classifier, images(ctx.cfg.data)),
                  describe="feature classifier for FD"),
            *(Stage(stage_name(run), dmd2_stage(run), needs=("teacher", "classifier")) for run in all_runs(cfg))]


# The upload's top is the main run's one-step pipeline (report.py): a diffusers pipeline whose class is
# athanor's (pipeline.py), holding the distilled generator (a diffusers DiT) and its EDM scheduler.
PAPER = Paper(name="DMD2", config=DMD2RecipeConfig, stages=stages, report=report, check=check,
              main_model="pipeline", card="diffusers")
