"""Class-conditional diffusion teachers with EDM preconditioning, classifier-free guidance and samplers.

Shared by the DMD2 and ILF recipes: a teacher is a diffusers model (``DiTTransformer2DModel`` or
``UNet2DModel`` with a class embedding) wrapped in the preconditioning of Karras et al. 2022,
"Elucidating the Design Space of Diffusion-Based Generative Models" (EDM), Table 1:

    D(x; σ, y) = c_skip(σ) x + c_out(σ) F(c_in(σ) x; c_noise(σ), y)
    c_skip = σ_d² / (σ² + σ_d²),  c_out = σ σ_d / √(σ² + σ_d²),  c_in = 1 / √(σ² + σ_d²),  c_noise = ¼ ln σ

(the same constants as diffusers' ``EDMEulerScheduler``). Training (EDM eq. 2 and Table 1):
``L = E[λ(σ) ‖D(x + σε; σ, y) − x‖²]`` with ``ln σ ~ N(P_mean, P_std²)`` and
``λ(σ) = (σ² + σ_d²) / (σ σ_d)²``. Classifier-free guidance (Ho & Salimans 2022): labels are replaced
by a null class with probability ``label_dropout`` in training, and sampling uses
``D_w = D(x; σ, ∅) + w (D(x; σ, y) − D(x; σ, ∅))``. The reference sampler is EDM's Euler
(Algorithm 1 without the 2nd-order correction) on the Karras grid
``σ_i = (σ_max^{1/ρ} + i/(N−1) (σ_min^{1/ρ} − σ_max^{1/ρ}))^ρ``, ``σ_N = 0``:
``x_{i+1} = x_i + (σ_{i+1} − σ_i) (x_i − D(x_i; σ_i)) / σ_i``.

A trained teacher is saved as a diffusers pipeline folder (``EDMClassPipeline``) that
``DiffusionPipeline.from_pretrained(folder, trust_remote_code=True)`` loads in any process.
"""
from __future__ import annotations

import copy
import json
from dataclasses import dataclass, field
from pathlib import Path

import diffusers
import torch
from diffusers import DiffusionPipeline, DiTTransformer2DModel, EDMEulerScheduler, ImagePipelineOutput, UNet2DModel
from diffusers.models.embeddings import LabelEmbedding

from ..config import ConfigError, OptimConfig, choice, positive
from ..data.batches import ShuffledBatches
from ..data.images import load_image_data
from ..engine import Engine, Method
from ..runner import StageContext


# ---------------------------------------------------------------------------------------------- config
@dataclass
class TeacherConfig:
    name_or_path: str = ""  # an EDM pipeline folder saved by athanor (or a diffusers model folder) instead of training
    arch: str = "dit"  # dit (DiTTransformer2DModel) | unet (UNet2DModel with a class embedding)
    width: int = 64  # dit: hidden size
    layers: int = 4  # dit: transformer blocks
    heads: int = 4  # dit: attention heads
    patch_size: int = 4  # dit: pixels per patch side (8x8 digits -> 4 tokens)
    unet_channels: list[int] = field(default_factory=lambda: [32, 64])  # unet: channels per resolution level
    unet_layers_per_block: int = 1
    sigma_data: float = 0.5  # EDM σ_d
    sigma_min: float = 0.002
    sigma_max: float = 80.0
    rho: float = 7.0  # Karras grid curvature
    p_mean: float = -1.2  # training noise: ln σ ~ N(p_mean, p_std²)
    p_std: float = 1.2
    label_dropout: float = 0.1  # probability of the null class in training (classifier-free guidance)
    steps: int = 3000  # optimizer steps
    batch_size: int = 256
    ema_decay: float = 0.999  # EMA of the weights used for sampling (0: none)
    sample_steps: int = 40  # N of the reference sampler (teacher@N)
    guidance: float = 1.0  # CFG scale w for the teacher's samplers (1: conditional only)
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=1e-3, betas=(0.9, 0.99), warmup_steps=100,
                                                                   schedule="cosine", min_lr_ratio=0.05))

    def validate(self) -> None:
        choice(self.arch, ("dit", "unet"), "teacher.arch")
        for key in ("width", "layers", "heads", "patch_size", "unet_layers_per_block", "steps", "batch_size",
                    "sample_steps", "sigma_data", "sigma_min", "sigma_max", "rho", "p_std"):
            positive(getattr(self, key), f"teacher.{key}")
        if self.width % self.heads:
            raise ConfigError(f"teacher.width={self.width} must be divisible by teacher.heads={self.heads}")
        if not self.unet_channels or any(c % 8 for c in self.unet_channels):
            raise ConfigError(f"teacher.unet_channels={list(self.unet_channels)} must be multiples of 8")
        if not 0 <= self.label_dropout < 1:
            raise ConfigError(f"teacher.label_dropout={self.label_dropout} must be in [0, 1)")
        if not 0 <= self.ema_decay < 1:
            raise ConfigError(f"teacher.ema_decay={self.ema_decay} must be in [0, 1)")
        if self.sigma_min >= self.sigma_max:
            raise ConfigError("teacher.sigma_min must be below teacher.sigma_max")
        if self.name_or_path and not Path(self.name_or_path).exists():
            raise ConfigError(f"teacher.name_or_path={self.name_or_path!r}: no such folder")


