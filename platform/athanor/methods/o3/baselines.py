"""The unlearning baselines open-unlearning ships (locuslab/open-unlearning, ``src/trainer/unlearn``),
applied to the same sequential requests as O3: request t fine-tunes the whole model that request
t-1 left, on request t's forget set (trained phrasings) and, where the method has one, on the
retained data (every trained record whose fact no request forgets: the retain set TOFU gives its
methods).

- GradAscent: ``L = -NLL(forget)``.
- GradDiff: ``L = γ · (-NLL(forget)) + α · NLL(retain)`` (γ = α = 1).
- NPO (Zhang et al. 2024): ``L = γ · -(2/β) · mean log σ(-β · (log p_θ(y|x) - log p_ref(y|x)))
  + α · NLL(retain)`` with log p the summed answer log-probability, the reference the model as
  the request found it, β = 0.1, γ = α = 1.
- SimNPO (Fan et al. 2024): ``L = γ · -(2/β) · mean log σ(β · NLL_len(forget) - δ) + α · NLL(retain)``
  with NLL_len the length-normalised NLL, β = 4.5, δ = 0, γ = 0.125, α = 1.

NLL(·) of a batch is the mean token cross-entropy of the answers (HF's loss). The learning rate
and the number of steps per request of every method were tuned on the dev world (data.dev_seed)
by ``python -m athanor.methods.o3.tofu_tune``; never on a report's world.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ...config import ConfigError, OptimConfig, positive
from ...data import ShuffledBatches
from ...engine import Engine, Method
from ...parts.lm import answer_matches, lm_inputs

METHODS = ("grad_ascent", "grad_diff", "npo", "simnpo")
TUNE_COMMAND = "python -m athanor.methods.o3.tofu_tune --run.output_dir DIR"


@dataclass
class BaselineConfig:
    methods: str = "grad_ascent,grad_diff,npo,simnpo"  # comma-separated subset of METHODS ("": none)
    # lr / steps per request, tuned on the dev world (data.dev_seed 1) by tofu_tune (lr 3e-4 / 1e-3 / 3e-3 at
    # 20 steps; the highest forget quality keeping model utility >= 0.9 x retain-only's, else the highest
    # utility: only simnpo kept it on the dev world, at every lr; grad_diff / npo at 3e-4 reached forget
    # quality 0.23 / 0.59 there but utility 0.83 / 0.76)
    grad_ascent_lr: float = 3e-4
    grad_ascent_steps: int = 20
    grad_diff_lr: float = 3e-4
    grad_diff_steps: int = 20
    npo_lr: float = 3e-3
    npo_steps: int = 20
    simnpo_lr: float = 3e-3
    simnpo_steps: int = 20
    npo_beta: float = 0.1
    simnpo_beta: float = 4.5
    simnpo_delta: float = 0.0
    simnpo_gamma: float = 0.125
    retain_weight: float = 1.0  # α
    batch_size: int = 0  # forget records per step (0: the whole request); the retain batch has as many

    def validate(self) -> None:
        unknown = [m for m in self.names() if m not in METHODS]
        if unknown:
            raise ConfigError(f"baselines.methods: unknown {unknown}; known: {', '.join(METHODS)}")
        for m in METHODS:
            positive(getattr(self, f"{m}_lr"), f"baselines.{m}_lr")
            positive(getattr(self, f"{m}_steps"), f"baselines.{m}_steps")
        for key in ("npo_beta", "simnpo_beta"):
            positive(getattr(self, key), f"baselines.{key}")
        positive(self.batch_size, "baselines.batch_size", allow_zero=True)

    def names(self) -> list[str]:
        return [m.strip() for m in self.methods.split(",") if m.strip()]

    def optim(self, method: str) -> OptimConfig:
        return OptimConfig(lr=getattr(self, f"{method}_lr"), schedule="constant", weight_decay=0.0, grad_clip=1.0)


def sequence_nll(model, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row: summed answer NLL and the number of answer tokens (labels != -100)."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    labels = batch["labels"][:, 1:]
    nll = F.cross_entropy(logits[:, :-1].float().transpose(1, 2), labels, ignore_index=-100, reduction="none")
    return nll.sum(1), (labels != -100).sum(1).clamp(min=1)


class Unlearner(Method):
    """One request of a baseline: the full model, the method's loss, a frozen reference for NPO."""

    def __init__(self, method: str, model, forget: dict, retain: dict | None, cfg: BaselineConfig, reference=None,
                 seed: int = 0):
        if method in ("grad_diff", "npo", "simnpo") and retain is None:
            raise ConfigError(f"{method} needs retained data")
        self.method, self.model_unprepared, self.forget, self.retain = method, model, forget, retain
        self.cfg, self.reference, self.seed = cfg, reference, seed

    def setup(self, engine: Engine) -> None:
        self.engine = engine
        n = len(self.forget["input_ids"])
        self.batch_size = (self.cfg.batch_size or n) // engine.world_size
        if self.batch_size < 1:
            raise ConfigError(f"{n} forget records cannot be split over {engine.world_size} processes")
        self.model = engine.register("model", self.model_unprepared, optim=self.cfg.optim(self.method),
                                     max_steps=getattr(self.cfg, f"{self.method}_steps"), batch_size=self.batch_size)
        self.generator = torch.Generator().manual_seed(self.seed * 7919 + engine.rank)
        if self.reference is not None:
            self.reference.to(engine.device).eval().requires_grad_(False)

    def batches(self, engine: Engine) -> ShuffledBatches:
        return ShuffledBatches(self.forget, self.batch_size, self.seed, engine.rank, engine.world_size)

    def _retain_batch(self, device) -> dict:
        rows = torch.randint(len(self.retain["input_ids"]), (self.batch_size,), generator=self.generator)
        return {k: v[rows].to(device) for k, v in lm_inputs(self.retain).items()}

    def forget_loss(self, batch: dict) -> torch.Tensor:
        if self.method in ("grad_ascent", "grad_diff"):
            return -self.model(**lm_inputs(batch)).loss
        nll, tokens = sequence_nll(self.model, batch)
        if self.method == "npo":
            with torch.no_grad():
                ref_nll, _ = sequence_nll(self.reference, batch)
            beta = self.cfg.npo_beta
            return -2.0 / beta * F.logsigmoid(beta * (nll - ref_nll)).mean()  # log p_θ - log p_ref = ref_nll - nll
        beta = self.cfg.simnpo_beta
        return -2.0 / beta * F.logsigmoid(beta * (nll / tokens) - self.cfg.simnpo_delta).mean() * self.cfg.simnpo_gamma

    def train_step(self, batch: dict) -> dict:
        forget = self.forget_loss(batch)
        loss, metrics = forget, {"forget_loss": forget.detach(), "samples": len(batch["input_ids"])}
        if self.method != "grad_ascent":
            retain = self.model(**self._retain_batch(batch["input_ids"].device)).loss
            loss = forget + self.cfg.retain_weight * retain
            metrics["retain_loss"] = retain.detach()
        self.engine.optimize("model", loss)
        return {"loss": loss.detach(), **metrics}

    def evaluate(self) -> dict:
        return {"forget_acc": answer_matches(self.model, self.forget).float().mean().item()}
