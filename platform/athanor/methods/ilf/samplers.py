"""The samplers ILF is compared with, over one frozen backbone, and how their cost is measured.

- ``plain``: EDM's Euler sampler on the N-step Karras grid (the teacher's own sampler);
- ``dpm++{order}m``: diffusers' ``EDMDPMSolverMultistepScheduler`` (DPM-Solver++, Lu et al. 2022,
  multistep, ``solver_order`` 2 or 3) on the same Karras grid and the same EDM preconditioning (its
  ``precondition_inputs/noise/outputs`` are EDM's Table 1, as ours). It starts from σ_max · ε, as
  EDM does (the scheduler's ``init_noise_sigma`` is √(σ_max² + 1), a VP convention);
- ``caching``: block caching (``feedback.block_caching``), cached blocks refreshed every k-th step;
- ``plain_ilf_grid``: the frozen backbone on ILF's levels (s = 0);
- a feedback module: ILF@N (or a control) on the teacher's (N·jump)-step grid taken every jump-th level.

Cost: block evaluations are counted by hooks (``feedback.count_block_calls``) on a real run; wall time
is measured per batch (every batch of a sampler's run is timed; the median over batches is reported).
"""
from __future__ import annotations

import statistics
import time

import torch
from diffusers import EDMDPMSolverMultistepScheduler

from ...parts.diffusion import EDM
from .diffusers_pipeline import euler_on_grid, ilf_sigmas
from .feedback import FeedbackModule, attach_feedback, block_caching, count_block_calls


@torch.no_grad()
def dpm_solver_sample(edm, model, noise: torch.Tensor, labels: torch.Tensor, steps: int,
                      order: int = 2) -> torch.Tensor:
    """DPM-Solver++ (multistep, ``order``) through diffusers' ``EDMDPMSolverMultistepScheduler``.

    The scheduler is handed the output F that its EDM ``precondition_outputs`` turns back into our
    denoiser's D(x; σ): F = (D − c_skip x) / c_out. For athanor's EDM teacher that is the network's own
    output; for a latent DiT (``latent.DiTEpsDenoiser``, σ_d = 1 here) it carries the ε-model's D."""
    sigma_data = getattr(edm, "sigma_data", 1.0)
    scheduler = EDMDPMSolverMultistepScheduler(
        sigma_min=edm.sigma_min, sigma_max=edm.sigma_max, sigma_data=sigma_data, rho=edm.rho,
        sigma_schedule="karras", solver_order=order, prediction_type="epsilon", algorithm_type="dpmsolver++",
        final_sigmas_type="zero")
    scheduler.set_timesteps(steps, device=noise.device)
    grid = EDM(sigma_data=sigma_data)
    x = noise * scheduler.sigmas[0]
    for i, t in enumerate(scheduler.timesteps):
        sigma = scheduler.sigmas[i].to(noise.device).expand(len(x))
        denoised = edm.denoise(model, x, sigma, labels)
        c_skip, c_out, _, _ = grid.precondition(sigma)
        x = scheduler.step((denoised - c_skip * x) / c_out, t, x).prev_sample
    return x


class Samplers:
    """Named samplers ``fn(noise, labels) -> images`` over one frozen backbone."""

    def __init__(self, backbone, edm: EDM, feedbacks: dict[str, FeedbackModule], jump: int, cache_blocks,
                 cache_every: int):
        self.backbone, self.edm, self.feedbacks, self.jump = backbone, edm, feedbacks, jump
        self.cached, self.cache_every = range(cache_blocks[0], cache_blocks[1] + 1), cache_every

    def plain(self, steps: int):
        return lambda noise, y: euler_on_grid(self.edm, self.backbone, noise, y, self.edm.karras_sigmas(steps))

    def solver(self, order: int, steps: int):
        return lambda noise, y: dpm_solver_sample(self.edm, self.backbone, noise, y, steps, order)

    def plain_on_ilf_grid(self, steps: int):
        return lambda noise, y: euler_on_grid(self.edm, self.backbone, noise, y, ilf_sigmas(self.edm, steps, self.jump))

    def caching(self, steps: int):
        def sample(noise, y):
            with block_caching(self.backbone, self.cached) as state:
                return euler_on_grid(self.edm, self.backbone, noise, y, self.edm.karras_sigmas(steps),
                                     on_step=lambda i: state.update(refresh=i % self.cache_every == 0))
        return sample

    def feedback(self, name: str, steps: int):
        def sample(noise, y):
            hooks = attach_feedback(self.backbone, self.feedbacks[name])
            try:
                return euler_on_grid(self.edm, self.backbone, noise, y, ilf_sigmas(self.edm, steps, self.jump))
            finally:
                hooks.remove()
        return sample

    def block_evaluations(self, fn, feedback: FeedbackModule | None = None) -> int:
        """Counted block evaluations per sample of one run of ``fn`` (each call processes the batch)."""
        c = self.backbone.config
        device = next(self.backbone.parameters()).device
        noise = torch.randn(2, c.in_channels, c.sample_size, c.sample_size, device=device)
        with count_block_calls(self.backbone, *([feedback] if feedback is not None else [])) as counter:
            fn(noise, torch.zeros(2, dtype=torch.long, device=device))
        return counter["blocks"]


def sampling_device() -> torch.device:
    """Sampling (trajectories, evaluation) runs outside the engine: on the GPU when there is one."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


class TimedSampling:
    """A sampler's images from the evaluation's fixed noise (every sampler gets the same noise, so
    comparisons are paired), in batches of ``batch``, each batch timed (CUDA synchronised)."""

    def __init__(self, labels: torch.Tensor, shape, seed: int, batch: int, device=torch.device("cpu")):
        gen = torch.Generator().manual_seed(seed)
        self.labels, self.batch, self.device = labels, batch, torch.device(device)
        self.noise = torch.randn((len(labels), *shape), generator=gen)

    def run(self, fn) -> tuple[torch.Tensor, dict]:
        images, seconds = [], []
        for start in range(0, len(self.labels), self.batch):
            noise = self.noise[start:start + self.batch].to(self.device)
            y = self.labels[start:start + self.batch].to(self.device)
            t0 = time.perf_counter()
            out = fn(noise, y)
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
            seconds.append(time.perf_counter() - t0)
            images.append(out.float().cpu())
        full = [s for s, im in zip(seconds, images) if len(im) == self.batch] or seconds  # a short last batch: left out
        return torch.cat(images), {"seconds_per_batch": statistics.median(full), "timed_batches": len(full),
                                   "seconds_per_batch_spread": [min(full), max(full)]}
