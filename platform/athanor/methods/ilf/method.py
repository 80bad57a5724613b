"""Distilling the feedback module: cached teacher trajectories, and one ILF step = the teacher's jump.

Trajectories (stage ``trajectories``): for every N in ``ilf.train_steps`` the frozen teacher runs EDM's
Euler sampler with N·``jump`` steps from fixed noise; the states on every ``jump``-th level (the ILF@N
grid, ``pipeline.ilf_sigmas``) are stored in one safetensors file, plus a dev set from other noise.

Distillation (stage ``ilf`` and its variants): with the backbone frozen, only the feedback block and s
are trained so that one Euler step of the backbone-with-feedback from the teacher's state x_k at σ_k
lands on the teacher's state after its ``jump`` steps:

    L = E ‖ x_k + (σ_{k+1} − σ_k)(x_k − D_ILF(x_k; σ_k, y)) / σ_k − x_{k+1}^teacher ‖²

(pairs (k, sample, N) drawn uniformly). This is the error one ILF step adds to the sample, so the
loss weighs every level by its effect on the final image.
"""
from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from ...config import ConfigError, OptimConfig, positive
from ...data.batches import ShuffledBatches
from ...engine import Engine, Method
from ...parts.diffusion import EDM
from .diffusers_pipeline import euler_on_grid, euler_step, ilf_sigmas
from .latent import load_backbone
from .samplers import sampling_device
from .feedback import MODES, FeedbackModule, attach_feedback, backbone_blocks


@dataclass
class ILFConfig:
    # A diffusers DiT pipeline folder or Hub id (facebook/DiT-XL-2-256): ILF on that latent DiT
    # (``latent``) instead of training the pixel-space teacher; "" trains the teacher.
    backbone: str = ""
    # First and last block of the loop region (inclusive): a 2-block loop in the middle of the 8 blocks.
    loop: list[int] = field(default_factory=lambda: [3, 4])
    mode: str = "loop"  # loop (ILF: the loop runs again with the feedback) | once (the no-loop control)
    jump: int = 2  # teacher steps one ILF step replaces (ILF@N samples on the teacher's N·jump grid)
    train_steps: list[int] = field(default_factory=lambda: [3, 4, 6, 8])  # ILF step counts N trained on
    trajectories: int = 800  # cached teacher trajectories per N (training)
    dev_trajectories: int = 200  # per N, other noise: the dev loss (knobs are chosen on it)
    batch_size: int = 128
    steps: int = 250  # optimizer steps of the feedback module (~90 s a run on the shared 2 cores; 10 runs by default)
    seed: int = 0  # feedback initialisation
    # -1: the feedback block is freshly initialised; k >= 0: it starts as a copy of backbone block k's
    # weights (the block kinds are the same, so the state dicts match; s = 0 still makes it vanish).
    init_block: int = -1
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=2e-3, betas=(0.9, 0.99), warmup_steps=25,
                                                                   schedule="cosine", min_lr_ratio=0.05))

    def validate(self) -> None:
        if len(self.loop) != 2 or not 0 <= self.loop[0] <= self.loop[1]:
            raise ConfigError(f"ilf.loop={list(self.loop)} must be [first, last] block indices, first <= last")
        if self.mode not in MODES:
            raise ConfigError(f"ilf.mode={self.mode!r} is not one of: {', '.join(MODES)}")
        if not self.train_steps or any(n < 1 for n in self.train_steps):
            raise ConfigError(f"ilf.train_steps={list(self.train_steps)} must be step counts >= 1")
        if self.init_block < -1:
            raise ConfigError(f"ilf.init_block={self.init_block} must be -1 (fresh) or a block index")
        for key in ("jump", "trajectories", "dev_trajectories", "batch_size", "steps"):
            positive(getattr(self, key), f"ilf.{key}")
        if self.batch_size > self.trajectories:
            raise ConfigError(f"ilf.batch_size={self.batch_size} is larger than ilf.trajectories={self.trajectories}")

    def check_backbone(self, layers: int) -> None:
        if self.loop[1] >= layers:
            raise ConfigError(f"ilf.loop={list(self.loop)} is outside the teacher's {layers} blocks "
                              f"(teacher.layers={layers})")
        if self.init_block >= layers:
            raise ConfigError(f"ilf.init_block={self.init_block} is outside the teacher's {layers} blocks")