# ---------------------------------------------------------------------------------------------- models
def build_denoiser(cfg: TeacherConfig, image_shape: tuple[int, int, int], num_classes: int) -> torch.nn.Module:
    """A fresh class-conditional diffusers model whose class ``num_classes`` is the null (unconditional) label."""
    channels, height, width = image_shape
    if height != width:
        raise ConfigError(f"square images expected, got {height}x{width}")
    if cfg.arch == "dit":
        if height % cfg.patch_size:
            raise ConfigError(f"teacher.patch_size={cfg.patch_size} must divide the image size {height}")
        # DiT's label embedding keeps a null row when its dropout is > 0; the dropout itself is ours (below).
        model = DiTTransformer2DModel(num_attention_heads=cfg.heads, attention_head_dim=cfg.width // cfg.heads,
                                      in_channels=channels, out_channels=channels, num_layers=cfg.layers,
                                      sample_size=height, patch_size=cfg.patch_size, num_embeds_ada_norm=num_classes)
    else:
        levels = len(cfg.unet_channels)
        if height % 2 ** (levels - 1):
            raise ConfigError(f"{levels} unet levels need an image size divisible by {2 ** (levels - 1)}, got {height}")
        model = UNet2DModel(sample_size=height, in_channels=channels, out_channels=channels,
                            block_out_channels=tuple(cfg.unet_channels), layers_per_block=cfg.unet_layers_per_block,
                            down_block_types=("DownBlock2D",) * (levels - 1) + ("AttnDownBlock2D",),
                            up_block_types=("AttnUpBlock2D",) + ("UpBlock2D",) * (levels - 1),
                            norm_num_groups=8, attention_head_dim=cfg.unet_channels[-1] // 2,
                            num_class_embeds=num_classes + 1)
    disable_builtin_label_dropout(model)
    return model


def disable_builtin_label_dropout(model: torch.nn.Module) -> torch.nn.Module:
    """DiT drops labels by itself in train mode, independently in every block (a sample can be
    conditional in one block and unconditional in the next). We drop labels once per sample instead."""
    for module in model.modules():
        if isinstance(module, LabelEmbedding):
            module.dropout_prob = 0.0
    return model


def null_label(model: torch.nn.Module) -> int:
    config = model.config
    if "num_embeds_ada_norm" in config:
        return config.num_embeds_ada_norm
    if config.get("num_class_embeds"):
        return config.num_class_embeds - 1
    raise ConfigError(f"{type(model).__name__} has no class embedding; a class-conditional model is needed")


