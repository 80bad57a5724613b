"""ILF: "Accelerate High-Quality Diffusion Models with Inner Loop Feedback" (Gwilliam et al. 2025).

A feedback block with the backbone's own settings reads the output of a loop region of a frozen DiT;
its output times a learnable scale s (initialised at 0, so s = 0 is the backbone exactly) is added to
the loop's input and the loop runs again (``feedback``). Only the feedback block and s are trained,
so that one ILF step matches the teacher's ``jump``-step jump on cached teacher trajectories
(``training``). Evaluation puts plain sampling, block caching, the no-loop control (the same block
added once, trained the same way) and ILF on one curve of paired MSE to the full-step teacher against
counted block evaluations, plus FD of the key samplers against held-out images (``evaluation``).

Stages: teacher (shared with DMD2: ``diffusion.teacher_stage``) -> classifier (FD features) ->
trajectories (cached, safetensors) -> ilf -> ilf-<variant> (no-loop control, other loops) -> evaluate
(curve, FD, the diffusers ``ILFPipeline``) -> report (report.json/md, PNG plots).
"""
from __future__ import annotations

from dataclasses import dataclass, field

from ...config import ConfigError, OptimConfig, RunConfig, TrainConfig
from ...data.images import ImageDataConfig
from ...hub import HubConfig
from ...runner import Paper, Stage
from ...parts.diffusion import TeacherConfig, teacher_stage
from ...parts.fd import ClassifierConfig
from .evaluation import EvaluationConfig, evaluate_stage
from .report import report, summary
from .training import ILFConfig, train_feedback, trajectories_stage, variant_config


@dataclass
class ILFRecipeConfig(TrainConfig):
    # run.max_steps is unused (each stage sets its own steps); run.eval_every: dev-loss points of ILF training.
    run: RunConfig = field(default_factory=lambda: RunConfig(output_dir="outputs/ilf", max_steps=0, eval_every=100,
                                                             log_every=10))
    optim: OptimConfig = field(default_factory=OptimConfig)  # unused: teacher, classifier and ILF have their own
    data: ImageDataConfig = field(default_factory=ImageDataConfig)
    # A 12-block DiT (the prototype's 6 blocks showed no loop effect; the issue asks for >= 12).
    teacher: TeacherConfig = field(default_factory=lambda: TeacherConfig(
        layers=12, steps=1500, batch_size=128, sample_steps=40,
        optim=OptimConfig(lr=1e-3, betas=(0.9, 0.99), warmup_steps=100, schedule="cosine", min_lr_ratio=0.05)))
    classifier: ClassifierConfig = field(default_factory=ClassifierConfig)
    ilf: ILFConfig = field(default_factory=ILFConfig)
    evaluation: EvaluationConfig = field(default_factory=EvaluationConfig)
    hub: HubConfig = field(default_factory=HubConfig)


def variant_stage_name(variant: str) -> str:
    return "ilf-" + variant.replace("=", "").replace(",", "-")


def check(cfg: ILFRecipeConfig) -> None:
    if cfg.teacher.arch != "dit":
        raise ConfigError("ILF needs a transformer backbone: teacher.arch=dit")
    if cfg.teacher.guidance != 1.0:
        raise ConfigError("ILF distils the conditional teacher without guidance: teacher.guidance=1.0")
    layers = cfg.teacher.layers
    cfg.ilf.check_backbone(layers)
    for variant in cfg.evaluation.variants:
        variant_config(cfg.ilf, variant, layers).check_backbone(layers)
    if cfg.evaluation.cache_blocks[1] >= layers:
        raise ConfigError(f"evaluation.cache_blocks={list(cfg.evaluation.cache_blocks)} is outside the teacher's "
                          f"{layers} blocks")
    if len({variant_stage_name(v) for v in cfg.evaluation.variants}) != len(cfg.evaluation.variants):
        raise ConfigError(f"evaluation.variants={list(cfg.evaluation.variants)} repeat")


def stages(cfg: ILFRecipeConfig) -> list[Stage]:
    from ...parts.fd import train_classifier

    def classifier_stage(ctx):
        from ...data.images import load_image_data

        return train_classifier(ctx.dir, ctx.cfg, ctx.cfg.classifier, load_image_data(ctx.cfg.data))

    def feedback_stage(variant: str):
        return lambda ctx: train_feedback(ctx, variant_config(ctx.cfg.ilf, variant, ctx.cfg.teacher.layers)
                                          if variant else ctx.cfg.ilf)

    trained = {"ilf": "ilf", **{v: variant_stage_name(v) for v in cfg.evaluation.variants}}
    return [Stage("teacher", teacher_stage, describe="EDM teacher (diffusers DiT), shared with DMD2"),
            Stage("classifier", classifier_stage, describe="feature classifier for FD"),
            Stage("trajectories", trajectories_stage, needs=("teacher",), describe="cached teacher trajectories"),
            Stage("ilf", feedback_stage(""), needs=("teacher", "trajectories"), describe="ILF feedback module"),
            *[Stage(trained[v], feedback_stage(v), needs=("teacher", "trajectories"), describe=f"variant {v}")
              for v in cfg.evaluation.variants],
            Stage("evaluate", lambda ctx: evaluate_stage(ctx, trained),
                  needs=("teacher", "classifier", *trained.values()), describe="curve, FD, pipeline")]


PAPER = Paper(name="ilf", config=ILFRecipeConfig, stages=stages, report=report, check=check, summary=summary)
