"""The latent path: ILF on a diffusers ``DiTTransformer2DModel`` + ``AutoencoderKL`` pair such as
``facebook/DiT-XL-2-256`` (the paper's backbones are latent DiTs).

A DiT checkpoint predicts noise ε (and, with learned σ, a variance: ``out_channels = 2 × in_channels``;
the second half is left out) on the discrete VP schedule of its scheduler config (DDPM: 1000 steps,
linear β from 1e-4 to 0.02; ᾱ_t from diffusers' ``DDPMScheduler``). It becomes a denoiser in the VE
variables the ILF code works in, as k-diffusion's ``DiscreteEpsDDPMDenoiser`` does (Karras et al.
2022, Table 1, the "VP" column):

    σ_t = √((1 − ᾱ_t) / ᾱ_t),   x_VE = x_VP / √ᾱ_t,   D(x; σ, y) = x − σ · ε(x / √(σ² + 1); t(σ), y)

with t(σ) the continuous timestep from linear interpolation of log σ_t over t (the DiT's timestep
embedding takes fractional t). Samplers run on the Karras grid between the schedule's σ_min and σ_max
(ρ = 7), exactly as on the pixel path; latents are decoded with ``vae.decode(z / scaling_factor)``.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from diffusers import AutoencoderKL, DDPMScheduler, DiTTransformer2DModel
from huggingface_hub import snapshot_download

from ...config import ConfigError
from ...parts.diffusion import EDM, disable_builtin_label_dropout, load_denoiser


class DiTEpsDenoiser:
    """The VE denoiser of a discrete-time ε-prediction DiT (duck-types ``EDM``'s sampler interface:
    ``denoise``, ``karras_sigmas``, ``sigma_min``/``sigma_max``/``rho``)."""

    def __init__(self, alphas_cumprod: torch.Tensor, rho: float = 7.0):
        self.log_sigmas = ((1 - alphas_cumprod) / alphas_cumprod).sqrt().log().double()
        self.sigma_min, self.sigma_max, self.rho = self.log_sigmas[0].exp().item(), self.log_sigmas[-1].exp().item(), rho
        self._grid = EDM(sigma_data=1.0, sigma_min=self.sigma_min, sigma_max=self.sigma_max, rho=rho)

    @classmethod
    def from_scheduler_config(cls, folder: str | Path, rho: float = 7.0) -> "DiTEpsDenoiser":
        return cls(DDPMScheduler.from_pretrained(folder, subfolder="scheduler").alphas_cumprod, rho)

    def karras_sigmas(self, steps: int) -> torch.Tensor:
        return self._grid.karras_sigmas(steps)

    def timestep(self, sigma: torch.Tensor) -> torch.Tensor:
        """t(σ): linear in log σ between the neighbouring discrete timesteps (clamped to [0, T − 1])."""
        log_sigma = sigma.double().log().clamp(self.log_sigmas[0], self.log_sigmas[-1]).to(self.log_sigmas.device)
        high = torch.searchsorted(self.log_sigmas, log_sigma).clamp(1, len(self.log_sigmas) - 1)
        lo_v, hi_v = self.log_sigmas[high - 1], self.log_sigmas[high]
        return ((high - 1) + (log_sigma - lo_v) / (hi_v - lo_v)).float().to(sigma.device)

    def denoise(self, model, x: torch.Tensor, sigma: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        sigma = sigma.to(x.dtype)
        c_in = (sigma ** 2 + 1).rsqrt().reshape(-1, 1, 1, 1)
        out = model(x * c_in, timestep=self.timestep(sigma), class_labels=labels).sample
        eps = out[:, :x.shape[1]]  # learned σ: the variance half is not used by a deterministic sampler
        return x - sigma.reshape(-1, 1, 1, 1) * eps


def is_dit_pipeline(folder: str | Path) -> bool:
    index = Path(folder) / "model_index.json"
    return index.exists() and {"transformer", "vae", "scheduler"} <= set(json.loads(index.read_text()))


def resolve_checkpoint(name_or_path: str) -> Path:
    """A local DiT pipeline folder, or a Hub id (``facebook/DiT-XL-2-256``) fetched by huggingface_hub
    (from its cache when ``HF_HUB_OFFLINE=1``)."""
    if Path(name_or_path).exists():
        folder = Path(name_or_path)
    else:
        folder = Path(snapshot_download(name_or_path, allow_patterns=["*.json", "transformer/*", "vae/*",
                                                                      "scheduler/*"]))
    if not is_dit_pipeline(folder):
        raise ConfigError(f"{name_or_path}: not a DiT pipeline folder (model_index.json with transformer, vae, "
                          "scheduler)")
    return folder


def load_dit(folder: str | Path):
    """(transformer, vae, DiTEpsDenoiser) of a saved DiT pipeline (``DiTPipeline.save_pretrained`` layout)."""
    folder = Path(folder)
    transformer = DiTTransformer2DModel.from_pretrained(folder, subfolder="transformer")
    vae = AutoencoderKL.from_pretrained(folder, subfolder="vae")
    return disable_builtin_label_dropout(transformer), vae, DiTEpsDenoiser.from_scheduler_config(folder)


def load_backbone(path: str | Path):
    """(model, denoiser parameterisation) for ILF: a latent DiT pipeline folder, or athanor's EDM teacher."""
    if is_dit_pipeline(path):
        transformer, _, param = load_dit(path)
        return transformer, param
    return load_denoiser(path)


@torch.no_grad()
def decode(vae: AutoencoderKL, latents: torch.Tensor) -> torch.Tensor:
    """Images in [-1, 1] from DiT latents (``vae.config.scaling_factor``: 0.18215 for DiT's VAE)."""
    return vae.decode(latents / vae.config.scaling_factor).sample.clamp(-1, 1)
