"""Quality against cost: plain sampling, block caching, ILF and the no-loop control on one curve.

Cost is counted, not assumed: every block evaluation of the backbone (and of the feedback block) is
counted by hooks during a sampler run (``feedback.count_block_calls``); wall time per 1,000 samples is
measured too (one thread; inflated when the machine is shared). Quality:

- paired MSE: mean over samples and pixels of (x_sampler − x_reference)², where the reference is the
  full-step teacher from the same initial noise: teacher@``reference_steps`` (default 20 = key_steps ×
  jump, the sampler whose jumps ILF@10 distils, as in the prototype that calibrated the issue), and for
  the key samplers also the converged teacher@``converged_steps`` (40);
- FD (``athanor.parts.fd``) against the held-out images, for the key samplers, on
  ``seeds × fd_samples_per_seed`` samples (the spread over noise seeds is shown).
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import torch

from ...config import ConfigError, positive
from ...data.images import load_image_data
from ...parts.diffusion import EDM, euler_sample, load_denoiser, sample_in_batches, save_pipeline
from ...parts.fd import load_evaluator, save_sample_grid
from .diffusers_pipeline import ILFPipeline, euler_on_grid, fix_component_library, ilf_sigmas
from .feedback import FeedbackModule, attach_feedback, backbone_blocks, block_caching, count_block_calls


@dataclass
class EvaluationConfig:
    reference_steps: int = 20  # the full-step teacher every sampler is compared with (the distillation target)
    converged_steps: int = 40  # key samplers are also compared with this longer teacher run
    key_steps: int = 10  # the headline step count: ILF@N vs teacher@N
    plain_steps: list[int] = field(default_factory=lambda: [4, 5, 6, 7, 8, 9, 10, 11, 12, 14, 16, 20])
    ilf_steps: list[int] = field(default_factory=lambda: [6, 8, 10])  # ILF@N (and every variant) on the curve
    cache_steps: list[int] = field(default_factory=lambda: [6, 8, 10, 12, 14, 16, 20])
    cache_blocks: list[int] = field(default_factory=lambda: [2, 9])  # first and last cached block (inclusive)
    cache_every: int = 2  # cached blocks are recomputed every N-th step
    curve_samples: int = 1000  # paired MSE of every curve point (noise seed 0)
    fd_samples_per_seed: int = 1000  # key samplers: FD and paired MSE on seeds × this many samples
    seeds: int = 5
    # Extra feedback runs, each the main ILF config with one change: once (the no-loop control) |
    # loop=A-B (another loop region) | once,loop=A-B.
    variants: list[str] = field(default_factory=lambda: ["once"])

    def validate(self) -> None:
        for key in ("reference_steps", "converged_steps", "key_steps", "cache_every", "curve_samples", "fd_samples_per_seed", "seeds"):
            positive(getattr(self, key), f"evaluation.{key}")
        if len(self.cache_blocks) != 2 or not 0 <= self.cache_blocks[0] <= self.cache_blocks[1]:
            raise ConfigError(f"evaluation.cache_blocks={list(self.cache_blocks)} must be [first, last], first <= last")
        if self.curve_samples > self.fd_samples_per_seed:
            raise ConfigError("evaluation.curve_samples must not exceed evaluation.fd_samples_per_seed "
                              "(the curve reuses the first seed's reference samples)")


class Samplers:
    """Named samplers ``fn(noise, labels, generator) -> images`` over one frozen backbone."""

    def __init__(self, backbone, edm: EDM, feedbacks: dict[str, FeedbackModule], jump: int, cfg: EvaluationConfig):
        self.backbone, self.edm, self.feedbacks, self.jump, self.cfg = backbone, edm, feedbacks, jump, cfg
        self.cached = range(cfg.cache_blocks[0], cfg.cache_blocks[1] + 1)

    def plain(self, steps: int):
        return lambda noise, y, gen: euler_sample(self.edm, self.backbone, noise, y, steps)

    def plain_on_ilf_grid(self, steps: int):
        """The frozen backbone on ILF's levels (s = 0): separates the feedback's effect from the grid's."""
        return lambda noise, y, gen: euler_on_grid(self.edm, self.backbone, noise, y,
                                                   ilf_sigmas(self.edm, steps, self.jump))

    def caching(self, steps: int):
        def sample(noise, y, gen):
            with block_caching(self.backbone, self.cached) as state:
                return euler_on_grid(self.edm, self.backbone, noise, y, self.edm.karras_sigmas(steps),
                                     on_step=lambda i: state.update(refresh=i % self.cfg.cache_every == 0))
        return sample

    def feedback(self, name: str, steps: int):
        def sample(noise, y, gen):
            hooks = attach_feedback(self.backbone, self.feedbacks[name])
            try:
                return euler_on_grid(self.edm, self.backbone, noise, y, ilf_sigmas(self.edm, steps, self.jump))
            finally:
                hooks.remove()
        return sample

    def block_evaluations(self, fn, feedback: FeedbackModule | None = None) -> int:
        """Counted block evaluations per sample of one run of ``fn`` (each call processes the batch)."""
        c = self.backbone.config
        noise = torch.randn(2, c.in_channels, c.sample_size, c.sample_size)
        with count_block_calls(self.backbone, *([feedback] if feedback is not None else [])) as counter:
            fn(noise, torch.zeros(2, dtype=torch.long), None)
        return counter["blocks"]


