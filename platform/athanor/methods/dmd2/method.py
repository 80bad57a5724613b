"""DMD2: "Improved Distribution Matching Distillation for Fast Image Synthesis" (Yin et al. 2024).

A one- or few-step generator G (initialised from the teacher) is trained so that its samples'
distribution matches the teacher's. Two score estimates are compared at a noisy copy of a sample:
the frozen teacher μ_real (with classifier-free guidance w) and a "fake" critic μ_fake (also
initialised from the teacher) trained online to denoise G's samples.

Distribution matching loss (DMD, Yin et al. 2023, eq. 7-8, with its per-sample normalisation): for
x = G(z), σ drawn over the Karras grid at ramp positions u ~ U[u_min, u_max], x_σ = x + σε,

    grad = (μ_fake(x_σ, σ) − μ_real(x_σ, σ)) / mean_pixels |x − μ_real(x_σ, σ)|
    L_DM = ½ ‖x − sg(x − grad)‖²        (so ∇_x L_DM = grad: x moves from the fake score to the real one)

Fake critic (DMD2 §4.1): the EDM denoising loss on sg(G(z)), λ(σ) ‖μ_fake(x_σ, σ) − x‖², with
ln σ ~ N(P_mean, P_std²) as in teacher training.

Two time-scale update rule (DMD2 §4.2): the critic takes ``critic_updates_per_generator_step``
optimizer steps per generator step; here it is the engine's ``every`` rate of the generator, so the
engine counts critic steps and ``engine.due("generator")`` says when G updates.

GAN (DMD2 §4.3): a small head D on the critic's features (DiT: last block; UNet: bottleneck) classifies
re-noised real images against re-noised generator samples (non-saturating loss):
    critic:    softplus(D(F(G(z)_σ))) + softplus(−D(F(x_real,σ)))     (weight ``critic_gan_weight``)
    generator: softplus(−D(F(G(z)_σ)))                                 (weight ``gan_weight``)

Multi-step generator with backward simulation (DMD2 §4.4): G denoises at fixed levels
σ_0 = σ_max > σ_1 > … > σ_{K−1}; sampling alternates x̂ = G(x_k, σ_k) and x_{k+1} = x̂ + σ_{k+1} ε with
fresh noise. Training picks k uniformly; with backward simulation x_k comes from running G itself k
steps from noise without gradients (what G meets at inference), without it from noisy real images.

Generator EMA: sampling uses θ̄ ← d θ̄ + (1 − d) θ (``ema_decay``; 0 disables).

Distributed: generator and critic are two ``engine.register`` calls, i.e. two accelerate ``prepare``
calls (accelerate refuses two models in one call under DeepSpeed). With DDP, passes that must not
synchronise or collect gradients (no-grad sampling, the frozen critic in the generator's GAN loss) use
the unwrapped modules. With DeepSpeed ZeRO-1/2 each model is its own DeepSpeed engine sharing one
config; accelerate's ``backward`` drives only the first, so ``Engine.optimize`` calls the second
engine's ``backward``/``step`` itself; checkpoints hold ``pytorch_model`` and ``pytorch_model_1``.
ZeRO-3 is refused: it partitions the parameters that the unwrapped passes read.
"""
from __future__ import annotations

import contextlib
import copy
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from diffusers.utils import BaseOutput
from torch import nn

from ...config import ConfigError, OptimConfig, TrainConfig, positive
from ...data.batches import ShuffledBatches
from ...data.images import ImageDataConfig, load_image_data
from ...engine import Engine, Method, launch_parallelism
from ...runner import StageContext
from ...parts.diffusion import EDM, EDMClassPipeline, EMA, TeacherConfig, feature_block, load_denoiser, null_label