def feature_block(model: torch.nn.Module) -> torch.nn.Module:
    """The block whose output serves as the model's features (e.g. for a GAN head): DiT's last
    transformer block, UNet's bottleneck."""
    if isinstance(model, DiTTransformer2DModel):
        return model.transformer_blocks[-1]
    if isinstance(model, UNet2DModel):
        return model.mid_block
    raise ConfigError(f"no feature block known for {type(model).__name__}")


class EMA:
    """Exponential moving average of weights: θ̄ ← d θ̄ + (1 − d) θ, with d_n = min(d, (1 + n) / (10 + n))
    so the first updates (n small) do not anchor θ̄ to the initial weights."""

    def __init__(self, model: torch.nn.Module, decay: float):
        self.decay, self.updates = decay, 0
        self.model = copy.deepcopy(model).requires_grad_(False).eval()

    @torch.no_grad()
    def update(self, model: torch.nn.Module) -> None:
        self.updates += 1
        d = min(self.decay, (1 + self.updates) / (10 + self.updates))
        for avg, p in zip(self.model.parameters(), model.parameters()):
            avg.lerp_(p.detach(), 1 - d)
        for avg, b in zip(self.model.buffers(), model.buffers()):
            avg.copy_(b)

    def state_dict(self) -> dict:
        return {"model": self.model.state_dict(), "updates": self.updates}

    def load_state_dict(self, state: dict) -> None:
        self.model.load_state_dict(state["model"])
        self.updates = state["updates"]


# ---------------------------------------------------------------------------------------------- EDM
@dataclass(frozen=True)
class EDM:
    sigma_data: float = 0.5
    sigma_min: float = 0.002
    sigma_max: float = 80.0
    rho: float = 7.0

    @classmethod
    def from_config(cls, cfg: TeacherConfig) -> "EDM":
        return cls(cfg.sigma_data, cfg.sigma_min, cfg.sigma_max, cfg.rho)

    @classmethod
    def from_scheduler(cls, scheduler: EDMEulerScheduler) -> "EDM":
        c = scheduler.config
        return cls(c.sigma_data, c.sigma_min, c.sigma_max, c.rho)

    def scheduler(self) -> EDMEulerScheduler:
        return EDMEulerScheduler(sigma_min=self.sigma_min, sigma_max=self.sigma_max, sigma_data=self.sigma_data,
                                 rho=self.rho, sigma_schedule="karras", prediction_type="epsilon",
                                 final_sigmas_type="zero")

    def precondition(self, sigma: torch.Tensor):
        """(c_skip, c_out, c_in) shaped (B, 1, 1, 1) and c_noise shaped (B,)."""
        sigma = sigma.reshape(-1, 1, 1, 1)
        var = sigma ** 2 + self.sigma_data ** 2
        return self.sigma_data ** 2 / var, sigma * self.sigma_data / var.sqrt(), 1 / var.sqrt(), sigma.log().flatten() / 4

    def denoise(self, model, x: torch.Tensor, sigma: torch.Tensor, labels: torch.Tensor, return_output: bool = False,
                **model_kwargs):
        """D(x; σ, y); with ``return_output`` also the model's raw output object (e.g. a critic's logits)."""
        c_skip, c_out, c_in, c_noise = self.precondition(sigma.to(x.dtype))
        out = model(c_in * x, c_noise, class_labels=labels, **model_kwargs)
        denoised = c_skip * x + c_out * out.sample
        return (denoised, out) if return_output else denoised

    def guided_denoise(self, model, x, sigma, labels, guidance: float, null: int) -> torch.Tensor:
        if guidance == 1.0:
            return self.denoise(model, x, sigma, labels)
        both = self.denoise(model, torch.cat([x, x]), torch.cat([sigma, sigma]),
                            torch.cat([labels, torch.full_like(labels, null)]))
        cond, uncond = both.chunk(2)
        return uncond + guidance * (cond - uncond)

    def training_sigmas(self, n: int, p_mean: float, p_std: float, rng: torch.Generator) -> torch.Tensor:
        return (torch.randn(n, generator=rng, device=rng.device) * p_std + p_mean).exp()

    def loss_weight(self, sigma: torch.Tensor) -> torch.Tensor:
        return ((sigma ** 2 + self.sigma_data ** 2) / (sigma * self.sigma_data) ** 2).reshape(-1, 1, 1, 1)

    def karras(self, u: torch.Tensor) -> torch.Tensor:
        """σ at ramp position u ∈ [0, 1] of the Karras grid (u = 0: σ_max, u = 1: σ_min)."""
        hi, lo = self.sigma_max ** (1 / self.rho), self.sigma_min ** (1 / self.rho)
        return (hi + u * (lo - hi)) ** self.rho

    def karras_sigmas(self, steps: int) -> torch.Tensor:
        """N + 1 noise levels of an N-step sampler, ending at 0 (as ``EDMEulerScheduler.set_timesteps``)."""
        ramp = torch.linspace(0, 1, steps, dtype=torch.float64)
        return torch.cat([self.karras(ramp), torch.zeros(1, dtype=torch.float64)]).float()


