"""DMD2's typed config (the method's own section, ``DMD2Config``, is in ``method``) and the names of
its runs and their stages."""
from __future__ import annotations

from dataclasses import dataclass, field

from ...config import ConfigError, OptimConfig, RunConfig, TrainConfig, positive
from ...data.images import ImageDataConfig
from ...hub import HubConfig
from ...parts.diffusion import TeacherConfig
from ...parts.fd import ClassifierConfig
from .method import VARIANTS, DMD2Config


@dataclass
class EvaluationConfig:
    samples: int = 2000  # generated samples per sampler in the final table
    seeds: int = 3  # noise seeds averaged in the final table
    # Extra DMD2 runs, each the main config with one change: 4step (the 4-step generator: dmd2@4) | ratio1 |
    # no_gan | no_ema | no_backsim (a 4-step generator trained on noisy real images) | gan_x10 (10x GAN weight).
    runs: list[str] = field(default_factory=lambda: ["4step", "ratio1", "no_gan", "no_backsim"])
    # Extra training seeds of the main run (stage dmd2-seed<N>, sampler dmd2@1:seed<N>): dmd2@1 is
    # reported over run.seed and these, with its spread.
    train_seeds: list[int] = field(default_factory=lambda: [1])

    def validate(self) -> None:
        positive(self.samples, "evaluation.samples")
        positive(self.seeds, "evaluation.seeds")
        if len(set(self.train_seeds)) != len(self.train_seeds):
            raise ConfigError(f"evaluation.train_seeds has repeats: {self.train_seeds}")
        for name in self.runs:
            if name not in VARIANTS:
                raise ConfigError(f"evaluation.runs: {name!r} is not one of: {', '.join(VARIANTS)}")


@dataclass
class DMD2RecipeConfig(TrainConfig):
    # run.max_steps counts generator updates; run.eval_every too (an FD point every N generator updates).
    run: RunConfig = field(default_factory=lambda: RunConfig(output_dir="outputs/dmd2", max_steps=300, eval_every=25,
                                                             log_every=10))
    # The generator's optimizer (the critic's too, with dmd2.critic_lr): Adam, β1 = 0 as in DMD2.
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=1e-4, betas=(0.0, 0.99), schedule="constant",
                                                                   grad_clip=10.0))
    data: ImageDataConfig = field(default_factory=ImageDataConfig)
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    classifier: ClassifierConfig = field(default_factory=ClassifierConfig)
    # The main run is the one-step generator (dmd2@1); the 4-step generator is the "4step" run (dmd2@4).
    dmd2: DMD2Config = field(default_factory=lambda: DMD2Config(generator_steps=1))
    evaluation: EvaluationConfig = field(default_factory=EvaluationConfig)
    hub: HubConfig = field(default_factory=HubConfig)


def stage_name(run: str) -> str:
    return "dmd2" + (f"-{run}" if run else "")  # "" is the main run


def seed_run(seed: int) -> str:
    return f"seed{seed}"  # the main config trained with another seed


def all_runs(cfg: DMD2RecipeConfig) -> list[str]:
    """"" (the main run), the variant runs, then the main run at each extra training seed."""
    seeds = [s for s in cfg.evaluation.train_seeds if s != cfg.run.seed]
    return ["", *cfg.evaluation.runs, *(seed_run(s) for s in seeds)]
