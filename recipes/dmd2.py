"""DMD2: distil a class-conditional diffusion teacher into a 1-/few-step generator.

Stages (each one engine run in OUTPUT/<stage>, skipped when already finished):
teacher (EDM, diffusers DiT) -> feature classifier (for FD) -> DMD2 (the one-step generator) -> other DMD2
runs (the 4-step generator, ablations) -> evaluation, report, sample grids, FD curves, and a 1-step
diffusers pipeline with its model card.

    python recipes/dmd2.py                                         # sklearn digits, CPU, < 20 min
    python recipes/dmd2.py --config recipes/configs/dmd2/gpu.yaml  # same recipe, long enough to close the gap
    accelerate launch --config_file launch/zero2-cpu.yaml recipes/dmd2.py --run.max_steps 4
"""
import time
from dataclasses import dataclass, field, replace

import torch

from athanor.config import ConfigError, OptimConfig, RunConfig, TrainConfig, exit_on_config_error, parse_or_exit, positive
from athanor.engine import process_state
from athanor.data.images import ImageDataConfig, load_image_data
from athanor.methods.diffusion import TeacherConfig, train_teacher
from athanor.methods.dmd2 import VARIANTS, DMD2Config, check_launch, publish, train_dmd2
from athanor.methods.fd import ClassifierConfig, load_evaluator, train_classifier
from athanor.stages import Stages


@dataclass
class EvaluationConfig:
    samples: int = 2000  # generated samples per sampler in the final table
    seeds: int = 3  # noise seeds averaged in the final table
    # Extra DMD2 runs, each the main config with one change: 4step (the 4-step generator: dmd2@4) | ratio1 |
    # no_gan | no_ema | no_backsim (a 4-step generator trained on noisy real images).
    runs: list[str] = field(default_factory=lambda: ["4step", "ratio1", "no_gan"])

    def validate(self) -> None:
        positive(self.samples, "evaluation.samples")
        positive(self.seeds, "evaluation.seeds")
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
    # torch threads per process on CPU (0: torch's default). These models are tiny: one thread is as fast,
    # and multi-threaded ops stalled for seconds per step when the 2 cores of the shared machine were busy.
    cpu_threads: int = 1


def main(argv=None) -> dict:
    started = time.time()
    cfg = parse_or_exit(DMD2RecipeConfig, argv)
    if cfg.cpu_threads and not torch.cuda.is_available():
        torch.set_num_threads(cfg.cpu_threads)
    with exit_on_config_error():
        check_launch()
        data = load_image_data(cfg.data)
        stages = Stages(cfg.run.output_dir)
    teacher = stages.run("teacher", lambda d: train_teacher(d, cfg, cfg.teacher, data))
    classifier = stages.run("classifier", lambda d: train_classifier(d, cfg, cfg.classifier, data))
    evaluator = load_evaluator(classifier["model"], data.held_out_images)
    runs = {}
    for name in ["", *cfg.evaluation.runs]:  # "" is the main run
        method_cfg = replace(cfg.dmd2, **VARIANTS.get(name, {}))
        runs[name] = stages.run("dmd2" + (f"-{name}" if name else ""), lambda d: train_dmd2(
            d, cfg, method_cfg, cfg.teacher, teacher["pipeline"], data, evaluator))
    if not process_state(cfg.engine.cpu).is_main_process:
        return {}
    report = publish(cfg, data, teacher, classifier, runs, evaluator, stages.root, time.time() - started)
    print(f"report: {stages.root / 'report.md'}")
    return report


if __name__ == "__main__":
    main()