# ---------------------------------------------------------------------------------------------- trajectories
@torch.no_grad()
def teacher_trajectories(edm: EDM, teacher, n_steps: int, jump: int, count: int, num_classes: int, seed: int,
                         batch: int = 1000) -> dict:
    """States of the teacher's (n_steps·jump)-step Euler run on the ILF@n_steps levels: (n+1, count, C, H, W)
    (noise drawn on the CPU; the teacher runs where its weights are)."""
    device = next(teacher.parameters()).device
    gen = torch.Generator().manual_seed(seed)
    config = teacher.config
    shape = (config.in_channels, config.sample_size, config.sample_size)
    fine = edm.karras_sigmas(n_steps * jump)
    labels = torch.randint(0, num_classes, (count,), generator=gen)
    states = []
    for start in range(0, count, batch):
        y = labels[start:start + batch].to(device)
        x = (torch.randn((len(y), *shape), generator=gen) * fine[0]).to(device)
        kept = [x.cpu()]
        for k in range(n_steps):
            x = euler_on_grid(edm, teacher, x, y, fine[k * jump:(k + 1) * jump + 1], start=x)
            kept.append(x.float().cpu())
        states.append(torch.stack(kept))
    return {"states": torch.cat(states, 1), "labels": labels, "sigmas": ilf_sigmas(edm, n_steps, jump)}


def trajectories_stage(ctx) -> dict:
    """Stage: cache the teacher's trajectories (train and dev noise) as safetensors."""
    cfg = ctx.cfg.ilf
    teacher, edm = load_backbone(ctx.results["teacher"]["pipeline"])
    teacher.eval().to(sampling_device())
    tensors = {}
    if ctx.is_main:
        for n in cfg.train_steps:
            for split, count, seed in (("train", cfg.trajectories, 1), ("dev", cfg.dev_trajectories, 2)):
                t = teacher_trajectories(edm, teacher, n, cfg.jump, count, teacher.config.num_embeds_ada_norm,
                                         seed=ctx.cfg.run.seed * 1000 + seed * 100 + n)
                tensors.update({f"{split}/{n}/{k}": v.contiguous() for k, v in t.items()})
        save_file(tensors, ctx.dir / "trajectories.safetensors")
    ctx.barrier()
    return {"file": str(ctx.dir / "trajectories.safetensors"), "train_steps": list(cfg.train_steps),
            "pairs": cfg.trajectories * sum(cfg.train_steps)}


def jump_pairs(file: str | Path, split: str, train_steps) -> dict:
    """All (x_k, σ_k, σ_{k+1}, label, x_{k+1}) of a split, flattened over N, k and sample."""
    t = load_file(str(file))
    out = {k: [] for k in ("x", "sigma", "sigma_next", "labels", "target")}
    for n in train_steps:
        states, labels, sigmas = t[f"{split}/{n}/states"], t[f"{split}/{n}/labels"], t[f"{split}/{n}/sigmas"]
        count = states.shape[1]
        for k in range(n):
            out["x"].append(states[k])
            out["target"].append(states[k + 1])
            out["sigma"].append(sigmas[k].expand(count))
            out["sigma_next"].append(sigmas[k + 1].expand(count))
            out["labels"].append(labels)
    return {k: torch.cat(v) for k, v in out.items()}