def paired_mse(images: torch.Tensor, reference: torch.Tensor) -> tuple[float, float]:
    """Mean paired MSE and its standard error over samples."""
    per_sample = (images.float() - reference.float()).square().flatten(1).mean(1)
    return per_sample.mean().item(), (per_sample.std() / math.sqrt(len(per_sample))).item()


def equal_cost_plain(curve: dict, blocks: int) -> dict | None:
    """The cheapest plain point costing at least ``blocks`` (plain gets as much compute or more)."""
    above = [p for p in curve["plain"] if p["blocks"] >= blocks]
    return min(above, key=lambda p: p["blocks"]) if above else None


def interpolated_mse(points: list[dict], blocks: float) -> float | None:
    """Paired MSE of a curve at ``blocks``, linear in log MSE between its neighbours (linear in MSE
    next to the reference sampler itself, whose MSE is 0)."""
    pts = sorted(points, key=lambda p: p["blocks"])
    for a, b in zip(pts, pts[1:]):
        if a["blocks"] <= blocks <= b["blocks"]:
            t = (blocks - a["blocks"]) / max(b["blocks"] - a["blocks"], 1)
            if min(a["mse"], b["mse"]) <= 0:
                return (1 - t) * a["mse"] + t * b["mse"]
            return math.exp((1 - t) * math.log(a["mse"]) + t * math.log(b["mse"]))
    return None


def evaluate_stage(ctx, feedback_stages: dict[str, str]) -> dict:
    """Stage: every sampler's cost and paired MSE (the curve), FD of the key samplers, the ILF pipeline.
    ``feedback_stages`` maps a sampler name (``ilf``, ``once``, ...) to its training stage."""
    if not ctx.is_main:  # sampling is cheap next to training: one process evaluates, the others wait
        return {"evaluated_on": "main process"}
    cfg, jump = ctx.cfg.evaluation, ctx.cfg.ilf.jump
    data = load_image_data(ctx.cfg.data)
    backbone, edm = load_denoiser(ctx.results["teacher"]["pipeline"])
    backbone.eval()
    if cfg.cache_blocks[1] >= len(backbone_blocks(backbone)):
        raise ConfigError(f"evaluation.cache_blocks={list(cfg.cache_blocks)} is outside the teacher's blocks")
    feedbacks = {name: FeedbackModule.from_pretrained(ctx.results[stage]["feedback"]).eval()
                 for name, stage in feedback_stages.items()}
    samplers = Samplers(backbone, edm, feedbacks, jump, cfg)
    labels = torch.arange(cfg.fd_samples_per_seed) % data.num_classes
    seeds = [10_000 + s for s in range(cfg.seeds)]  # noise unseen by trajectories (train/dev seeds < 10,000)
    sampling = _Sampling(labels, data.image_shape, seeds, torch.device("cpu"))
    reference = sampling.run(samplers.plain(cfg.reference_steps), cfg.seeds, cfg.fd_samples_per_seed)
    curve = _curve(cfg, samplers, feedbacks, sampling, reference[0][0][:cfg.curve_samples])

    # Key samplers on every seed: FD (pooled samples, spread over seeds) and paired MSE.
    evaluator = load_evaluator(ctx.results["classifier"]["model"], data.held_out_images)
    ilf_blocks = samplers.block_evaluations(samplers.feedback("ilf", cfg.key_steps), feedbacks["ilf"])
    table = _key_table(ctx.dir, cfg, samplers, feedbacks, sampling, _key_samplers(cfg, samplers, feedbacks, curve,
                                                                                   ilf_blocks), reference, evaluator)
    folder = ctx.dir / "pipeline"
    pipe = ILFPipeline(denoiser=backbone, feedback=feedbacks["ilf"], scheduler=edm.scheduler(), jump=jump)
    save_pipeline(pipe, folder)
    fix_component_library(folder, "feedback", FeedbackModule)
    pipe.hooks.remove()
    return {"curve": curve, "key": table, "ilf_blocks": ilf_blocks, "pipeline": str(folder),
            "real_fd_floor": _real_fd_floor(evaluator, data)}


class _Sampling:
    """A sampler's images on the evaluation's noise seeds (``labels[:n]`` each), and seconds per 1000."""

    def __init__(self, labels: torch.Tensor, shape, seeds: list[int], device):
        self.labels, self.shape, self.seeds, self.device = labels, shape, seeds, device

    def run(self, fn, n_seeds: int, n: int):
        started, images = time.perf_counter(), []
        for seed in self.seeds[:n_seeds]:
            images.append(sample_in_batches(fn, self.labels[:n], self.shape, seed, self.device))
        return images, (time.perf_counter() - started) / (n_seeds * n / 1000)