def edm_loss(edm: EDM, model, images, labels, p_mean: float, p_std: float, rng: torch.Generator) -> torch.Tensor:
    sigma = edm.training_sigmas(len(images), p_mean, p_std, rng)
    noisy = images + sigma.reshape(-1, 1, 1, 1) * torch.randn(images.shape, generator=rng, device=rng.device)
    return (edm.loss_weight(sigma) * (edm.denoise(model, noisy, sigma, labels) - images) ** 2).mean()


@torch.no_grad()
def euler_sample(edm: EDM, model, noise: torch.Tensor, labels: torch.Tensor, steps: int,
                 guidance: float = 1.0, null: int | None = None) -> torch.Tensor:
    """EDM's deterministic Euler sampler from ``x_0 = σ_max ε``; one step returns D(σ_max ε; σ_max)."""
    null = null_label(model) if null is None else null
    sigmas = edm.karras_sigmas(steps).to(noise.device)
    x = noise * sigmas[0]
    for sigma, sigma_next in zip(sigmas[:-1], sigmas[1:]):
        denoised = edm.guided_denoise(model, x, sigma.expand(len(x)), labels, guidance, null)
        x = x + (sigma_next - sigma) * (x - denoised) / sigma
    return x


def guided_nfe(steps: int, guidance: float) -> int:
    """Network evaluations of an Euler run: CFG evaluates the model twice per step."""
    return steps * (1 if guidance == 1.0 else 2)


# ---------------------------------------------------------------------------------------------- pipeline
class EDMClassPipeline(DiffusionPipeline):
    """Class-conditional EDM sampling with a diffusers denoiser; the scheduler holds σ_d, σ_min, σ_max, ρ.

    ``pipe(class_labels=[3, 7], num_inference_steps=40, guidance_scale=1.0, output_type="pil")``;
    ``output_type="latent"`` returns the model-space tensor in [-1, 1]."""
    model_cpu_offload_seq = "denoiser"

    def __init__(self, denoiser, scheduler: EDMEulerScheduler):
        super().__init__()
        self.register_modules(denoiser=denoiser, scheduler=scheduler)

    def sample(self, noise, labels, num_inference_steps: int, guidance_scale: float, generator=None) -> torch.Tensor:
        return euler_sample(EDM.from_scheduler(self.scheduler), self.denoiser, noise, labels,
                            num_inference_steps, guidance_scale)

    @torch.no_grad()
    def __call__(self, class_labels, num_inference_steps: int = 40, guidance_scale: float = 1.0,
                 generator: torch.Generator | None = None, output_type: str = "pil", return_dict: bool = True):
        labels = torch.as_tensor(class_labels, device=self.device).long().reshape(-1)
        config = self.denoiser.config
        shape = (len(labels), config.in_channels, config.sample_size, config.sample_size)
        noise = torch.randn(shape, generator=generator, device=generator.device if generator else self.device)
        images = self.sample(noise.to(self.device, self.denoiser.dtype), labels, num_inference_steps, guidance_scale,
                             generator)
        if output_type != "latent":
            images = (images / 2 + 0.5).clamp(0, 1)
            if output_type in ("np", "pil"):
                images = images.permute(0, 2, 3, 1).float().cpu().numpy()
                images = self.numpy_to_pil(images) if output_type == "pil" else images
        return ImagePipelineOutput(images=images) if return_dict else (images,)