MULTISTEP = "4step"
VARIANTS = {  # extra DMD2 runs beside the main one: name -> DMD2Config field changes
    MULTISTEP: {"generator_steps": 4},  # the 4-step generator (backward simulation as configured)
    "ratio1": {"critic_updates_per_generator_step": 1},
    "no_gan": {"gan_weight": 0.0},
    "no_ema": {"ema_decay": 0.0},
    "no_backsim": {"generator_steps": 4, "backward_simulation": False},
    # 10x the generator's GAN weight: on digits (300 updates, seeds 0 and 1) dmd2@1 FD 11.32/11.55 against
    # 12.30/12.43 at the default 3e-3, still 1.5x teacher@40 (the GAN term on real data is what DMD2
    # credits for beating the teacher)
    "gan_x10": {"gan_weight": 3e-2},
}


@dataclass
class DMD2Config:
    critic_updates_per_generator_step: int = 5  # TTUR: critic optimizer steps per generator step
    gan_weight: float = 3e-3  # generator's GAN loss weight; 0 removes the GAN head and both GAN losses
    critic_gan_weight: float = 1e-2  # critic's real-vs-fake classification loss weight
    ema_decay: float = 0.99  # generator weight EMA used for sampling; 0 disables
    generator_steps: int = 4  # K denoising steps of the generator (1: one-step generator)
    backward_simulation: bool = True  # train step k on G's own k-step samples (False: noisy real images)
    real_guidance: float = 1.0  # CFG scale of the teacher's (real) score
    batch_size: int = 128  # per process
    critic_lr: float = 0.0  # 0: same as optim.lr
    dm_min_step: float = 0.02  # DM-loss noise: ramp positions u ~ U[min, max] on the Karras grid
    dm_max_step: float = 0.98
    gan_head_hidden: int = 256
    eval_samples: int = 1000  # one-step samples per FD evaluation during training (the FD curve)

    def validate(self) -> None:
        for key in ("critic_updates_per_generator_step", "generator_steps", "batch_size", "gan_head_hidden",
                    "eval_samples", "real_guidance"):
            positive(getattr(self, key), f"dmd2.{key}")
        for key in ("gan_weight", "critic_gan_weight", "critic_lr"):
            positive(getattr(self, key), f"dmd2.{key}", allow_zero=True)
        if not 0 <= self.ema_decay < 1:
            raise ConfigError(f"dmd2.ema_decay={self.ema_decay} must be in [0, 1)")
        if not 0 <= self.dm_min_step < self.dm_max_step <= 1:
            raise ConfigError("dmd2.dm_min_step < dmd2.dm_max_step must lie in [0, 1]")


class CriticOutput(BaseOutput):
    sample: torch.Tensor
    logits: torch.Tensor | None = None


class Critic(nn.Module):
    """The fake score μ_fake (a copy of the teacher) plus, when the GAN is on, a classification head on
    the features of its ``feature_block`` (read with a forward hook, so the denoiser stays stock)."""

    def __init__(self, denoiser: nn.Module, head_hidden: int = 0):
        super().__init__()
        self.denoiser, self.head, self._features = denoiser, None, None
        feature_block(denoiser).register_forward_hook(self._keep_features)
        if head_hidden:
            c = denoiser.config
            with torch.no_grad():
                denoiser(torch.zeros(1, c.in_channels, c.sample_size, c.sample_size), torch.zeros(1),
                         class_labels=torch.zeros(1, dtype=torch.long))
            self.head = nn.Sequential(nn.Flatten(), nn.Linear(self._features[0].numel(), head_hidden), nn.SiLU(),
                                      nn.Linear(head_hidden, 1))

    def _keep_features(self, module, args, output):
        self._features = output[0] if isinstance(output, tuple) else output

    def forward(self, sample, timestep, class_labels, with_logits: bool = False) -> CriticOutput:
        out = self.denoiser(sample, timestep, class_labels=class_labels).sample
        logits = self.head(self._features).squeeze(-1) if with_logits else None
        self._features = None
        return CriticOutput(sample=out, logits=logits)