# ---------------------------------------------------------------------------------------------- distillation
class FeedbackDistillation(Method):
    """Trains a ``FeedbackModule`` on a frozen backbone; the backbone is registered frozen (never updated)."""

    def __init__(self, cfg: ILFConfig, teacher_dir: str, dev: dict):
        self.cfg, self.teacher_dir, self.dev = cfg, teacher_dir, dev

    def setup(self, engine: Engine) -> None:
        self.engine = engine
        backbone, self.edm = load_backbone(self.teacher_dir)
        self.cfg.check_backbone(len(backbone_blocks(backbone)))
        self.backbone = engine.register("backbone", backbone, trainable=False)
        torch.manual_seed(self.cfg.seed)  # the feedback block's initialisation
        feedback = FeedbackModule.for_backbone(backbone, *self.cfg.loop, mode=self.cfg.mode)
        if self.cfg.init_block >= 0:
            feedback.block.load_state_dict(backbone_blocks(backbone)[self.cfg.init_block].state_dict())
        self.n_params = sum(p.numel() for p in feedback.parameters())
        self.feedback = engine.register("feedback", feedback, optim=self.cfg.optim, max_steps=self.cfg.steps,
                                        batch_size=self.cfg.batch_size)
        self.hooks = attach_feedback(self.backbone, self.feedback)

    def jump_loss(self, batch: dict) -> torch.Tensor:
        x_next = euler_step(self.edm, self.backbone, batch["x"], batch["sigma"], batch["sigma_next"], batch["labels"])
        return (x_next - batch["target"]).square().mean()

    def train_step(self, batch: dict) -> dict:
        loss = self.jump_loss(batch)
        self.engine.optimize("feedback", loss)
        return {"loss": loss.detach(), "scale": self.engine.unwrap("feedback").scale.detach(),
                "samples": len(batch["x"])}

    def evaluate(self) -> dict:
        """Dev jump loss, and the same jump taken by the plain backbone (what the feedback must improve)."""
        dev = {k: v.to(self.engine.device) for k, v in self.dev.items()}
        loss = sum(self.jump_loss(b) * len(b["x"]) for b in _chunks(dev, 2000)) / len(dev["x"])
        with self.hooks.disabled():
            plain = sum(self.jump_loss(b) * len(b["x"]) for b in _chunks(dev, 2000)) / len(dev["x"])
        return {"loss": loss, "backbone_loss": plain, "scale": self.engine.unwrap("feedback").scale.item()}


def _chunks(data: dict, size: int):
    n = len(data["x"])
    for start in range(0, n, size):
        yield {k: v[start:start + size] for k, v in data.items()}


# Variants of the main run: each a "+"-joined list of changes (the no-loop control, the
# placement/length attempts, other feedback seeds, the copy initialisation).
VARIANT_HELP = "once | loop=FIRST-LAST | seed=K | init=K (a copy of block K), joined by '+', e.g. once+seed=1"


def variant_config(cfg: ILFConfig, name: str, layers: int) -> ILFConfig:
    """The main config with the variant's changes: ``once`` (no-loop control, same block and training),
    ``loop=a-b`` (another loop region), ``seed=k`` (another feedback seed), ``init=k`` (feedback block
    initialised as a copy of backbone block k)."""
    changes = {}
    for part in name.split("+"):
        key, _, value = part.partition("=")
        try:
            if part == "once":
                changes["mode"] = "once"
            elif key == "loop":
                first, last = (int(v) for v in value.split("-"))
                changes["loop"] = [first, last]
            elif key in ("seed", "init"):
                changes["seed" if key == "seed" else "init_block"] = int(value)
            else:
                raise ValueError
        except ValueError:
            raise ConfigError(f"ilf variant {name!r}: expected {VARIANT_HELP}") from None
    return dataclasses.replace(cfg, **changes)


def train_feedback(ctx, cfg: ILFConfig) -> dict:
    """Stage body: distil one feedback module; saves it (diffusers folder) under ``feedback/``."""
    started = time.time()
    file = ctx.results["trajectories"]["file"]
    engine = ctx.engine(max_steps=cfg.steps, optim=cfg.optim, eval_every=ctx.cfg.run.eval_every)
    method = FeedbackDistillation(cfg, ctx.results["teacher"]["pipeline"], jump_pairs(file, "dev", cfg.train_steps))
    batches = ShuffledBatches(jump_pairs(file, "train", cfg.train_steps), cfg.batch_size, ctx.cfg.run.seed,
                              engine.rank, engine.world_size)
    _, final = ctx.fit(method, batches, engine=engine)
    ctx.save_pretrained(engine, "feedback", ctx.dir / "feedback")
    initial = engine.history["initial_eval"]
    return {"feedback": str(ctx.dir / "feedback"), "loop": list(cfg.loop), "mode": cfg.mode, "seed": cfg.seed,
            "init_block": cfg.init_block, "steps": engine.step,
            "n_params": method.n_params, "dev_loss": final["loss"], "dev_backbone_loss": initial["backbone_loss"],
            "scale": final["scale"], "seconds": time.time() - started}