def save_pipeline(pipeline: DiffusionPipeline, folder: str | Path) -> Path:
    """``save_pretrained`` plus a one-line ``pipeline.py`` naming the athanor class, so that
    ``DiffusionPipeline.from_pretrained(folder, trust_remote_code=True)`` finds it in a fresh process."""
    folder = Path(folder)
    pipeline.save_pretrained(folder, safe_serialization=True)
    cls = type(pipeline)
    (folder / "pipeline.py").write_text(f"from {cls.__module__} import {cls.__name__}  # noqa: F401\n")
    index_path = folder / "model_index.json"
    index = json.loads(index_path.read_text())
    index["_class_name"] = ["pipeline", cls.__name__]  # diffusers' convention for custom pipeline code
    index_path.write_text(json.dumps(index, indent=2) + "\n")
    return folder


def load_denoiser(path: str | Path, fallback: EDM | None = None):
    """(model, EDM) from a pipeline folder (``denoiser`` + ``scheduler`` subfolders) or a diffusers model
    folder (its EDM constants then come from ``fallback``)."""
    path = Path(path)
    if (path / "model_index.json").exists():
        index = json.loads((path / "model_index.json").read_text())
        library, class_name = index["denoiser"]
        model = getattr(diffusers, class_name).from_pretrained(path / "denoiser")
        edm = EDM.from_scheduler(EDMEulerScheduler.from_pretrained(path / "scheduler"))
    else:
        class_name = json.loads((path / "config.json").read_text())["_class_name"]
        model = getattr(diffusers, class_name).from_pretrained(path)
        edm = fallback or EDM()
    null_label(model)  # fails early, with a clear message, on a model without class conditioning
    return disable_builtin_label_dropout(model), edm