def _curve(cfg: EvaluationConfig, samplers: Samplers, feedbacks: dict, sampling: _Sampling,
           curve_ref: torch.Tensor) -> dict:
    """Per sampler kind, its points (steps, counted block evaluations, paired MSE to ``curve_ref``)."""
    def point(kind: str, steps: int, fn, feedback=None) -> dict:
        (images,), seconds = sampling.run(fn, 1, cfg.curve_samples)
        mse, se = paired_mse(images, curve_ref)
        return {"sampler": kind, "steps": steps, "blocks": samplers.block_evaluations(fn, feedback),
                "mse": mse, "mse_se": se, "seconds_per_1000": seconds}

    curve = {"plain": [point("plain", n, samplers.plain(n)) for n in cfg.plain_steps],
             "caching": [point("caching", n, samplers.caching(n)) for n in cfg.cache_steps],
             "plain_ilf_grid": [point("plain_ilf_grid", n, samplers.plain_on_ilf_grid(n)) for n in cfg.ilf_steps]}
    for name, fb in feedbacks.items():
        curve[name] = [point(name, n, samplers.feedback(name, n), fb) for n in cfg.ilf_steps]
    return curve


def _key_samplers(cfg: EvaluationConfig, samplers: Samplers, feedbacks: dict, curve: dict, ilf_blocks: int) -> dict:
    """name -> (sampler, feedback module or None): the teacher at the converged, reference and key
    steps and at ILF's cost, caching at ILF's cost, every feedback sampler at the key steps."""
    key = cfg.key_steps
    plain_match = equal_cost_plain(curve, ilf_blocks)
    cache_match = min(curve["caching"], key=lambda p: abs(p["blocks"] - ilf_blocks))
    keys = {f"teacher@{cfg.converged_steps}": (samplers.plain(cfg.converged_steps), None),
            f"teacher@{cfg.reference_steps}": (samplers.plain(cfg.reference_steps), None),
            f"teacher@{key}": (samplers.plain(key), None)}
    if plain_match is not None:
        keys[f"teacher@{plain_match['steps']}"] = (samplers.plain(plain_match["steps"]), None)
    keys[f"caching@{cache_match['steps']}"] = (samplers.caching(cache_match["steps"]), None)
    for name, fb in feedbacks.items():
        keys[f"{name}@{key}"] = (samplers.feedback(name, key), fb)
    return keys


def _key_table(out, cfg: EvaluationConfig, samplers: Samplers, feedbacks: dict, sampling: _Sampling, keys: dict,
               reference: tuple, evaluator) -> dict:
    """FD, class accuracy and paired MSE (to the reference and to the converged teacher) of each key
    sampler on every seed; a sample grid of each (``out``/samples_*.png)."""
    reference, ref_seconds = reference
    converged, converged_seconds = (reference, ref_seconds) if cfg.converged_steps == cfg.reference_steps else \
        sampling.run(samplers.plain(cfg.converged_steps), cfg.seeds, cfg.fd_samples_per_seed)
    labels = sampling.labels
    table, grids = {}, {}
    all_labels = labels.repeat(cfg.seeds)
    for name, (fn, fb) in keys.items():
        images, seconds = (reference, ref_seconds) if name == f"teacher@{cfg.reference_steps}" else \
            (converged, converged_seconds) if name == f"teacher@{cfg.converged_steps}" else \
            sampling.run(fn, cfg.seeds, cfg.fd_samples_per_seed)
        pooled = torch.cat(images)
        per_seed = torch.tensor([evaluator(im, labels)["fd"] for im in images])
        scores = evaluator(pooled, all_labels)
        mse, se = paired_mse(pooled, torch.cat(reference))
        mse_converged, se_converged = paired_mse(pooled, torch.cat(converged))
        table[name] = {"blocks": samplers.block_evaluations(fn, fb), "mse": mse, "mse_se": se,
                       "mse_converged": mse_converged, "mse_converged_se": se_converged,
                       "fd": scores["fd"], "fd_per_seed_mean": per_seed.mean().item(),
                       "fd_per_seed_std": per_seed.std().item() if len(per_seed) > 1 else 0.0,
                       "class_acc": scores["class_acc"], "samples": len(pooled), "seconds_per_1000": seconds}
        grids[name] = images[0]
    for name, images in grids.items():
        save_sample_grid(images, labels, out / f"samples_{name.replace('@', '_at_')}.png",
                         title=f"{name}: paired MSE {table[name]['mse']:.2e}, FD {table[name]['fd']:.2f}")
    return table


def _real_fd_floor(evaluator, data) -> float:
    """FD of real training images against the held-out ones (as many as the held-out split): what a
    perfect sampler of this data would score with this evaluator."""
    n = min(len(data.train_images), len(data.held_out_images))
    return evaluator(data.train_images[:n], data.train_labels[:n])["fd"]