@contextlib.contextmanager
def frozen(module: nn.Module):
    """Gradients flow through ``module`` to its input but not into its parameters (the generator's GAN
    loss must not touch the critic; DDP/ZeRO would also see stray gradients)."""
    flags = [p.requires_grad for p in module.parameters()]
    module.requires_grad_(False)
    try:
        yield module
    finally:
        for p, flag in zip(module.parameters(), flags):
            p.requires_grad_(flag)


def generator_sigmas(edm: EDM, steps: int) -> torch.Tensor:
    """σ_0 = σ_max > … > σ_{K−1}: the first K points of a (K+1)-point Karras grid (its last point, σ_min,
    is dropped: denoising from there would change nothing)."""
    return edm.karras(torch.linspace(0, 1, steps + 1, dtype=torch.float64)[:-1]).float()


def few_step_sample(edm: EDM, model, noise, labels, sigmas, rng: torch.Generator | None = None) -> torch.Tensor:
    """x̂ = G(σ_0 z); then x̂ = G(x̂ + σ_k ε_k) for k = 1..len(sigmas)−1 with fresh noise each time."""
    x = noise * sigmas[0]
    for k, sigma in enumerate(sigmas):
        denoised = edm.denoise(model, x, sigma.expand(len(x)).to(x.device), labels)
        if k + 1 < len(sigmas):
            fresh = torch.randn(x.shape, generator=rng, device=rng.device if rng is not None else x.device).to(x.device)
            x = denoised + sigmas[k + 1] * fresh
    return denoised


def distribution_matching_loss(x: torch.Tensor, real: torch.Tensor, fake: torch.Tensor) -> torch.Tensor:
    """L_DM = ½ ‖x − sg(x − grad)‖² (mean over elements), grad = (fake − real) / mean_pixels |x − real|;
    ``real``/``fake`` are the two scores' denoised estimates at a noisy copy of x."""
    with torch.no_grad():
        grad = (fake - real) / (x.detach() - real).abs().mean(dim=tuple(range(1, x.ndim)), keepdim=True)
        grad = torch.nan_to_num(grad)
    return 0.5 * F.mse_loss(x, (x - grad).detach())


