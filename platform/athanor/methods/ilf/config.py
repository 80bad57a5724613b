"""ILF's typed config (the method's own section, ``ILFConfig``, is in ``method``) and the stage name
of an ILF variant."""
from __future__ import annotations

from dataclasses import dataclass, field

from ...config import OptimConfig, RunConfig, TrainConfig
from ...data.images import ImageDataConfig
from ...hub import HubConfig
from ...parts.diffusion import TeacherConfig
from ...parts.fd import ClassifierConfig
from .evaluation import EvaluationConfig
from .method import ILFConfig


@dataclass
class ILFRecipeConfig(TrainConfig):
    # run.max_steps is unused (each stage sets its own steps); run.eval_every: dev-loss points of ILF training.
    run: RunConfig = field(default_factory=lambda: RunConfig(output_dir="outputs/ilf", max_steps=0, eval_every=100,
                                                             log_every=10))
    optim: OptimConfig = field(default_factory=OptimConfig)  # unused: teacher, classifier and ILF have their own
    data: ImageDataConfig = field(default_factory=ImageDataConfig)
    # An 8-block DiT at patch 2: 16 tokens per 8x8 digit (at patch 4, 4 tokens, a loop had nothing to
    # work on); width 48 keeps the recipe inside 20 minutes on 2 shared cores.
    teacher: TeacherConfig = field(default_factory=lambda: TeacherConfig(
        layers=8, width=48, heads=4, patch_size=2, steps=1000, batch_size=128, sample_steps=40,
        optim=OptimConfig(lr=1e-3, betas=(0.9, 0.99), warmup_steps=100, schedule="cosine", min_lr_ratio=0.05)))
    classifier: ClassifierConfig = field(default_factory=ClassifierConfig)
    ilf: ILFConfig = field(default_factory=ILFConfig)
    evaluation: EvaluationConfig = field(default_factory=EvaluationConfig)
    hub: HubConfig = field(default_factory=HubConfig)


def variant_stage_name(variant: str) -> str:
    return "ilf-" + variant.replace("=", "").replace("+", "-")
