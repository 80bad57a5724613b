"""Quality against cost for every sampler, on one fixed set of noise: the curves speed-up at equal
quality is read from (``speedup``).

Every curve point is a sampler at a step count, run on the same ``samples`` initial noises and class
labels (paired comparisons), and scored by

- paired MSE: mean over samples and pixels of (x_sampler − x_ref)², with x_ref the converged teacher
  (Euler, ``converged_steps`` = 40) from the same noise;
- FD (``athanor.parts.fd``) of the samples against the held-out images, and the feature classifier's
  accuracy on them;
- cost: counted block evaluations per sample, and the median wall seconds per batch of ``batch_size``
  over the run's batches (one process; on a shared machine the seconds are inflated and noisier).

Curves: plain Euler, DPM-Solver++ of each order (diffusers), block caching, the main ILF over
``ilf_steps``; every other feedback run (seeds, the no-loop control, placements) and the backbone on
ILF's levels at ``key_steps``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from ...config import ConfigError, positive
from ...data.images import load_image_data
from ...parts.diffusion import null_label, save_pipeline
from ...parts.fd import load_evaluator, save_sample_grid
from .diffusers_pipeline import ILFPipeline, fix_component_library
from .feedback import FeedbackModule, backbone_blocks
from .latent import is_dit_pipeline, load_backbone
from .samplers import Samplers, TimedSampling, sampling_device

NOISE_SEED = 10_000  # noise unseen by the trajectories (train/dev seeds < 10,000)


@dataclass
class EvaluationConfig:
    converged_steps: int = 40  # the converged teacher every sampler's paired MSE is measured to
    key_steps: int = 6  # the headline: ILF@N
    plain_steps: list[int] = field(default_factory=lambda: [3, 4, 5, 6, 8, 10, 12, 16, 20, 28])
    solver_orders: list[int] = field(default_factory=lambda: [2, 3])  # DPM-Solver++ 2M / 3M (diffusers)
    solver_steps: list[int] = field(default_factory=lambda: [3, 4, 5, 6, 8, 10, 14])
    ilf_steps: list[int] = field(default_factory=lambda: [3, 4, 6, 8])  # the main ILF's curve (includes key_steps)
    cache_steps: list[int] = field(default_factory=lambda: [6, 10, 14])
    cache_blocks: list[int] = field(default_factory=lambda: [2, 5])  # first and last cached block (inclusive)
    cache_every: int = 2  # cached blocks are recomputed every N-th step
    samples: int = 1536  # every point: the same noise, labels 0..9 in turn
    batch_size: int = 256  # sampling batch; every batch timed
    # Extra feedback runs, each the main ILF config with some changes (``method.VARIANT_HELP``): other
    # feedback seeds, the no-loop control at each seed, other loop placements/lengths, copy initialisation.
    variants: list[str] = field(default_factory=lambda: [
        "seed=1", "seed=2", "once", "once+seed=1", "once+seed=2", "loop=1-2", "loop=5-6", "loop=3-3", "init=4"])

    def validate(self) -> None:
        for key in ("converged_steps", "key_steps", "cache_every", "samples", "batch_size"):
            positive(getattr(self, key), f"evaluation.{key}")
        if len(self.cache_blocks) != 2 or not 0 <= self.cache_blocks[0] <= self.cache_blocks[1]:
            raise ConfigError(f"evaluation.cache_blocks={list(self.cache_blocks)} must be [first, last], first <= last")
        if self.key_steps not in self.ilf_steps:
            raise ConfigError(f"evaluation.key_steps={self.key_steps} must be one of evaluation.ilf_steps")
        if len(self.plain_steps) < 2 or any(n < 1 or n == self.converged_steps for n in self.plain_steps):
            raise ConfigError("evaluation.plain_steps needs >= 2 step counts >= 1, none the converged reference's")
        if any(order not in (1, 2, 3) for order in self.solver_orders):
            raise ConfigError(f"evaluation.solver_orders={list(self.solver_orders)}: DPM-Solver++ orders are 1, 2, 3")
        if self.solver_orders and len(self.solver_steps) < 2:
            raise ConfigError("evaluation.solver_steps needs >= 2 step counts")


def paired_mse(images: torch.Tensor, reference: torch.Tensor) -> tuple[float, float]:
    """Mean paired MSE and its standard error over samples."""
    per_sample = (images.float() - reference.float()).square().flatten(1).mean(1)
    return per_sample.mean().item(), (per_sample.std() / math.sqrt(len(per_sample))).item()


class _Scorer:
    """One curve point: run a sampler on the fixed noise, count its blocks, score it."""

    def __init__(self, samplers: Samplers, sampling: TimedSampling, evaluator, reference: torch.Tensor):
        self.samplers, self.sampling, self.evaluator, self.reference = samplers, sampling, evaluator, reference
        self.images = {}

    def __call__(self, kind: str, steps: int, fn, feedback=None, keep: bool = False) -> dict:
        images, timing = self.sampling.run(fn)
        mse, se = paired_mse(images, self.reference)
        scores = self.evaluator(images, self.sampling.labels) if self.evaluator else {"fd": None, "class_acc": None}
        if keep:
            self.images[f"{kind}@{steps}"] = images
        return {"sampler": kind, "steps": steps, "blocks": self.samplers.block_evaluations(fn, feedback),
                "mse": mse, "mse_se": se, "fd": scores["fd"], "class_acc": scores["class_acc"], **timing}


def _curves(cfg: EvaluationConfig, samplers: Samplers, feedbacks: dict, score: _Scorer) -> dict:
    key = cfg.key_steps
    curves = {"plain": [score("plain", n, samplers.plain(n), keep=n == key) for n in cfg.plain_steps]}
    for order in cfg.solver_orders:
        name = f"dpm++{order}m"
        curves[name] = [score(name, n, samplers.solver(order, n), keep=n == key) for n in cfg.solver_steps]
    curves["caching"] = [score("caching", n, samplers.caching(n)) for n in cfg.cache_steps]
    curves["plain_ilf_grid"] = [score("plain_ilf_grid", key, samplers.plain_on_ilf_grid(key))]
    for name, fb in feedbacks.items():
        steps = cfg.ilf_steps if name == "ilf" else [key]
        curves[name] = [score(name, n, samplers.feedback(name, n), fb, keep=n == key and name in ("ilf", "once"))
                        for n in steps]
    return curves


def evaluate_stage(ctx, feedback_stages: dict[str, str]) -> dict:
    """Stage: every sampler's curve points, sample grids, the ILF pipeline. ``feedback_stages`` maps a
    sampler name (``ilf``, ``once``, ``seed=1``, ...) to its training stage. On a latent DiT
    (``ilf.backbone``) FD is not measured (it would need an Inception network on decoded images)."""
    if not ctx.is_main:  # sampling is cheap next to training: one process evaluates, the others wait
        return {"evaluated_on": "main process"}
    cfg, jump, path = ctx.cfg.evaluation, ctx.cfg.ilf.jump, ctx.results["teacher"]["pipeline"]
    backbone, edm = load_backbone(path)
    device = sampling_device()
    backbone.eval().to(device)
    latent = is_dit_pipeline(path)
    if cfg.cache_blocks[1] >= len(backbone_blocks(backbone)):
        raise ConfigError(f"evaluation.cache_blocks={list(cfg.cache_blocks)} is outside the teacher's blocks")
    feedbacks = {name: FeedbackModule.from_pretrained(ctx.results[stage]["feedback"]).eval().to(device)
                 for name, stage in feedback_stages.items()}
    samplers = Samplers(backbone, edm, feedbacks, jump, cfg.cache_blocks, cfg.cache_every)
    c = backbone.config
    labels = torch.arange(cfg.samples) % null_label(backbone)  # the null label's index = the class count
    sampling = TimedSampling(labels, (c.in_channels, c.sample_size, c.sample_size), NOISE_SEED, cfg.batch_size, device)
    data = None if latent else load_image_data(ctx.cfg.data)
    evaluator = None if latent else load_evaluator(ctx.results["classifier"]["model"], data.held_out_images)
    reference, ref_timing = sampling.run(samplers.plain(cfg.converged_steps))
    score = _Scorer(samplers, sampling, evaluator, reference)
    curves = _curves(cfg, samplers, feedbacks, score)
    converged = {"sampler": "plain", "steps": cfg.converged_steps, "mse": 0.0, "mse_se": 0.0,
                 "blocks": samplers.block_evaluations(samplers.plain(cfg.converged_steps)),
                 **(evaluator(reference, labels) if evaluator else {"fd": None}), **ref_timing}
    out = {"curves": curves, "converged": converged, "samples": cfg.samples, "batch_size": cfg.batch_size,
           "latent": latent, "real_fd_floor": None if latent else _real_fd_floor(evaluator, data)}
    if not latent:  # sample grids and the EDM ILFPipeline (pixel path)
        score.images[f"teacher@{cfg.converged_steps}"] = reference
        for name, images in score.images.items():
            save_sample_grid(images, labels, ctx.dir / f"samples_{name.replace('@', '_at_')}.png", title=name)
        backbone.cpu()
        pipe = ILFPipeline(denoiser=backbone, feedback=feedbacks["ilf"].cpu(), scheduler=edm.scheduler(), jump=jump)
        save_pipeline(pipe, ctx.dir / "pipeline")
        fix_component_library(ctx.dir / "pipeline", "feedback", FeedbackModule)
        pipe.hooks.remove()
        out["pipeline"] = str(ctx.dir / "pipeline")
    return out


def _real_fd_floor(evaluator, data) -> float:
    """FD of real training images against the held-out ones (as many as the held-out split): what a
    perfect sampler of this data would score with this evaluator."""
    n = min(len(data.train_images), len(data.held_out_images))
    return evaluator(data.train_images[:n], data.train_labels[:n])["fd"]
