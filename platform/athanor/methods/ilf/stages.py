"""ILF's declared stages and ``PAPER``: teacher -> classifier -> trajectories -> ilf -> ilf-<variant>
(other feedback seeds, the no-loop control, placements, copy initialisation) -> evaluate."""
from __future__ import annotations

import re
from pathlib import Path

from ...config import ConfigError
from ...data.images import load_image_data
from ...parts.diffusion import teacher_stage
from ...parts.fd import train_classifier
from ...runner import Paper, Stage
from .config import ILFRecipeConfig, variant_stage_name
from .evaluation import evaluate_stage
from .latent import resolve_checkpoint
from .method import train_feedback, trajectories_stage, variant_config
from .report import report, summary


def check(cfg: ILFRecipeConfig) -> None:
    if cfg.teacher.arch != "dit":
        raise ConfigError("ILF needs a transformer backbone: teacher.arch=dit")
    if cfg.teacher.guidance != 1.0:
        raise ConfigError("ILF distils the conditional teacher without guidance: teacher.guidance=1.0")
    names = {variant_stage_name(v) for v in cfg.evaluation.variants}
    if len(names) != len(cfg.evaluation.variants) or "ilf-" in names:
        raise ConfigError(f"evaluation.variants={list(cfg.evaluation.variants)} repeat")
    if cfg.ilf.backbone:
        if not Path(cfg.ilf.backbone).exists() and not re.fullmatch(r"[\w.-]+/[\w.-]+", cfg.ilf.backbone):
            raise ConfigError(f"ilf.backbone={cfg.ilf.backbone!r}: neither a folder nor a Hub id (owner/name)")
        for variant in cfg.evaluation.variants:
            variant_config(cfg.ilf, variant, 0)
        return  # the loop/variant/caching blocks are checked against the loaded DiT's blocks in its stages
    layers = cfg.teacher.layers
    cfg.ilf.check_backbone(layers)
    for variant in cfg.evaluation.variants:
        variant_config(cfg.ilf, variant, layers).check_backbone(layers)
    if cfg.evaluation.cache_blocks[1] >= layers:
        raise ConfigError(f"evaluation.cache_blocks={list(cfg.evaluation.cache_blocks)} is outside the teacher's "
                          f"{layers} blocks")


def stages(cfg: ILFRecipeConfig) -> list[Stage]:
    def backbone_stage(ctx):
        if ctx.cfg.ilf.backbone:  # a latent DiT checkpoint is the frozen backbone (and its teacher)
            return {"pipeline": str(resolve_checkpoint(ctx.cfg.ilf.backbone)), "trained_steps": 0, "latent": True}
        return teacher_stage(ctx)

    def classifier_stage(ctx):
        if ctx.cfg.ilf.backbone:
            return {"model": None, "skipped": "latent DiT: FD is not measured"}
        return train_classifier(ctx.dir, ctx.cfg, ctx.cfg.classifier, load_image_data(ctx.cfg.data))

    def feedback_stage(variant: str):
        return lambda ctx: train_feedback(ctx, variant_config(ctx.cfg.ilf, variant, ctx.cfg.teacher.layers)
                                          if variant else ctx.cfg.ilf)

    trained = {"ilf": "ilf", **{v: variant_stage_name(v) for v in cfg.evaluation.variants}}
    return [Stage("teacher", backbone_stage, describe="EDM teacher (diffusers DiT), shared with DMD2"),
            Stage("classifier", classifier_stage, describe="feature classifier for FD"),
            Stage("trajectories", trajectories_stage, needs=("teacher",), describe="cached teacher trajectories"),
            Stage("ilf", feedback_stage(""), needs=("teacher", "trajectories"), describe="ILF feedback module"),
            *[Stage(trained[v], feedback_stage(v), needs=("teacher", "trajectories"), describe=f"variant {v}")
              for v in cfg.evaluation.variants],
            Stage("evaluate", lambda ctx: evaluate_stage(ctx, trained),
                  needs=("teacher", "classifier", *trained.values()), describe="curve, FD, pipeline")]


PAPER = Paper(name="ilf", config=ILFRecipeConfig, stages=stages, report=report, check=check, summary=summary,
              main_model="evaluate/pipeline", card="diffusers")