class DMD2(Method):
    def __init__(self, cfg: DMD2Config, teacher_cfg: TeacherConfig, teacher_dir: str, generator_updates: int,
                 optim: OptimConfig, evaluator=None, num_classes: int = 10, seed: int = 0):
        self.cfg, self.teacher_cfg, self.teacher_dir = cfg, teacher_cfg, teacher_dir
        self.generator_updates, self.optim, self.evaluator = generator_updates, optim, evaluator
        self.num_classes, self.seed = num_classes, seed

    # ------------------------------------------------------------------ setup
    def setup(self, engine: Engine) -> None:
        self.engine = engine
        if engine.parallelism.shards_parameters:
            raise ConfigError("DMD2 runs with DDP or DeepSpeed ZeRO-1/2: ZeRO-3 partitions the parameters that the "
                              "no-grad generator and frozen-critic passes read directly")
        teacher, self.edm = load_denoiser(self.teacher_dir, EDM.from_config(self.teacher_cfg))
        self.null = null_label(teacher)
        self.image_shape = (teacher.config.in_channels, teacher.config.sample_size, teacher.config.sample_size)
        generator = copy.deepcopy(teacher).requires_grad_(True).train()
        gan_on = self.cfg.gan_weight > 0
        critic = Critic(copy.deepcopy(teacher).requires_grad_(True), self.cfg.gan_head_hidden if gan_on else 0)
        self.teacher = engine.register("teacher", teacher, trainable=False)
        ratio = self.cfg.critic_updates_per_generator_step
        critic_optim = OptimConfig(**{**vars(self.optim), "lr": self.cfg.critic_lr or self.optim.lr})
        self.generator = engine.register("generator", generator, optim=self.optim, max_steps=self.generator_updates,
                                         every=ratio, batch_size=self.cfg.batch_size)
        self.critic = engine.register("critic", critic, optim=critic_optim, max_steps=self.generator_updates * ratio,
                                      batch_size=self.cfg.batch_size)
        self.ema = EMA(engine.unwrap("generator"), self.cfg.ema_decay) if self.cfg.ema_decay else None
        if self.ema is not None:
            engine.after_step("generator", lambda: self.ema.update(self.engine.unwrap("generator")))
        self.sigmas = generator_sigmas(self.edm, self.cfg.generator_steps).to(engine.device)
        # Noise differs per process (accelerate seeds every process alike) and is checkpointed for exact resume.
        self.rng = torch.Generator(device=engine.device).manual_seed(self.seed * 1009 + engine.rank)

    def _randn(self, shape) -> torch.Tensor:
        return torch.randn(shape, generator=self.rng, device=self.engine.device)

    def _rand(self, n: int) -> torch.Tensor:
        return torch.rand(n, generator=self.rng, device=self.engine.device)

    def _critic_sigmas(self, n: int) -> torch.Tensor:
        return (torch.randn(n, generator=self.rng, device=self.engine.device) * self.teacher_cfg.p_std
                + self.teacher_cfg.p_mean).exp()

    # ------------------------------------------------------------------ generator
    def _generator_input(self, batch: dict, k: int) -> torch.Tensor:
        """What G sees at its step k: pure noise (k = 0), its own k-step sample re-noised (backward
        simulation) or a re-noised real image."""
        images, labels = batch["images"], batch["labels"]
        if k == 0:
            return self._randn(images.shape) * self.sigmas[0]
        if self.cfg.backward_simulation:
            with torch.no_grad():
                start = few_step_sample(self.edm, self.engine.unwrap("generator"), self._randn(images.shape), labels,
                                        self.sigmas[:k], self.rng)
        else:
            start = images
        return start + self.sigmas[k] * self._randn(images.shape)

    def _generate(self, batch: dict, grad: bool):
        k = int(torch.randint(self.cfg.generator_steps, (1,), generator=self.rng, device=self.engine.device))
        x = self._generator_input(batch, k)
        sigma = self.sigmas[k].expand(len(x))
        if grad:
            return self.edm.denoise(self.generator, x, sigma, batch["labels"]), k
        with torch.no_grad():
            return self.edm.denoise(self.engine.unwrap("generator"), x, sigma, batch["labels"]), k

    def _distribution_matching_loss(self, x: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        u = self.cfg.dm_min_step + (self.cfg.dm_max_step - self.cfg.dm_min_step) * self._rand(len(x))
        sigma = self.edm.karras(u)
        with torch.no_grad():
            noisy = x.detach() + sigma.reshape(-1, 1, 1, 1) * self._randn(x.shape)
            real = self.edm.guided_denoise(self.teacher, noisy, sigma, labels, self.cfg.real_guidance, self.null)
            fake = self.edm.denoise(self.engine.unwrap("critic"), noisy, sigma, labels)
        return distribution_matching_loss(x, real, fake)

    def _generator_gan_loss(self, x: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        sigma = self._critic_sigmas(len(x))
        noisy = x + sigma.reshape(-1, 1, 1, 1) * self._randn(x.shape)
        with frozen(self.engine.unwrap("critic")) as critic:
            _, out = self.edm.denoise(critic, noisy, sigma, labels, return_output=True, with_logits=True)
        return F.softplus(-out.logits).mean()

    def _generator_update(self, batch: dict) -> tuple[torch.Tensor, dict]:
        x, k = self._generate(batch, grad=True)
        dm = self._distribution_matching_loss(x, batch["labels"])
        loss, metrics = dm, {"generator_dm_loss": dm.detach()}
        if self.cfg.gan_weight > 0:
            gan = self._generator_gan_loss(x, batch["labels"])
            loss = loss + self.cfg.gan_weight * gan
            metrics["generator_gan_loss"] = gan.detach()
        norm = self.engine.optimize("generator", loss).grad_norm  # a step's end also updates the EMA (setup)
        if norm is not None:
            metrics["generator_grad_norm"] = norm
        return x.detach(), metrics

    # ------------------------------------------------------------------ critic
    def _critic_update(self, fakes: torch.Tensor, batch: dict) -> dict:
        n, labels = len(fakes), batch["labels"]
        sigma = self._critic_sigmas(n)
        x0, y, sigmas = fakes, labels, sigma
        gan_on = self.cfg.gan_weight > 0
        if gan_on:  # real images ride in the same forward pass (one DDP/ZeRO forward per backward)
            x0 = torch.cat([fakes, batch["images"]])
            y, sigmas = torch.cat([labels, labels]), torch.cat([sigma, self._critic_sigmas(n)])
        noisy = x0 + sigmas.reshape(-1, 1, 1, 1) * self._randn(x0.shape)
        denoised, out = self.edm.denoise(self.critic, noisy, sigmas, y, return_output=True, with_logits=gan_on)
        denoise_loss = (self.edm.loss_weight(sigma) * (denoised[:n] - fakes) ** 2).mean()
        loss, metrics = denoise_loss, {"critic_denoise_loss": denoise_loss.detach()}
        if gan_on:
            fake_logits, real_logits = out.logits[:n], out.logits[n:]
            gan = F.softplus(fake_logits).mean() + F.softplus(-real_logits).mean()
            loss = loss + self.cfg.critic_gan_weight * gan
            metrics.update(critic_gan_loss=gan.detach(), critic_real_acc=(real_logits > 0).float().mean(),
                           critic_fake_acc=(fake_logits < 0).float().mean())
        self.engine.optimize("critic", loss)
        return metrics

    def train_step(self, batch: dict) -> dict:
        metrics = {"samples": len(batch["images"])}
        fakes = None
        if self.engine.due("generator"):
            fakes, gen_metrics = self._generator_update(batch)
            metrics.update(gen_metrics)
        if fakes is None:
            fakes, _ = self._generate(batch, grad=False)
        metrics.update(self._critic_update(fakes, batch))
        return metrics

    # ------------------------------------------------------------------ evaluation and state
    def sampling_generator(self, ema: bool = True) -> nn.Module:
        return self.ema.model if ema and self.ema is not None else self.engine.unwrap("generator")

    def generator_step(self) -> int:
        """Generator updates done so far (the engine counts critic updates)."""
        return -(-self.engine.step // self.cfg.critic_updates_per_generator_step)

    def evaluate(self) -> dict:
        if self.evaluator is None:
            return {}
        gen = torch.Generator().manual_seed(1234)
        labels = torch.arange(self.cfg.eval_samples) % self.num_classes
        noise = torch.randn((len(labels), *self.image_shape), generator=gen).to(self.engine.device)
        out = {"generator_step": self.generator_step()}
        models = {"": self.sampling_generator(True)}
        if self.ema is not None:
            models["_raw"] = self.sampling_generator(False)
        for suffix, model in models.items():
            images = few_step_sample(self.edm, model, noise, labels.to(self.engine.device), self.sigmas[:1])
            out.update({f"{k}{suffix}": v for k, v in self.evaluator(images, labels).items()})
        return out

    def state_dict(self) -> dict:
        state = {"rng": self.rng.get_state()}
        if self.ema is not None:
            state["ema"] = self.ema.state_dict()
        return state

    def load_state_dict(self, state: dict) -> None:
        self.rng.set_state(state["rng"])
        if self.ema is not None:
            self.ema.load_state_dict(state["ema"])


class DMD2Pipeline(EDMClassPipeline):
    """Samples a DMD2 generator: ``pipe(class_labels=[0, 1], num_inference_steps=1)``; up to
    ``len(generator_sigmas)`` steps, each a denoising then (except the last) a fresh re-noising."""

    def __init__(self, denoiser, scheduler, generator_sigmas: list | None = None):
        super().__init__(denoiser=denoiser, scheduler=scheduler)
        self.register_to_config(generator_sigmas=list(generator_sigmas or [scheduler.config.sigma_max]))

    def sample(self, noise, labels, num_inference_steps: int, guidance_scale: float, generator=None):
        sigmas = self.config.generator_sigmas
        if not 1 <= num_inference_steps <= len(sigmas):
            raise ValueError(f"this generator was trained for 1..{len(sigmas)} steps, not {num_inference_steps}")
        sigmas = torch.tensor(sigmas[:num_inference_steps], dtype=torch.float32)
        return few_step_sample(EDM.from_scheduler(self.scheduler), self.denoiser, noise, labels, sigmas, generator)

    def __call__(self, class_labels, num_inference_steps: int = 1, **kwargs):
        return super().__call__(class_labels, num_inference_steps=num_inference_steps, **kwargs)


def train_dmd2(stage_dir: Path, recipe_cfg: TrainConfig, cfg: DMD2Config, teacher_cfg: TeacherConfig,
               teacher_dir: str, data, evaluator) -> dict:
    """One DMD2 run in ``stage_dir`` (outside the runner: tests; the recipe uses ``dmd2_stage``).
    ``recipe_cfg`` gives run (``max_steps`` counts generator updates) and optim."""
    return run_dmd2(StageContext(cfg=recipe_cfg, root=Path(stage_dir), folder="."), cfg, teacher_cfg, teacher_dir,
                    data, evaluator)


def run_dmd2(ctx: StageContext, cfg: DMD2Config, teacher_cfg: TeacherConfig, teacher_dir: str, data,
             evaluator, seed: int | None = None) -> dict:
    """Stage: one DMD2 run; saves the generator (raw and EMA) as diffusers model folders. ``seed``
    (default ``run.seed``) seeds the engine, the method's noise and the batch order: a training seed."""
    ratio = cfg.critic_updates_per_generator_step
    run = ctx.cfg.run
    seed = run.seed if seed is None else seed
    updates = run.max_steps
    engine = ctx.engine(max_steps=updates * ratio, eval_every=run.eval_every * ratio, save_every=run.save_every * ratio,
                        seed=seed)
    method = DMD2(cfg, teacher_cfg, teacher_dir, updates, ctx.cfg.optim, evaluator, data.num_classes, seed)
    batches = ShuffledBatches(data.train_dict(), cfg.batch_size, seed + 2, engine.rank, engine.world_size)
    _, final = ctx.fit(method, batches, engine=engine)
    engine.save_pretrained("generator", ctx.dir / "generator")
    if ctx.is_main and method.ema is not None:  # the EMA copy is the method's, not a registered model
        method.ema.model.save_pretrained(ctx.dir / "generator_ema")
    ctx.barrier()
    return {"generator": str(ctx.dir / ("generator_ema" if method.ema is not None else "generator")),
            "generator_raw": str(ctx.dir / "generator"), "generator_updates": updates,
            "generator_sigmas": method.sigmas.tolist(), "final_eval": final, "world_size": engine.world_size,
            "seed": seed}


def check_launch() -> None:
    """Before any compute: refuse a launch DMD2 cannot run under (see ``DMD2.setup``)."""
    if launch_parallelism().shards_parameters:
        raise ConfigError("DMD2 runs with DDP or DeepSpeed ZeRO-1/2 (launch/zero2*.yaml), not ZeRO-3: ZeRO-3 "
                          "partitions the parameters that the no-grad generator and frozen-critic passes read")


_IMAGES: dict[str, object] = {}


def images(cfg: ImageDataConfig):
    """The image data of ``cfg`` (the recipe's ``data``), loaded once per process and data config."""
    key = repr(cfg)
    if key not in _IMAGES:
        _IMAGES[key] = load_image_data(cfg)
    return _IMAGES[key]
