"""Samplers on a noise grid, and the diffusers pipeline of a backbone with its feedback module.

ILF@N samples on the teacher's 2N-step Karras grid taken every ``jump``-th level (``ilf_sigmas``): each
ILF step was trained to match the teacher's ``jump``-step Euler jump between exactly these levels.
Plain teacher@N uses the N-step Karras grid (EDM's sampler, ``diffusion.euler_sample``).
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

from ...parts.diffusion import EDM, EDMClassPipeline, null_label
from .feedback import FeedbackModule, attach_feedback


def ilf_sigmas(edm: EDM, steps: int, jump: int) -> torch.Tensor:
    """N + 1 levels: every ``jump``-th level of the teacher's (N·jump)-step Karras grid, ending at 0."""
    return edm.karras_sigmas(steps * jump)[::jump]


@torch.no_grad()
def euler_on_grid(edm: EDM, model, noise: torch.Tensor, labels: torch.Tensor, sigmas: torch.Tensor,
                  on_step=None, start: torch.Tensor | None = None) -> torch.Tensor:
    """EDM's Euler sampler (Karras et al. 2022, Alg. 1 without the 2nd-order step) on given levels from
    x_0 = σ_0 · noise (or from the state ``start``); ``on_step(i)`` runs before step i (block caching
    sets its refresh flag there)."""
    sigmas = sigmas.to(noise.device)
    x = noise * sigmas[0] if start is None else start
    for i, (sigma, sigma_next) in enumerate(zip(sigmas[:-1], sigmas[1:])):
        if on_step is not None:
            on_step(i)
        denoised = edm.denoise(model, x, sigma.expand(len(x)), labels)
        x = x + (sigma_next - sigma) * (x - denoised) / sigma
    return x


def euler_step(edm: EDM, model, x: torch.Tensor, sigma: torch.Tensor, sigma_next: torch.Tensor, labels) -> torch.Tensor:
    """One Euler step with gradients (distillation): x + (σ' − σ)(x − D(x; σ))/σ, per-sample σ."""
    denoised = edm.denoise(model, x, sigma, labels)
    ratio = ((sigma_next - sigma) / sigma).reshape(-1, 1, 1, 1)
    return x + ratio * (x - denoised)


class ILFPipeline(EDMClassPipeline):
    """A frozen diffusers denoiser plus its ``FeedbackModule``; ``pipe(class_labels, num_inference_steps=10)``
    samples ILF@N on the teacher's (N·jump)-step grid. Save with ``diffusion.save_pipeline``; load with
    ``DiffusionPipeline.from_pretrained(folder, trust_remote_code=True)``."""

    model_cpu_offload_seq = "denoiser"

    def __init__(self, denoiser, feedback: FeedbackModule, scheduler, jump: int = 2):
        super().__init__(denoiser=denoiser, scheduler=scheduler)
        self.register_modules(feedback=feedback)
        self.register_to_config(jump=jump)
        self.hooks = attach_feedback(denoiser, feedback)
        null_label(denoiser)

    def sample(self, noise, labels, num_inference_steps: int, guidance_scale: float, generator=None):
        if guidance_scale != 1.0:
            raise ValueError("ILFPipeline samples without classifier-free guidance (guidance_scale=1.0)")
        edm = EDM.from_scheduler(self.scheduler)
        return euler_on_grid(edm, self.denoiser, noise, labels, ilf_sigmas(edm, num_inference_steps, self.config.jump))

    def __call__(self, class_labels, num_inference_steps: int = 10, **kwargs):
        return super().__call__(class_labels, num_inference_steps=num_inference_steps, **kwargs)


def fix_component_library(folder, component: str, cls: type) -> None:
    """diffusers records a component's top-level package ("athanor"); point it at the defining module
    so ``from_pretrained`` imports the class in a fresh process."""
    index_path = Path(folder) / "model_index.json"
    index = json.loads(index_path.read_text())
    index[component] = [cls.__module__, cls.__name__]
    index_path.write_text(json.dumps(index, indent=2) + "\n")