# ---------------------------------------------------------------------------------------------- training
class DenoiserTraining(Method):
    """EDM training of a class-conditional denoiser with label dropout for guidance and a weight EMA."""

    def __init__(self, cfg: TeacherConfig, image_shape, num_classes: int, held_out: dict, seed: int = 0):
        self.cfg, self.image_shape, self.num_classes, self.seed = cfg, image_shape, num_classes, seed
        self.edm = EDM.from_config(cfg)
        self.held_out = held_out

    def setup(self, engine: Engine) -> None:
        self.engine = engine
        model = build_denoiser(self.cfg, self.image_shape, self.num_classes)
        self.n_params = sum(p.numel() for p in model.parameters())
        self.model = engine.register("denoiser", model, optim=self.cfg.optim, max_steps=self.cfg.steps,
                                     batch_size=self.cfg.batch_size)
        self.ema = EMA(engine.unwrap("denoiser"), self.cfg.ema_decay) if self.cfg.ema_decay else None
        if self.ema is not None:
            engine.after_step("denoiser", lambda: self.ema.update(self.engine.unwrap("denoiser")))
        # Noise differs per process (accelerate seeds every process alike) and is checkpointed for exact resume.
        self.rng = torch.Generator(device=engine.device).manual_seed(self.seed * 1009 + engine.rank)

    def train_step(self, batch: dict) -> dict:
        images, labels = batch["images"], batch["labels"]
        drop = torch.rand(len(labels), generator=self.rng, device=self.rng.device) < self.cfg.label_dropout
        labels = torch.where(drop, torch.full_like(labels, self.num_classes), labels)
        loss = edm_loss(self.edm, self.model, images, labels, self.cfg.p_mean, self.cfg.p_std, self.rng)
        self.engine.optimize("denoiser", loss)  # at a step's end the after-step hook updates the EMA
        return {"loss": loss.detach(), "samples": len(images)}

    def sampling_model(self) -> torch.nn.Module:
        return self.ema.model if self.ema is not None else self.engine.unwrap("denoiser")

    def evaluate(self) -> dict:
        """Held-out denoising loss at fixed noise levels and fixed noise (comparable across steps)."""
        gen = torch.Generator().manual_seed(0)
        images, labels = self.held_out["images"], self.held_out["labels"]
        total = 0.0
        for sigma in (0.05, 0.3, 1.0, 5.0):
            noise = torch.randn(images.shape, generator=gen)
            s = torch.full((len(images),), sigma)
            dev = self.engine.device
            denoised = self.edm.denoise(self.sampling_model(), (images + sigma * noise).to(dev), s.to(dev), labels.to(dev))
            total += (self.edm.loss_weight(s.to(dev)) * (denoised - images.to(dev)) ** 2).mean().item() / 4
        return {"loss": total}

    def state_dict(self) -> dict:
        return {"rng": self.rng.get_state(), **({"ema": self.ema.state_dict()} if self.ema is not None else {})}

    def load_state_dict(self, state: dict) -> None:
        self.rng.set_state(state["rng"])
        if self.ema is not None:
            self.ema.load_state_dict(state["ema"])


def _teacher(ctx: StageContext, cfg: TeacherConfig, data) -> dict:
    if cfg.name_or_path:
        return {"pipeline": str(Path(cfg.name_or_path).resolve()), "trained_steps": 0}
    held = {"images": data.held_out_images[:512], "labels": data.held_out_labels[:512]}
    method = DenoiserTraining(cfg, data.image_shape, data.num_classes, held, ctx.cfg.run.seed)
    engine = ctx.engine(max_steps=cfg.steps, optim=cfg.optim, eval_every=0)
    batches = ShuffledBatches(data.train_dict(), cfg.batch_size, ctx.cfg.run.seed, engine.rank, engine.world_size)
    _, final = ctx.fit(method, batches, engine=engine)
    folder = ctx.dir / "pipeline"
    if ctx.is_main:  # the EMA weights (the method's, not a registered model) are what samples
        save_pipeline(EDMClassPipeline(denoiser=method.sampling_model(), scheduler=method.edm.scheduler()), folder)
    ctx.barrier()
    return {"pipeline": str(folder), "trained_steps": engine.step, "n_params": method.n_params,
            "held_out_loss": final["loss"], "initial_held_out_loss": engine.history["initial_eval"]["loss"]}


def sample_in_batches(sample_fn, labels: torch.Tensor, image_shape, seed: int, device, batch: int = 1000):
    """``sample_fn(noise, labels, generator)`` over chunks, with noise from a fixed seed: every sampler gets
    the same initial noise, so comparisons between samplers are paired (``generator`` serves samplers that
    draw fresh noise on the way)."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for start in range(0, len(labels), batch):
        y = labels[start:start + batch]
        noise = torch.randn((len(y), *image_shape), generator=gen)
        out.append(sample_fn(noise.to(device), y.to(device), gen).cpu())
    return torch.cat(out)


def teacher_stage(ctx) -> dict:
    """Runner stage shared by every diffusion paper (DMD2, ILF): train or adopt the EDM teacher.
    Needs ``ctx.cfg.data`` (an ``ImageDataConfig``) and ``ctx.cfg.teacher`` (a ``TeacherConfig``);
    the result's ``pipeline`` is the saved ``EDMClassPipeline`` folder."""
    return _teacher(ctx, ctx.cfg.teacher, load_image_data(ctx.cfg.data))
